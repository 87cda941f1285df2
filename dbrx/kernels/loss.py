"""Cross-entropy of the lm head without keeping the (N, V) fp32 logits: chunked, gradients formed in forward.

Shape legend: N tokens, D d_model, V vocab, C rows per chunk.

With DBRX's 100352-row vocabulary the usual `cross_entropy(lm_head(h).float(), labels)` keeps the fp32 logits,
their log-softmax and its gradient alive at once, 3 x N x V x 4 bytes: 39 GB for 32K tokens, more than the rest
of a `dbrx-9b` training step. Here the head and the loss run C rows at a time in one fp32 (C, V) workspace,
logits turned into softmax in place. A row's gradient with respect to its logits, softmax - onehot, is known as
soon as its loss is, so forward goes on to the head's two backward matmuls for the chunk (Liger-Kernel's fused
linear cross-entropy): dh (N, D) and, when the head is trained, dW (V, D) accumulate chunk by chunk, so no (N, V)
tensor is kept. Backward only scales them by the incoming gradient. Only where dW (V, D) in fp32 would be larger
than the logit gradient (N, V) in the model dtype (few rows: N < 2 D) is that gradient kept instead, and dW formed
in backward. Same FLOPs and the same bf16 matmuls as the plain head.
"""

from __future__ import annotations

import torch

# fp32 logits per chunk (C x V): 1 GB on a GPU (C = 2675 rows for V = 100352). On the CPU 16 MB (C = 41) when
# the head is frozen (LoRA, evaluation), which with one thread is no slower than larger chunks (the workspace stays
# in the last-level cache), and matters there: the trainer's CPU heap never shrinks (keep_freed_memory), so whatever
# the loss takes at its peak, or fragments with fresh (C, V) blocks, stays resident. A trained head's dW (V, D)
# update per chunk wants more rows: 2048 rows, V 100352, 2 threads, forward + backward (median of 3): D 64 1.29 s
# at C = 41, 1.03 s at 334, 1.20 s at 2048; D 256 5.16 s, 2.99 s, 2.93 s. So 128 MB (C = 334) for a trained head.
CHUNK_ELEMENTS = 1 << 28
CPU_CHUNK_ELEMENTS = 1 << 22
CPU_HEAD_GRAD_CHUNK_ELEMENTS = 1 << 25


