"""The trainer's distillation and TDPO terms (dpo/kinds/teacher.py through the pairs task's step, dpo/kinds/pairs.py) on batches shaped as
the loader gives them, from a tiny teacher's logits: with K = V, loss and gradient w.r.t. every policy parameter
equal the exact full-logit computation (TRL 1.16's DistillationTrainer loss; TDPO's definition); combinations add
up; the sampled estimator; slices; refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logitstore import teacher as T
from logitstore.dpo.objectives.objective import Objective, ObjectiveError, for_teacher
from logitstore.dpo.kinds.pairs import KIND as PAIRS
from logitstore.dpo.training import TrainConfig
from logitstore.loader import pad_pairs, pad_teacher


@pytest.fixture(scope="module")
def models(byte_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from logitstore.dpo.demo import make_tiny_model

    teacher_folder = make_tiny_model(tmp_path_factory.mktemp("teacher"), seed=1)
    policy = AutoModelForCausalLM.from_pretrained(str(byte_model), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_folder), dtype=torch.float32).eval()
    return policy.train(), teacher, str(byte_model)


def pairs(vocab: int, seed: int = 0, empty_prompt: bool = False):
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g)  # noqa: E731
    prompts, chosen, rejected = [draw(0 if empty_prompt else 3), draw(5)], [draw(4), draw(6)], [draw(5), draw(2)]
    return prompts, chosen, rejected


def teacher_batch(teacher, k: int | None = None, sample_k: int | None = None, seed: int = 0,
                  empty_prompt: bool = False):
    """A batch as the loader gives it (logitstore.loader.pad_pairs and pad_teacher), with the teacher's records of
    every scored completion token; also the teacher's full logits [2B, L-1, V] and the scored positions."""
    vocab = teacher.config.vocab_size
    prompts, chosen, rejected = pairs(vocab, seed, empty_prompt)
    batch = pad_pairs(prompts, chosen, rejected, pad_token_id=0)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    scored = batch["completion_mask"][:, 1:].bool()
    labels = batch["input_ids"][:, 1:]
    ref = (logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0] * scored).sum(1)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref.chunk(2)
    batch["rows"] = torch.arange(2)
    per_row = [logits[i][scored[i]].numpy() for i in range(len(logits))]
    if k is not None:
        recs = [T.top_k(r, k) for r in per_row]
        fields = {"ids": [r.ids for r in recs], "logps": [r.logps for r in recs],
                  "tail_logp": [r.tail_logp for r in recs]}
    else:
        recs = [T.sample(r, sample_k, seed=7, stream=i) for i, r in enumerate(per_row)]
        fields = {"ids": [r.ids for r in recs], "counts": [r.counts for r in recs]}
    sides = [{name: values[:2] for name, values in fields.items()}, {name: values[2:] for name, values in fields.items()}]
    batch.update(pad_teacher(sides, prompts, [chosen, rejected]))
    return batch, logits, scored


def ours(policy, batch, objective, model_path):
    """The pairs task's step: its loss and the gradient of every policy parameter, flattened."""
    cfg = TrainConfig(model=model_path, store="-", out="-", dtype="float32")
    policy.zero_grad(set_to_none=True)
    loss, metrics = PAIRS.task(cfg, objective).step(policy, batch, torch.device("cpu"))
    loss.backward()
    return loss.detach(), flat_grad(policy), metrics


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters()])


