"""The LM head's log-probs under autograd (dpo/model/head.py): the sliced custom backward against autograd through the
plain formula log_softmax(h W^T)[label], values and gradients, for hidden states and for a trainable head."""

from __future__ import annotations

import types

import pytest
import torch

from logitstore.dpo.model import head as logps

CONFIG = types.SimpleNamespace()  # no softcap, no logit scale


def reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)


@pytest.mark.parametrize("slice_rows", [1, 3, 7, 64])
@pytest.mark.parametrize("train_head", [False, True])
def test_sliced_head_matches_autograd_formula(monkeypatch, slice_rows, train_head):
    torch.manual_seed(0)
    vocab, width, rows = 50, 16, 13
    monkeypatch.setattr(logps, "LOGIT_BYTES", 4 * vocab * slice_rows)
    head = torch.nn.Linear(width, vocab, bias=False).double().requires_grad_(train_head)
    hidden = torch.randn(rows, width, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    upstream = torch.randn(rows, dtype=torch.float64)

    values, squares = logps.head_logps(hidden, labels, head, CONFIG)
    assert squares is None and values.grad_fn is not None
    assert type(values.grad_fn).__name__ == "_LinearHeadLogpsBackward"  # the sliced path, not the generic one
    grads = torch.autograd.grad((values * upstream).sum(), [hidden] + ([head.weight] if train_head else []))

    want = reference(hidden, head.weight, labels)
    want_grads = torch.autograd.grad((want * upstream).sum(), [hidden] + ([head.weight] if train_head else []))
    assert values.dtype == torch.float32  # as the reference pass stores them
    assert torch.allclose(values.double(), want, atol=1e-5)
    for got, exp in zip(grads, want_grads):
        assert got.dtype == exp.dtype and torch.allclose(got, exp, atol=1e-5)


def test_sliced_head_values_equal_the_no_grad_path():
    """Policy and reference compute the same float32 values: training's path is the reference pass's, plus a
    backward."""
    torch.manual_seed(1)
    head = torch.nn.Linear(32, 300, bias=False)
    hidden = torch.randn(40, 32, requires_grad=True)
    labels = torch.randint(0, 300, (40,))
    with_grad, _ = logps.head_logps(hidden, labels, head, CONFIG)
    with torch.no_grad():
        without, _ = logps.head_logps(hidden, labels, head, CONFIG)
    assert torch.equal(with_grad.detach(), without)


def test_sliced_head_in_bfloat16_matches_autograd_through_a_float32_cast():
    torch.manual_seed(2)
    head = torch.nn.Linear(32, 300, bias=False).bfloat16()
    hidden = torch.randn(20, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 300, (20,))
    values, _ = logps.head_logps(hidden, labels, head, CONFIG)
    (grad,) = torch.autograd.grad(values.sum(), hidden)
    want = reference(hidden, head.weight, labels)
    (want_grad,) = torch.autograd.grad(want.sum(), hidden)
    assert values.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.allclose(values, want, atol=1e-2)
    assert torch.allclose(grad.float(), want_grad.float(), atol=2e-2, rtol=2e-2)


def test_other_heads_keep_the_generic_path():
    """A softcapped head (Gemma 2) is not a plain linear one: autograd through the recomputed slices."""
    head = torch.nn.Linear(8, 20, bias=False)
    hidden = torch.randn(5, 8, requires_grad=True)
    labels = torch.randint(0, 20, (5,))
    values, _ = logps.head_logps(hidden, labels, head, types.SimpleNamespace(final_logit_softcapping=30.0))
    assert type(values.grad_fn).__name__ != "_LinearHeadLogpsBackward"
    logits = torch.tanh(hidden @ head.weight.T / 30.0) * 30.0
    want = torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    assert torch.allclose(values, want, atol=1e-5)
