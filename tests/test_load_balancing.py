"""Load balancing as DBRX was trained (MegaBlocks' per-layer loss) and exact masks: padding is never a target and
never counted in router statistics; a batch without a real token gives zeros, not NaN."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_config

from dbrx import DbrxForCausalLM
from dbrx.moe import load_balancing_loss

E, K = 8, 2  # tiny_config: 8 experts, top-2


def _model(seed=0, **kw):
    return randomize_(DbrxForCausalLM.from_config(tiny_config(**kw)), seed=seed).train()


def _router_logits(model, *args, **kwargs) -> list[torch.Tensor]:
    """Each layer's router logits (N, E) from the model's own forward, captured by hooks."""
    captured = []
    hooks = [b.ffn.router.register_forward_hook(lambda m, i, o: captured.append(o.detach().double()))
             for b in model.transformer.blocks]
    out = model.compute_loss(*args, **kwargs)
    for h in hooks:
        h.remove()
    return out, captured


def _direct(logits: list[torch.Tensor], real: torch.Tensor) -> tuple[float, list[float], float]:
    """Per-layer E * sum_e f_le * P_le (f = share of the K * N routed rows, P = mean probability), their mean, and
    the pooled transformers form, written out from the router logits over the real tokens only."""
    per_layer, counts_all, probs_all = [], torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    for lg in logits:
        lg = lg[real.reshape(-1)]  # real tokens only
        p = torch.softmax(lg, -1)  # (N, E)
        top = p.topk(K, -1).indices  # (N, K)
        counts = torch.zeros(E, dtype=torch.float64)
        for e in range(E):
            counts[e] = (top == e).sum()
        n = lg.shape[0]
        per_layer.append(float(E * ((counts / (K * n)) * p.mean(0)).sum()))
        counts_all += counts
        probs_all += p.sum(0)
    n_all = sum(int(real.sum()) for _ in logits)
    pooled = float(E * ((counts_all / n_all) * (probs_all / n_all)).sum())
    return sum(per_layer) / len(per_layer), per_layer, pooled


def test_per_layer_loss_against_a_direct_computation():
    model = _model()
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(1))
    out, logits = _router_logits(model, ids)
    mean, per_layer, pooled = _direct(logits, torch.ones_like(ids, dtype=torch.bool))
    assert out.lb_loss.item() == pytest.approx(mean, rel=1e-5)
    assert out.lb_per_layer.tolist() == pytest.approx(per_layer, rel=1e-5)
    pooled_out = model.compute_loss(ids, load_balancing="pooled")
    assert pooled_out.lb_loss.item() == pytest.approx(pooled, rel=1e-5)
    assert abs(pooled - K * mean) > 1e-4  # the two forms really differ (not just by the factor K)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 0.05 * mean, rel=1e-5)


def test_an_overloaded_expert_cannot_hide_behind_another_layer():
    """Two experts, top-1: layer 0 sends 90 % to expert 0, layer 1 90 % to expert 1. Pooled over layers this reads
    as perfectly balanced (1.0 = top_k); per layer it is 2 * (0.9^2 + 0.1^2) = 1.64 in each layer."""
    from dbrx.moe import RouterStats

    n = 10.0

    def layer(share0):
        shares = torch.tensor([share0, 1 - share0])
        return RouterStats(shares * n, shares * n, torch.tensor(0.0), torch.tensor(n))  # counts, prob sums

    stats = [layer(0.9), layer(0.1)]
    assert load_balancing_loss(stats, 2, 1, "pooled").item() == pytest.approx(1.0)
    assert load_balancing_loss(stats, 2, 1, "per_layer").item() == pytest.approx(1.64)
    with pytest.raises(ValueError, match="per_layer, pooled"):
        load_balancing_loss(stats, 2, 1, "mean")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("form", ["per_layer", "pooled"])
def test_padding_changes_no_loss_gradient_or_statistic(form):
    model = _model(seed=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 12), generator=g)

    model.zero_grad()
    ref = model.compute_loss(ids, ids, load_balancing=form, z_loss_weight=1e-3)
    ref.loss.backward()
    ref_grads = _grads(model)

    # right padding on every row, and a third row that is all padding
    pad_ids = torch.cat([torch.cat([ids, torch.randint(0, 128, (2, 5), generator=g)], 1),
                         torch.randint(0, 128, (1, 17), generator=g)])
    mask = torch.zeros(3, 17, dtype=torch.long)
    mask[:2, :12] = 1
    model.zero_grad()
    out = model.compute_loss(pad_ids, pad_ids, attention_mask=mask, load_balancing=form, z_loss_weight=1e-3)
    out.loss.backward()
    for name in ("loss", "lm_loss", "lb_loss", "z_loss", "expert_load", "lb_per_layer"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-6, rtol=1e-5, msg=name)
    assert int(out.n_tokens) == int(ref.n_tokens) and int(out.n_routed) == 2 * 12
    grads = _grads(model)
    for name, gr in ref_grads.items():
        torch.testing.assert_close(grads[name], gr, atol=1e-6, rtol=1e-4, msg=name)


def test_padding_is_never_a_target_without_labels():
    model = _model(seed=4).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    out = model.compute_loss(ids, attention_mask=mask)
    explicit = model.compute_loss(ids, ids.masked_fill(mask == 0, -100), attention_mask=mask)
    assert int(out.n_tokens) == 9 + 6  # shifted targets: row 1 all 9, row 0 positions 1..6
    torch.testing.assert_close(out.loss, explicit.loss)


def test_an_all_padding_batch_contributes_nothing_and_no_nan():
    model = _model(seed=6)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(7))
    out = model.compute_loss(ids, attention_mask=torch.zeros_like(ids), z_loss_weight=1e-3)
    for name in ("loss", "lm_loss", "lb_loss", "z_loss"):
        assert getattr(out, name).item() == 0.0, name
    assert torch.isfinite(out.expert_load).all() and int(out.n_routed) == 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() and not p.grad.abs().sum() for p in model.parameters()
               if p.grad is not None)


def test_doc_ids_with_a_kv_cache_is_a_clear_error():
    model = _model().eval()
    model.setup_cache(1, 16)
    with pytest.raises(ValueError, match="doc_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 16, dtype=torch.long),
              doc_ids=torch.zeros(1, 4, dtype=torch.long), cache_pos=torch.arange(4))


def test_sft_batches_mark_their_padding():
    from dbrx.tokenizer import get_tokenizer
    from dbrx.train.sft import SFTLoader

    convs = [[{"role": "user", "content": "hi " * n}, {"role": "assistant", "content": "ok"}] for n in (1, 5, 9)]
    loader = SFTLoader(convs, seq_len=64, global_batch=3, seed=0, tokenizer=get_tokenizer(), system_prompt=None)
    b = loader.batch(0)
    m = b["attention_mask"].bool()
    assert m.shape == b["input_ids"].shape and (~m).any() and m.any()
    assert (b["input_ids"][~m] == get_tokenizer().pad_id).all()  # padding is exactly the pad-id tail
    assert (b["labels"][~m] == -100).all()
    assert (m.int().diff(dim=1) <= 0).all()  # real tokens, then padding: one boundary per row
