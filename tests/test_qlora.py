"""QLoRA (LoRA on a base quantized by `dbrx quantize`, int8 and int4, never dequantized as a whole) and adapters at
inference (`--adapter DIR` on a float or quantized base, unmerged).

References are direct computations here: the quantized weights dequantized by hand from the checkpoint layout
(test_quant's deq8 / deq4), the adapter math written out per token and per expert in fp64, with the bf16
roundings the quantized kernels apply to their inputs; gradients by autograd through that reference.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, tiny_config
from test_quant import BF16_EPS, deq4, deq8

from dbrx.cli import main
from dbrx.lora import LoraConfig, LoraExperts, LoraLinear, apply_lora, lora_state_dict, save_adapter
from dbrx.model import DbrxForCausalLM
from dbrx.quant import quantize_model
from dbrx.quant.formats import quantize_int4, quantize_int8
from dbrx.quant.grad import dequantize
from dbrx.quant.layers import QuantExperts, QuantLinear

QUANT = [(8, None), (4, 32)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quantize(w, bits, group):
    """w (..., out, in) -> (q, scale, zero) in the checkpoint layout and the dequantized fp64 reference."""
    if bits == 8:
        q, s = quantize_int8(w)
        return (q, s, None), deq8(q, s)
    q, s, z = quantize_int4(w, group)
    return (q, s, z), deq4(q, s, z, w.shape[-1], group)


def _bf(t):
    """The bf16 rounding the quantized kernels apply to their input, in fp64 (the gradient passes unrounded)."""
    return t + (t.bfloat16().double() - t).detach()


def _randn(*shape, seed, std=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


@pytest.mark.parametrize("bits, group", QUANT)
def test_dequantize_is_what_the_kernel_multiplies_by(bits, group):
    w = _randn(40, 96, seed=0, std=0.05)
    parts, ref = _quantize(w, bits, group)
    lin = QuantLinear.from_quantized(bits, group, 96, *parts)
    assert torch.equal(dequantize(lin).double(), ref.float().double())
    E, parts2 = 3, _quantize(_randn(3, 40, 96, seed=1, std=0.05), bits, group)
    stack = QuantExperts.from_quantized(bits, group, parts2[0], parts2[0], _quantize(
        _randn(3, 96, 40, seed=2, std=0.05), bits, group)[0])
    for e in range(E):
        assert torch.equal(dequantize(stack.w13, e)[:40].double(), parts2[1][e].float().double())


@pytest.mark.parametrize("bits, group", QUANT)
def test_lora_linear_over_a_quantized_linear_matches_the_reference(bits, group):
    w = _randn(48, 64, seed=0, std=0.05)
    parts, wd = _quantize(w, bits, group)
    layer = LoraLinear(QuantLinear.from_quantized(bits, group, 64, *parts), rank=4, scaling=2.0)
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.copy_(_randn(48, 4, seed=1, std=0.1))
    x = _randn(5, 64, seed=2).requires_grad_()
    y = layer(x)
    dy = _randn(5, 48, seed=3)
    (y * dy).sum().backward()

    A, B = (layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_())
    xr = x.detach().double().requires_grad_()
    ref = _bf(xr) @ wd.T + 2.0 * (xr @ A.T) @ B.T
    (ref * dy.double()).sum().backward()
    tol = 4 * BF16_EPS * ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=tol)
    torch.testing.assert_close(layer.lora_A.grad.double(), A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.double(), B.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)  # dx = dy @ W_deq (exact product)


def _quant_experts(bits, group, E=6, Fh=48, D=64):
    w1, v1, w2 = (_randn(E, Fh, D, seed=s, std=0.05) for s in (10, 11, 12))  # w2 as the model stores it: (E, F, D)
    (p1, d1), (pv, dv), (p2, d2t) = (_quantize(w, bits, group) for w in (w1, v1, w2.transpose(1, 2)))
    return QuantExperts.from_quantized(bits, group, p1, pv, p2), (d1, dv, d2t)


def _reference(x, weights, idx, d1, dv, d2t, ad):
    """Token by token, each routed expert: the dequantized base products on bf16-rounded inputs plus s * x A_e^T
    B_e^T in fp64 (ad: name -> (A, B, s), fp64 leaves)."""
    y = []
    for n in range(x.shape[0]):
        acc = 0
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            xn = x[n]
            gate = d1[e] @ _bf(xn) + ad["w1"][2] * ad["w1"][1][e] @ (ad["w1"][0][e] @ xn)
            up = dv[e] @ _bf(xn) + ad["v1"][2] * ad["v1"][1][e] @ (ad["v1"][0][e] @ xn)
            hp = weights[n, k] * F.silu(gate) * up
            out = d2t[e] @ _bf(hp) + ad["w2"][2] * ad["w2"][1][e] @ (ad["w2"][0][e] @ hp)
            acc = acc + out
        y.append(acc)
    return torch.stack(y)


@pytest.mark.parametrize("bits, group", QUANT)
def test_per_expert_adapters_on_quantized_experts_match_the_reference(bits, group):
    base, (d1, dv, d2t) = _quant_experts(bits, group)
    mod = LoraExperts(base, {"w1": 4, "v1": 4, "w2": 4}, {"w1": 2.0, "v1": 0.5, "w2": 1.5})
    assert all(p.dtype == torch.float32 for p in mod.parameters())
    assert {n for n, p in mod.named_parameters()} == {f"lora_{s}.{w}" for s in "AB" for w in ("w1", "v1", "w2")}
    with torch.no_grad():
        for i, w in enumerate(("w1", "v1", "w2")):
            mod.lora_B[w].copy_(_randn(*mod.lora_B[w].shape, seed=20 + i, std=0.1))
    N = 9
    x = _randn(N, 64, seed=3).requires_grad_()
    weights, idx = torch.softmax(_randn(N, 6, seed=4), -1).topk(2, -1)
    idx[1] = idx[0]  # tokens sharing experts; expert 5 may get no rows at all
    y = mod(x, weights, idx)
    dy = _randn(N, 64, seed=5)
    (y * dy).sum().backward()

    ad = {w: (mod.lora_A[w].detach().double().requires_grad_(), mod.lora_B[w].detach().double().requires_grad_(),
              mod.scaling[w]) for w in ("w1", "v1", "w2")}
    xr = x.detach().double().requires_grad_()
    ref = _reference(xr, weights.double(), idx, d1, dv, d2t, ad)
    (ref * dy.double()).sum().backward()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=8 * BF16_EPS * ref.abs().max().item())
    for w, (A, B, _) in ad.items():  # the gradients see the same bf16 roundings of the forward: a looser bound
        for got, want in ((mod.lora_A[w].grad, A.grad), (mod.lora_B[w].grad, B.grad)):
            assert got is not None
            rel = ((got.double() - want).norm() / want.norm()).item()
            assert rel < 0.02, (w, rel)
    rel = ((x.grad.double() - xr.grad).norm() / xr.grad.norm()).item()
    assert rel < 0.02, rel
    assert not any(t.requires_grad for t in base.buffers())


@pytest.mark.parametrize("bits, group", QUANT)
def test_qlora_model_trains_only_the_adapters(bits, group):
    model = quantize_model(randomize_(DbrxForCausalLM.from_config(tiny_config()), 0), bits, group,
                           targets=("attn", "experts"))
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["Wqkv", "out_proj", "router", "w1", "v1", "w2"]))
    assert isinstance(model.transformer.blocks[0].ffn.experts.base, QuantExperts)
    assert isinstance(model.transformer.blocks[0].norm_attn_norm.attn.Wqkv.base, QuantLinear)
    model.train()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.compute_loss(x).loss.item()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 6 and len(trainable) == len(lora_state_dict(model))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(5):
        opt.zero_grad()
        model.compute_loss(x).loss.backward()
        assert all(p.grad is not None for p in trainable)
        if step:  # B starts at zero, so A's first gradient is zero
            assert all(p.grad.abs().sum() > 0 for p in trainable)
        opt.step()
    with torch.no_grad():
        assert model.compute_loss(x).loss.item() < before
    with pytest.raises(ValueError, match="quantized") as e:
        from dbrx.lora import merge_lora

        merge_lora(model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bits, group", QUANT)
def test_attention_only_qlora_backpropagates_through_the_quantized_experts(bits, group):
    """Adapters on attention only leave the experts a plain QuantExperts, which gradients must cross (to the
    adapters of earlier layers): they equal those of the same model whose experts carry zero adapters (the
    LoraExperts path), up to the bf16 roundings the two expert paths apply in different places."""
    base = quantize_model(randomize_(DbrxForCausalLM.from_config(tiny_config()), 0), bits, group)
    attn, both = copy.deepcopy(base), base
    apply_lora(attn, LoraConfig(rank=4, alpha=8, targets=["Wqkv", "out_proj"]))
    apply_lora(both, LoraConfig(rank=4, alpha=8, targets=["Wqkv", "out_proj", "w1", "v1", "w2"]))
    assert isinstance(attn.transformer.blocks[0].ffn.experts, QuantExperts)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same attention adapters, B non-zero so that every factor has a gradient
        for name, p in attn.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                both.get_parameter(name).copy_(p)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (attn, both):
        model.train()
        loss = model.compute_loss(x).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad and "attn" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * 2
    for name, ref in grads[1].items():
        assert grads[0][name].abs().sum() > 0, name
        assert (grads[0][name] - ref).norm() / ref.norm() < 1e-2, name  # measured about 1e-3


def test_finetune_on_a_quantized_checkpoint_trains_an_adapter(tmp_path):
    from test_lora import _finetune_config
    from test_trainer import step_records, train

    from dbrx.train.config import from_dict

    cfg = _finetune_config(tmp_path, "float")  # writes tmp_path/base and the chat set
    assert main(["quantize", str(tmp_path / "base"), str(tmp_path / "q4"), "--bits", "4", "--group-size", "32"]) == 0
    d = cfg.to_dict()
    d["run_dir"], d["model"]["checkpoint"] = str(tmp_path / "qlora"), str(tmp_path / "q4")
    qcfg = from_dict(type(cfg), d)
    trainer, _ = train(qcfg, task="finetune")
    out = trainer.export()
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    losses = [r["loss"] for r in step_records(qcfg.run_dir)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.sample() is not None
    # the adapter applies to the float base too (same shapes): it moved away from zero
    from dbrx.lora import load_adapter

    base = DbrxForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    x = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(load_adapter(copy.deepcopy(base), out)(x), base(x))
    # full fine-tuning of a quantized checkpoint: a one-line error
    d["lora"], d["run_dir"] = None, str(tmp_path / "full")
    with pytest.raises(ValueError, match="quantized") as e:
        train(from_dict(type(cfg), d), task="finetune")
    assert "\n" not in str(e.value)
    json.dumps(d)


# ---- adapters at inference: --adapter DIR on generate / chat / eval / serve -------------------------------------
@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny float base (the tokenizer's vocabulary), a non-zero adapter on every target, and the base with the
    adapter merged by `dbrx merge-lora` (the reference: merged weights, no adapter code at inference)."""
    from dbrx import DbrxConfig

    d = tmp_path_factory.mktemp("adapted")
    cfg = DbrxConfig.from_preset("dbrx-tiny", d_model=32, ffn_hidden_size=64, max_seq_len=64)
    model = randomize_(DbrxForCausalLM.from_config(cfg, seed=0), 0).eval()
    model.save_pretrained(d / "base")
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["Wqkv", "out_proj", "router", "w1", "v1", "w2"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    save_adapter(model, d / "adapter")
    assert main(["merge-lora", str(d / "base"), str(d / "adapter"), str(d / "merged")]) == 0
    return d


def _generate(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["generate", *args, "ROMEO:", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    return capsys.readouterr().out


def test_generate_with_an_adapter_equals_the_merged_checkpoint(adapted, capsys):
    d = adapted
    with_adapter = _generate(capsys, "--model", str(d / "base"), "--adapter", str(d / "adapter"))
    merged = _generate(capsys, "--model", str(d / "merged"))
    base = _generate(capsys, "--model", str(d / "base"))
    assert with_adapter == merged and with_adapter != base
    from dbrx.loading import load_pretrained

    model = load_pretrained(d / "base", device="cpu", adapter=d / "adapter")
    assert isinstance(model.transformer.blocks[0].ffn.experts, LoraExperts) and not model.training
    ref = DbrxForCausalLM.from_pretrained(d / "merged", dtype=torch.float32).eval()
    x = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_an_adapter_on_a_quantized_base(adapted, capsys):
    d = adapted
    assert main(["quantize", str(d / "base"), str(d / "q8"), "--bits", "8"]) == 0
    from dbrx.loading import load_pretrained

    model = load_pretrained(d / "q8", adapter=d / "adapter")
    experts = model.transformer.blocks[0].ffn.experts
    assert isinstance(experts, LoraExperts) and isinstance(experts.base, QuantExperts)
    merged = load_pretrained(d / "merged")
    x = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), merged(x)
    assert ((a - b).norm() / b.norm()).item() < 0.05  # int8 base: close to the float merged model
    bf16 = load_pretrained(d / "q8", dtype="bf16", adapter=d / "adapter")  # bf16 activations, fp32 expert adapters
    with torch.no_grad():
        c = bf16(x)
    assert c.dtype == torch.bfloat16 and ((c.float() - b).norm() / b.norm()).item() < 0.1
    out = _generate(capsys, "--model", str(d / "q8"), "--adapter", str(d / "adapter"))
    assert out.startswith("ROMEO:")


def test_bad_adapters_are_one_line_errors(adapted, tmp_path, capsys):
    d = adapted
    cases = [(str(tmp_path / "nope"), "adapter directory not found"),
             (str(d / "base"), "missing (not a PEFT adapter directory)")]
    from dbrx import DbrxConfig

    other = tmp_path / "other"  # an adapter for another base shape
    m = DbrxForCausalLM.from_config(DbrxConfig.from_preset("dbrx-tiny", d_model=48, ffn_hidden_size=64), seed=0)
    apply_lora(m, LoraConfig(rank=2, alpha=4, targets=["Wqkv", "w1"]))
    save_adapter(m, other)
    cases.append((str(other), "shape"))
    for adapter, match in cases:
        capsys.readouterr()
        assert main(["generate", "--model", str(d / "base"), "--adapter", adapter, "hi", "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dbrx generate: error:") and match in err and "\n" not in err, err


@pytest.mark.parametrize("verb", ["generate", "chat", "eval", "serve"])
def test_every_model_verb_takes_an_adapter(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    assert "--adapter DIR" in capsys.readouterr().out


def test_eval_with_an_adapter(adapted, tmp_path, capsys):
    d = adapted
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(d / "base"), "--adapter", str(d / "adapter"), "--tasks", "demo",
                 "--limit", "2", "--out", str(out)]) in (0, 1)
    assert json.loads(out.read_text())["meta"]["adapter"] == str(d / "adapter")
