"""DBRX as plain single-device PyTorch.

How DBRX differs from a plain GPT decoder:
- attention: one fused `Wqkv` projection whose output is clamped to [-clip_qkv, clip_qkv] before the split;
  grouped-query attention (n_heads query heads share kv_n_heads KV heads); rotary embeddings (rotate-half
  form, theta 5e5); no biases anywhere;
- LayerNorm without bias (norm_1 before attention, norm_2 before the FFN, norm_f at the end);
- the FFN is a fine-grained mixture of experts: 16 GLU/SiLU experts, 4 chosen per token (see moe.py);
- untied input embedding and output head.

Activation checkpointing, sharding, compilation and quantization are applied to this model from outside
(dbrx.parallel, ...). Module and parameter names follow the Hugging Face checkpoint layout
(`transformer.blocks.{i}.norm_attn_norm.attn.Wqkv` ...), except that expert weights are stacked `(E, F, D)`
tensors (dbrx.hf_checkpoint reshapes them). Imports: config, kernels, moe (and hf_checkpoint, for from_pretrained).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import DbrxConfig
from .kernels import attention
from .kernels.loss import linear_cross_entropy
from .kernels.paged_attention import PagedMetadata, paged_attend
from .moe import MoE, RouterStats, expert_load, load_balance_per_layer, load_balancing_loss, router_z_loss


# ---- rotary embeddings --------------------------------------------------------------------------------
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, head_dim) in fp32 (rotate-half layout: the two halves repeat)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd): x * cos + rotate_half(x) * sin, computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


# ---- KV cache -------------------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Preallocated keys and values, written by index so that a decode step has static shapes."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)  # (B, kvH, Tmax, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (T,) slots; k, v (B, kvH, T, hd) -> the whole cache (B, kvH, Tmax, hd)."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v


# ---- attention ------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: DbrxConfig):
        super().__init__()
        a = cfg.attn_config
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, a.kv_n_heads, cfg.head_dim
        self.clip_qkv, self.rope_theta, self.pdrop = a.clip_qkv, a.rope_theta, a.attn_pdrop
        self.Wqkv = nn.Linear(cfg.d_model, cfg.qkv_dim, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_pos=None, paged=None):
        """x (B, T, D); cos/sin (B, 1, T, hd); mask: None (causal) or bool (B, 1, T, S), True = may attend.

        paged: (PagedMetadata, k_cache, v_cache) for the serving engine's ragged step: x is (1, N, D), the N new
        tokens of several sequences; their K/V go to the engine's paged cache (dbrx.kernels.paged_attention)."""
        B, T, _ = x.shape
        qkv = self.Wqkv(x)  # (B, T, D + 2*kvH*hd)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        kv_dim = self.kv_heads * self.head_dim
        q, k, v = qkv.split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kvH, T, hd)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kvH, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_heads != self.kv_heads
        if paged is not None:  # (1, H, N, hd) -> (N, H, hd)
            y = paged_attend(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), *paged[1:],
                             paged[0], gqa)  # (N, H, hd)
            return self.out_proj(y.reshape(B, T, -1))  # (1, N, D)
        if cache_pos is not None:
            k, v = self.cache.update(cache_pos, k, v)  # (B, kvH, Tmax, hd)
        if attention.is_block_mask(mask):  # packed documents on CUDA: no T x T mask (dbrx.kernels.attention)
            return self.out_proj(attention.flex_attend(q, k, v, mask, gqa).transpose(1, 2).reshape(B, T, -1))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa,
            dropout_p=self.pdrop if self.training else 0.0,
        )  # (B, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class NormAttentionNorm(nn.Module):
    def __init__(self, cfg: DbrxConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = Attention(cfg)
        self.norm_2 = nn.LayerNorm(cfg.d_model, bias=False)


class Block(nn.Module):
    def __init__(self, cfg: DbrxConfig):
        super().__init__()
        self.norm_attn_norm = NormAttentionNorm(cfg)
        self.ffn = MoE(cfg)
        self.resid_pdrop = cfg.resid_pdrop

    def forward(self, x, cos, sin, mask, token_mask=None, cache_pos=None,
                with_stats: bool = True) -> tuple[torch.Tensor, RouterStats | None]:
        return self.moe(*self.attend(x, cos, sin, mask, cache_pos), token_mask, with_stats=with_stats)

    def attend(self, x, cos, sin, mask, cache_pos=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half: the residual stream h (B, T, D) after attention, and norm_2(h), the MoE's input."""
        n = self.norm_attn_norm
        h = x + F.dropout(n.attn(n.norm_1(x), cos, sin, mask, cache_pos), self.resid_pdrop, self.training)
        return h, n.norm_2(h)

    def forward_paged(self, x, cos, sin, paged) -> torch.Tensor:
        """The serving step (x (1, N, D), see Attention.forward): no dropout, no router statistics."""
        n = self.norm_attn_norm
        h = x + n.attn(n.norm_1(x), cos, sin, None, paged=paged)
        return h + self.ffn(n.norm_2(h), with_stats=False)[0]

    def moe(self, h, normed, token_mask=None, recompute: bool = False,
            with_stats: bool = True) -> tuple[torch.Tensor, RouterStats | None]:
        """The MoE half; `recompute` has the experts recompute their gate/up activations in backward."""
        y, stats = self.ffn(normed, token_mask, recompute=recompute, with_stats=with_stats)
        return h + F.dropout(y, self.resid_pdrop, self.training), stats


class Transformer(nn.Module):
    def __init__(self, cfg: DbrxConfig):
        super().__init__()
        if torch.empty(0).is_meta:  # built on the meta device (from_pretrained): skip nn.Embedding's own init, whose
            # normal_ on meta tensors imports torch._dynamo (seconds at startup); the weights are assigned next anyway
            self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model,
                                    _weight=nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model)))
        else:
            self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model, bias=False)


