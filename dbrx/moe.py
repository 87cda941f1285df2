"""Dropless mixture-of-experts FFN: router, stacked GLU experts, load-balancing statistics.

Shape legend:
  B batch, T sequence, N = B*T tokens, D d_model, F ffn_hidden_size (per expert),
  E experts, K experts chosen per token (top-k), R = N*K routed rows (token, slot) pairs.

Every token reaches its K experts (no capacity factor, nothing dropped), so a token's output never depends on
the other tokens of the batch. Routed rows are sorted by expert (stable) and run through grouped matmuls over
the stacked expert weights `w1, v1, w2: (E, F, D)`; a decode step on the CPU (inference, one token) runs only its
K chosen experts instead. The kernels and that choice live in `dbrx.kernels.experts`. Router statistics are
computed only when asked (`with_stats`): training and evaluation losses, not inference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import DbrxConfig
from .kernels.experts import expert_glu


class RouterStats(NamedTuple):
    """Per-layer routing sums over the (non-padding) tokens of a forward pass; summed over layers later."""

    counts: torch.Tensor  # (E,) routed (token, slot) pairs per expert
    prob_sum: torch.Tensor  # (E,) summed router probability per expert
    z_sum: torch.Tensor  # () summed logsumexp(router logits)^2
    n_tokens: torch.Tensor  # () number of tokens counted


class Router(nn.Module):
    def __init__(self, d_model: int, n_experts: int, jitter_eps: float | None):
        super().__init__()
        self.layer = nn.Linear(d_model, n_experts, bias=False)
        self.jitter_eps = jitter_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, E)
        if self.training and self.jitter_eps:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x = x * noise  # a new tensor: the residual stream is never modified in place
        return self.layer(x)


class ExpertGLU(nn.Module):
    """The stacked expert weights: out_e(x) = (silu(x @ w1_e^T) * (x @ v1_e^T)) @ w2_e."""

    def __init__(self, n_experts: int, ffn_hidden_size: int, d_model: int):
        super().__init__()
        shape = (n_experts, ffn_hidden_size, d_model)  # (E, F, D)
        self.w1 = nn.Parameter(torch.empty(shape))  # gate
        self.v1 = nn.Parameter(torch.empty(shape))  # up
        self.w2 = nn.Parameter(torch.empty(shape))  # down (not transposed)


class Experts(nn.Module):
    """The experts' compute over routed tokens: the seam where adapters (dbrx.lora) replace this module."""

    def __init__(self, cfg: DbrxConfig):
        super().__init__()
        f = cfg.ffn_config
        self.mlp = ExpertGLU(f.moe_num_experts, f.ffn_hidden_size, cfg.d_model)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, backend: str = "auto",
                recompute: bool = False) -> torch.Tensor:
        """x (N, D), router weights (N, K) fp32, expert ids (N, K) -> (N, D), see expert_glu."""
        w1, v1, w2 = self.mlp.w1, self.mlp.v1, self.mlp.w2
        if torch.is_autocast_enabled(x.device.type):  # autocast does not reach the grouped GEMMs: cast as it would
            dt = torch.get_autocast_dtype(x.device.type)
            x, w1, v1, w2 = x.to(dt), w1.to(dt), v1.to(dt), w2.to(dt)
        return expert_glu(x, weights.to(x.dtype), idx, w1, v1, w2, backend=backend, recompute=recompute)


