"""The Triton paged-attention backend against `reference_attention`: ragged batches of decodes and prefill chunks.

Without CUDA the kernel runs under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported,
hence at the top of this module); the cases are tiny because the interpreter is slow.
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import randomize_, tiny_config  # noqa: E402

from dbrx import DbrxForCausalLM  # noqa: E402
from dbrx.kernels import paged_attention  # noqa: E402
from dbrx.kernels import triton_paged_attention as tpa  # noqa: E402
from dbrx.kernels.paged_attention import PagedMetadata, default_backend, reference_attention  # noqa: E402


def make_case(qlens, lens, kvH=2, G=3, hd=16, BS=4, dtype=torch.float32, cache_dtype=None, seed=0, device="cpu"):
    """q (N, kvH*G, hd), caches (NB, BS, kvH, hd) and metadata: each sequence's blocks drawn from a shuffled pool,
    tables padded with a spare block, and every slot outside a context holding huge values (reading one shows)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-L // BS) for L in lens]
    NB = sum(need) + 2
    ids = torch.randperm(NB, generator=g).tolist()
    spare, rows = ids.pop(), []
    for nb in need:
        rows.append([ids.pop() for _ in range(nb)])
    width = max(need) + 1
    tables = torch.tensor([r + [spare] * (width - len(r)) for r in rows])  # (S, width)
    shape = (NB, BS, kvH, hd)
    k_cache, v_cache = torch.full(shape, 1e4), torch.full(shape, -1e4)
    slots = torch.cat([tables[s, torch.arange(L) // BS] * BS + torch.arange(L) % BS for s, L in enumerate(lens)])
    k_cache.view(-1, kvH, hd)[slots] = torch.randn(len(slots), kvH, hd, generator=g)
    v_cache.view(-1, kvH, hd)[slots] = torch.randn(len(slots), kvH, hd, generator=g)
    q = torch.randn(sum(qlens), kvH * G, hd, generator=g)
    cache_dtype = cache_dtype or dtype
    meta = PagedMetadata(torch.zeros(sum(qlens), dtype=torch.long, device=device), tables.to(device), list(qlens),
                         list(lens))
    return q.to(device, dtype), k_cache.to(device, cache_dtype), v_cache.to(device, cache_dtype), meta


def _interpreter_works() -> bool:
    """Triton's CPU interpreter runs a kernel like ours here: a loop with a runtime bound, gathered loads and a dot
    (some triton/numpy pairs break it; see test_experts). A probe of its own, so that a broken paged kernel fails
    the tests below instead of skipping them."""
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None or not tpa._INTERPRET:
        return False
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def probe(x_ptr, idx_ptr, out_ptr, n):
            r = tl.arange(0, 16)
            acc = tl.zeros((16, 16), dtype=tl.float32)
            for _ in range(0, n):
                rows = tl.load(idx_ptr + r).to(tl.int64)
                a = tl.load(x_ptr + rows[:, None] * 16 + r[None, :])
                acc = tl.dot(a, a, acc, input_precision="ieee")
            tl.store(out_ptr + r[:, None] * 16 + r[None, :], acc)

        x, idx, out = torch.randn(16, 16), torch.randperm(16), torch.empty(16, 16)
        probe[(1,)](x, idx, out, 2)
        return torch.allclose(out, 2 * x[idx] @ x[idx], atol=1e-4)
    except Exception:  # noqa: BLE001 - any failure of the interpreter means: not testable here
        return False


HAS_TRITON = _interpreter_works()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no working Triton interpreter here")
HAS_CUDA_TRITON = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
gpu = pytest.mark.skipif(not HAS_CUDA_TRITON, reason="needs a CUDA device and triton")

# name: (query_lens, seq_lens, kvH, G, hd, BS). BS 4: lens not multiples of it; key tiles of 16 span 4 blocks.
CASES = {
    "decode": ([1, 1, 1], [1, 6, 23], 2, 3, 16, 4),
    "prefill": ([7, 4], [7, 4], 2, 3, 16, 4),
    "prefill_chunk": ([9], [26], 1, 4, 16, 4),  # 36 rows: three query tiles, each with its own causal limit
    "mixed": ([1, 6, 1, 3], [9, 14, 1, 3], 2, 3, 16, 4),
    "mixed_no_gqa": ([2, 1, 5], [2, 17, 11], 3, 1, 16, 4),
    "block_16": ([1, 5, 1], [33, 20, 16], 2, 2, 16, 16),
    "block_5_hd_24": ([3, 1], [13, 7], 1, 2, 24, 5),  # odd block size, head dim padded to 32 in the kernel
}


def _check(name, dtype, cache_dtype=None, atol=2e-6, rtol=1e-5, device="cpu"):
    qlens, lens, kvH, G, hd, BS = CASES[name]
    q, k, v, meta = make_case(qlens, lens, kvH, G, hd, BS, dtype, cache_dtype, device=device)
    got = tpa.paged_attention(q, k, v, meta, G > 1)
    assert got.shape == q.shape and got.dtype == q.dtype
    want = reference_attention(q.float(), k.float(), v.float(), meta, G > 1)  # fp32 from the same rounded inputs
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("name", CASES)
def test_matches_reference_fp32(name):
    _check(name, torch.float32)


@needs_triton
@pytest.mark.parametrize("name", ["decode", "mixed", "block_5_hd_24"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_half(name, dtype):
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3  # p is rounded to the half type before P @ V
    _check(name, dtype, atol=tol, rtol=tol)


@needs_triton
def test_bf16_cache_fp32_queries():
    _check("mixed", torch.float32, cache_dtype=torch.bfloat16)


@needs_triton
def test_tile_map_is_built_once_per_step():
    q, k, v, meta = make_case(*CASES["mixed"][:2])
    tpa.paged_attention(q, k, v, meta, True)
    cached = dict(meta.derived)
    tpa.paged_attention(q, k, v, meta, True)
    assert len(cached) == 1 and all(a is b for a, b in zip(cached.values(), meta.derived.values()))


@needs_triton
def test_model_steps_through_the_backend(monkeypatch):
    """The dense forward's logits from chunked ragged steps (test_paged's plan, smaller), q non-contiguous."""
    from test_paged import Paged

    monkeypatch.setattr(paged_attention, "BACKEND", "triton")
    model = randomize_(DbrxForCausalLM.from_config(tiny_config(kv_n_heads=2)), seed=1).eval()
    seqs = {"a": list(range(3, 14)), "b": list(range(40, 47))}
    with torch.no_grad():
        dense = {name: model(torch.tensor([s]))[0] for name, s in seqs.items()}  # (T, V)
    paged, got = Paged(model), {name: [] for name in seqs}
    for step in [{"a": (0, 6), "b": (0, 1)}, {"a": (6, 10), "b": (1, 2)}, {"b": (2, 7), "a": (10, 11)}]:
        for name, logits in paged.step({name: seqs[name][a:b] for name, (a, b) in step.items()}).items():
            got[name].append(logits)
    for name in seqs:
        torch.testing.assert_close(torch.cat(got[name]), dense[name], atol=2e-5, rtol=1e-4, msg=name)


def test_user_mistakes_raise_value_error():
    q, k, v, meta = make_case([1, 2], [3, 2])
    bad = [
        (q, k, v, PagedMetadata(meta.slot_mapping, meta.block_tables, [1, 1], [3, 2]), True),  # 2 lens, 3 tokens
        (q, k, v, PagedMetadata(meta.slot_mapping, meta.block_tables, [1, 2], [3, 1]), True),  # query_len > seq_len
        (q, k, v, PagedMetadata(meta.slot_mapping, meta.block_tables, [1, 2], [3, 99]), True),  # past the table
        (q, k, v, meta, False),  # 6 query heads, 2 KV heads, gqa off
        (q[..., :8], k, v, meta, True),  # head dims differ
    ]
    for args in bad:
        with pytest.raises(ValueError):
            tpa._validate(*args)


def test_backend_registry_and_default():
    assert "triton" in paged_attention.BACKENDS
    assert default_backend(torch.device("cpu")) == default_backend("cpu") == "mixed"
    want = "triton" if importlib.util.find_spec("triton") is not None else "mixed"
    assert default_backend("cuda") == want


def test_refuses_the_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(tpa, "_INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA"):
        tpa.paged_attention(*make_case([1], [2]), False)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dbrx_shapes_on_cuda(dtype):
    """DBRX's attention shapes (hd 128, kvH 8, H 48, BS 16): decodes with long contexts and prefill chunks."""
    qlens, lens = [1] * 6 + [37, 200, 1], [1, 17, 300, 64, 1000, 129, 37, 700, 2048]
    q, k, v, meta = make_case(qlens, lens, kvH=8, G=6, hd=128, BS=16, dtype=dtype, device="cuda")
    got = tpa.paged_attention(q, k, v, meta, True)
    want = reference_attention(q.float(), k.float(), v.float(), meta, True)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    decode = make_case([1] * 8, [5, 16, 17, 100, 1000, 3, 64, 2000], kvH=8, G=6, hd=128, BS=16, dtype=dtype,
                       device="cuda")
    torch.testing.assert_close(tpa.paged_attention(*decode, True).float(),
                               reference_attention(*[t.float() for t in decode[:3]], decode[3], True),
                               atol=tol, rtol=tol)