def _chunk_rows(
    n_rows: int, vocab: int, chunk_rows: int | None, device: torch.device, head_grad: bool
) -> int:
    if device.type != "cpu":
        elements = CHUNK_ELEMENTS
    else:
        elements = CPU_HEAD_GRAD_CHUNK_ELEMENTS if head_grad else CPU_CHUNK_ELEMENTS
    return max(1, min(n_rows, chunk_rows or elements // vocab))


def _chunk_exp(h_c, weight, labels_c, ignore_index, buf):
    """One chunk's logits h_c @ weight^T, made in `buf` (at least C rows of V, fp32 or fp64) and turned in place
    into exp(logit - row max) -> exp (C, V) (a view of buf), its row sums (C, 1), the chunk's summed loss, target
    ids (C,), the matmul dtype."""
    c = h_c.shape[0]
    if h_c.dtype == weight.dtype == buf.dtype and not torch.is_autocast_enabled(h_c.device.type):
        x = torch.mm(h_c, weight.T, out=buf[:c])  # (C, V) straight into the workspace
    else:
        x = h_c @ weight.T  # (C, V) in the model dtype (autocast's under autocast), rounded as the plain head's
    dtype = x.dtype
    x = buf[:c].copy_(x) if x.dtype != buf.dtype else x  # (C, V) fp32
    valid = labels_c != ignore_index
    target = labels_c.masked_fill(~valid, 0)  # (C,) any in-range id where ignored
    top = x.amax(1, keepdim=True)  # (C, 1)
    picked = x.gather(1, target[:, None])  # (C, 1) the label's logit
    e = x.sub_(top).exp_()  # (C, V) exp(logit - max)
    sums = e.sum(1, keepdim=True)  # (C, 1)
    loss = ((sums.log() + top - picked).squeeze(1) * valid).sum()  # -log softmax at the label, ignored rows 0
    return e, sums, loss, target, dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index: int, rows: int):
        (N, D), V = h.shape, weight.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 (fp64 stays): the softmax and the sums
        want_h, want_w = ctx.needs_input_grad[:2]
        valid = (labels != ignore_index)[:, None]  # (N, 1): ignored rows get no gradient
        total = torch.zeros((), dtype=acc, device=h.device)
        buf = torch.empty(rows, V, dtype=acc, device=h.device)  # (C, V) workspace
        dh = torch.empty(N, D, dtype=acc, device=h.device) if want_h else None  # (N, D)
        dw = dlogits = w = None
        for s in range(0, N, rows):
            h_c, valid_c = h[s:s + rows], valid[s:s + rows]  # (C, D), (C, 1)
            e, sums, loss, target, dtype = _chunk_exp(h_c, weight, labels[s:s + rows], ignore_index, buf)
            total += loss
            grad = e.div_(sums)  # softmax (C, V)
            grad.scatter_add_(1, target[:, None], grad.new_full((grad.shape[0], 1), -1.0))  # - onehot(label)
            grad = grad.to(dtype)  # (C, V) in the matmul dtype, as the plain head's backward has it
            if want_h:
                w = weight.to(dtype) if w is None else w  # (V, D), cast once
                dh[s:s + rows] = (grad @ w) * valid_c  # (C, D)
            if want_w and dw is None and dlogits is None:  # the smaller of dW (V, D) in acc and (N, V) in dtype
                if D * acc.itemsize <= N * dtype.itemsize:
                    dw = torch.zeros(V, D, dtype=acc, device=h.device)
                else:
                    dlogits = torch.empty(N, V, dtype=dtype, device=h.device)
            if dw is not None:
                if dtype == acc:
                    dw.addmm_(grad.T, h_c * valid_c)  # (V, C) @ (C, D), accumulated in place
                else:
                    dw += grad.T @ (h_c * valid_c).to(dtype)
            elif dlogits is not None:
                dlogits[s:s + rows] = grad
            del e, grad  # views of the workspace, or its copy in the matmul dtype
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.save_for_backward(dh, dw, dlogits, (h * valid).to(dlogits.dtype) if dlogits is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw, dlogits, h_valid = ctx.saved_tensors
        if dlogits is not None:  # few rows: dW formed here, (V, N) @ (N, D)
            dw = dlogits.T @ h_valid
        dh = (dh * grad_total).to(ctx.h_dtype) if dh is not None else None  # (N, D)
        dw = (dw * grad_total).to(ctx.w_dtype) if dw is not None else None  # (V, D)
        return dh, dw, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of logits h @ weight^T (h (N, D), weight (V, D), labels (N,), ignore_index skipped).

    Equals `F.cross_entropy((h @ weight.T).float(), labels, reduction="sum")` up to rounding, differentiable in h
    and weight. Keeps one fp32 chunk (C x V) and, for backward, the gradients themselves (dh (N, D), and dW (V, D)
    when the weight wants one) instead of N x V tensors; `chunk_rows` defaults to CHUNK_ELEMENTS // V
    (on the CPU CPU_CHUNK_ELEMENTS, or CPU_HEAD_GRAD_CHUNK_ELEMENTS when the weight is trained).
    """
    if h.dim() != 2 or weight.dim() != 2 or labels.shape != h.shape[:1] or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy wants h (N, D), weight (V, D), labels (N,); got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    head_grad = torch.is_grad_enabled() and weight.requires_grad
    rows = _chunk_rows(h.shape[0], weight.shape[0], chunk_rows, h.device, head_grad)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, labels, ignore_index, rows)
    acc = torch.promote_types(h.dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=h.device)
    buf = torch.empty(rows, weight.shape[0], dtype=acc, device=h.device)  # (C, V) workspace
    for s in range(0, h.shape[0], rows):  # no gradient wanted: the loss alone, chunk by chunk
        total += _chunk_exp(h[s:s + rows], weight, labels[s:s + rows], ignore_index, buf)[2]
    return total
