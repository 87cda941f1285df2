"""Our CPU kernels (dbrx.kernels.cpu_matvec) against references computed here directly: the int8/int4 kernels
against the documented arithmetic done in float64 by hand (activations quantized in blocks of 32, integer dot
products, the weights' scales and zeros), and against the dequantized weights within the activation rounding;
the fp32 kernel against torch's matmul; the layers that use them; torch.compile; the fallback without them."""

from __future__ import annotations

import copy

import pytest
import torch
from test_quant import ALL, deq4, deq8, unpack, weight

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.kernels import cpu_matvec
from dbrx.quant import quantize_model
from dbrx.quant.formats import quantize_int4, quantize_int8
from dbrx.quant.grad import dequantize, quant_matmul
from dbrx.quant.layers import QuantExperts, QuantLinear

pytestmark = pytest.mark.skipif(cpu_matvec.kernels() is None, reason="dbrx's CPU kernels cannot be built here")


@pytest.fixture(autouse=True)
def two_threads():
    """The kernels split the outputs over threads: two, so that the split (and its tails) is exercised."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ---- the arithmetic, by hand ----------------------------------------------------------------------------------
R = 254  # the weight of the high activation codes


def act_blocks(x: torch.Tensor):
    """x (M, K) -> codes (M, K) int64, R * hi + lo, and the lo step d (M, K/32), as the kernel computes them (fp32):
    step = amax / 127, hi = round-half-even(x * (127 / amax)), lo = round((x - hi * step) * (127 / amax) * R);
    x ~ d * codes with d = step / R."""
    xb = x.float().view(x.shape[0], -1, 32)  # (M, nb, 32)
    amax = xb.abs().amax(-1, keepdim=True)  # (M, nb, 1)
    step = amax / 127
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    hi = torch.round(xb * inv)
    lo = torch.round((xb - hi * step) * inv * R).clamp(-127, 127)
    assert hi.abs().max() <= 127
    return (hi.long() * R + lo.long()).view_as(x), (step / R)[..., 0]


def ref_q8(x, q, s):
    codes, d = act_blocks(x)
    dots = (codes.view(x.shape[0], 1, -1, 32) * q.long().view(1, q.shape[0], -1, 32)).sum(-1)  # (M, N, nb) exact
    return (dots.double() * d.double()[:, None, :]).sum(-1) * s.double()[None, :]  # (M, N)


def ref_q4(x, q, s, z, group):
    K = x.shape[1]
    codes, d = act_blocks(x)
    c = unpack(q, K)  # (N, K) 0..15
    dots = (codes.view(x.shape[0], 1, -1, 32) * c.view(1, q.shape[0], -1, 32)).sum(-1)  # (M, N, nb)
    g_of_block = torch.arange(K // 32) * 32 // group
    main = (dots.double() * d.double()[:, None, :] * s.double()[None, :, g_of_block]).sum(-1)
    g = torch.arange(K) // group
    xsum = torch.zeros(x.shape[0], s.shape[1], dtype=torch.float64).index_add_(1, g, x.double())  # (M, ng)
    return main + xsum @ (z.double() - 8 * s.double()).T


def act_rounding_bound(x, wd):
    """|y - x @ wd^T| from the activations' rounding alone: half a lo step per element, times |w|."""
    _, d = act_blocks(x)
    half = (d.double() / 2).repeat_interleave(32, dim=1)  # (M, K)
    return half @ wd.abs().T


# ---- the kernels ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("N, K", [(37, 256), (70, 96)])
def test_q8_kernel_is_the_integer_arithmetic(M, N, K):
    w = weight(N, K)
    q, s = quantize_int8(w)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    x[0, :32] = 0.0  # an all-zero activation block
    x[-1, 40] = 30.0  # an outlier: its block's other elements rest on the lo codes
    y = cpu_matvec.q8_linear(x, q, s)
    assert y.shape == (M, N) and y.dtype == torch.float32
    ref = ref_q8(x, q, s)
    mag = ref_q8(x.abs(), q.abs(), s)  # the size of the sums: fp32 accumulation error relative to it
    assert ((y.double() - ref).abs() <= 1e-5 * mag + 1e-7).all()
    wd = deq8(q, s)
    assert ((y.double() - x.double() @ wd.T).abs() <= act_rounding_bound(x, wd) * 1.001 + 1e-5).all()


@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("group, K", [(32, 256), (64, 320), (128, 320), (256, 256)])  # 320/128: a short last group
def test_q4_kernel_is_the_integer_arithmetic(M, group, K):
    w = weight(41, K)
    q, s, z = quantize_int4(w, group)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) + 0.5  # sums far from zero: the zero points
    y = cpu_matvec.q4_linear(x, q, s, z, group)
    assert y.shape == (M, 41) and y.dtype == torch.float32
    ref = ref_q4(x, q, s, z, group)
    wd = deq4(q, s, z, K, group)
    mag = x.abs().double() @ wd.abs().T
    assert ((y.double() - ref).abs() <= 1e-5 * mag + 1e-6).all()
    assert ((y.double() - x.double() @ wd.T).abs() <= act_rounding_bound(x, wd) * 1.001 + 1e-4).all()


