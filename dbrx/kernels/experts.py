"""Expert compute for the dropless MoE: sort routed rows by expert, grouped GLU matmuls, weighted un-sort.

Shape legend: N tokens, D d_model, F ffn_hidden_size, E experts, K top-k, R = N*K routed rows.

Backends (all exact up to floating-point rounding, all forward and backward):
  grouped_mm  torch._grouped_mm over the stacked (E, F, D) weights (CUDA bf16; the CPU where strides are 16-byte
              aligned; under torch.compile bf16 only)
  triton      our Triton grouped GEMMs (dbrx.kernels.triton_grouped_gemm), gate and up fused in one pass
  dense       every expert on every token, combined with the router weights: E/K times the work, no sorting,
              no host sync; the independent reference for tests
  loop        one call per active expert (`expert_loop`): at one token its K chosen experts in turn, unsorted;
              else the rows sorted by expert, experts without rows skipped; reads the expert ids on the host
  auto        CUDA: grouped_mm where torch has its fast kernels (Hopper; Blackwell from torch 2.9) for the shapes,
              else triton (A100, L40S ...), else loop. CPU: loop for inference on few tokens (`use_expert_loop`:
              decode), else grouped_mm where aligned, else loop (dense while compiling, where a host sync would
              break the graph)

grouped_mm and triton share one autograd.Function (_GroupedMoE), from the tokens to the combined output: the
router weight multiplies h before w2, and it keeps only the gate/up activations (R, F) beside its inputs (the
routed copies of x are gathered again, p * silu(gate) * up recomputed), and writes each weight gradient once
as (E, F, D). No path but `loop` synchronises with the host, so a block compiles with
torch.compile(fullgraph=True). `loop` at one token compiles too when dynamo captures scalar outputs
(`torch._dynamo.config.capture_scalar_outputs`, as `dbrx bench decode --compile` sets it): the K expert ids become
unbacked integers and each chosen expert's weights an indexed view, read in place.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from ..compat import TORCH_VERSION as _TORCH  # patched by tests
from .cpu_matvec import matmul

BACKENDS = ("auto", "grouped_mm", "triton", "dense", "loop")

_gmm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx (N, K) -> order (R,) stable sort of routed rows by expert, inverse (R,), group ends (E,) int32."""
    flat = idx.reshape(-1)  # (R,)
    order = torch.argsort(flat, stable=True)  # (R,)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=idx.device)
    counts.scatter_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int32))  # no host sync
    return order, inverse, torch.cumsum(counts, 0, dtype=torch.int32)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped matmul can run x (R, D) against w (E, F, D) here (dtype, alignment, compile)."""
    if _gmm is None:
        return False
    align = 16 // x.element_size()  # the kernels want 16-byte aligned strides
    aligned = x.shape[-1] % align == 0 and w.shape[1] % align == 0
    if x.device.type == "cuda":
        return fast_grouped_mm_gpu(x.device) and aligned and x.dtype == torch.bfloat16
    if torch.compiler.is_compiling():  # its meta kernel (compile) accepts bf16 only
        return aligned and x.dtype == torch.bfloat16
    return aligned and x.device.type == "cpu"


_FAST_GMM: dict[int, bool] = {}  # CUDA device index -> torch's grouped matmul has fast kernels there


def fast_grouped_mm_gpu(device: torch.device) -> bool:
    """Whether torch's grouped matmul runs its CUTLASS kernels on this GPU: Hopper, and Blackwell from torch 2.9.

    Elsewhere (A100, L40S ...) it falls back to a per-group loop that reads the group sizes on the host. The answer
    is cached per device; `compile_blocks` asks before compiling, so compiled code only reads the cache.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _FAST_GMM:
        major = torch.cuda.get_device_properties(index).major
        _FAST_GMM[index] = major == 9 or (major == 10 and _TORCH >= (2, 9))
    return _FAST_GMM[index]


