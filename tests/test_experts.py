"""Expert compute backends against an fp64 dense reference; compile, checkpointing, flex attention, batch invariance.

Without CUDA the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is
imported, hence at the top of this module).
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from dbrx import DbrxConfig  # noqa: E402
from dbrx.kernels import attention, experts  # noqa: E402
from dbrx.kernels.experts import expert_glu, resolve_backend, sort_by_expert  # noqa: E402
from dbrx.model import DbrxForCausalLM  # noqa: E402
from dbrx.parallel.activation_checkpoint import apply_activation_checkpointing  # noqa: E402
from dbrx.parallel.compile import compile_blocks  # noqa: E402

# The CPU tests run the Triton kernels in the interpreter; on a CUDA machine (no interpreter) the GPU tests below
# cover them instead.


def _triton_interpreter_works() -> bool:
    """Triton's CPU interpreter runs our kernels here (some triton/numpy pairs break it: triton 3.6's interpreter
    cannot loop over a runtime bound with numpy 2.4; triton 3.2's needs a GPU driver even to autotune)."""
    if torch.cuda.is_available() or not experts.triton_supported(torch.empty(0)):
        return False
    try:
        a, b = torch.ones(4, 16), torch.ones(1, 16, 8)
        return torch.equal(experts._tg().gmm_rows(a, b, torch.tensor([0, 4], dtype=torch.int32))[0], a @ b[0])
    except Exception:  # noqa: BLE001 - any failure of the interpreter means: not testable here
        return False


HAS_TRITON = _triton_interpreter_works()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no working Triton interpreter here (see above)")
HAS_GMM = experts._gmm is not None
needs_gmm = pytest.mark.skipif(not HAS_GMM, reason="torch < 2.8 has no torch._grouped_mm")
GMM = pytest.param("grouped_mm", marks=needs_gmm)
HAS_CUDA_TRITON = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_case(seed, N, D, F, E, K, empty=(), dtype=torch.float32):
    """Random tokens, router weights/ids (experts in `empty` get no tokens) and (E, F, D) expert weights."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g)
    logits[:, list(empty)] = -1e9
    weights, idx = torch.softmax(logits, -1).topk(K, dim=-1)
    x = torch.randn(N, D, generator=g)
    ws = [torch.randn(E, F, D, generator=g) / D**0.5 for _ in range(3)]
    return [t.to(dtype) for t in (x, weights)] + [idx] + [w.to(dtype) for w in ws]


def run(backend, x, weights, idx, w1, v1, w2, dtype=None):
    """Output and gradients (x, router weights, w1, v1, w2) of a fixed random projection of expert_glu."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, weights, w1, v1, w2)]
    xx, ww, a, b, c = leaves
    y = expert_glu(xx, ww, idx, a, b, c, backend=backend)
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    proj = proj.to(device=y.device, dtype=y.dtype)
    (y * proj).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


# (seed, N, D, F, E, K, experts without tokens): top-1, top-E, empty experts, N smaller than E
CASES = [
    (0, 37, 32, 48, 6, 2, (2,)),
    (1, 20, 16, 24, 4, 1, (0, 3)),
    (2, 9, 24, 16, 5, 5, ()),
    (3, 3, 8, 40, 8, 2, (1, 5, 6)),
    (4, 64, 40, 32, 16, 4, (7,)),
]
NAMES = ["out", "dx", "drouter", "dw1", "dv1", "dw2"]


