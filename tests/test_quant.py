"""Weight-only int8 / int4 quantization (dbrx.quant): error bounds from the quantization step, the CPU kernels
against direct dequantize-then-matmul references, every expert path, whole models, the checkpoint round trip and
bad inputs. Every reference is computed here directly (nibbles unpacked, weights dequantized by hand)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, tiny_config
from safetensors.torch import load_file, save_file

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.cli import main
from dbrx.kernels.loss import linear_cross_entropy
from dbrx.quant import load_quantized, quantize_checkpoint, quantize_model, save_quantized
from dbrx.quant.formats import quantize_int4, quantize_int8
from dbrx.quant.layers import QuantEmbedding, QuantExperts, QuantLinear

BF16_EPS = 2.0**-8  # relative rounding of bf16 (the kernels' activations and outputs)
ALL = ("attn", "experts", "lm_head", "embedding")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small ops: on 2 shared cores, OpenMP threads waiting for each other make them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- direct references ----------------------------------------------------------------------------------------
def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Nibbles by hand: byte j holds element 2j (low) and 2j+1 (high)."""
    codes = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=torch.int64)
    codes[..., 0::2] = packed.long() % 16
    codes[..., 1::2] = packed.long() // 16
    return codes[..., :k]


def deq8(q, scale):
    return q.double() * scale.double()[..., None]


def deq4(q, scale, zero, k, group):
    g = torch.arange(k) // group  # the group of each input column
    return (unpack(q, k).double() - 8) * scale.double()[..., g] + zero.double()[..., g]


