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


def _chunk_log_probs(h_c, weight, labels_c, ignore_index):
    """-> log-softmax (C, V) in fp32 (fp64 stays), summed loss of the chunk, target ids (C,), the matmul dtype."""
    mm = h_c @ weight.T  # (C, V) in the model dtype (autocast's under autocast), rounded as the plain head's
    logp = torch.log_softmax(mm, dim=-1, dtype=torch.promote_types(mm.dtype, torch.float32))  # (C, V)
    valid = labels_c != ignore_index
    target = labels_c.masked_fill(~valid, 0)  # (C,) any in-range id where ignored
    loss = -(logp.gather(1, target[:, None]).squeeze(1) * valid).sum()
    return logp, loss, target, mm.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index: int, rows: int):
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        dlogits = None
        for s in range(0, h.shape[0], rows):
            logp, loss, target, dtype = _chunk_log_probs(h[s:s + rows], weight, labels[s:s + rows], ignore_index)
            total += loss
            grad = logp.exp_()  # softmax, in place (C, V)
            grad.scatter_add_(1, target[:, None], grad.new_full((grad.shape[0], 1), -1.0))  # - onehot(label)
            if rows >= h.shape[0]:  # one chunk: no copy
                dlogits = grad.to(dtype)  # (N, V) in the model dtype
            else:
                if dlogits is None:
                    dlogits = torch.empty(h.shape[0], weight.shape[0], dtype=dtype, device=h.device)
                dlogits[s:s + rows] = grad
            del logp, grad  # before the next chunk's are made
        # ignored rows keep softmax - onehot(0) here; backward gives them zero weight through `row_scale`
        ctx.save_for_backward(h, weight, dlogits, labels != ignore_index)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, dlogits, valid = ctx.saved_tensors
        row_scale = (valid * grad_total)[:, None]  # (N, 1): the incoming gradient, 0 for ignored rows
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dh = ((dlogits @ weight.to(dlogits.dtype)) * row_scale).to(h.dtype)  # (N, D)
        if ctx.needs_input_grad[1]:
            dw = (dlogits.T @ (h * row_scale).to(dlogits.dtype)).to(weight.dtype)  # (V, D)
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
        total += _chunk_log_probs(h[s:s + rows], weight, labels[s:s + rows], ignore_index)[1]
    return total