def _close(got, ref, atol, rtol):
    for name, a, b in zip(NAMES, got, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["loop", GMM, "dense"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_backend_matches_reference_fp32(backend, case):
    seed, N, D, F, E, K, empty = case
    tensors = make_case(seed, N, D, F, E, K, empty)
    ref = run("dense", *tensors, dtype=torch.float64)
    got = run(backend, *tensors)
    assert all(t.dtype == torch.float32 for t in got)
    _close(got, ref, atol=2e-5, rtol=1e-4)
    for e in empty:  # experts that received no tokens get exactly zero weight gradients
        assert all(g[e].abs().max() == 0 for g in got[3:])


@st.composite
def shapes(draw):
    """(seed, N, D, F, E, K, empty): D and F multiples of 4 (grouped_mm's 16-byte rule in fp32), at most E - K
    experts without tokens (so that top-k never has to pick one of them)."""
    E = draw(st.integers(1, 10))
    K = draw(st.integers(1, E))
    empty = draw(st.sets(st.integers(0, E - 1), max_size=E - K))
    return (draw(st.integers(0, 2**16)), draw(st.integers(1, 40)), 4 * draw(st.integers(1, 10)),
            4 * draw(st.integers(1, 12)), E, K, tuple(sorted(empty)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=shapes())
def test_random_shapes_match_reference(case):
    seed, N, D, F, E, K, empty = case
    tensors = make_case(seed, N, D, F, E, K, empty)
    ref = run("dense", *tensors, dtype=torch.float64)
    for backend in ("grouped_mm", "loop") if HAS_GMM else ("loop",):
        got = run(backend, *tensors)
        _close(got, ref, atol=2e-5, rtol=1e-4)
        for e in empty:
            assert all(g[e].abs().max() == 0 for g in got[3:]), (backend, e)


@needs_triton
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # the interpreter is slow
@given(case=shapes())
def test_random_shapes_triton_matches_reference(case):
    tensors = make_case(*case)
    _close(run("triton", *tensors), run("dense", *tensors, dtype=torch.float64), atol=2e-5, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("case", CASES[:3], ids=[f"case{c[0]}" for c in CASES[:3]])
def test_triton_matches_reference_fp32(case):
    seed, N, D, F, E, K, empty = case
    tensors = make_case(seed, N, D, F, E, K, empty)
    _close(run("triton", *tensors), run("dense", *tensors, dtype=torch.float64), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["loop", GMM, pytest.param("triton", marks=needs_triton)])
def test_backend_matches_reference_bf16(backend):
    tensors = make_case(5, 29, 32, 48, 6, 2, (4,), dtype=torch.bfloat16)
    ref = run("dense", *tensors, dtype=torch.float64)
    got = run(backend, *tensors)
    assert got[0].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    for name, a, b in zip(NAMES, got, ref):  # bf16: relative error of the whole tensor
        err = (a.double() - b).norm() / b.norm()
        assert err < 2e-2, (name, float(err))


@needs_gmm
def test_sum_backward_and_gradient_layout():
    x, weights, idx, w1, v1, w2 = make_case(6, 12, 16, 8, 4, 2)
    w1.requires_grad_()
    expert_glu(x, weights, idx, w1, v1, w2, backend="grouped_mm").sum().backward()  # an expanded output grad
    assert w1.grad.shape == (4, 8, 16) and w1.grad.is_contiguous()


@pytest.mark.parametrize("chunk", [1, 96, 1000])  # elements per chunk: 1 row, 2 rows, 20 rows (of 37 x 48)
def test_glu_backward_in_chunks_equals_one_pass(monkeypatch, chunk):
    g = torch.Generator().manual_seed(7)
    gate, up, dhp = (torch.randn(37, 48, generator=g).to(torch.bfloat16) for _ in range(3))
    p = torch.rand(37, generator=g).to(torch.bfloat16)
    whole = experts.glu_backward(gate, up, dhp, p)  # small: one pass
    monkeypatch.setattr(experts, "GLU_CHUNK_ELEMENTS", chunk)
    for name, a, b in zip(("hp", "dgate", "dup", "dp"), experts.glu_backward(gate, up, dhp, p), whole):
        assert torch.equal(a, b), name  # the same fp32 arithmetic per element, so bitwise equal


@needs_gmm
def test_chunked_backward_matches_reference(monkeypatch):
    monkeypatch.setattr(experts, "GLU_CHUNK_ELEMENTS", 200)  # chunks of 4 rows of F=48 (74 routed rows)
    tensors = make_case(0, 37, 32, 48, 6, 2, (2,))
    _close(run("grouped_mm", *tensors), run("dense", *tensors, dtype=torch.float64), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", [GMM, pytest.param("triton", marks=needs_triton)])
def test_inference_path_equals_autograd_path(backend):
    x, weights, idx, w1, v1, w2 = make_case(0, 37, 32, 48, 6, 2, (2,))
    with torch.no_grad():  # in-place SiLU and product, nothing saved
        fast = expert_glu(x, weights, idx, w1, v1, w2, backend=backend)
    w1.requires_grad_()
    train = expert_glu(x, weights, idx, w1, v1, w2, backend=backend)
    assert train.requires_grad and torch.equal(fast, train.detach())


@needs_gmm
@pytest.mark.parametrize("major, torch_version, expected", [
    (9, (2, 6), "grouped_mm"), (10, (2, 9), "grouped_mm"), (10, (2, 8), "triton"), (8, (2, 11), "triton")])
def test_auto_backend_on_cuda_by_architecture(monkeypatch, major, torch_version, expected):
    """torch's grouped matmul has fast kernels on Hopper (and Blackwell from 2.9); elsewhere it loops with host
    syncs, so `auto` takes the Triton kernels there. Fake CUDA tensors: no GPU needed."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))
    monkeypatch.setattr(experts, "_TORCH", torch_version)
    monkeypatch.setattr(experts, "_FAST_GMM", {})
    monkeypatch.setattr(experts, "triton_supported", lambda x: True)
    with FakeTensorMode():
        x = torch.empty(8, 64, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(4, 128, 64, dtype=torch.bfloat16, device="cuda")
        assert resolve_backend("auto", x, w) == expected
        if expected != "grouped_mm":
            with pytest.raises(ValueError, match="Hopper"):
                resolve_backend("grouped_mm", x, w)


@needs_gmm
def test_recompute_keeps_no_expert_activations_and_gives_the_same_gradients():
    N, D, F, E, K = 37, 32, 48, 6, 2
    x, weights, idx, w1, v1, w2 = make_case(0, N, D, F, E, K, (2,))
    results = {}
    for recompute in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weights, w1, v1, w2)]
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            y = expert_glu(leaves[0], leaves[1], idx, *leaves[2:], backend="grouped_mm", recompute=recompute)
        y.square().sum().backward()
        results[recompute] = [y.detach()] + [t.grad for t in leaves]
        assert shapes.count((N * K, F)) == (0 if recompute else 2), (recompute, shapes)  # gate and up
    for name, a, b in zip(NAMES, results[True], results[False]):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)  # the same arithmetic, recomputed


def test_sort_by_expert():
    idx = torch.tensor([[2, 0], [0, 3], [2, 1]])
    order, inverse, ends = sort_by_expert(idx, 5)
    flat = idx.reshape(-1)
    assert flat[order].tolist() == [0, 0, 1, 2, 2, 3]
    assert order.tolist() == [1, 2, 5, 0, 4, 3]  # stable: ties keep token order
    assert torch.equal(order[inverse], torch.arange(6))
    assert ends.tolist() == [2, 3, 5, 6, 6] and ends.dtype == torch.int32


@needs_gmm
def test_backend_errors():
    x, weights, idx, w1, v1, w2 = make_case(0, 4, 6, 10, 3, 1)  # 6 * 4 bytes: not 16-byte aligned
    with pytest.raises(ValueError, match="unknown expert backend"):
        expert_glu(x, weights, idx, w1, v1, w2, backend="magic")
    with pytest.raises(ValueError, match="grouped_mm"):
        expert_glu(x, weights, idx, w1, v1, w2, backend="grouped_mm")
    assert resolve_backend("auto", x, w1) == "loop"  # the CPU fallback for unaligned shapes
    aligned = make_case(0, 4, 8, 8, 3, 1)
    assert resolve_backend("auto", aligned[0], aligned[3]) == "grouped_mm"


# ---- few tokens on the CPU: expert_loop (the decode path), auto's choice of it ---------------------------------
# (seed, N, D, F, E, K): one token with top-1 .. top-E, and a few tokens (the sorted branch) with a top-1 router
FEW = [(10, 1, 32, 48, 6, 2), (11, 1, 16, 24, 16, 4), (12, 1, 8, 40, 4, 4), (13, 1, 24, 16, 5, 1),
       (14, 3, 16, 24, 8, 1)]


def _dense_per_token(x, weights, idx, w1, v1, w2):
    """The direct definition in fp64, token by token: sum_k weights[n, k] * expert_{idx[n, k]}(x[n])."""
    x, weights, w1, v1, w2 = (t.double() for t in (x, weights, w1, v1, w2))
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k, e in enumerate(idx[n].tolist()):
            y[n] += weights[n, k] * ((torch.nn.functional.silu(w1[e] @ x[n]) * (v1[e] @ x[n])) @ w2[e])
    return y


@pytest.mark.parametrize("case", FEW, ids=[f"case{c[0]}" for c in FEW])
def test_expert_loop_matches_per_token_reference(case):
    """Both branches of expert_loop (one token: its K chosen experts in turn; more: sorted by expert), inference
    (in place) and with autograd: outputs, and gradients against the fp64 dense reference; experts not chosen get
    exactly zero weight gradients."""
    tensors = make_case(*case)
    ref = _dense_per_token(*tensors)
    with torch.no_grad():
        fast = expert_glu(*tensors, backend="loop")
    torch.testing.assert_close(fast.double(), ref, atol=2e-5, rtol=1e-4)
    got = run("loop", *tensors)
    assert torch.equal(got[0], fast)  # the same arithmetic with and without autograd
    _close(got, run("dense", *tensors, dtype=torch.float64), atol=2e-5, rtol=1e-4)
    unused = set(range(case[4])) - set(tensors[2].reshape(-1).tolist())
    for e in unused:
        assert all(g[e].abs().max() == 0 for g in got[3:]), e


def test_auto_takes_the_expert_loop_for_inference_on_few_rows(monkeypatch):
    """auto on the CPU: expert_loop for inference on at most LOOP_MAX_ROWS routed rows (a decode step at top-4),
    the grouped path otherwise (more rows, or autograd recording); each equal to the reference."""
    chosen = []
    real = experts.expert_loop
    monkeypatch.setattr(experts, "expert_loop", lambda *a, **k: chosen.append(a[2].shape) or real(*a, **k))
    for N, K, grad, loop in [(1, 4, False, True), (1, 2, False, True), (2, 4, False, False), (1, 4, True, False),
                             (4, 1, False, True), (5, 1, False, False)]:
        chosen.clear()
        tensors = make_case(0, N, 16, 24, 8, K)
        with torch.set_grad_enabled(grad):
            y = expert_glu(*[t.requires_grad_(grad) if t.is_floating_point() else t for t in tensors])
        assert bool(chosen) == (loop or not HAS_GMM), (N, K, grad)  # without grouped_mm the fallback is the loop
        torch.testing.assert_close(y.detach().double(), _dense_per_token(*tensors), atol=2e-5, rtol=1e-4)
    x, weights, idx, w1, v1, w2 = make_case(0, 1, 16, 24, 8, 4)
    assert experts.use_expert_loop(x, idx, weights, w1)
    monkeypatch.setattr(experts, "LOOP_MAX_ROWS", 3)
    assert not experts.use_expert_loop(x, idx, weights, w1)


def test_one_token_loop_traces_into_one_graph_with_captured_scalars(monkeypatch):
    """Compiled (as `dbrx bench decode --compile`, dynamo capturing scalar outputs), auto at one token is the loop
    over its K chosen experts with unbacked ids: one graph, no break, no recompilation for other ids, equal to eager.
    Without captured scalars it stays the dense path (no host read in a graph)."""
    monkeypatch.setattr(experts, "_dense", lambda *a: pytest.fail("dense path taken"))
    torch._dynamo.reset()
    cases = [make_case(seed, 1, 16, 24, 8, 4) for seed in (0, 1, 2)]
    assert len({tuple(c[2][0].tolist()) for c in cases}) == 3  # three different choices of experts
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch.no_grad():
        explained = torch._dynamo.explain(lambda *t: expert_glu(*t))(*cases[0])
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        fn = torch.compile(lambda *t: expert_glu(*t), backend=counter, fullgraph=True, dynamic=False)
        for c in cases:
            torch.testing.assert_close(fn(*c), expert_glu(*c), atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1  # one compilation served all three
    monkeypatch.undo()
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(lambda *t: expert_glu(*t))(*cases[0])
    assert explained.graph_break_count == 0


# ---- the model: batch invariance, compile, checkpointing, flex attention -----------------------------------
def tiny(**kw):
    return DbrxConfig.from_preset("dbrx-tiny", vocab_size=128, max_seq_len=64, **kw)


@pytest.mark.parametrize("backend", [GMM, "loop", pytest.param("triton", marks=needs_triton)])
def test_batch_invariance(backend):
    """A sequence's logits do not depend on the other sequences of its batch (dropless routing)."""
    model = DbrxForCausalLM.from_config(tiny(), seed=0).eval()
    for block in model.transformer.blocks:
        block.ffn.backend = backend
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 8), generator=g)
    with torch.no_grad():
        alone = model(ids[1:2])
        batched = model(ids)
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)


def test_dynamo_fullgraph_trace_expert_glu():
    """No graph break anywhere in the MoE (no host sync) for the grouped paths."""
    tensors = make_case(0, 16, 16, 16, 4, 2, dtype=torch.bfloat16)
    backends = (["grouped_mm"] if HAS_GMM else []) + ["dense"] + (["triton"] if HAS_TRITON else [])
    for backend in backends:
        for training in (False, True):  # the in-place inference path and the autograd function
            torch._dynamo.reset()
            args = [t.detach().requires_grad_(training) if t.is_floating_point() else t for t in tensors]
            explained = torch._dynamo.explain(lambda *t, b=backend: expert_glu(*t, backend=b))(*args)
            assert explained.graph_break_count == 0 and explained.graph_count == 1, (backend, training,
                                                                                     explained.break_reasons)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model.compute_loss(ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_compiled_blocks_fullgraph_with_checkpointing():
    """compile_blocks(fullgraph=True) on grouped_mm bf16 blocks with selective checkpointing matches eager.

    (Full checkpointing goes through the same code path; left out of CI to keep this file's compile time down.)
    """
    mode = "selective"
    torch._dynamo.reset()
    model = DbrxForCausalLM.from_config(tiny(n_layers=1), seed=0, dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    apply_activation_checkpointing(model, mode)
    compile_blocks(model, fullgraph=True)
    assert model.activation_checkpointing == mode
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-2)
    for name, g in grads.items():
        torch.testing.assert_close(g.float(), ref_grads[name].float(), atol=2e-2, rtol=5e-2, msg=name)
    assert set(model.state_dict()) == set(DbrxForCausalLM.from_config(tiny(n_layers=1), device="meta").state_dict())


@pytest.mark.skipif(attention.flex_attention is None, reason="torch without flex_attention")
def test_flex_attention_matches_sdpa_mask(monkeypatch):
    import warnings

    model = DbrxForCausalLM.from_config(tiny(), seed=0).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 24), generator=g)
    doc_ids = torch.tensor([[0] * 5 + [1] * 12 + [2] * 7, [0] * 20 + [1] * 4])
    pad = torch.ones(2, 24, dtype=torch.long)
    pad[1, -3:] = 0
    with torch.no_grad():
        ref = model(ids, doc_ids=doc_ids)
        ref_pad = model(ids, attention_mask=pad, doc_ids=doc_ids)
        monkeypatch.setattr(attention, "FLEX_ON_CPU", True)
        assert attention.is_block_mask(attention.doc_block_mask(doc_ids))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
            flex = model(ids, doc_ids=doc_ids)
            flex_pad = model(ids, attention_mask=pad, doc_ids=doc_ids)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex_pad[:, :21], ref_pad[:, :21], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex_pad[0], ref_pad[0], atol=1e-5, rtol=1e-5)