@pytest.mark.parametrize("M", [1, 5, 32])
def test_f32_kernel_equals_torch_in_both_layouts(M):
    w = torch.randn(1000, 96)
    x = torch.randn(M, 96)
    ref = x.double() @ w.double().T
    for wt in (w.T, w.T.contiguous()):  # a row-major weight transposed, and a column-major one
        y = cpu_matvec.matmul(x, wt)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M", [2, 3, 4, 7, 32])
@pytest.mark.parametrize("K", [64, 100, 1024])  # 100: a tail that is not a whole 8-float vector
def test_f32_rows_kernel_equals_torch(M, K):
    w = torch.randn(300, K)
    x = torch.randn(M, K)
    ref = x.double() @ w.double().T
    torch.testing.assert_close(cpu_matvec.matmul(x, w.T).double(), ref, rtol=1e-5, atol=1e-4)  # through f32_rows
    torch.testing.assert_close(cpu_matvec.kernels().f32_rows(x, w).double(), ref, rtol=1e-5, atol=1e-4)
    wide = torch.randn(300, K + 8)[:, :K]  # rows with a stride: still contiguous along K
    torch.testing.assert_close(cpu_matvec.kernels().f32_rows(x, wide).double(), x.double() @ wide.double().T,
                               rtol=1e-5, atol=1e-4)


def test_f32_kernel_leaves_autograd_to_torch():
    w = torch.randn(50, 64, requires_grad=True)
    x = torch.randn(2, 64, requires_grad=True)
    y = cpu_matvec.matmul(x, w.T)  # grad enabled and inputs that need it: torch's matmul, differentiable
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(0).expand(2, 64))
    with torch.no_grad():  # parameters that require grad, under no_grad: the kernel (its threads lack grad mode)
        torch.testing.assert_close(cpu_matvec.matmul(x, w.T), x @ w.T, rtol=1e-5, atol=1e-5)


