"""Weight-only quantization arithmetic and the file and kernel layouts (pure tensor functions, no modules).

Every quantized weight is a matrix (or a stack of matrices) laid out (..., out, in): the reduction runs along the
last dim, as in `nn.Linear.weight`. Its quantized form, as stored in a checkpoint:

  int8  q int8 (..., out, in) in [-127, 127], scale (..., out):                 w ~ q * scale
  int4  q uint8 (..., out, ceil(in/2)), two codes in [0, 15] per byte (the even input index in the low nibble),
        scale, zero (..., out, ceil(in / group)), groups of `group` along the input dim (the last may be short):
                                                                                 w ~ (q - 8) * scale + zero

int8 is symmetric per output row (scale = max |w| / 127); int4 is asymmetric per group (zero ~ min + 8 * (max -
min) / 15, the value of the middle code 8, as torch's int4 kernels want it; scale ~ (max - min) / 15). Scales
and zeros are rounded to SCALE_DTYPE first, the scale upwards and widened just enough that the group's whole range
stays representable after the zero's rounding, and the codes are computed from the stored values: no code is
ever clamped, so each dequantized element is within scale / 2 of the float weight.

Scales and zeros are bfloat16: torch's CPU weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_
cpu`) run fast only on bf16 activations (fp32 and fp16 inputs measured 20-80x slower), so quantized layers compute
in bf16 whatever the model's dtype, and the scales are stored in the dtype they are used in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE_DTYPE = torch.bfloat16
BITS = (8, 4)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
DEFAULT_GROUP_SIZE = 128
_ROWS_PER_CHUNK = 1 << 12  # quantize big matrices in row chunks so that the fp32 temporaries stay small


def check_bits_group(bits: int, group_size: int | None, d_model: int) -> int | None:
    """Validate bits and the int4 group size for a model of width d_model; returns the group size used.

    group_size None (int4): DEFAULT_GROUP_SIZE, or the largest allowed size below it that divides d_model."""
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 8:
        return None
    if group_size is None:
        fits = [g for g in INT4_GROUP_SIZES if g <= DEFAULT_GROUP_SIZE and d_model % g == 0]
        if not fits:
            raise ValueError(f"no int4 group size in {INT4_GROUP_SIZES} divides d_model {d_model}")
        return fits[-1]
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} (torch's CPU "
                         f"int4 kernel), got {group_size!r}")
    if d_model % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide d_model {d_model}")
    return group_size


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def _rows(w: torch.Tensor):
    """(..., out, in) -> chunks of at most _ROWS_PER_CHUNK rows of the flattened (rows, in) matrix."""
    return w.reshape(-1, w.shape[-1]).split(_ROWS_PER_CHUNK)


def _ceil_to_scale_dtype(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> SCALE_DTYPE, rounded up (never below x), and at least the dtype's smallest normal number."""
    y = x.clamp_min(torch.finfo(SCALE_DTYPE).tiny).to(SCALE_DTYPE)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) float -> q int8 (..., out, in), scale (..., out) SCALE_DTYPE; w ~ q * scale."""
    qs, scales = [], []
    for rows in _rows(w):
        wf = rows.float()  # (r, in)
        scale = _ceil_to_scale_dtype(wf.abs().amax(-1) / 127)  # (r,): rounded up, so no code needs clamping
        qs.append(torch.round(wf / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8))
        scales.append(scale)
    return torch.cat(qs).view(w.shape), torch.cat(scales).view(w.shape[:-1])


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (..., out, in) float -> packed q uint8 (..., out, ceil(in/2)), scale, zero (..., out, n_groups)."""
    K = w.shape[-1]
    G, ng = group_size, n_groups(K, group_size)
    qs, scales, zeros = [], [], []
    for rows in _rows(w):
        wf = F.pad(rows.float(), (0, ng * G - K), mode="replicate") if ng * G != K else rows.float()
        wg = wf.view(-1, ng, G)  # (r, ng, G): the padding repeats the row's last value, so min/max are unchanged
        lo, hi = wg.amin(-1), wg.amax(-1)  # (r, ng)
        zero = (lo + 8 * (hi - lo) / 15).to(SCALE_DTYPE)  # rounded: widen the scale so that [lo, hi] still fits
        z = zero.float()
        scale = _ceil_to_scale_dtype(torch.maximum((z - lo) / 8, (hi - z) / 7))  # codes 0..15 <-> -8..7 steps
        q = torch.round((wg - z[..., None]) / scale.float()[..., None]) + 8
        qs.append(pack_int4(q.clamp_(0, 15).to(torch.uint8).view(-1, ng * G)[:, :K]))
        scales.append(scale)
        zeros.append(zero)
    lead = w.shape[:-1]
    return (torch.cat(qs).view(*lead, -1), torch.cat(scales).view(*lead, ng), torch.cat(zeros).view(*lead, ng))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 (..., K) in [0, 15] -> (..., ceil(K/2)): element 2j in the low nibble of byte j, 2j+1 high."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """(..., ceil(K/2)) uint8 -> codes uint8 (..., K)."""
    out = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)  # (..., 2 * ceil(K/2))
    return out[..., :in_features]


def dequantize_int4_rows(packed, scale, zero, in_features: int, group_size: int, dtype) -> torch.Tensor:
    """Rows of the file layout -> float (..., in) in dtype (used for embedding lookups: a few rows at a time)."""
    codes = unpack_int4(packed, in_features).to(torch.float32)  # (..., K)
    idx = torch.arange(in_features, device=packed.device) // group_size  # (K,) the group of each input
    return ((codes - 8) * scale.float()[..., idx] + zero.float()[..., idx]).to(dtype)


# ---- torch's CPU int4 kernel layout -----------------------------------------------------------------------------
_LAYOUT_ROWS = 1024  # rows converted at a time: torch's int4 packing is row-local, and each row's codes pass as int32


def int4_kernel_layout(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (out, ceil(in/2)) matrix in the file layout -> (weight, scales_and_zeros) for `_weight_int4pack_mm_for_
    cpu`: the input dim padded to whole groups and the output dim to a multiple of 16 (with the code 8, whose
    padded inputs are zero at run time and whose padded outputs are dropped). Converted _LAYOUT_ROWS rows at a
    time, so that the int32 codes the converter takes (8x the packed size) never exist for the whole matrix: for a
    100352 x 1024 head that was 0.8 GB of transients for a 51 MB weight."""
    out = packed.shape[0]
    ng = scale.shape[-1]
    Kp, Np = ng * group_size, -(-out // 16) * 16
    weight = torch.empty(Np, Kp // 2, dtype=torch.uint8, device=packed.device)  # (Np, Kp/2) torch's own order
    for s in range(0, Np, _LAYOUT_ROWS):
        n = min(_LAYOUT_ROWS, Np - s)
        rows = packed[s:s + n]  # (<= n, ceil(in/2)); fewer in the last block when out < Np
        codes = F.pad(unpack_int4(rows, in_features).to(torch.int32), (0, Kp - in_features, 0, n - rows.shape[0]),
                      value=8)  # (n, Kp)
        weight[s:s + n] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack((F.pad(scale, (0, 0, 0, Np - out)), F.pad(zero, (0, 0, 0, Np - out))), dim=-1)  # (Np, ng, 2)
    return weight, sz.transpose(0, 1).contiguous()  # (ng, Np, 2)


def int4_mm(x: torch.Tensor, weight: torch.Tensor, sz: torch.Tensor, group_size: int, out_features: int):
    """x (M, in) SCALE_DTYPE @ the int4 kernel-layout weight -> (M, out_features)."""
    pad = sz.shape[0] * group_size - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, sz)  # (M, Np)
    return y if y.shape[-1] == out_features else y[:, :out_features]


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, in) SCALE_DTYPE @ (q * scale)^T -> (M, out)."""
    return torch._weight_int8pack_mm(x, q, scale)


__all__ = ["SCALE_DTYPE", "BITS", "INT4_GROUP_SIZES", "DEFAULT_GROUP_SIZE", "check_bits_group", "n_groups",
           "quantize_int8", "quantize_int4", "pack_int4", "unpack_int4", "dequantize_int4_rows",
           "int4_kernel_layout", "int4_mm", "int8_mm"]
