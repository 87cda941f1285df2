"""Cross-entropy of the lm head without keeping the (N, V) fp32 logits: chunked, logit gradients formed in forward.

Shape legend: N tokens, D d_model, V vocab, C rows per chunk.

With DBRX's 100352-row vocabulary the usual `cross_entropy(lm_head(h).float(), labels)` keeps the fp32 logits,
their log-softmax and its gradient alive at once, 3 x N x V x 4 bytes: 39 GB for 32K tokens, more than the rest
of a `dbrx-9b` training step. Here the head and the loss run C rows at a time, in fp32 per chunk. A row's
gradient with respect to its logits, softmax - onehot, is known as soon as its loss is, so forward stores it in
the model dtype (N x V x 2 bytes, a sixth of the above) and drops the fp32 logits; backward is the plain head's
two matmuls, scaled by the incoming gradient. Same FLOPs and the same bf16 arithmetic as the plain head.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 28  # fp32 logits per chunk (C x V): 1 GB, so C = 2675 rows for V = 100352


def _chunk_rows(n_rows: int, vocab: int, chunk_rows: int | None) -> int:
    return max(1, min(n_rows, chunk_rows or CHUNK_ELEMENTS // vocab))


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """fp32 logits (C, V), labels (C,) -> per-row loss (C,) (0 where ignored), logsumexp (C,), valid, target."""
    valid = labels != ignore_index
    target = labels.masked_fill(~valid, 0)  # (C,) any in-range id where ignored
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    picked = logits.gather(1, target[:, None]).squeeze(1)  # (C,)
    return (lse - picked) * valid, lse, valid, target


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index: int, rows: int):
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        dlogits = None
        for s in range(0, h.shape[0], rows):
            mm = h[s:s + rows] @ weight.T  # (C, V) in the model dtype (autocast's under autocast), as the plain head
            if dlogits is None:
                dlogits = mm.new_empty(h.shape[0], weight.shape[0])  # (N, V)
            logits = _upcast(mm)  # (C, V) fp32
            del mm
            loss, lse, valid, target = _chunk_loss(logits, labels[s:s + rows], ignore_index)
            total += loss.sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits (C, V)
            grad.scatter_add_(1, target[:, None], -valid[:, None].to(grad.dtype))  # - onehot(label)
            grad.mul_(valid[:, None])  # ignored rows carry no gradient
            dlogits[s:s + rows] = grad  # (C, V) in the model dtype
            del logits, grad  # before the next chunk's are made
        ctx.save_for_backward(h, weight, dlogits)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, dlogits = ctx.saved_tensors
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dh = ((dlogits @ weight.to(dlogits.dtype)) * grad_total).to(h.dtype)  # (N, D)
        if ctx.needs_input_grad[1]:
            dw = (dlogits.T @ (h * grad_total).to(dlogits.dtype)).to(weight.dtype)  # (V, D)
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
    and weight. Keeps one fp32 chunk (C x V) and, when a gradient is wanted, the N x V logit gradient in the
    model dtype, instead of three N x V fp32 tensors; `chunk_rows` defaults to CHUNK_ELEMENTS // V.
    """
    if h.dim() != 2 or weight.dim() != 2 or labels.shape != h.shape[:1] or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy wants h (N, D), weight (V, D), labels (N,); got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    rows = _chunk_rows(h.shape[0], weight.shape[0], chunk_rows)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, labels, ignore_index, rows)
    total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    for s in range(0, h.shape[0], rows):  # no gradient wanted: the loss alone, chunk by chunk
        total += _chunk_loss(_upcast(h[s:s + rows] @ weight.T), labels[s:s + rows], ignore_index)[0].sum()
    return total