def triton_supported(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x's device (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if x.device.type == "cuda":
        return True
    if x.device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:  # older Triton (3.2) cannot build its autotuner without a GPU driver, even in the interpreter
        _tg()
    except RuntimeError:
        return False
    return True


def resolve_backend(backend: str, x: torch.Tensor, w: torch.Tensor) -> str:
    """The concrete backend `auto` (or an explicit choice) means for these tensors; ValueError if it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown expert backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "auto":
        if grouped_mm_supported(x, w):
            return "grouped_mm"
        if x.device.type == "cuda" and triton_supported(x):
            return "triton"
        return "dense" if torch.compiler.is_compiling() else "loop"
    if backend == "grouped_mm" and not grouped_mm_supported(x, w):
        raise ValueError(
            f"expert backend 'grouped_mm' cannot run {x.dtype} on {x.device.type} with d_model={x.shape[-1]}, "
            f"ffn_hidden_size={w.shape[1]} (needs torch._grouped_mm, 16-byte aligned sizes, and on CUDA bf16 "
            f"on a Hopper GPU, or Blackwell with torch >= 2.9; use --backend triton elsewhere)"
        )
    if backend == "triton" and not triton_supported(x):
        raise ValueError("expert backend 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
    return backend


# ---- grouped GEMM primitives, one set per backend ---------------------------------------------------------
# rows_nt(a, w, ends): a (R, K) @ w_e^T with w (E, N, K) -> (R, N)     rows_nn(a, w, ends): a @ w_e, w (E, K, N)
# up(x, w1, v1, ends) -> gate, up (R, F)                                down_t(a, a2, w, w2, ends): a @ w_e + a2 @ w2_e
# wgrad(a, b, ends): a_e^T @ b_e -> (E, M, N)                           wgrad2(a, a2, b, ends): two of those
def _gm_wgrad(a, b, ends):
    return _gmm(a.transpose(0, 1), b, offs=ends)  # (M, R) x (R, N) split by ends -> (E, M, N)


def _tg():
    """The Triton kernels, imported on first use (TRITON_INTERPRET must be set before triton is imported)."""
    from . import triton_grouped_gemm

    return triton_grouped_gemm


def _bounds(ends):
    return F.pad(ends, (1, 0))  # (E+1,) group starts and ends


_OPS = {
    "grouped_mm": dict(
        up=lambda xs, w1, v1, ends: (_gmm(xs, w1.transpose(-2, -1), offs=ends),
                                     _gmm(xs, v1.transpose(-2, -1), offs=ends)),
        rows_nn=lambda a, w, ends: _gmm(a, w, offs=ends),
        rows_nt=lambda a, w, ends: _gmm(a, w.transpose(-2, -1), offs=ends),
        dx=lambda dg, du, w1, v1, ends: _gmm(dg, w1, offs=ends) + _gmm(du, v1, offs=ends),
        wgrad=_gm_wgrad,
        wgrad2=lambda a, a2, b, ends: (_gm_wgrad(a, b, ends), _gm_wgrad(a2, b, ends)),
    ),
    "triton": dict(  # gate and up in one pass; dx sums both products in one kernel; dw1 and dv1 in one pass
        up=lambda xs, w1, v1, ends: _tg().gmm_rows(xs, w1.transpose(-2, -1), _bounds(ends),
                                                    b2=v1.transpose(-2, -1)),
        rows_nn=lambda a, w, ends: _tg().gmm_rows(a, w, _bounds(ends))[0],
        rows_nt=lambda a, w, ends: _tg().gmm_rows(a, w.transpose(-2, -1), _bounds(ends))[0],
        dx=lambda dg, du, w1, v1, ends: _tg().gmm_rows(dg, w1, _bounds(ends), a2=du, b2=v1, add=True)[0],
        wgrad=lambda a, b, ends: _tg().gmm_wgrad(a, b, _bounds(ends))[0],
        wgrad2=lambda a, a2, b, ends: _tg().gmm_wgrad(a, b, _bounds(ends), a2=a2),
    ),
}


def _combine(rows: torch.Tensor, inverse: torch.Tensor, K: int) -> torch.Tensor:
    """(R, D) rows in expert order -> (N, D): each token's K rows summed (a gather and a sum, deterministic)."""
    return rows[inverse].view(-1, K, rows.shape[-1]).sum(1)  # (N, K, D) -> (N, D)


class _GroupedMoE(torch.autograd.Function):
    """y_n = sum over token n's K routed rows r of p_r * (silu(x_n @ w1_e^T) * (x_n @ v1_e^T)) @ w2_e, e = e(r).

    x (N, D); p (R,) router weight of each routed row, rows sorted by expert; src (R,) the token of each row;
    inverse (R,) the row of each (token, slot); ends (E,) group ends. Beside its inputs it keeps only the gate
    and up activations (R, F): the routed copies of x are gathered again in backward and p is applied to h
    before w2, so no (R, D) tensor is saved. With `recompute` it keeps not even those: backward runs the two
    gate/up grouped GEMMs again (selective checkpointing). Weight gradients are written once, as (E, F, D).
    """

    @staticmethod
    def forward(ctx, x, p, w1, v1, w2, src, inverse, ends, backend: str, recompute: bool):
        ops = _OPS[backend]
        gate, up = ops["up"](x[src], w1, v1, ends)  # (R, F) each from the routed rows (R, D)
        hp = F.silu(gate).mul_(up).mul_(p[:, None])  # (R, F) p * silu(gate) * up, in place on a new tensor
        y = _combine(ops["rows_nn"](hp, w2, ends), inverse, inverse.numel() // x.shape[0])  # (N, D)
        ctx.save_for_backward(x, p, w1, v1, w2, src, inverse, ends, *(() if recompute else (gate, up)))
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, p, w1, v1, w2, src, inverse, ends, *gate_up = ctx.saved_tensors
        ops = _OPS[ctx.backend]
        gate, up = gate_up or ops["up"](x[src], w1, v1, ends)  # recomputed under selective checkpointing
        dys = dy[src]  # (R, D) each row's output gradient is its token's (a gather: contiguous)
        dhp = ops["rows_nt"](dys, w2, ends)  # (R, F) = dys @ w2_e^T
        hp, dgate, dup, dp = glu_backward(gate, up, dhp, p)  # (R, F) x 3, (R,); hp recomputed rather than saved
        del dhp
        need = ctx.needs_input_grad
        dw2 = ops["wgrad"](hp, dys, ends) if need[4] else None  # (E, F, D)
        del hp, dys  # before the larger products below, to lower the peak
        dx = dw1 = dv1 = None
        if need[0]:
            dx = _combine(ops["dx"](dgate, dup, w1, v1, ends), inverse, inverse.numel() // x.shape[0])  # (N, D)
        if need[2] or need[3]:
            dw1, dv1 = ops["wgrad2"](dgate, dup, x[src], ends)  # (E, F, D) each
        return dx, dp if need[1] else None, dw1, dv1, dw2, None, None, None, None, None


GLU_CHUNK_ELEMENTS = 1 << 25  # eager backward: fp32 temporaries of at most this many elements (128 MB) each


def glu_backward(gate: torch.Tensor, up: torch.Tensor, dhp: torch.Tensor, p: torch.Tensor):
    """For hp = p * silu(gate) * up: hp, d gate, d up (R, F) in gate's dtype and d p (R,) in p's, from dhp = dL/dhp.

    Computed in fp32. Compiled, this is one fused pass. Eager, it runs in row chunks so that the fp32 temporaries
    stay small: unchunked, they took 7 GB at DBRX's size (32768 routed rows x 10752) on top of the gradients.
    """
    rows = max(1, GLU_CHUNK_ELEMENTS // max(gate.shape[1], 1))
    if torch.compiler.is_compiling() or gate.shape[0] <= rows:
        return _glu_backward_rows(gate, up, dhp, p)
    hp, dgate, dup, dp = torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(p)
    for s in range(0, gate.shape[0], rows):  # a handful of chunks by size, not per expert; no host sync
        hp[s:s + rows], dgate[s:s + rows], dup[s:s + rows], dp[s:s + rows] = _glu_backward_rows(
            gate[s:s + rows], up[s:s + rows], dhp[s:s + rows], p[s:s + rows])
    return hp, dgate, dup, dp


def _glu_backward_rows(gate, up, dhp, p):
    g, u, d, w = gate.float(), up.float(), dhp.float(), p.float()[:, None]
    sig = torch.sigmoid(g)
    silu = g * sig
    a = silu * u  # the expert activation before the router weight
    dp = (d * a).sum(-1)  # (R,)
    da = d * w
    dgate = da * u * sig * (1 + g * (1 - sig))  # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dt = gate.dtype
    return (a * w).to(dt), dgate.to(dt), (da * silu).to(dt), dp.to(p.dtype)


# Inference on at most this many routed rows (tokens * top_k) runs `expert_loop` on the CPU (auto backend). Measured
# with fp32 experts, 1 thread, against grouped_mm (torch's CPU fallback runs every expert, empty or not) and an
# index_select of the chosen experts' weights with bmm (copies them): see BENCHMARKS.md, issue 11.
LOOP_MAX_ROWS = 4


def use_expert_loop(x: torch.Tensor, idx: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether `auto` runs these routed rows through `expert_loop`: inference (nothing needs a gradient) on the CPU
    on at most LOOP_MAX_ROWS rows, the decode step; compiled, one token only, and only when dynamo captures the
    expert ids as unbacked integers (else `.tolist()` would break the graph)."""
    if x.device.type != "cpu" or idx.numel() > LOOP_MAX_ROWS:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)):
        return False
    if torch.compiler.is_compiling():
        return idx.shape[0] == 1 and bool(torch._dynamo.config.capture_scalar_outputs)
    return True


def expert_loop(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, expert, n_experts: int,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_k weights[n, k] * expert(x[n], idx[n, k]) by one call per active expert; expert(xs (r, D), e) -> (r, D).

    The float experts' `loop` backend and the quantized experts (dbrx.quant.layers) share it. One token (decode):
    its K chosen experts in turn into an out_dtype accumulator (default x's), no sort, few ops, each chosen
    expert's weights read once, the others never. More: the routed rows sorted by expert, one call per expert with
    rows (the empty ones skipped), weighted in the experts' output dtype and summed per token. Reads the expert ids
    (and group sizes) on the host: free on the CPU, a sync on CUDA.
    """
    N, K = idx.shape
    if N == 1:
        y = x.new_zeros(1, x.shape[-1], dtype=out_dtype or x.dtype)  # (1, D)
        for e, p in zip(idx[0].tolist(), weights[0].unbind()):
            y.addcmul_(expert(x, e), p)  # (1, D) += p * expert_e(x)
        return y
    order, inverse, ends = sort_by_expert(idx, n_experts)  # (R,), (R,), (E,)
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # host read
    xs = x[order // K]  # (R, D) routed rows in expert order
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            outs.append(expert(xs[start:start + c], e))  # (c, D)
            start += c
    rows = torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1], dtype=out_dtype or x.dtype)  # (R, D)
    return _combine(rows * weights.reshape(-1)[order].to(rows.dtype)[:, None], inverse, K)  # (N, D)


def glu_expert(x: torch.Tensor, w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor):
    """The float GLU expert for `expert_loop`: (xs (r, D), e) -> (silu(xs @ w1_e^T) * (xs @ v1_e^T)) @ w2_e (r, D)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, v1, w2)):
        # unbind (not w[e]) so that backward stacks the per-expert gradients once instead of allocating a
        # full-size zero gradient for every expert
        w1s, v1s, w2s = w1.unbind(0), v1.unbind(0), w2.unbind(0)
        return lambda xs, e: (F.silu(xs @ w1s[e].T) * (xs @ v1s[e].T)) @ w2s[e]

    def expert(xs, e):  # inference: SiLU and the product in place; w[e] a view (compiled: an unbacked index);
        # few fp32 rows on the CPU through our threaded kernel (dbrx.kernels.cpu_matvec)
        h = matmul(xs, w1[e].T)  # (r, F)
        return matmul(F.silu(h, inplace=True).mul_(matmul(xs, v1[e].T)), w2[e])  # (r, D)

    return expert


def _dense(x, weights, idx, w1, v1, w2):
    comb = weights.new_zeros(x.shape[0], w1.shape[0]).scatter(1, idx, weights)  # (N, E), zero where not routed
    h = F.silu(torch.einsum("nd,efd->nef", x, w1)) * torch.einsum("nd,efd->nef", x, v1)  # (N, E, F)
    return torch.einsum("nef,efd,ne->nd", h, w2, comb)  # (N, D)


def expert_glu(
    x: torch.Tensor,
    weights: torch.Tensor,
    idx: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    w2: torch.Tensor,
    backend: str = "auto",
    recompute: bool = False,
) -> torch.Tensor:
    """x (N, D), router weights (N, K), expert ids (N, K), w1/v1/w2 (E, F, D) -> sum_k weight * expert(x): (N, D).

    recompute: the grouped backends keep no (R, F) activations for backward and run the gate/up GEMMs again there.
    """
    backend = "loop" if backend == "auto" and use_expert_loop(x, idx, weights, w1, v1, w2) else backend
    backend = resolve_backend(backend, x, w1)
    if backend == "dense":
        return _dense(x, weights, idx, w1, v1, w2)
    if backend == "loop":
        return expert_loop(x, weights, idx, glu_expert(x, w1, v1, w2), w1.shape[0])
    N, K = idx.shape
    order, inverse, ends = sort_by_expert(idx, w1.shape[0])
    src = order // K  # (R,) the token of each routed row
    p = weights.reshape(-1)[order]  # (R,) the router weight of each routed row
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w1, v1, w2)):
        return _GroupedMoE.apply(x, p, w1, v1, w2, src, inverse, ends, backend, recompute)  # (N, D)
    # inference: nothing kept for backward, so SiLU and the products go in place (half the (R, F) memory)
    ops = _OPS[backend]
    gate, up = ops["up"](x[src], w1, v1, ends)  # (R, F) each
    hp = F.silu(gate, inplace=True).mul_(up).mul_(p[:, None])  # (R, F)
    return _combine(ops["rows_nn"](hp, w2, ends), inverse, K)  # (N, D)