class MoE(nn.Module):
    def __init__(self, cfg: DbrxConfig):
        super().__init__()
        f = cfg.ffn_config
        self.n_experts, self.top_k = f.moe_num_experts, f.moe_top_k
        self.normalize_p = f.moe_normalize_expert_weights
        self.router = Router(cfg.d_model, f.moe_num_experts, f.moe_jitter_eps)
        self.experts = Experts(cfg)
        self.backend = "auto"  # see dbrx.kernels.experts.BACKENDS

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, E) logits -> probs (N, E) fp32, top-k weights (N, K) fp32, top-k expert ids (N, K)."""
        probs = torch.softmax(logits.float(), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_p is not None:
            weights = weights / weights.norm(p=self.normalize_p, dim=-1, keepdim=True)
        return probs, weights, idx

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, recompute: bool = False,
                with_stats: bool = True) -> tuple[torch.Tensor, RouterStats | None]:
        """x: (B, T, D); token_mask: (B, T) bool, False for padding (excluded from the statistics only);
        recompute: keep no (routed rows, F) activations for backward, recompute them there (see expert_glu);
        with_stats: False for inference (no router statistics computed; None returned)."""
        B, T, D = x.shape
        x_nd = x.reshape(B * T, D)  # (N, D)
        logits = self.router(x_nd)  # (N, E)
        probs, weights, idx = self.route(logits)

        y_nd = self.experts(x_nd, weights, idx, backend=self.backend, recompute=recompute)  # (N, D)

        stats = self.stats(logits, probs, idx, token_mask) if with_stats else None
        return y_nd.view(B, T, D), stats

    def stats(self, logits, probs, idx, token_mask) -> RouterStats:
        N = probs.shape[0]
        m = probs.new_ones(N) if token_mask is None else token_mask.reshape(N).to(probs.dtype)  # (N,)
        slot_mask = m[:, None].expand(N, self.top_k).reshape(-1)  # (N*K,) as idx.reshape(-1); no repeat_interleave
        counts = probs.new_zeros(self.n_experts).scatter_add_(0, idx.reshape(-1), slot_mask)  # (E,)
        prob_sum = (probs * m[:, None]).sum(0)  # (E,)
        z_sum = (torch.logsumexp(logits.float(), dim=-1).square() * m).sum()
        return RouterStats(counts, prob_sum, z_sum, m.sum())


LOAD_BALANCING = ("per_layer", "pooled")


def load_balancing_loss(stats: list[RouterStats], n_experts: int, top_k: int, form: str = "per_layer") -> torch.Tensor:
    """The load-balancing loss E * sum_e f_e * P_e (f: share of routed rows, P: mean router probability).

    - ``per_layer`` (MegaBlocks, as DBRX was trained): each layer's own f_le = counts_le / (K * N_l) and
      P_le = prob_sum_le / N_l, averaged over layers; 1.0 when every layer is balanced. An overloaded expert in
      one layer cannot hide behind an idle one in another.
    - ``pooled`` (transformers' `load_balancing_loss_func`): counts and probabilities summed over all layers first,
      f_e = counts_e / N (top_k slots counted, so balanced = top_k).
    Padding never counts (the stats hold real tokens only); a layer with no real token contributes 0, not NaN.
    """
    if form not in LOAD_BALANCING:
        raise ValueError(f"load balancing must be one of {', '.join(LOAD_BALANCING)}, got {form!r}")
    counts = torch.stack([s.counts for s in stats])  # (L, E)
    prob_sum = torch.stack([s.prob_sum for s in stats])  # (L, E)
    n = torch.stack([s.n_tokens for s in stats])  # (L,)
    if form == "pooled":
        rows = n.sum().clamp_min(1)
        return n_experts * torch.sum((counts.sum(0) / rows) * (prob_sum.sum(0) / rows))
    return load_balance_per_layer(stats, n_experts, top_k).mean()


def load_balance_per_layer(stats: list[RouterStats], n_experts: int, top_k: int) -> torch.Tensor:
    """(L,) each layer's own E * sum_e f_le * P_le (1.0 = balanced): the per-layer loss before the mean."""
    counts = torch.stack([s.counts for s in stats])  # (L, E)
    n = torch.stack([s.n_tokens for s in stats]).clamp_min(1)[:, None]  # (L, 1)
    prob_sum = torch.stack([s.prob_sum for s in stats])
    return n_experts * ((counts / (top_k * n)) * (prob_sum / n)).sum(-1)


def router_z_loss(stats: list[RouterStats]) -> torch.Tensor:
    """Mean over layers and tokens of logsumexp(router logits)^2 (ST-MoE)."""
    return torch.stack([s.z_sum for s in stats]).sum() / torch.stack([s.n_tokens for s in stats]).sum().clamp_min(1)


def expert_load(stats: list[RouterStats]) -> torch.Tensor:
    """(L, E): the share of routed (token, slot) pairs each expert received, per layer."""
    counts = torch.stack([s.counts for s in stats])  # (L, E)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


__all__ = ["MoE", "Router", "RouterStats", "LOAD_BALANCING", "load_balancing_loss", "load_balance_per_layer",
           "router_z_loss", "expert_load"]
