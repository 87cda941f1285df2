"""Parity with `transformers.DbrxForCausalLM` (CPU, fp32) through real safetensors checkpoints, both ways.

The HF model gets non-trivial random weights (LayerNorm weights around 1), is saved with its own
`save_pretrained` and loaded with `dbrx.DbrxForCausalLM.from_pretrained`; logits, loss and the load-balancing
loss must agree. Also: KV-cache decoding equals the full forward, and activation checkpointing does not change
the loss or the gradients.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model, randomize_, tiny_config

from dbrx import DbrxForCausalLM
from dbrx.parallel.activation_checkpoint import apply_activation_checkpointing

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
CLIP = 0.3  # with weights of std 0.05 roughly half of the Wqkv outputs exceed this (checked below)

# (id, config overrides): GQA ratios 1 / 2 / 4, clip_qkv on and off, top-k 1..E, normalisation p = 1 / 2 / None,
# non-default rope theta.
CASES = [
    ("mha-clip-top2", dict(kv_n_heads=4, clip_qkv=CLIP, moe_top_k=2, moe_normalize_expert_weights=1.0,
                           rope_theta=10000.0)),
    ("gqa2-noclip-top1-nonorm", dict(kv_n_heads=2, clip_qkv=None, moe_top_k=1, moe_normalize_expert_weights=None,
                                     rope_theta=1234.5)),
    ("mqa-clip-topE", dict(kv_n_heads=1, clip_qkv=CLIP, moe_top_k=8, moe_normalize_expert_weights=1.0,
                           rope_theta=500000.0)),
    ("gqa2-noclip-top3-p2", dict(kv_n_heads=2, clip_qkv=None, moe_top_k=3, moe_normalize_expert_weights=2.0,
                                 rope_theta=77.0)),
]


def _pair(tmp_path, overrides, seed=0):
    """(HF model, our model loaded from the HF model's safetensors checkpoint)."""
    cfg = tiny_config(**overrides)
    hf = make_hf_model(cfg, seed=seed)
    hf.save_pretrained(str(tmp_path / "hf"))
    if cfg.attn_config.clip_qkv is None:  # the HF side ran with HF_NO_CLIP; we must accept a real null
        cfg.save(tmp_path / "hf" / "config.json")
    ours = DbrxForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.attn_config.clip_qkv == cfg.attn_config.clip_qkv
    return hf, ours


def _batch(seed=1, B=2, T=12, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def _left_padded(ids, pads=(4, 0)):
    mask = torch.ones_like(ids)
    for b, n in enumerate(pads):
        mask[b, :n] = 0
    return mask


@pytest.mark.parametrize("overrides", [c[1] for c in CASES], ids=[c[0] for c in CASES])
@torch.no_grad()
def test_logits_and_losses_match_transformers(tmp_path, overrides):
    hf, ours = _pair(tmp_path, overrides)
    ids = _batch()
    labels = ids.clone()
    labels[0, 5] = -100

    captured = []
    hook = ours.transformer.blocks[0].norm_attn_norm.attn.Wqkv.register_forward_hook(
        lambda mod, inp, out: captured.append(out))
    logits = ours(ids)
    hook.remove()
    if overrides["clip_qkv"] is not None:  # the clamp really binds (but not everywhere)
        frac = (captured[0].abs() > overrides["clip_qkv"]).float().mean().item()
        assert 0.05 < frac < 0.95, frac

    ref = hf(ids, labels=labels, output_router_logits=True)
    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)
    out = ours.compute_loss(ids, labels, load_balancing="pooled")  # transformers pools the layers
    torch.testing.assert_close(out.lb_loss, ref.aux_loss.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert out.lb_loss.item() > 0.9  # E * sum f_e P_e >= ~1: a real value, not a placeholder zero


@pytest.mark.parametrize("overrides", [CASES[0][1], CASES[1][1]], ids=[CASES[0][0], CASES[1][0]])
@torch.no_grad()
def test_left_padded_batch_matches_transformers(tmp_path, overrides):
    hf, ours = _pair(tmp_path, overrides)
    ids = _batch(seed=2)
    mask = _left_padded(ids)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 4] = -100  # the first real token: its prediction would come from a padding position's logits

    ref = hf(ids, attention_mask=mask, position_ids=pos, labels=labels, output_router_logits=True)
    logits = ours(ids, attention_mask=mask)  # positions default to the same count over real tokens
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref.logits[real], atol=ATOL, rtol=0)
    out = ours.compute_loss(ids, labels, attention_mask=mask, load_balancing="pooled")
    torch.testing.assert_close(out.lb_loss, ref.aux_loss.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    # padding changed nothing for the real tokens of row 0: same logits as the unpadded sequence alone
    alone = ours(ids[:1, 4:])
    torch.testing.assert_close(logits[0, 4:], alone[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_transformers_loads_our_checkpoint(tmp_path):
    cfg = tiny_config(kv_n_heads=2, clip_qkv=CLIP, moe_top_k=2, rope_theta=3000.0)
    ours = randomize_(DbrxForCausalLM.from_config(cfg, seed=0), seed=3).eval()
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.DbrxForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert hf.dtype == torch.float32
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()  # the head stays untied
    assert hf.config.rope_parameters["rope_theta"] == 3000.0
    ids = _batch(seed=4)
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


def _decode_all(model, ids, mask, T0):
    """Prefill T0 tokens into the KV cache, then feed the rest one at a time; returns logits (B, T, V)."""
    B, T = ids.shape
    max_len = T + 3
    model.setup_cache(B, max_len)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache_mask = torch.zeros(B, max_len, dtype=torch.long)
    cache_mask[:, :T0] = mask[:, :T0]
    outs = [model(ids[:, :T0], attention_mask=cache_mask, position_ids=pos[:, :T0], cache_pos=torch.arange(T0))]
    for t in range(T0, T):
        cache_mask[:, t] = mask[:, t]
        outs.append(model(ids[:, t:t + 1], attention_mask=cache_mask, position_ids=pos[:, t:t + 1],
                          cache_pos=torch.tensor([t])))
    model.clear_cache()
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@torch.no_grad()
def test_kv_cache_decoding_matches_full_forward(tmp_path, padded):
    _, ours = _pair(tmp_path, CASES[2][1])  # MQA with clipping
    ids = _batch(seed=5, T=11)
    mask = _left_padded(ids, pads=(3, 0)) if padded else torch.ones_like(ids)
    full = ours(ids, attention_mask=mask if padded else None)
    step = _decode_all(ours, ids, mask, T0=5)
    real = mask.bool()
    torch.testing.assert_close(step[real], full[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_loss_and_grads(mode):
    cfg = tiny_config(clip_qkv=CLIP, moe_jitter_eps=0.0)
    model = randomize_(DbrxForCausalLM.from_config(cfg, seed=0), seed=6).train()
    ids = _batch(seed=7, T=16)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model.compute_loss(ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    apply_activation_checkpointing(model, "none")
    ref_loss, ref_grads = loss_and_grads()
    apply_activation_checkpointing(model, mode)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())