def weight(*shape, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * std
    w[..., 0, :] = 0.0  # an all-zero row
    w[..., 1, :] = 0.3  # a constant row
    w[..., 2, :] += 1.0  # an offset row (the int4 zero point far from 0)
    return w


# ---- weights: each dequantized element within half a step of the float weight --------------------------------
def test_int8_error_is_at_most_half_a_step():
    w = weight(48, 80)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.abs().max() <= 127
    err = (deq8(q, s) - w.double()).abs()
    assert (err <= s.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert (s.double() * 127 >= w.abs().amax(-1).double()).all()  # the scale covers the row: nothing clamped


@pytest.mark.parametrize("k, group", [(64, 32), (64, 64), (112, 32), (256, 128)])  # 112: a short last group
def test_int4_error_is_at_most_half_a_step(k, group):
    w = weight(40, k)
    q, s, z = quantize_int4(w, group)
    ng = -(-k // group)
    assert q.shape == (40, k // 2) and s.shape == z.shape == (40, ng) and q.dtype == torch.uint8
    codes = unpack(q, k)
    assert codes.min() >= 0 and codes.max() <= 15
    err = (deq4(q, s, z, k, group) - w.double()).abs()
    step = s.double()[:, torch.arange(k) // group]
    assert (err <= step / 2 * (1 + 1e-6) + 1e-7).all()
    assert err[1].max() < 1e-6  # a constant row is exact up to its rounding


def test_int4_nibble_order():
    w = torch.tensor([[-8.0, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7] * 2])  # codes 0..15, twice
    q, s, z = quantize_int4(w, 32)
    assert q[0, :8].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]


# ---- Linear: the kernels against dequantize-then-matmul ----------------------------------------------------------
def _linear(bits, group, out_f, in_f, seed=0):
    w = weight(out_f, in_f, seed=seed)
    if bits == 8:
        q, s = quantize_int8(w)
        return w, QuantLinear.from_quantized(8, None, in_f, q, s), deq8(q, s)
    q, s, z = quantize_int4(w, group)
    return w, QuantLinear.from_quantized(4, group, in_f, q, s, z), deq4(q, s, z, in_f, group)


@pytest.mark.parametrize("bits, group, out_f, in_f", [
    (8, None, 96, 64), (8, None, 40, 112), (4, 32, 96, 64), (4, 64, 128, 64),
    (4, 32, 40, 112),  # the output padded to a multiple of 16 and the input to whole groups
])
def test_linear_matches_dequantized_reference_and_float_within_bounds(bits, group, out_f, in_f):
    w, layer, wd = _linear(bits, group, out_f, in_f)
    x = torch.randn(2, 5, in_f, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert y.shape == (2, 5, out_f) and y.dtype == torch.float32
    xb = x.bfloat16().double()  # the kernels' activations are bf16
    ref = xb @ wd.T  # the dequantized weight, applied directly
    mag = xb.abs() @ wd.abs().T  # bounds each output's rounding
    assert ((y.double() - ref).abs() <= 2 * BF16_EPS * mag + 1e-6).all()
    # against the float layer: half a step per weight, plus the bf16 roundings
    step = (torch.ones(out_f, in_f, dtype=torch.float64) * layer_scale(layer, wd, w)).double()
    bound = x.abs().double() @ (step / 2).T + 3 * BF16_EPS * (x.abs().double() @ w.abs().double().T) + 1e-6
    assert ((y.double() - x.double() @ w.double().T).abs() <= bound).all()


@pytest.mark.parametrize("bits, group, out_f, in_f", [(8, None, 40, 112), (4, 32, 40, 112), (4, 64, 96, 320)])
def test_linear_weight_is_the_dequantized_matrix(bits, group, out_f, in_f):
    _, layer, wd = _linear(bits, group, out_f, in_f)
    w = layer.weight
    assert w.shape == (out_f, in_f) and w.dtype == torch.float32
    tol = 1e-7 if bits == 8 else BF16_EPS  # int4 is read back through the kernel: its bf16 outputs
    assert ((w.double() - wd).abs() <= tol * wd.abs() + 1e-7).all()


@pytest.mark.parametrize("group, out_f, in_f", [(32, 40, 112), (64, 96, 320)])
def test_dequantize_reads_both_int4_layouts(group, out_f, in_f):
    """QLoRA's backward dequantizes through dbrx.quant.grad.dequantize: torch's CPU kernel layout and the checkpoint
    layout (kept on CUDA) give the same matrix, the reference dequantization of the codes."""
    from dbrx.quant.grad import dequantize

    w = weight(out_f, in_f)
    q, s, z = quantize_int4(w, group)
    ref = deq4(q, s, z, in_f, group)
    cpu = QuantLinear.from_quantized(4, group, in_f, q, s, z)
    file = QuantLinear(4, group, in_f, out_f)
    file._set(q, s, z, layout="file")
    for layer in (cpu, file):
        torch.testing.assert_close(dequantize(layer).double(), ref, rtol=0, atol=1e-6)
    stack = [quantize_int4(weight(2, out_f, in_f, seed=i), group) for i in range(3)]  # w1, v1, w2 of 2 experts
    parts = [(q_, s_, z_) for q_, s_, z_ in stack]
    parts[2] = quantize_int4(weight(2, in_f, out_f, seed=2), group)  # w2 maps F -> D: (E, D, F)
    experts = QuantExperts.from_quantized(4, group, *parts, layout="file")
    q2, s2, z2 = parts[2]
    torch.testing.assert_close(dequantize(experts.w2, 1).double(), deq4(q2[1], s2[1], z2[1], out_f, group),
                               rtol=0, atol=1e-6)


def layer_scale(layer, wd, w):
    """The quantization step of each weight element, recovered directly: at most |dequantized - float| * 2."""
    return ((wd - w.double()).abs() * 2).amax(-1, keepdim=True).clamp_min(1e-12)


def test_embedding_lookups_dequantize_their_rows():
    w = weight(50, 64)
    ids = torch.tensor([[0, 1, 2, 49], [7, 7, 3, 0]])
    q, s = quantize_int8(w)
    e8 = QuantEmbedding(8, None, q, s, None, 64, torch.float32)
    torch.testing.assert_close(e8(ids).double(), deq8(q, s)[ids], rtol=1e-6, atol=1e-7)
    q, s, z = quantize_int4(w, 32)
    e4 = QuantEmbedding(4, 32, q, s, z, 64, torch.float32)
    torch.testing.assert_close(e4(ids).double(), deq4(q, s, z, 64, 32)[ids], rtol=1e-6, atol=1e-7)


# ---- experts: every path against a per-token reference ----------------------------------------------------------
def _experts(bits, group, E=8, Fh=48, D=64):
    g = torch.Generator().manual_seed(2)
    w1, v1, w2 = (torch.randn(E, Fh, D, generator=g) * 0.05 for _ in range(3))  # w2 as the model: (E, F, D)
    parts, deq = [], []
    for w in (w1, v1, w2.transpose(1, 2)):  # down quantized as (E, D, F): (out, in)
        k = w.shape[-1]
        if bits == 8:
            q, s = torch.stack([quantize_int8(m)[0] for m in w]), torch.stack([quantize_int8(m)[1] for m in w])
            parts.append((q, s, None))
            deq.append(deq8(q, s))
        else:
            qs = [quantize_int4(m, group) for m in w]
            q, s, z = (torch.stack([t[i] for t in qs]) for i in range(3))
            parts.append((q, s, z))
            deq.append(deq4(q, s, z, k, group))
    return QuantExperts.from_quantized(bits, group, *parts), (w1, v1, w2), deq


def _reference(x, weights, idx, w1, v1, w2t, bf16: bool):
    """Per token, per chosen expert: silu(x w1^T) * (x v1^T) then @ w2t^T, weighted; optionally with the kernels'
    bf16 roundings of the inputs of both matmuls."""
    r = (lambda t: t.bfloat16().double()) if bf16 else (lambda t: t.double())
    y = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            xn = r(x[n])
            h = F.silu(w1[e].double() @ xn) * (v1[e].double() @ xn)
            y[n] += weights[n, k].double() * (w2t[e].double() @ r(h))
    return y


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 64)])
@pytest.mark.parametrize("N", [1, 7])  # 1: the decode branch (chosen experts in turn); 7: the sorted batched path
def test_experts_match_dequantized_reference_and_float(bits, group, N):
    mod, (w1, v1, w2), (d1, dv, d2t) = _experts(bits, group)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 64, generator=g)
    weights, idx = torch.softmax(torch.randn(N, 8, generator=g), -1).topk(2, -1)
    if N > 1:
        idx[1] = idx[0]  # two tokens sharing both experts
    y = mod(x, weights, idx)
    assert y.shape == (N, 64) and y.dtype == torch.float32
    ref = _reference(x, weights, idx, d1, dv, d2t, bf16=True)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=4 * BF16_EPS * ref.abs().max().item())
    flt = _reference(x, weights, idx, w1, v1, w2.transpose(1, 2), bf16=False)
    rel = ((y.double() - flt).norm() / flt.norm()).item()
    # int4 on Gaussian weights: a step of ~0.27 sigma (groups of 32-64), ~8 % rms per weight, compounded by the GLU
    assert rel < (0.02 if bits == 8 else 0.2), rel


