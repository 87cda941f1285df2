"""Quantized modules that replace the model's float ones at run time: Linear, Embedding and the stacked experts.

They hold the weights in the kernels' layouts (dbrx.quant.formats) and are built from the checkpoint layout
(`from_quantized`), so a model quantized in memory and one loaded from a quantized checkpoint are the same.
Kernels: on the CPU our own (dbrx.kernels.cpu_matvec: activations quantized to int8 in blocks of 32, integer dot
products, every thread) for matrices whose input dim they take (a multiple of 32, at least
MIN_QUANT_IN_FEATURES), with int4 kept in the checkpoint layout; else torch's weight-only kernels, whose
activations meet the weights in bf16 (the dtype they are fast in). On CUDA our Triton kernels. Outputs leave in
the model's dtype. QuantLinear is differentiable w.r.t. its input (dbrx.quant.grad.quant_matmul), for QLoRA.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_matvec
from ..kernels.experts import expert_loop, sort_by_expert
from .formats import SCALE_DTYPE, dequantize_int4_rows, int4_kernel_layout, int4_mm, int8_mm
from .grad import quant_matmul

_DEQUANT_ROWS = 1 << 12  # rows (int8) dequantized at a time by QuantLinear.weight
_DEQUANT_COLS = 256  # input columns (int4) read back through the kernel at a time


def check_device(device: torch.device | str) -> None:
    """ValueError unless quantized layers have kernels on `device`: the CPU (torch's weight-only kernels), or CUDA
    with Triton (dbrx.kernels.triton_quant_gemm)."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(f"quantized layers run on the CPU or on CUDA (with Triton) only; got device {device}")
    if importlib.util.find_spec("triton") is None:
        raise ValueError(f"quantized layers on {device} need Triton (dbrx.kernels.triton_quant_gemm), which is not "
                         f"installed: install triton or run on the CPU")


def _gpu_gmm(x, q, scale, zero, bounds, bits, group_size, in_features):
    from ..kernels.triton_quant_gemm import quant_gmm

    return quant_gmm(x, q, scale, zero, bounds, bits, group_size or 32, in_features)


class _QuantMatmul(nn.Module):
    """x (M, in) @ W^T for one quantized matrix W (out, in), or for matrix e of a stack of them (E, out, in)."""

    def __init__(self, bits: int, group_size: int | None, in_features: int, out_features: int):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, out_features

    def _set(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, layout: str | None = None) -> None:
        """From the checkpoint layout, (E?, out, in | in/2) + scale (+ zero); one matrix at a time for int4.

        On CUDA every weight stays in the checkpoint layout, which the Triton kernel reads; on the CPU too where
        our kernels take the matrix (`matvec`), else int4 goes to torch's kernel layout (fixed at build time: such
        an int4 layer does not run on CUDA). `layout` 'file' forces the checkpoint layout and torch's or Triton's
        kernels (tests of the Triton path under its interpreter)."""
        check_device(q.device)
        self.matvec = layout is None and q.device.type == "cpu" and cpu_matvec.quant_fits(self.in_features)
        self.layout = layout or ("file" if q.device.type == "cuda" or self.matvec else "cpu")
        if self.bits == 8:
            self.register_buffer("qweight", q.contiguous())  # (E?, out, in) int8
            self.register_buffer("weight_scale", scale.to(SCALE_DTYPE).contiguous())  # (E?, out)
            return
        if self.layout == "file":
            self.register_buffer("qweight", q.contiguous())  # (E?, out, ceil(in/2)) uint8
            self.register_buffer("weight_scale", scale.to(SCALE_DTYPE).contiguous())  # (E?, out, ng)
            self.register_buffer("weight_zero", zero.to(SCALE_DTYPE).contiguous())  # (E?, out, ng)
            return
        if q.dim() == 2:
            w, sz = int4_kernel_layout(q, scale, zero, self.in_features, self.group_size)
        else:
            pairs = [int4_kernel_layout(q[e], scale[e], zero[e], self.in_features, self.group_size)
                     for e in range(q.shape[0])]
            w, sz = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        self.register_buffer("qweight", w)  # (E?, Np, Kp/2) uint8 in torch's int4 kernel order
        self.register_buffer("weight_scales_and_zeros", sz.to(SCALE_DTYPE))  # (E?, ng, Np, 2)

    def _gpu(self, x: torch.Tensor) -> bool:
        """Whether x goes to the Triton kernel (CUDA); ValueError when the weights' layout cannot serve x."""
        if x.device.type == "cpu" and self.qweight.device.type == "cpu" and (
                self.layout == "cpu" or self.bits == 8 or self.matvec):
            return False
        if x.device.type == "cuda" and self.qweight.device == x.device and (self.layout == "file" or self.bits == 8):
            return True
        built = "the CPU" if self.layout == "cpu" else "CUDA"
        raise ValueError(f"a quantized layer built for {built} (weights now on {self.qweight.device}) cannot run on "
                         f"{x.device}: quantize or load the model on the device it runs on")

    def grouped(self, x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        """CUDA: x (R, in) rows sorted by expert, bounds (E+1,) int32 -> (R, out), one Triton launch."""
        q = self.qweight if self.qweight.dim() == 3 else self.qweight[None]
        s = self.weight_scale if self.qweight.dim() == 3 else self.weight_scale[None]
        z = getattr(self, "weight_zero", None)
        if z is not None and z.dim() == 2:
            z = z[None]
        return _gpu_gmm(x, q, s, z, bounds, self.bits, self.group_size, self.in_features)

    def mm(self, x: torch.Tensor, e: int | None = None) -> torch.Tensor:
        """x (M, in) float -> (M, out): fp32 from our CPU kernels, SCALE_DTYPE from torch's and Triton's."""
        if self._gpu(x):
            assert e is None, "on CUDA the experts run grouped (QuantExperts._grouped_gpu)"
            x = x.to(SCALE_DTYPE)
            return self.grouped(x, torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device))
        if self.matvec:
            w, s = (self.qweight, self.weight_scale) if e is None else (self.qweight[e], self.weight_scale[e])
            if self.bits == 8:
                return cpu_matvec.q8_linear(x, w, s)
            z = self.weight_zero if e is None else self.weight_zero[e]
            return cpu_matvec.q4_linear(x, w, s, z, self.group_size)
        x = x.to(SCALE_DTYPE)
        if self.bits == 8:
            w, s = (self.qweight, self.weight_scale) if e is None else (self.qweight[e], self.weight_scale[e])
            return int8_mm(x, w, s)
        w, sz = self.qweight, self.weight_scales_and_zeros
        if e is not None:
            w, sz = w[e], sz[e]
        return int4_mm(x, w, sz, self.group_size, self.out_features)


class QuantLinear(_QuantMatmul):
    """A bias-free nn.Linear with an int8 (per output row) or int4 (group-wise) weight.

    `weight` is the dequantized (out, in) matrix in `dtype` (the model's), rebuilt on each access: for callers that
    need the matrix itself, as `DbrxForCausalLM.compute_loss` does with the head (its chunked cross-entropy,
    dbrx.kernels.loss); the forward pass never builds it."""

    def __init__(self, bits: int, group_size: int | None, in_features: int, out_features: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__(bits, group_size, in_features, out_features)
        self.dtype = dtype

    @classmethod
    def from_quantized(cls, bits: int, group_size: int | None, in_features: int, q: torch.Tensor,
                       scale: torch.Tensor, zero: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float32) -> QuantLinear:
        m = cls(bits, group_size, in_features, q.shape[0], dtype)
        m._set(q, scale, zero)
        return m

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in) in `dtype`, built _DEQUANT_ROWS rows (int8) or columns (int4) at a time.
        int4 reads it back through the kernel itself (identity rows in, so each value is the kernel's own, rounded
        to bf16 as its outputs are), since torch's int4 packing is private to its kernels."""
        out = torch.empty(self.out_features, self.in_features, dtype=self.dtype, device=self.qweight.device)
        with torch.no_grad():
            if self.bits == 8:
                for s in range(0, self.out_features, _DEQUANT_ROWS):
                    q, sc = self.qweight[s:s + _DEQUANT_ROWS], self.weight_scale[s:s + _DEQUANT_ROWS]
                    out[s:s + _DEQUANT_ROWS] = q.float() * sc.float()[:, None]
                return out
            if self.layout == "file":  # the checkpoint layout (CUDA, our CPU kernels), dequantized directly
                codes = torch.stack((self.qweight & 15, self.qweight >> 4), dim=-1).flatten(-2)[:, : self.in_features]
                g = torch.arange(self.in_features, device=codes.device) // self.group_size
                out.copy_((codes.float() - 8) * self.weight_scale.float()[:, g] + self.weight_zero.float()[:, g])
                return out
            for s in range(0, self.in_features, _DEQUANT_COLS):
                c = min(_DEQUANT_COLS, self.in_features - s)
                eye = torch.zeros(c, self.in_features, dtype=SCALE_DTYPE)
                eye[:, s:s + c] = torch.eye(c, dtype=SCALE_DTYPE)  # rows e_s .. e_{s+c-1}
                out[:, s:s + c] = self.mm(eye).T  # (c, out) = columns s.. of W, transposed
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = quant_matmul(x.reshape(-1, self.in_features), self)  # (M, out), differentiable w.r.t. x
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"


class QuantEmbedding(nn.Module):
    """nn.Embedding with int8 or int4 rows, kept in the checkpoint layout: a lookup dequantizes only its rows."""

    def __init__(self, bits: int, group_size: int | None, q: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        check_device(q.device)
        self.bits, self.group_size, self.embedding_dim, self.dtype = bits, group_size, embedding_dim, dtype
        self.register_buffer("weight", q)  # (V, D) int8 or (V, D/2) uint8
        self.register_buffer("weight_scale", scale.to(SCALE_DTYPE))  # (V,) or (V, ng)
        if zero is not None:
            self.register_buffer("weight_zero", zero.to(SCALE_DTYPE))  # (V, ng)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, scale = self.weight[ids], self.weight_scale[ids]  # (..., D) or (..., D/2); (...,) or (..., ng)
        if self.bits == 8:
            return (q.float() * scale.float()[..., None]).to(self.dtype)
        return dequantize_int4_rows(q, scale, self.weight_zero[ids], self.embedding_dim, self.group_size, self.dtype)


class QuantExperts(nn.Module):
    """The stacked GLU experts, quantized: gate and up fused in one (E, 2F, D) stack, down kept as (E, D, F).

    Replaces `MoE.experts` (same call: x (N, D), router weights (N, K), expert ids (N, K) -> (N, D)). The routed
    rows are sorted by expert and each expert that has rows runs as two kernel calls (gate/up, then down) on them;
    at batch 1 the K chosen experts run in turn, unsorted (dbrx.kernels.experts.expert_loop, the float experts' loop
    too; compiled decoding runs it inside the graph). Each chosen expert's weights are read once, the others never.
    torch has no grouped int8/int4 kernel for the CPU, so the batched path loops over the experts with rows
    (at most E iterations) rather than dequantizing the stack. Measured against the alternatives (gathering the
    chosen experts' weights per routed row and dequantizing them: 17x slower at batch 1; dequantizing each active
    expert to fp32 for fp32 matmuls: 1.6-7x slower at 1 to 128 tokens) in benchmarks/quant_decode.py.
    """

    def __init__(self, bits: int, group_size: int | None, n_experts: int, ffn: int, d_model: int):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.n_experts, self.ffn, self.d_model = n_experts, ffn, d_model
        self.w13 = _QuantMatmul(bits, group_size, d_model, 2 * ffn)  # gate rows then up rows, per expert
        self.w2 = _QuantMatmul(bits, group_size, ffn, d_model)  # (E, D, F): down, transposed to (out, in)

    @classmethod
    def from_quantized(cls, bits: int, group_size: int | None, w1, v1, w2, layout: str | None = None) -> QuantExperts:
        """w1, v1: (q, scale, zero) of the (E, F, D) gate and up stacks; w2: of the (E, D, F) transposed down stack.
        layout: see _QuantMatmul._set."""
        E, F_, D = w1[0].shape[0], w1[0].shape[1], w2[0].shape[1]
        m = cls(bits, group_size, E, F_, D)
        cat = [None if a is None else torch.cat((a, b), dim=1) for a, b in zip(w1, v1)]  # (E, 2F, ...)
        m.w13._set(*cat, layout=layout)
        m.w2._set(*w2, layout=layout)
        return m

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, backend: str = "auto",
                recompute: bool = False) -> torch.Tensor:
        """x (N, D), router weights (N, K) fp32, expert ids (N, K) -> (N, D) in x's dtype. `backend` and
        `recompute` belong to the float experts (training) and are ignored here."""
        N, K = idx.shape
        xb = x if self.w13.matvec else x.to(SCALE_DTYPE)  # our CPU kernels take any float dtype
        if self.w13._gpu(xb):
            return self._grouped_gpu(xb.to(SCALE_DTYPE), weights, idx).to(x.dtype)
        decode = N == 1 and not (torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad))
        # the float experts' loop (dbrx.kernels.experts.expert_loop): at batch 1 the K chosen experts in turn, no
        # sort; else the rows sorted by expert, one pair of kernel calls per expert with rows; fp32 sums
        expert = self._expert_decode if decode else self._expert
        return expert_loop(xb, weights.float(), idx, expert, self.n_experts, torch.float32).to(x.dtype)

    def _expert_decode(self, xs: torch.Tensor, e: int) -> torch.Tensor:
        """xs (1, D) through expert e -> (1, D): the kernels and their output dtype between them, few ops (decode
        is dispatch-bound). Compiled with captured scalar outputs, e is an unbacked integer and the kernels read the
        expert's slice of the stacks in place."""
        gu = self.w13.mm(xs, e)  # (1, 2F) bf16
        h = F.silu(gu[:, : self.ffn]).mul_(gu[:, self.ffn:])  # (1, F)
        return self.w2.mm(h, e)  # (1, D)

    def _expert(self, xs: torch.Tensor, e: int) -> torch.Tensor:
        """xs (r, D) through expert e -> (r, D) fp32 (the GLU in fp32 between the two kernel calls).
        Differentiable w.r.t. xs (dbrx.quant.grad), for QLoRA whose adapters leave the experts quantized."""
        gu = quant_matmul(xs, self.w13, e).float()  # (r, 2F)
        h = F.silu(gu[:, : self.ffn]) * gu[:, self.ffn:]  # (r, F)
        return quant_matmul(h, self.w2, e).float()  # (r, D)

    def _grouped_gpu(self, xb, weights, idx):
        """CUDA: every routed row in one grouped Triton launch per matrix, no host sync."""
        N, K = idx.shape
        order, inverse, ends = sort_by_expert(idx, self.n_experts)  # (R,), (R,), (E,)
        bounds = torch.cat((ends.new_zeros(1), ends))  # (E+1,) int32
        gu = self.w13.grouped(xb[order // K], bounds).float()  # (R, 2F)
        h = (F.silu(gu[:, : self.ffn]) * gu[:, self.ffn:]).to(SCALE_DTYPE)  # (R, F)
        rows = self.w2.grouped(h, bounds).float() * weights.reshape(-1)[order].float()[:, None]  # (R, D)
        return rows[inverse].view(N, K, self.d_model).sum(1)  # (N, D)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"experts={self.n_experts}, ffn={self.ffn}, d_model={self.d_model}, bits={self.bits}{g}"


__all__ = ["QuantLinear", "QuantEmbedding", "QuantExperts", "check_device"]