def trl_distill(policy, teacher, batch, beta):
    """TRL 1.16 DistillationTrainer's loss (_chunked_divergence_loss) on the full teacher, and its gradient."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    policy.zero_grad(set_to_none=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    student_hidden = policy.model(**inputs).last_hidden_state[:, :-1]
    with torch.no_grad():
        teacher_hidden = teacher.model(**inputs).last_hidden_state[:, :-1]
    loss, _, _ = _chunked_divergence_loss(student_hidden, teacher_hidden, policy.lm_head.weight,
                                          teacher.lm_head.weight, batch["completion_mask"][:, 1:], beta)
    loss.backward()
    return loss.detach(), flat_grad(policy)


def assert_close(got, want, grad, want_grad, value_tol=2e-6, grad_tol=2e-5):
    assert float(want_grad.abs().max()) > 0  # something to compare
    assert abs(float(got) - float(want)) <= value_tol * max(1.0, abs(float(want))), (float(got), float(want))
    relative = float((grad - want_grad).abs().max() / want_grad.abs().max())
    assert relative <= grad_tol, relative


@pytest.mark.parametrize("beta, empty_prompt", [(0.0, False), (0.5, False), (1.0, False), (0.5, True)])
def test_distill_at_vocabulary_size_equals_trl_on_full_logits(models, beta, empty_prompt):
    policy, teacher, path = models
    batch, _, _ = teacher_batch(teacher, k=teacher.config.vocab_size, empty_prompt=empty_prompt)
    if empty_prompt:  # the loader's layout: no record at t = 0, where no position predicts the first token
        first = torch.isfinite(batch["teacher_logps"][:, 0, 0])  # rows: chosen 0, chosen 1, rejected 0, rejected 1
        assert first.tolist() == [False, True, False, True]
    loss, grad, metrics = ours(policy, batch, Objective(loss_types=("distill",), distill_beta=beta), path)
    want, want_grad = trl_distill(policy, teacher, batch, beta)
    assert_close(loss, want, grad, want_grad)
    assert float(metrics["distill/loss"]) == float(loss)


def full_tdpo(policy, teacher_logits, batch, beta, alpha, variant):
    """TDPO from full logits (Zeng et al. 2024, eq. 14 / 16): Σ_t KL(π_ref || π) per completion, margins of the
    label log-ratios; TDPO2 stops the chosen KL's gradient and weighs the difference by α."""
    policy.zero_grad(set_to_none=True)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    scored = batch["completion_mask"][:, 1:].float()
    log_pi, log_ref = logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    kl = ((log_ref.exp() * (log_ref - log_pi)).sum(-1) * scored).sum(1)
    labels = batch["input_ids"][:, 1:, None]
    margin = ((log_pi.gather(-1, labels) - log_ref.gather(-1, labels))[..., 0] * scored).sum(1)
    (m_w, m_l), (kl_w, kl_l) = margin.chunk(2), kl.chunk(2)
    if variant == "tdpo1":
        z = m_w - m_l - (kl_l - kl_w)
    else:
        z = m_w - m_l - alpha * (kl_l - kl_w.detach())
    loss = -torch.nn.functional.logsigmoid(beta * z).mean()
    loss.backward()
    return loss.detach(), flat_grad(policy), kl.detach()


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_at_vocabulary_size_equals_the_full_logit_loss(models, variant):
    policy, teacher, path = models
    batch, teacher_logits, _ = teacher_batch(teacher, k=teacher.config.vocab_size)
    alpha = 0.3 if variant == "tdpo2" else None
    objective = Objective(loss_types=(variant,), beta=0.5, tdpo_alpha=alpha)
    loss, grad, metrics = ours(policy, batch, objective, path)
    want, want_grad, kl = full_tdpo(policy, teacher_logits, batch, 0.5, 0.3, variant)
    assert_close(loss, want, grad, want_grad)
    chosen_kl, rejected_kl = kl.chunk(2)
    assert abs(float(metrics["tdpo/seq_kl_chosen"]) - float(chosen_kl.mean())) < 1e-5
    assert abs(float(metrics["tdpo/seq_kl_rejected"]) - float(rejected_kl.mean())) < 1e-5
    assert float(chosen_kl.min()) > 0.05  # the two tiny models differ: the KL terms are not trivially zero


def test_combinations_add_up(models):
    policy, teacher, path = models
    batch, teacher_logits, _ = teacher_batch(teacher, k=16)
    both, both_grad, _ = ours(policy, batch, Objective(loss_types=("sigmoid", "distill", "tdpo2"),
                                                       loss_weights=(1.0, 0.5, 2.0), distill_beta=0.5), path)
    parts = [ours(policy, batch, Objective(loss_types=(t,), **kw), path)
             for t, kw in (("sigmoid", {}), ("distill", {"distill_beta": 0.5}), ("tdpo2", {}))]
    want = parts[0][0] + 0.5 * parts[1][0] + 2.0 * parts[2][0]
    want_grad = parts[0][1] + 0.5 * parts[1][1] + 2.0 * parts[2][1]
    assert_close(both, want, both_grad, want_grad)


def test_distill_below_vocabulary_size_is_below_the_full_loss(models):
    """K < V: the bucketed divergence is a lower bound of the full one (its size is benchmarks/topk.py's figure)."""
    policy, teacher, path = models
    full, _, _ = ours(policy, teacher_batch(teacher, k=teacher.config.vocab_size)[0],
                      Objective(loss_types=("distill",), distill_beta=0.0), path)
    losses = [float(ours(policy, teacher_batch(teacher, k=k)[0],
                         Objective(loss_types=("distill",), distill_beta=0.0), path)[0]) for k in (1, 8, 64)]
    assert losses[0] < losses[1] < losses[2] < float(full)


def test_sampled_distill_is_the_estimator_on_full_logits(models):
    from logitstore.dpo.objectives.distill import sampled_divergence

    policy, teacher, path = models
    batch, _, scored = teacher_batch(teacher, sample_k=12)
    objective = for_teacher(Objective(loss_types=("distill",)), "sampled", "s.lstore")
    assert objective.distill_divergence == 0.0  # the only divergence a sampled record estimates
    loss, grad, _ = ours(policy, batch, objective, path)
    policy.zero_grad(set_to_none=True)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    real = batch["teacher_counts"].sum(-1) > 0
    want = sampled_divergence(logits[scored], batch["teacher_ids"][real], batch["teacher_counts"][real]).mean()
    want.backward()
    assert_close(loss, want.detach(), grad, flat_grad(policy))