def test_f32_kernel_under_inference_mode():
    """The serving engine runs under torch.inference_mode, which the kernel's worker threads do not inherit."""
    w = torch.randn(300, 64, requires_grad=True)
    with torch.inference_mode():
        x = torch.randn(3, 64)
        torch.testing.assert_close(cpu_matvec.matmul(x, w.T), x @ w.T, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused():
    q, s = quantize_int8(weight(8, 64))
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_matvec.q8_linear(torch.randn(1, 32), q, s)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        q2, s2 = quantize_int8(weight(8, 48))
        cpu_matvec.q8_linear(torch.randn(1, 48), q2, s2)


def test_kernels_compile_into_a_full_graph():
    w = weight(40, 256)
    q8, s8 = quantize_int8(w)
    q4, s4, z4 = quantize_int4(w, 64)
    wt = torch.randn(256, 300)

    def f(x):
        return (cpu_matvec.q8_linear(x, q8, s8) + cpu_matvec.q4_linear(x, q4, s4, z4, 64), cpu_matvec.matmul(x, wt),
                cpu_matvec.matmul(x, wt.T.contiguous().T))  # f32_linear, then f32_rows

    x = torch.randn(3, 256)
    for got, want in zip(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- the layers that use them ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group", [(8, None), (4, 64)])
def test_quant_linear_runs_our_kernels_where_they_fit(bits, group):
    w = weight(48, 256)
    if bits == 8:
        q, s = quantize_int8(w)
        layer, ref, wd = QuantLinear.from_quantized(8, None, 256, q, s), lambda x: ref_q8(x, q, s), deq8(q, s)
    else:
        q, s, z = quantize_int4(w, group)
        layer = QuantLinear.from_quantized(4, group, 256, q, s, z)
        ref, wd = (lambda x: ref_q4(x, q, s, z, group)), deq4(q, s, z, 256, group)
    assert layer.matvec and (bits == 8 or layer.layout == "file")  # int4 kept in the checkpoint layout
    x = torch.randn(2, 3, 256)
    y = layer(x)
    assert y.shape == (2, 3, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y.double().view(6, 48), ref(x.view(6, 256)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.double(), wd, rtol=0, atol=1e-6)  # the dequantized matrix
    torch.testing.assert_close(dequantize(layer).double(), wd, rtol=0, atol=1e-6)  # what QLoRA's backward uses
    xg = torch.randn(4, 256, requires_grad=True)  # QLoRA: dx = dy @ W through the dequantized matrix
    quant_matmul(xg, layer).pow(2).sum().backward()
    dy = 2 * quant_matmul(xg.detach(), layer).double()
    torch.testing.assert_close(xg.grad.double(), dy @ wd, rtol=1e-4, atol=1e-4)


def test_narrow_inputs_keep_torchs_kernels(monkeypatch):
    q, s = quantize_int8(weight(8, 64))
    assert not QuantLinear.from_quantized(8, None, 64, q, s).matvec  # below MIN_QUANT_IN_FEATURES
    monkeypatch.setattr(cpu_matvec, "kernels", lambda: None)  # a machine without a compiler
    q4, s4, z4 = quantize_int4(weight(8, 256), 64)
    layer = QuantLinear.from_quantized(4, 64, 256, q4, s4, z4)
    assert not layer.matvec and layer.layout == "cpu"
    x = torch.randn(2, 256)
    torch.testing.assert_close(layer(x).double(), x.bfloat16().double() @ deq4(q4, s4, z4, 256, 64).T,
                               rtol=0.02, atol=0.02)


@pytest.mark.parametrize("bits, group", [(8, None), (4, 64)])
@pytest.mark.parametrize("N", [1, 6])  # the decode branch, and the sorted batched one
def test_quant_experts_on_our_kernels_match_the_dequantized_experts(bits, group, N):
    E, F_, D = 4, 256, 256
    w1, v1, w2 = (weight(E, F_, D, seed=1), weight(E, F_, D, seed=2), weight(E, D, F_, seed=3))  # w2: (E, D, F)
    quant = (lambda w: quantize_int8(w)) if bits == 8 else (lambda w: quantize_int4(w, group))
    parts = [quant(w) for w in (w1, v1, w2)]
    mod = QuantExperts.from_quantized(bits, group, *[p if bits == 4 else (*p, None) for p in parts])
    assert mod.w13.matvec and mod.w2.matvec
    deq = [deq8(*p) if bits == 8 else deq4(*p, p[0].shape[-1] * 2, group) for p in parts]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g)
    weights, idx = torch.softmax(torch.randn(N, E, generator=g), -1).topk(2, -1)
    y = mod(x, weights, idx)
    def lin(v, part):  # the kernels' arithmetic, by hand, on one fp32 activation row
        v = v.float()[None]
        return (ref_q8(v, *part) if bits == 8 else ref_q4(v, *part, group))[0]

    ref, plain = torch.zeros(N, D, dtype=torch.float64), torch.zeros(N, D, dtype=torch.float64)
    for n in range(N):
        for k in range(2):
            e, p = int(idx[n, k]), weights[n, k].double()
            h = torch.nn.functional.silu(lin(x[n], [t[e] for t in parts[0]])) * lin(x[n], [t[e] for t in parts[1]])
            ref[n] += p * lin(h, [t[e] for t in parts[2]])
            h = torch.nn.functional.silu(deq[0][e] @ x[n].double()) * (deq[1][e] @ x[n].double())
            plain[n] += p * (deq[2][e] @ h)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(y, ref) < 1e-4, rel(y, ref)  # the same arithmetic (fp32 sums; h in fp32 here, float64 by hand)
    # the activations' rounding itself (~15 bits a block, though weight()'s offset row (+1.0) puts an outlier
    # into the GLU's output): far below bf16's 2^-9
    assert rel(y, plain) < 2e-4, rel(y, plain)


@torch.no_grad()
def test_whole_model_on_our_kernels_close_to_its_dequantized_weights():
    cfg = DbrxConfig.from_preset("dbrx-demo", d_model=256, n_heads=4, kv_n_heads=2, ffn_hidden_size=256,
                                 n_layers=2, vocab_size=4096, max_seq_len=64)
    from conftest import randomize_
    from test_quant import dequantized_copy

    model = randomize_(DbrxForCausalLM.from_config(cfg, seed=0), seed=0, std=0.05).eval()
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(4))
    for bits, group in ((8, None), (4, 64)):
        q = quantize_model(copy.deepcopy(model), bits, group, ALL)
        assert q.lm_head.matvec and q.transformer.blocks[0].ffn.experts.w13.matvec
        y, deq = q(ids), dequantized_copy(model, bits, group)(ids)
        rel = ((y - deq).norm() / deq.norm()).item()
        agree = (y.argmax(-1) == deq.argmax(-1)).float().mean().item()
        assert rel < 1e-3 and agree == 1.0, (bits, rel, agree)  # torch's bf16-activation kernels: ~5e-3 here


def test_matvec_linears_keep_parameters_and_outputs():
    cfg = DbrxConfig.from_preset("dbrx-demo", n_layers=1, vocab_size=512, max_seq_len=32)
    model = DbrxForCausalLM.from_config(cfg, seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        ref = model(ids)
        n = cpu_matvec.use_matvec_linears(model)
        y = model(ids)
    assert n == 4 and type(model.lm_head) is cpu_matvec.MatvecLinear  # Wqkv, out_proj, the router, lm_head
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids).sum().backward()  # training goes to F.linear: gradients reach the same parameters
    assert model.lm_head.weight.grad is not None