# ---- whole models -------------------------------------------------------------------------------------------
def demo_shaped(vocab_size: int | None = None, n_layers: int = 2) -> DbrxForCausalLM:
    """dbrx-demo's widths (d_model 64, ffn 112, 16 experts choose 4), random weights (std 0.05)."""
    extra = {} if vocab_size is None else {"vocab_size": vocab_size}
    cfg = DbrxConfig.from_preset("dbrx-demo", n_layers=n_layers, max_seq_len=64, **extra)
    return randomize_(DbrxForCausalLM.from_config(cfg, seed=0), seed=0, std=0.05).eval()


@pytest.fixture(scope="module")
def demo_model():
    return demo_shaped(vocab_size=4096)


def dequantized_copy(model, bits, group, targets=ALL):
    """The float model with each targeted weight replaced by its quantized-then-dequantized value, by hand."""
    d = copy.deepcopy(model)
    for name, p in d.named_parameters():
        hit = (("attn" in targets and "attn." in name) or ("experts" in targets and ".experts." in name)
               or ("lm_head" in targets and name.startswith("lm_head")) or ("embedding" in targets and "wte" in name))
        if not hit or p.dim() < 2:
            continue
        w = p.data.transpose(-1, -2) if name.endswith("w2") else p.data  # (..., out, in)
        flat = w.reshape(-1, w.shape[-1])
        if bits == 8:
            wd = deq8(*quantize_int8(flat))
        else:
            wd = deq4(*quantize_int4(flat, group), flat.shape[-1], group)
        wd = wd.float().view(w.shape)
        p.data.copy_(wd.transpose(-1, -2) if name.endswith("w2") else wd)
    return d