def test_slices_equal_one_pass(models, monkeypatch):
    from logitstore.dpo.model import head as logps_module

    policy, teacher, path = models
    batch, _, _ = teacher_batch(teacher, k=32)
    objective = Objective(loss_types=("sigmoid", "distill", "tdpo1"), distill_beta=0.3)
    whole, whole_grad, _ = ours(policy, batch, objective, path)
    monkeypatch.setattr(logps_module, "LOGIT_BYTES", 4 * policy.config.vocab_size * 3)  # slices of 3 positions
    sliced, sliced_grad, _ = ours(policy, batch, objective, path)
    assert_close(sliced, whole, sliced_grad, whole_grad, value_tol=1e-6, grad_tol=1e-5)


@pytest.mark.parametrize("kw, message", [
    ({"loss_types": ("sigmoid",), "distill_beta": 0.5}, "--distill-beta only applies to the distill loss"),
    ({"loss_types": ("distill",), "distill_beta": 1.5}, "--distill-beta must be in [0, 1], got 1.5"),
    ({"loss_types": ("tdpo1",), "tdpo_alpha": 0.5}, "--tdpo-alpha only applies to the tdpo2 loss (TDPO1 has no α)"),
    ({"loss_types": ("tdpo2",), "tdpo_alpha": -1.0}, "--tdpo-alpha must be a non-negative number, got -1.0"),
    ({"loss_types": ("distill",), "f_divergence": "forward_kl"},
     "the f-divergence has no effect on distill; it applies to the DPO losses"),
    ({"loss_types": ("distill",), "ld_alpha": 0.5}, "--ld-alpha has no effect on distill; it applies to the DPO losses"),
    ({"loss_types": ("sigmoid", "distill"), "use_weighting": True},
     "WPO-style weighting does not apply to the 'distill' loss: it is one mean over the batch's completion tokens, "
     "not a per-pair value to weight"),
    ({"loss_types": ("tdpo2",), "ld_alpha": 0.5},
     "--ld-alpha does not apply to TDPO: its sequential KL sums every completion token, so a length-desensitized "
     "log-ratio would weigh the two terms differently"),
])
def test_objective_refusals(kw, message):
    with pytest.raises(ObjectiveError) as info:
        Objective(**kw)
    assert str(info.value) == message


def test_f_divergence_still_applies_to_the_dpo_loss_beside_distill():
    o = Objective(loss_types=("sigmoid", "distill"), f_divergence="js_divergence")
    assert o.teacher_betas == (1.0,)  # TRL's default beta: the reverse KL


@pytest.mark.parametrize("objective, message", [
    (Objective(loss_types=("distill",), distill_beta=0.5),
     "s.lstore holds sampled teacher records, which estimate only the forward KL; pass --distill-beta 0 (got 0.5)"),
    (Objective(loss_types=("sigmoid", "tdpo2")),
     "tdpo2 needs the reference's top-k distribution and s.lstore holds sampled teacher records (an estimate of "
     "the forward KL's gradient, not of its value); rebuild with --top-k K"),
])
def test_sampled_records_refusals(objective, message):
    with pytest.raises(ObjectiveError) as info:
        for_teacher(objective, "sampled", "s.lstore")
    assert str(info.value) == message


def test_batch_checks_name_the_misfit(models):
    from logitstore.dpo.kinds.teacher import check_teacher_batch

    _, teacher, _ = models
    batch, _, _ = teacher_batch(teacher, k=8)
    assert check_teacher_batch(batch, teacher.config.vocab_size) is None
    rows, why = check_teacher_batch(batch, 100)
    assert why.startswith("a teacher token id ") and why.endswith(
        ", outside the model's vocabulary of 100; the store was built for another tokenizer")
    batch["teacher_tail_logp"][2, 0] = math.nan
    rows, why = check_teacher_batch(batch, teacher.config.vocab_size)
    assert rows.tolist() == [True, False]
    assert why == "a teacher log-prob of nan, which is no log-probability; the store is damaged"
    batch["teacher_tail_logp"][2, 0] = -1.0
    batch["teacher_logps"][3, 1:] = -math.inf  # the second pair's rejected side loses a position
    rows, why = check_teacher_batch(batch, teacher.config.vocab_size)
    assert rows.tolist() == [False, True]
    assert why == "teacher records for 1 positions of a completion that scores 2 tokens; the store is damaged"


def test_check_batch_names_the_examples_whose_records_misfit(models):
    from types import SimpleNamespace

    from logitstore.dpo.training.checks import check_batch
    from logitstore.errors import InputDataError
    from logitstore.kinds import PAIRS

    _, teacher, _ = models
    batch, _, _ = teacher_batch(teacher, k=8)
    store = SimpleNamespace(location=SimpleNamespace(url="t.lstore"), kind=PAIRS, id_of=lambda r: f"pair-{r}")
    check_batch(batch, store, teacher.config.vocab_size)
    batch["teacher_ids"][1, 0, 0] = 10_000
    with pytest.raises(InputDataError) as info:
        check_batch(batch, store, teacher.config.vocab_size)
    assert str(info.value) == ("t.lstore: example 'pair-1' holds a teacher token id 10000, outside the model's "
                               f"vocabulary of {teacher.config.vocab_size}; the store was built for another tokenizer")
