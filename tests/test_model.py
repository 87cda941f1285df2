import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.parallel.activation_checkpoint import apply_activation_checkpointing


def tiny(**kw):
    return DbrxConfig.from_preset("dbrx-tiny", vocab_size=512, **kw)


def test_meta_build_of_132b_is_instant_and_allocates_nothing():
    t = time.perf_counter()
    model = DbrxForCausalLM.from_config(DbrxConfig.from_preset("dbrx-132b"), device="meta")
    assert time.perf_counter() - t < 10
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == model.config.num_params()["total"]
    assert model.transformer.blocks[0].ffn.experts.mlp.w1.shape == (16, 10752, 6144)


def test_packed_documents_do_not_see_each_other():
    torch.manual_seed(0)
    model = DbrxForCausalLM.from_config(tiny(), seed=0).eval()
    a, b = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 9))
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids, position_ids=torch.cat([torch.arange(7), torch.arange(9)])[None])
        torch.testing.assert_close(out[:, :7], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 7:], model(b), atol=1e-5, rtol=1e-5)
        mixed = model(packed)  # without doc ids the second document attends to the first
    assert (mixed[:, 7:] - out[:, 7:]).abs().max() > 1e-3


def test_router_jitter_only_in_training_and_input_untouched():
    model = DbrxForCausalLM.from_config(tiny(moe_jitter_eps=0.3), seed=0)
    moe = model.transformer.blocks[0].ffn
    x = torch.randn(2, 5, 64)
    x0 = x.clone()
    moe.train()
    y1, _ = moe(x)
    y2, _ = moe(x)
    assert torch.equal(x, x0)
    assert not torch.allclose(y1, y2)
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])


class _AllocCounter(TorchDispatchMode):
    def __init__(self, numel):
        super().__init__()
        self.numel, self.hits = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views share storage: not an allocation
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                self.hits += 1
        return out


@pytest.mark.parametrize("backend", ["auto", "loop"])
def test_expert_weight_gradients_are_written_once(backend):
    cfg = tiny(n_layers=1, moe_num_experts=8, moe_top_k=2)
    model = DbrxForCausalLM.from_config(cfg, seed=0)
    model.transformer.blocks[0].ffn.backend = backend
    w1 = model.transformer.blocks[0].ffn.experts.mlp.w1
    ids = torch.randint(0, 512, (2, 16))
    loss = model.compute_loss(ids).loss
    counter = _AllocCounter(w1.numel())
    with counter:
        loss.backward()
    # w1, v1 and w2 each get one full-size gradient; per-expert slicing would allocate E per tensor.
    assert counter.hits <= 3 * 2
    assert w1.grad.shape == w1.shape and w1.grad.abs().sum() > 0


def test_bad_inputs_raise_value_error():
    model = DbrxForCausalLM.from_config(tiny(), seed=0)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="checkpointing"):
        apply_activation_checkpointing(model, "sometimes")
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(1, 10_000)


def test_experts_run_in_the_autocast_dtype(monkeypatch):
    import dbrx.moe

    seen = []
    real = dbrx.moe.expert_glu

    def spy(x, weights, idx, w1, v1, w2, **kwargs):
        seen.append((x.dtype, w1.dtype))
        return real(x, weights, idx, w1, v1, w2, **kwargs)

    monkeypatch.setattr(dbrx.moe, "expert_glu", spy)
    model = DbrxForCausalLM.from_config(tiny(), seed=0)
    ids = torch.randint(0, 512, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.compute_loss(ids).loss
    loss.backward()
    assert seen and all(s == (torch.bfloat16, torch.bfloat16) for s in seen)
    assert model.transformer.blocks[0].ffn.experts.mlp.w1.grad.dtype == torch.float32  # fp32 master weights
    seen.clear()
    model.compute_loss(ids)
    assert all(s == (torch.float32, torch.float32) for s in seen)
