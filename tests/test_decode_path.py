"""The decode path's economies: no router statistics at inference, the last position's logits only, the column-major
fp32 head, and compiled decoding of float and quantized models (the experts' batch-1 loop inside the graph)."""

from __future__ import annotations

import pytest
import torch

from dbrx.bench import compiled_decode_step, decode_greedy, decode_step
from dbrx.config import DbrxConfig
from dbrx.loading import column_major_head
from dbrx.model import DbrxForCausalLM
from dbrx.parallel.activation_checkpoint import apply_activation_checkpointing


def demo_shaped(**kw) -> DbrxForCausalLM:
    """dbrx-demo's widths (d_model 64, ffn 112, 16 experts choose 4), a small vocabulary."""
    cfg = DbrxConfig.from_preset("dbrx-demo", n_layers=2, vocab_size=512, max_seq_len=64, **kw)
    return DbrxForCausalLM.from_config(cfg, seed=0).eval()


def test_hidden_states_without_stats_are_the_same_and_skip_the_router_statistics(monkeypatch):
    model = demo_shaped()
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h, stats = model.hidden_states(ids, mask)
        assert len(stats) == 2 and all(s is not None for s in stats)
        calls = []
        for block in model.transformer.blocks:
            monkeypatch.setattr(block.ffn, "stats", lambda *a: calls.append(1))
        h2, none = model.hidden_states(ids, mask, with_stats=False)
        logits = model(ids, attention_mask=mask)
    assert torch.equal(h, h2) and none == [] and not calls
    torch.testing.assert_close(logits, model.lm_head(h), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_forward_with_autograd_under_checkpointing(mode):
    """While autograd records, forward calls the blocks as dbrx.parallel's checkpoint wrappers expect."""
    model = demo_shaped().train()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = model(ids)
    apply_activation_checkpointing(model, mode)
    out = model(ids)
    out.sum().backward()
    torch.testing.assert_close(out, ref)


def test_decode_step_is_the_last_positions_argmax():
    model = demo_shaped()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    model.setup_cache(2, 12)
    try:
        with torch.no_grad():
            tok = decode_step(model, ids, mask, torch.arange(9))  # a prefill: the last position only
    finally:
        model.clear_cache()
    with torch.no_grad():
        assert torch.equal(tok, model(ids)[:, -1].argmax(-1))


def test_column_major_head_same_weights_logits_and_checkpoint(tmp_path):
    model = demo_shaped()
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert column_major_head(model)
    w = model.lm_head.weight
    assert w.shape == (512, 64) and w.stride() == (1, 512) and w.t().is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model.save_pretrained(tmp_path / "m")  # safetensors needs contiguous tensors: save_pretrained copies
    back = DbrxForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(back.lm_head.weight, before["lm_head.weight"])
    assert not column_major_head(demo_shaped().to(torch.bfloat16))  # slower in bf16: left as it is


def test_load_pretrained_gives_an_fp32_cpu_model_the_column_major_head(tmp_path):
    from dbrx.loading import load_pretrained

    model = demo_shaped()
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", device="cpu")
    w = loaded.lm_head.weight
    assert w.dtype == torch.float32 and w.stride() == (1, 512) and torch.equal(w, model.lm_head.weight)
    assert load_pretrained(tmp_path / "m", device="cpu", dtype="bf16").lm_head.weight.is_contiguous()


def test_column_major_head_leaves_a_quantized_head():
    from dbrx.quant import quantize_model

    model = demo_shaped()
    quantize_model(model, 8, None, ("lm_head",))
    assert not column_major_head(model)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_compiled_decode_gives_the_eager_tokens_in_one_graph(one_thread, bits):
    """fp32, int8 and int4 (experts, attention and head quantized): the compiled step (dynamo capturing the expert
    ids as unbacked integers) has no graph break, compiles once for every step, and gives the eager tokens."""
    from torch._dynamo.utils import counters

    model = demo_shaped()
    if bits is not None:
        from dbrx.quant import quantize_model

        quantize_model(model, bits, None if bits == 8 else 32, ("attn", "experts", "lm_head"))
    else:
        column_major_head(model)
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(4))
    eager, _ = decode_greedy(model, prompt, 6)
    torch._dynamo.reset()
    counters.clear()
    compiled, _ = decode_greedy(model, prompt, 6, compiled_decode_step(model))
    assert torch.equal(eager, compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