def _check_whole_model(model, ids, bits, group, max_rel_float, min_agree_float):
    ref = model(ids)
    q = quantize_model(copy.deepcopy(model), bits, group, ALL)
    y = q(ids)
    deq = dequantized_copy(model, bits, group)(ids)  # the same weights, float activations
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    agree = lambda a, b: (a.argmax(-1) == b.argmax(-1)).float().mean().item()  # noqa: E731  next-token argmax
    assert rel(y, deq) < 0.02 and agree(y, deq) >= 0.9, (rel(y, deq), agree(y, deq))  # only the bf16 activations
    assert rel(y, ref) < max_rel_float and agree(y, ref) >= min_agree_float, (rel(y, ref), agree(y, ref))


# against float: int4 on random (unstructured) weights moves logits far more than on trained ones (attention
# alone: ~16 %), so its bounds here are loose; the dequantized comparison above is the tight one
@pytest.mark.parametrize("bits, group, max_rel, min_agree", [(8, None, 0.05, 0.85), (4, 32, 0.4, 0.3)])
@torch.no_grad()
def test_whole_model_logits_and_greedy_tokens_close_to_float(demo_model, bits, group, max_rel, min_agree):
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(4))
    _check_whole_model(demo_model, ids, bits, group, max_rel, min_agree)


@pytest.mark.slow
@pytest.mark.parametrize("bits, group, max_rel, min_agree", [(8, None, 0.05, 0.85), (4, 64, 0.4, 0.3)])
@torch.no_grad()
def test_whole_demo_model_with_its_full_vocabulary(bits, group, max_rel, min_agree):
    ids = torch.randint(0, 100_000, (2, 32), generator=torch.Generator().manual_seed(4))
    _check_whole_model(demo_shaped(n_layers=4), ids, bits, group, max_rel, min_agree)


@torch.no_grad()
def test_kv_cache_decoding_runs_on_a_quantized_model(demo_model):
    q = quantize_model(copy.deepcopy(demo_model), 8, None, ALL)
    ids = torch.randint(0, 4096, (1, 6), generator=torch.Generator().manual_seed(5))
    full = q(ids)[:, -1]
    q.setup_cache(1, 8)
    mask = torch.ones(1, 8, dtype=torch.long)
    q(ids[:, :5], attention_mask=mask, cache_pos=torch.arange(5))
    step = q(ids[:, 5:], attention_mask=mask, cache_pos=torch.tensor([5]))[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-2 * full.abs().max().item())


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_compute_loss_on_a_quantized_model_with_its_head(demo_model, bits, group):
    """compute_loss reads `lm_head.weight`: a quantized head dequantizes it; the loss equals the cross-entropy of the
    quantized model's own logits (computed here directly), and gradients still reach the activations."""
    q = quantize_model(copy.deepcopy(demo_model), bits, group, ALL)
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = q(ids).double()  # (B, T, V)
        out = q.compute_loss(ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(out.lm_loss.item() - ref.item()) < 2e-3 * ref.item(), (out.lm_loss.item(), ref.item())
    assert int(out.n_tokens) == 2 * 11
    h = q.transformer.wte(ids).requires_grad_(True)  # gradients flow through a frozen quantized head
    hid = q.transformer.norm_f(h)
    linear_cross_entropy(hid.reshape(-1, hid.shape[-1]), q.lm_head.weight, ids.reshape(-1)).backward()
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


# ---- checkpoints --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_float(tmp_path_factory):
    cfg = tiny_config(vocab_size=256)
    m = randomize_(DbrxForCausalLM.from_config(cfg, seed=0), seed=1, std=0.05).eval()
    path = tmp_path_factory.mktemp("q") / "float"
    m.save_pretrained(path)
    return m, path


@pytest.mark.parametrize("bits, group, targets", [(8, None, ALL), (4, 32, ALL), (4, 64, ("attn", "experts"))])
@torch.no_grad()
def test_round_trip_equals_the_in_memory_quantized_model_exactly(tiny_float, tmp_path, bits, group, targets):
    m, src = tiny_float
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    q = quantize_model(copy.deepcopy(m), bits, group, targets)
    save_quantized(m, tmp_path / "a", bits, group, targets)
    quantize_checkpoint(src, tmp_path / "b", bits, group, targets)  # streamed from the float checkpoint
    expected = q(ids)
    for d in ("a", "b"):
        loaded = load_quantized(tmp_path / d)
        assert torch.equal(loaded(ids), expected), d
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), q.state_dict().values()))
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "dbrx-weight-only", "format_version": 1, "bits": bits, "group_size": group,
                   "modules": list(targets), "scale_dtype": "bfloat16"}
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    assert tensors["transformer.blocks.0.ffn.router.layer.weight"].dtype == torch.float32  # the router stays float
    w2 = tensors["transformer.blocks.0.ffn.experts.mlp.w2"]
    assert w2.dtype == (torch.int8 if bits == 8 else torch.uint8) and w2.shape[:2] == (8, 64)  # (E, D, F[/2])