# ---- CUDA (pytest -m gpu): the compiled Triton kernels and torch's grouped GEMM in bf16, flex attention ----------
def _poison_cuda_cache():
    """Leave NaN in the caching allocator's free blocks, so that an output element nobody writes shows up."""
    torch.full((128 << 20,), float("nan"), device="cuda", dtype=torch.float32)  # 512 MiB, freed at once


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", [GMM, pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_CUDA_TRITON, reason="triton not installed"))])
@pytest.mark.parametrize("case", [(8, 300, 256, 384, 16, 4, (0, 11)), (9, 2048, 1024, 1792, 16, 4, (5,)),
                                  (10, 77, 128, 200, 8, 2, ())], ids=["ragged", "wide", "f200"])
def test_gpu_backend_matches_loop_bf16(backend, case):
    """bf16 forward and backward against the fp32 loop reference on the same GPU, with experts left empty."""
    seed, N, D, F, E, K, empty = case
    tensors = [t.cuda() for t in make_case(seed, N, D, F, E, K, empty, dtype=torch.bfloat16)]
    ref = run("loop", *tensors, dtype=torch.float32)
    for _ in range(2):  # the second run gets recycled (poisoned) memory
        _poison_cuda_cache()
        got = run(backend, *tensors)
        assert got[0].dtype == torch.bfloat16 and got[3].shape == (E, F, D)
        for name, a, b in zip(NAMES, got, ref):
            assert torch.isfinite(a).all(), name
            err = (a.double() - b.double()).norm() / b.double().norm()
            assert err < 2e-2, (backend, name, float(err))
        for e in empty:  # no tokens: exactly zero weight gradients
            assert all(g[e].abs().max() == 0 for g in got[3:]), e


