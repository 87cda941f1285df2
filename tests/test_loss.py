"""The chunked lm-head cross-entropy against the plain `F.cross_entropy(h @ W^T)`: values, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dbrx.kernels.loss import linear_cross_entropy


def make(N=23, D=16, V=50, dtype=torch.float32, seed=0, ignored=(3, 4, 17)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignored)] = -100
    return h, w, labels


def plain(h, w, labels):
    logits = h @ w.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64 for gradcheck
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def grads(fn, h, w, labels, scale=1.0):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [None, 1, 5, 23, 100])  # one chunk, one row per chunk, uneven chunks
def test_matches_plain_cross_entropy_fp32(chunk_rows):
    h, w, labels = make()
    got = grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk_rows), h, w, labels, scale=2.5)
    ref = grads(plain, h, w, labels, scale=2.5)  # a scaled loss checks that backward uses the incoming gradient
    for name, a, b in zip(("loss", "dh", "dw"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert got[1][3].abs().max() == 0  # an ignored row gets no gradient


def test_matches_plain_cross_entropy_bf16():
    h, w, labels = make(N=64, D=32, V=300, dtype=torch.bfloat16, seed=1)
    got = grads(lambda *a: linear_cross_entropy(*a, chunk_rows=7), h, w, labels)
    ref = grads(plain, h, w, labels)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=1e-4)  # the same bf16 logits, fp32 softmax
    for name, a, b in zip(("dh", "dw"), got[1:], ref[1:]):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-2, name


def test_gradcheck_float64():
    h, w, labels = make(N=7, D=5, V=11, dtype=torch.float64, ignored=(2,))
    h.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, labels, chunk_rows=3), (h, w))


def test_no_grad_and_partial_grad():
    h, w, labels = make()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, labels, chunk_rows=4), plain(h, w, labels))
    w = w.clone().requires_grad_()  # only the head needs a gradient (h frozen)
    linear_cross_entropy(h, w, labels, chunk_rows=4).backward()
    w_ref = w.detach().clone().requires_grad_()
    plain(h, w_ref, labels).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-5, rtol=1e-5)


def test_all_ignored_gives_zero_loss_and_gradients():
    h, w, labels = make(N=6, ignored=range(6))
    loss, dh, dw = grads(linear_cross_entropy, h, w, labels)
    assert loss == 0 and dh.abs().max() == 0 and dw.abs().max() == 0


def test_shape_errors():
    h, w, labels = make()
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, labels[:-1])
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w[:, :-1], labels)


def reference(h, w, labels, want_h, want_w, scale):
    """Gradients of F.cross_entropy on the materialised fp32 logits, by autograd: the independent reference."""
    h, w = h.detach().clone().requires_grad_(want_h), w.detach().clone().requires_grad_(want_w)
    loss = F.cross_entropy((h @ w.T).float(), labels, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def fused(h, w, labels, want_h, want_w, scale, **kw):
    h, w = h.detach().clone().requires_grad_(want_h), w.detach().clone().requires_grad_(want_w)
    loss = linear_cross_entropy(h, w, labels, **kw)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("N", [40, 9])  # N >= 2 D: dW accumulated in forward; N < 2 D: the logit gradient kept
@pytest.mark.parametrize("want", ["h", "w", "both"])  # head frozen (LoRA), only the head, both
@pytest.mark.parametrize("chunk_rows", [None, 1, 4])
def test_gradients_formed_in_forward_match_autograd(N, want, chunk_rows):
    h, w, labels = make(N=N, D=16, V=70, seed=2, ignored=(0, 5, 8))
    want_h, want_w = want in ("h", "both"), want in ("w", "both")
    got = fused(h, w, labels, want_h, want_w, 3.0, chunk_rows=chunk_rows)  # a scaled loss: grad_total = 3
    ref = reference(h, w, labels, want_h, want_w, 3.0)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for name, a, b, wanted in (("dh", got[1], ref[1], want_h), ("dw", got[2], ref[2], want_w)):
        if not wanted:
            assert a is None, name
            continue
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if want_h:
        assert got[1][[0, 5, 8]].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("N", [64, 20])  # D = 32: dW in forward / the logit gradient kept
@pytest.mark.parametrize("want", ["h", "both"])
def test_bf16_inputs_match_autograd(N, want):
    h, w, labels = make(N=N, D=32, V=300, dtype=torch.bfloat16, seed=3, ignored=(1, 2))
    want_w = want == "both"
    got = fused(h, w, labels, True, want_w, 0.5, chunk_rows=7)
    ref = reference(h, w, labels, True, want_w, 0.5)
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=1e-4)  # the same bf16 logits, fp32 softmax
    for name, a, b in zip(("dh", "dw"), got[1:], ref[1:]):
        if b is None:
            assert a is None
            continue
        assert a.dtype == torch.bfloat16, name
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-2, name


def test_autocast_bf16_matches_autograd():
    """fp32 inputs under CPU autocast: the head's matmuls in bf16 as autocast makes them, gradients in fp32."""
    h, w, labels = make(N=48, D=16, V=200, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(h, w, labels, True, True, 2.0, chunk_rows=5)
        ref = reference(h, w, labels, True, True, 2.0)
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=1e-4)
    for name, a, b in zip(("dh", "dw"), got[1:], ref[1:]):
        assert a.dtype == torch.float32, name
        assert ((a - b).norm() / b.norm()) < 1e-2, name