def _tamper(path, key, fn):
    f = path / "model.safetensors"
    t = load_file(f)
    t[key] = fn(t[key])
    save_file(t, f, metadata={"format": "pt"})


def test_bad_checkpoints_give_one_line_errors(tiny_float, tmp_path):
    m, src = tiny_float
    save_quantized(m, tmp_path / "q", 4, 32)
    k = "transformer.blocks.1.norm_attn_norm.attn.Wqkv.weight_scale"
    for name, edit, message in [
        ("scale", lambda p: _tamper(p, k, lambda t: t[:, :1].contiguous()), "has shape"),
        ("dtype", lambda p: _tamper(p, k, lambda t: t.float()), "has dtype F32, expected BF16"),
        ("config", lambda p: _edit_config(p, ffn_config={"ffn_hidden_size": 64}), "has shape"),
        ("group", lambda p: _edit_config(p, quantization_config={"group_size": 64}), "has shape"),
        ("bits", lambda p: _edit_config(p, quantization_config={"bits": 3}), "bits must be 8 or 4"),
        ("version", lambda p: _edit_config(p, quantization_config={"format_version": 2}), "format_version"),
    ]:
        d = tmp_path / name
        shutil.copytree(tmp_path / "q", d)
        edit(d)
        with pytest.raises(ValueError, match=message) as e:
            load_quantized(d)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="quantized checkpoint"):
        DbrxForCausalLM.from_pretrained(tmp_path / "q")  # the float loader points to the right one
    with pytest.raises(ValueError, match="CPU"):
        load_quantized(tmp_path / "q", device="meta")


def _edit_config(path, **changes):
    f = path / "config.json"
    d = json.loads(f.read_text())
    for key, value in changes.items():
        d[key].update(value)
    f.write_text(json.dumps(d))


def test_bad_arguments(tiny_float, tmp_path):
    m, _ = tiny_float
    for kwargs, message in [
        (dict(bits=3), "bits must be 8 or 4"),
        (dict(bits=4, group_size=48), "group size must be one of"),
        (dict(bits=4, group_size=128), "does not divide d_model 64"),
        (dict(bits=8, group_size=32), "int4 only"),
        (dict(bits=8, targets=("router",)), "targets must be some of"),
    ]:
        with pytest.raises(ValueError, match=message):
            quantize_model(copy.deepcopy(m), **kwargs)
    q = quantize_model(copy.deepcopy(m), 8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, 8)
    with pytest.raises(ValueError, match="float model"):
        save_quantized(q, tmp_path / "x")
    assert quantize_model(copy.deepcopy(m), 4).quantization.group_size == 64  # 128 does not divide d_model 64


def test_cli_quantize_then_generate(tmp_path, capsys):
    cfg = DbrxConfig.from_preset("dbrx-demo", n_layers=1, max_seq_len=64)
    DbrxForCausalLM.from_config(cfg, seed=0).save_pretrained(tmp_path / "f")
    assert main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--bits", "4", "--include-head"]) == 0
    assert "wrote 1 weight file(s)" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "q"), "ROMEO:", "--max-new-tokens", "3", "--seed", "0"]) == 0
    assert main(["quantize", str(tmp_path / "f"), str(tmp_path / "q2"), "--bits", "4", "--group-size", "128"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dbrx quantize: error:") and "does not divide d_model 64" in err and "\n" not in err
