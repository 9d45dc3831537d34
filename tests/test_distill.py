"""Distillation losses on stored teacher records against TRL 1.16's DistillationTrainer divergence
(``ChunkedDivergenceFunction``, its CPU path) on full logits: equal at K = V, a lower bound below it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitstore import teacher as T
from logitstore.dpo.objectives.distill import full_divergence, sampled_divergence, top_k_divergence

BETAS = [0.0, 0.3, 0.5, 1.0]


def trl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's per-token divergence, with identity LM heads so that hidden states are the logits."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    eye = torch.eye(student_logits.shape[-1])
    divergence, _ = ChunkedDivergenceFunction.apply(student_logits, eye, None, teacher_logits, eye, None, beta)
    return divergence


def case(n=12, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vocab, generator=g) * 2).requires_grad_()
    teacher = torch.randn(n, vocab, generator=g) * 3
    return student, teacher


def record(teacher: torch.Tensor, k: int):
    rec = T.top_k(teacher.numpy(), k)
    return torch.from_numpy(rec.ids).long(), torch.from_numpy(rec.logps), torch.from_numpy(rec.tail_logp)


def value_and_grad(fn, student):
    student.grad = None
    value = fn(student)
    value.sum().backward()
    return value.detach(), student.grad.clone()


@pytest.mark.parametrize("beta", BETAS)
def test_top_k_at_vocabulary_size_equals_trl_on_full_logits(beta):
    student, teacher = case()
    ids, logps, tail = record(teacher, 64)
    ours, our_grad = value_and_grad(lambda s: top_k_divergence(s, ids, logps, tail, beta), student)
    trl, trl_grad = value_and_grad(lambda s: trl_divergence(s, teacher, beta), student)
    full, full_grad = value_and_grad(lambda s: full_divergence(s, teacher, beta), student)
    assert (ours - trl).abs().max() < 2e-5 and (our_grad - trl_grad).abs().max() < 2e-6
    assert (full - trl).abs().max() < 2e-5 and (full_grad - trl_grad).abs().max() < 2e-6


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("k", [1, 8, 32])
def test_top_k_below_vocabulary_size_is_a_lower_bound(beta, k):
    student, teacher = case()
    ids, logps, tail = record(teacher, k)
    bucketed = top_k_divergence(student, ids, logps, tail, beta).detach()
    full = full_divergence(student, teacher, beta).detach()
    assert (bucketed <= full + 1e-5).all()
    assert (bucketed > 0).all()


def test_top_k_tail_bucket_takes_the_students_rest_in_log_space():
    # the student puts all but e^-40 of its mass on token 0: its tail is still a finite log-mass
    student = torch.full((1, 10), -20.0)
    student[0, 0] = 20.0
    teacher = torch.zeros(1, 10)
    ids, logps, tail = record(teacher, 1)  # teacher keeps token 0 at 0.1, tail 0.9
    value = top_k_divergence(student, ids, logps, tail, 0.0)
    s_tail = np.log(9.0) - 40.0 - np.log1p(9 * np.exp(-40.0))
    exact = 0.1 * (np.log(0.1) - 0.0) + 0.9 * (np.log(0.9) - s_tail)
    assert abs(float(value) - exact) < 1e-4


def test_sampled_gradient_is_unbiased_for_the_forward_kl():
    student, teacher = case(n=2, vocab=8)
    _, exact = value_and_grad(lambda s: full_divergence(s, teacher, 0.0), student)
    total = torch.zeros_like(exact)
    runs = 2000
    for stream in range(runs):
        rec = T.sample(teacher.numpy(), 12, seed=3, stream=stream)
        ids, counts = torch.from_numpy(rec.ids).long(), torch.from_numpy(rec.counts.astype(np.int64))
        total += value_and_grad(lambda s: sampled_divergence(s, ids, counts), student)[1]
    # each entry is softmax(s) - counts/12: a frequency over 24,000 draws, standard error <= 0.0032; 5 of them 0.016
    assert (total / runs - exact).abs().max() < 0.016


def test_sampled_at_all_mass_on_one_token_is_the_exact_kl():
    student, _ = case(n=1, vocab=8)
    teacher = torch.full((1, 8), -1e4)
    teacher[0, 3] = 0.0
    rec = T.sample(teacher.numpy(), 12, seed=0)
    assert rec.ids[0, 0] == 3 and rec.counts[0, 0] == 12
    ids, counts = torch.from_numpy(rec.ids).long(), torch.from_numpy(rec.counts.astype(np.int64))
    ours, ours_grad = value_and_grad(lambda s: sampled_divergence(s, ids, counts), student)
    exact, exact_grad = value_and_grad(lambda s: full_divergence(s, teacher, 0.0), student)
    assert abs(float(ours) - float(exact)) < 1e-5 and (ours_grad - exact_grad).abs().max() < 1e-6


@pytest.mark.parametrize("call, message", [
    (lambda s, r: top_k_divergence(s, *r, beta=1.5), "--distill-beta must be in [0, 1], got 1.5"),
    (lambda s, r: sampled_divergence(s, r[0], torch.ones_like(r[0]), beta=0.5),
     "a sampled teacher supports only the forward KL (--distill-beta 0)"),
])
def test_refusals(call, message):
    student, teacher = case()
    with pytest.raises(ValueError) as e:
        call(student, record(teacher, 4))
    assert str(e.value) == message


def reference_tdpo(policy_logits, ref_logits, labels, mask, beta, alpha, tdpo2):
    """The published TDPO on full logits: per-position KL(π_ref || π) and log-ratio margins summed over the
    completion, then eq. 14 (TDPO1) or eq. 16 (TDPO2, chosen KL without gradient); rows alternate chosen, rejected."""
    logps, ref_logps = policy_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    kl = (ref_logps.exp() * (ref_logps - logps)).sum(-1)
    margin = (logps.gather(-1, labels[..., None]) - ref_logps.gather(-1, labels[..., None]))[..., 0]
    kl, margin = (kl * mask).sum(-1), (margin * mask).sum(-1)
    kl_w, kl_l, m_w, m_l = kl[0::2], kl[1::2], margin[0::2], margin[1::2]
    kl_w_term = kl_w.detach() if tdpo2 else kl_w
    logits = m_w - m_l - (alpha if tdpo2 else 1.0) * (kl_l - kl_w_term)
    return -torch.nn.functional.logsigmoid(beta * logits)


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_with_the_whole_reference_distribution_equals_the_full_logit_loss(variant):
    from logitstore.dpo.objectives.distill import sequence_kl, tdpo_loss

    g = torch.Generator().manual_seed(7)
    b, t, v = 4, 5, 16  # two pairs: rows chosen, rejected, chosen, rejected
    policy = (torch.randn(b, t, v, generator=g) * 2).requires_grad_()
    ref = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[1, 3:] = 0
    mask[2, 4:] = 0
    rec = T.top_k(ref.reshape(-1, v).numpy(), v)
    ids = torch.from_numpy(rec.ids).long().reshape(b, t, v)
    logps, tail = torch.from_numpy(rec.logps).reshape(b, t, v), torch.from_numpy(rec.tail_logp).reshape(b, t)
    ref_token = torch.from_numpy(T.log_softmax(ref.reshape(-1, v).numpy())).float().reshape(b, t, v)
    ref_token = ref_token.gather(-1, labels[..., None])[..., 0]

    def ours(p):
        kl = sequence_kl(p, ids, logps, tail, mask)
        margin = ((p.log_softmax(-1).gather(-1, labels[..., None])[..., 0] - ref_token) * mask).sum(-1)
        return tdpo_loss(margin[0::2], margin[1::2], kl[0::2], kl[1::2], 0.1, alpha=0.5, variant=variant)[0]

    ours_value, ours_grad = value_and_grad(ours, policy)
    want, want_grad = value_and_grad(lambda p: reference_tdpo(p, ref, labels, mask, 0.1, 0.5, variant == "tdpo2"),
                                     policy)
    assert (ours_value - want).abs().max() < 1e-5 and (ours_grad - want_grad).abs().max() < 1e-6
    assert float(ours_grad.abs().sum()) > 0


def test_tdpo_refuses_an_unknown_variant():
    from logitstore.dpo.objectives.distill import tdpo_loss

    x = torch.zeros(2)
    with pytest.raises(ValueError, match="^unknown TDPO variant 'tdpo3'; choose from tdpo1, tdpo2$"):
        tdpo_loss(x, x, x, x, 0.1, variant="tdpo3")


def test_head_divergence_in_slices_equals_one_pass(monkeypatch):
    from types import SimpleNamespace

    from logitstore.dpo.model import head as logps_module
    from logitstore.dpo.model.head import head_top_k_divergence

    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(30, 8, generator=g).requires_grad_()
    config = SimpleNamespace(final_logit_softcapping=5.0)  # soft-capping applies before the divergence
    teacher = torch.randn(30, 40, generator=g) * 2
    ids, lp, tail = record(teacher, 6)
    whole, whole_grad = value_and_grad(
        lambda h: top_k_divergence(torch.tanh(head(h) / 5.0) * 5.0, ids, lp, tail, 0.5), hidden)
    monkeypatch.setattr(logps_module, "LOGIT_BYTES", 4 * 40 * 7)  # slices of 7 rows
    sliced, sliced_grad = value_and_grad(lambda h: head_top_k_divergence(h, head, config, ids, lp, tail, 0.5),
                                         hidden)
    assert (sliced - whole).abs().max() < 1e-6 and (sliced_grad - whole_grad).abs().max() < 1e-7


@pytest.mark.parametrize("kind, k", [("top_k", 6), ("top_k", 40), ("sampled", 12)])
def test_linear_head_divergences_equal_autograd_through_the_logits(monkeypatch, kind, k):
    """The one-buffer LM-head path (closed-form gradient in the logits) against autograd on whole logits: values,
    and gradients of the hidden states and the head's weight, for several betas at once, in slices of 7 rows."""
    from types import SimpleNamespace

    from logitstore.dpo.model import head as logps_module
    from logitstore.dpo.model.head import head_divergences
    from logitstore.dpo.objectives.distill import divergences

    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(30, 8, generator=g).requires_grad_()
    teacher = torch.randn(30, 40, generator=g) * 2
    if kind == "top_k":
        ids, lp, tail = record(teacher, k)
        fields, betas = {"logps": lp, "tail_logp": tail}, (0.0, 0.3, 1.0)
    else:
        rec = T.sample(teacher.numpy(), k, seed=1)
        ids, betas = torch.from_numpy(rec.ids).long(), (0.0,)
        fields = {"counts": torch.from_numpy(rec.counts.astype(np.int64))}
    weights = torch.tensor([1.0, -0.5, 2.0])[:len(betas)]

    def run(fn):
        hidden.grad, head.weight.grad = None, None
        values = fn()
        (values * weights).sum().backward()
        return values.detach(), hidden.grad.clone(), head.weight.grad.clone()

    want = run(lambda: divergences(head(hidden), ids, betas=betas, **fields))
    monkeypatch.setattr(logps_module, "LOGIT_BYTES", 4 * 40 * 7)
    got = run(lambda: head_divergences(hidden, head, SimpleNamespace(), ids, betas=betas, **fields))
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())), float((a - b).abs().max())


def test_the_trainers_divergences_renormalize_a_quantized_record():
    """A record whose values do not sum to 1 (quantized) is a distribution once renormalized: the trainer's
    divergence of a student to its own rounded record is at least 0, where the raw one can be below."""
    from logitstore.dpo.objectives.distill import divergences

    student, _ = case()
    ids, logps, tail = record(student.detach(), 8)
    off = logps - 0.01  # every stored value rounded down: the record sums to e^-0.01 < 1 (tail kept)
    raw = top_k_divergence(student, ids, off, tail, 0.0).detach()
    ours = divergences(student, ids, logps=off, tail_logp=tail, betas=(0.0,))[:, 0].detach()
    assert float(raw.min()) < 0 <= float(ours.min())
    norm = torch.logsumexp(torch.cat([off, tail[:, None]], 1), 1, keepdim=True)
    want = top_k_divergence(student, ids, off - norm, tail - norm[:, 0], 0.0).detach()
    assert (ours - want).abs().max() < 1e-6