@pytest.mark.gpu
@gpu
def test_gpu_flex_attention_matches_sdpa_and_block_mask_is_sparse(monkeypatch):
    cfg = DbrxConfig.from_preset("dbrx-tiny", vocab_size=128, max_seq_len=512, d_model=128, n_heads=2, kv_n_heads=1)
    model = DbrxForCausalLM.from_config(cfg, seed=0, device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 384), device="cuda")
    doc_ids = torch.cat([torch.zeros(2, 100), torch.ones(2, 200), torch.full((2, 84), 2.0)], 1).long().cuda()
    assert attention.use_flex(doc_ids, None) and attention.is_block_mask(attention.doc_block_mask(doc_ids))
    with torch.no_grad():
        flex = model(ids, doc_ids=doc_ids).float()  # compiled flex_attention with a block mask
        monkeypatch.setattr(attention, "use_flex", lambda *a: False)  # SDPA with a dense boolean mask
        ref = model(ids, doc_ids=doc_ids).float()
    assert (flex - ref).norm() / ref.norm() < 2e-2
    # 32K tokens: the block mask is built without a (T, T) tensor (that alone would be 1 GiB of bools)
    T = 32768
    long_docs = (torch.arange(T, device="cuda") // 5000)[None]  # (1, T)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    block_mask = attention.doc_block_mask(long_docs)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 256 * 2**20
    assert block_mask.shape[-2:] == (T, T)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_CUDA_TRITON, reason="triton not installed"))])
def test_gpu_moe_forward_backward_never_syncs(backend):
    """CUDA's sync debug mode turns any host-device synchronisation in the MoE (router, sort, grouped GEMMs,
    combine, statistics; forward and backward) into an error."""
    moe = DbrxForCausalLM.from_config(tiny(), seed=0, device="cuda", dtype=torch.bfloat16).transformer.blocks[0].ffn
    moe.backend = backend
    x = torch.randn(4, 48, moe.router.layer.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        y, stats = moe(x)
        (y.float().square().mean() + stats.prob_sum.sum()).backward()

    step()  # warm-up: Triton autotuning times its candidates, which synchronises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x.grad).all()
