"""The Triton grouped GEMM over int8 / int4 expert stacks (dbrx.kernels.triton_quant_gemm) against dequantize-then-
matmul references computed here directly; on the CPU under the Triton interpreter (TRITON_INTERPRET=1 is set before
triton is imported, hence at the top of this module), on CUDA natively."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dbrx.kernels import experts  # noqa: E402
from dbrx.quant.formats import quantize_int4, quantize_int8  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _kernel():
    if not experts.triton_supported(torch.empty(0, device=DEV)):
        return None
    try:
        from dbrx.kernels.triton_quant_gemm import quant_gmm

        a, q = torch.ones(2, 32, device=DEV), torch.ones(1, 16, 32, dtype=torch.int8, device=DEV)
        out = quant_gmm(a, q, torch.ones(1, 16, device=DEV), None, torch.tensor([0, 2], dtype=torch.int32,
                        device=DEV), 8, 32, 32)
        return quant_gmm if torch.equal(out.cpu(), torch.full((2, 16), 32.0)) else None
    except Exception:  # noqa: BLE001 - any failure of the interpreter means: not testable here
        return None


quant_gmm = _kernel()
pytestmark = pytest.mark.skipif(quant_gmm is None, reason="no working Triton (interpreter) here")


def unpack(packed, k):
    """Nibbles by hand: byte j holds input 2j (low) and 2j+1 (high)."""
    codes = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=torch.int64)
    codes[..., 0::2] = packed.long() % 16
    codes[..., 1::2] = packed.long() // 16
    return codes[..., :k]


def dequantized(w, bits, group):
    """w (E, N, K) float -> (q, scale, zero) and the dequantized stack in fp64, by hand."""
    E, N, K = w.shape
    if bits == 8:
        q, s = quantize_int8(w)
        return (q, s, None), q.double() * s.double()[..., None]
    q, s, z = quantize_int4(w, group)
    g = torch.arange(K) // group
    return (q, s, z), (unpack(q, K).double() - 8) * s.double()[..., g] + z.double()[..., g]


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 64)])
@pytest.mark.parametrize("E, N, K, counts", [
    (4, 48, 64, [3, 0, 17, 1]),  # an expert without rows, tiles cut by group ends
    (3, 40, 112, [1, 1, 1]),  # decode-like: one row each; K = 112: a short last int4 group, N not a tile multiple
    (1, 33, 96, [5]),  # a Linear (E = 1)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_gmm_matches_dequantized_reference(bits, group, E, N, K, counts, dtype):
    if dtype == torch.bfloat16 and E != 4 and DEV == "cpu":
        pytest.skip("the interpreter is slow: bf16 on the first shape only")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(E, N, K, generator=gen) * 0.05
    w[:, 0] += 0.5  # an offset row (the int4 zero far from 0)
    (q, s, z), wd = dequantized(w, bits, group)
    R = sum(counts)
    a = torch.randn(R, K, generator=gen)
    bounds = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    out = quant_gmm(a.to(DEV, dtype), q.to(DEV), s.to(DEV), None if z is None else z.to(DEV), bounds.to(DEV), bits,
                    group or 32, K)
    assert out.shape == (R, N) and out.dtype == dtype
    ab = a.to(dtype).double()  # the activations as the kernel sees them
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))  # (R,) the expert of each row
    ref = torch.einsum("rk,rnk->rn", ab, wd[expert])
    mag = torch.einsum("rk,rnk->rn", ab.abs(), wd.abs()[expert])
    # fp32: fp32 accumulation; bf16: the dequantized weight rounded to bf16 per element, then the bf16 output
    rel = 1e-5 if dtype == torch.float32 else 3 * 2.0**-8
    err = (out.double().cpu() - ref).abs()
    assert (err <= rel * mag + 1e-6).all(), float((err / (mag + 1e-9)).max())


def test_quant_gmm_with_no_rows():
    q = torch.zeros(2, 16, 32, dtype=torch.int8, device=DEV)
    out = quant_gmm(torch.empty(0, 32, device=DEV), q, torch.ones(2, 16, device=DEV), None,
                    torch.zeros(3, dtype=torch.int32, device=DEV), 8, 32, 32)
    assert out.shape == (0, 16)


def _reference(x, weights, idx, d1, dv, d2t):
    """Per token, per chosen expert, with the dequantized weights (fp64) and the kernels' bf16 activations."""
    r = lambda t: t.bfloat16().double()  # noqa: E731
    y = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            h = torch.nn.functional.silu(d1[e] @ r(x[n])) * (dv[e] @ r(x[n]))
            y[n] += weights[n, k].double() * (d2t[e] @ r(h))
    return y


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_quant_experts_grouped_gpu_path_matches_reference(bits, group):
    """QuantExperts' CUDA path (sort, one grouped launch per matrix, GLU, weighting), run here on CPU tensors in the
    checkpoint layout under the interpreter."""
    from dbrx.quant.layers import QuantExperts

    E, Fh, D, N = 4, 48, 64, 5
    gen = torch.Generator().manual_seed(1)
    parts, deq = [], []
    for _ in range(3):  # gate, up (E, F, D) and down quantized as (E, D, F): every matrix (out, in)
        w = torch.randn(E, Fh, D, generator=gen) * 0.05
        p, wd = dequantized(w if len(parts) < 2 else w.transpose(1, 2).contiguous(), bits, group)
        parts.append(p)
        deq.append(wd)
    mod = QuantExperts.from_quantized(bits, group, *parts, layout="file")
    x = torch.randn(N, D, generator=gen)
    weights, idx = torch.softmax(torch.randn(N, E, generator=gen), -1).topk(2, -1)
    idx[1] = idx[0]  # two tokens sharing both experts
    y = mod._grouped_gpu(x.bfloat16(), weights, idx)
    ref = _reference(x, weights, idx, *deq)
    assert ((y.double() - ref).norm() / ref.norm()) < 2e-2


def test_quantized_layers_refuse_devices_without_kernels():
    from dbrx.quant.layers import check_device

    with pytest.raises(ValueError, match="CPU or on CUDA"):
        check_device("mps")
    check_device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
@torch.no_grad()
def test_gpu_quantized_model_matches_the_cpu_one(bits, group):
    """The same quantized weights through the Triton kernel (CUDA) and torch's CPU kernels: the same logits up to
    bf16 rounding; prefill and batch-1 decode (the experts' grouped path at 1 and at many rows)."""
    from dbrx import DbrxConfig, DbrxForCausalLM
    from dbrx.quant import quantize_model

    cfg = DbrxConfig.from_preset("dbrx-demo", n_layers=2, vocab_size=4096, max_seq_len=64)
    base = DbrxForCausalLM.from_config(cfg, seed=0).eval()
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    targets = ("attn", "experts", "lm_head", "embedding")
    cpu = quantize_model(DbrxForCausalLM.from_config(cfg, seed=0).eval(), bits, group, targets)
    gpu = quantize_model(base.to("cuda"), bits, group, targets)
    for x in (ids, ids[:1, :1]):
        ref, out = cpu(x), gpu(x.cuda()).cpu()
        assert ((out - ref).norm() / ref.norm()) < 2e-2