@dataclass
class LossOutput:
    loss: torch.Tensor  # lm_loss + moe_loss_weight * lb_loss (+ z_loss_weight * z_loss)
    lm_loss: torch.Tensor
    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_load: torch.Tensor  # (L, E) share of routed pairs per expert
    n_tokens: torch.Tensor | None = None  # tokens that carried loss
    lb_per_layer: torch.Tensor | None = None  # (L,) each layer's E * sum_e f_le * P_le (1.0 = balanced)
    n_routed: torch.Tensor | None = None  # real (non-padding) tokens routed, per layer


class DbrxForCausalLM(nn.Module):
    def __init__(self, cfg: DbrxConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: DbrxConfig, device=None, dtype=None, seed: int | None = None) -> DbrxForCausalLM:
        """Build and randomly initialise a model (`device="meta"` allocates nothing)."""
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = cls(cfg)
        return model.to(dtype) if dtype is not None else model

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith(("norm_1.weight", "norm_2.weight", "norm_f.weight")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, allow_nonfinite: bool = False) -> DbrxForCausalLM:
        """Load a Hugging Face-format DBRX checkpoint directory (stacked or split experts; see dbrx.hf_checkpoint).

        The model is built on the meta device and each tensor is read from the memory-mapped files, converted and
        assigned, so the weights exist once. dtype: default the checkpoint's; device: default CPU.
        """
        from .hf_checkpoint import read_checkpoint

        with read_checkpoint(path, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite) as (cfg, tensors):
            model = cls.from_config(cfg, device="meta")
            for name, t in tensors:
                mod_name, _, leaf = name.rpartition(".")
                module = model.get_submodule(mod_name)
                module._parameters[leaf] = nn.Parameter(t, requires_grad=module._parameters[leaf].requires_grad)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        assert not left, f"tensors left on the meta device after loading: {left[:5]}"
        return model

    def save_pretrained(self, path, max_shard_bytes: int = 4 * 2**30, dtype=None) -> None:
        """Write `config.json` and safetensors shards in the Hugging Face (stacked experts) layout, atomically."""
        from .hf_checkpoint import save_state_dict

        save_state_dict(self.state_dict(), self.config, path, max_shard_bytes=max_shard_bytes, dtype=dtype)

    # ---- KV cache -------------------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, dtype=None, device=None) -> None:
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len {self.config.max_seq_len}")
        p = self.transformer.norm_f.weight  # a float weight even when the head is quantized (dbrx.quant)
        for block in self.transformer.blocks:
            attn = block.norm_attn_norm.attn
            attn.cache = KVCache(batch, max_len, attn.kv_heads, attn.head_dim, dtype or p.dtype, device or p.device)

    def clear_cache(self) -> None:
        for block in self.transformer.blocks:
            block.norm_attn_norm.attn.cache = None

    # ---- forward --------------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache_pos: torch.Tensor | None = None,
        with_stats: bool = True,
    ) -> tuple[torch.Tensor, list[RouterStats]]:
        """Final normed hidden states (B, T, D) and each layer's router statistics (none with `with_stats=False`,
        for inference: the list is then empty, unless autograd records, see below).

        input_ids (B, T). attention_mask (B, T) 1 = real token, 0 = padding; with `cache_pos` it is (B, Tmax)
        over the cache slots. position_ids (B, T): defaults to positions counted over real tokens. doc_ids
        (B, T): tokens attend only within their own document (packed sequences). cache_pos (T,): the cache
        slots these tokens are written to (after `setup_cache`). While autograd records, the blocks are called
        with the six arguments that dbrx.parallel's checkpoint wrappers take, and compute their statistics.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        dev = input_ids.device
        if doc_ids is not None and cache_pos is not None:
            raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache (cache_pos): decode one "
                             "document per row instead")
        if position_ids is None:
            if cache_pos is not None:
                position_ids = cache_pos[None].expand(B, T)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            else:
                position_ids = torch.arange(T, device=dev)[None].expand(B, T)
        if attention.use_flex(doc_ids, cache_pos):
            mask = attention.doc_block_mask(doc_ids, attention_mask)
        else:
            mask = build_attention_mask(T, attention_mask, doc_ids, cache_pos, dev)
        with_stats = with_stats or torch.is_grad_enabled()
        token_mask = None if attention_mask is None or not with_stats else attention_mask.bool()  # (B, T|Tmax)
        if token_mask is not None and cache_pos is not None:
            token_mask = token_mask[:, cache_pos]  # (B, T): the slots written now
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.attn_config.rope_theta)

        x = self.transformer.wte(input_ids)  # (B, T, D)
        x = F.dropout(x, self.config.emb_pdrop, self.training)
        stats: list[RouterStats] = []
        for block in self.transformer.blocks:  # (activation checkpointing wraps block.forward from outside)
            if with_stats:
                x, s = block(x, cos, sin, mask, token_mask, cache_pos)
                stats.append(s)
            else:
                x, _ = block(x, cos, sin, mask, None, cache_pos, False)
        return self.transformer.norm_f(x), stats

    def forward(self, input_ids, attention_mask=None, position_ids=None, doc_ids=None, cache_pos=None):
        """Token ids (B, T) -> logits (B, T, V); no router statistics."""
        h, _ = self.hidden_states(input_ids, attention_mask, position_ids, doc_ids, cache_pos, with_stats=False)
        return self.lm_head(h)

    def forward_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PagedMetadata,
                      kv_caches: list[tuple[torch.Tensor, torch.Tensor]], logits_indices: torch.Tensor) -> torch.Tensor:
        """The serving engine's step over a ragged batch: input_ids, positions (N,) the new tokens of several
        sequences, flattened; meta where their K/V go and what each sequence sees; kv_caches one (k, v) pair per
        layer, each (blocks, block_size, kvH, hd); logits_indices (M,) the tokens whose next-token logits are
        wanted (the last of each sequence, or every prompt token for prompt log-probabilities) -> (M, V)."""
        cos, sin = rope_cos_sin(positions[None], self.config.head_dim, self.config.attn_config.rope_theta)
        x = self.transformer.wte(input_ids)[None]  # (1, N, D)
        for block, (k_cache, v_cache) in zip(self.transformer.blocks, kv_caches, strict=True):
            x = block.forward_paged(x, cos, sin, (meta, k_cache, v_cache))
        return self.lm_head(self.transformer.norm_f(x[0, logits_indices]))  # (M, D) -> (M, V)

    def compute_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        shift: bool = True,
        z_loss_weight: float = 0.0,
        load_balancing: str = "per_layer",
    ) -> LossOutput:
        """Next-token cross-entropy (labels -100 ignored) plus the weighted load-balancing loss.

        With `shift=True` labels are aligned with input_ids (as in transformers) and shifted here; with
        `shift=False` labels[t] is already the target for position t. Padding (attention_mask 0) is never a target
        and never counted in the router statistics; a batch without a real token gives zero losses, not NaN.
        load_balancing: 'per_layer' (MegaBlocks, as DBRX was trained) or 'pooled' (transformers'; see moe.py).
        """
        labels = input_ids if labels is None else labels
        if attention_mask is not None:
            if attention_mask.shape != labels.shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, labels "
                                 f"{tuple(labels.shape)}")
            labels = labels.masked_fill(attention_mask == 0, -100)  # (B, T): padding is never a target
        h, stats = self.hidden_states(input_ids, attention_mask, position_ids, doc_ids)
        if shift:
            h, labels = h[:, :-1], labels[:, 1:]
        n_tokens = (labels != -100).sum()
        # the head and the loss in chunks: no fp32 (B, T, V) logits are kept (see kernels/loss.py)
        lm = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, labels.reshape(-1))  # (N, D), (N,)
        lm = lm / n_tokens.clamp_min(1)
        f = self.config.ffn_config
        lb = load_balancing_loss(stats, f.moe_num_experts, f.moe_top_k, load_balancing)
        z = router_z_loss(stats)
        loss = lm + f.moe_loss_weight * lb + (z_loss_weight * z if z_loss_weight else 0.0)
        per_layer = load_balance_per_layer(stats, f.moe_num_experts, f.moe_top_k).detach()
        return LossOutput(loss, lm, lb, z, expert_load(stats).detach(), n_tokens, per_layer, stats[0].n_tokens)


def build_attention_mask(T, attention_mask, doc_ids, cache_pos, device) -> torch.Tensor | None:
    """Boolean (B|1, 1, T, S) mask, True = may attend; None when plain causal attention suffices."""
    if cache_pos is not None:  # queries at slots cache_pos attend to cache slots <= their own
        S = attention_mask.shape[-1] if attention_mask is not None else None
        if S is None:
            raise ValueError("decoding with a KV cache needs attention_mask over the cache slots (B, Tmax)")
        slots = torch.arange(S, device=device)
        allowed = slots[None, :] <= cache_pos[:, None]  # (T, S)
        allowed = allowed[None] & attention_mask.bool()[:, None, :]  # (B, T, S)
        allowed = allowed | (slots[None, None, :] == cache_pos[None, :, None])  # a padding query sees itself
        return allowed[:, None]
    if attention_mask is None and doc_ids is None:
        return None
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    allowed = causal[None]  # (1, T, T)
    if attention_mask is not None:
        if attention_mask.shape[-1] != T:
            raise ValueError(f"attention_mask has length {attention_mask.shape[-1]}, input_ids {T}")
        allowed = allowed & attention_mask.bool()[:, None, :]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)[None]  # never an empty row
    return allowed[:, None]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DbrxForCausalLM", "LossOutput", "KVCache", "build_attention_mask"]
