"""KTO and APO-zero (unpaired) against TRL 1.16's own `KTOTrainer._compute_loss` on the same log-probs, with
nonzero rewards and KL; BCO's running reward mean against the mean of every reward seen."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch

from logitstore.dpo.objectives.unpaired_losses import RunningMean, bco_loss, kl_estimate, kto_loss


def trl_kto(loss_type: str, beta: float, desirable: float, undesirable: float):
    """A KTOTrainer carrying only what `_compute_loss` reads, set as TRL's __init__ sets it (precomputed
    reference log-probs, one process)."""
    from trl import KTOTrainer

    trainer = KTOTrainer.__new__(KTOTrainer)
    module = torch.nn.Module().train()
    accelerator = SimpleNamespace(gather_for_metrics=lambda x: x, device=torch.device("cpu"))
    trainer.__dict__.update(
        beta=beta, loss_type=loss_type, desirable_weight=desirable, undesirable_weight=undesirable,
        calculate_KL=loss_type != "apo_zero_unpaired", precompute_ref_logps=True, aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1, model=module,
        accelerator=accelerator)
    return trainer


def stub_model(scale: torch.Tensor):
    """Stands in for TRL's fused-LM-head forward: log p of token t+1 is -scale * (0.03 * id + 0.01 * t) on the
    completion, 0 elsewhere; differentiable in `scale`."""
    def forward(input_ids, labels, **_):
        target = labels[:, 1:]
        position = torch.arange(target.shape[1], dtype=torch.float32)[None, :]
        per_token = -scale * (0.03 * target.clamp(min=0).float() + 0.01 * position) * (target != -100)
        zeros = torch.zeros_like(per_token.detach())
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)
    return forward


def batch(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    width = 9
    out = {}
    for prefix in ("", "KL_"):
        ids = torch.randint(1, 50, (n, width), generator=g)
        attention = torch.ones(n, width, dtype=torch.long)
        completion = torch.zeros(n, width, dtype=torch.long)
        for i in range(n):
            start = int(torch.randint(1, 4, (1,), generator=g))
            stop = int(torch.randint(start + 1, width + 1, (1,), generator=g))
            completion[i, start:stop] = 1
            attention[i, stop:] = 0
        out[f"{prefix}input_ids"], out[f"{prefix}attention_mask"] = ids, attention
        out[f"{prefix}completion_mask"] = completion
    out["label"] = torch.tensor([True, False, True, True, False, False][:n])
    return out


def sums(scale: torch.Tensor, b: dict, prefix: str = "") -> torch.Tensor:
    labels = b[f"{prefix}input_ids"].masked_fill(b[f"{prefix}completion_mask"] == 0, -100)
    return stub_model(scale)(input_ids=b[f"{prefix}input_ids"], labels=labels).log_probs.sum(-1)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_shift", [-3.0, 2.5])  # KL estimate clamped to 0, and positive
@pytest.mark.parametrize("beta,desirable,undesirable", [(0.1, 1.0, 1.0), (0.5, 1.3, 0.7)])
def test_kto_matches_trl(loss_type, kl_shift, beta, desirable, undesirable):
    b = batch(7)
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor(1.0, requires_grad=True)
    with torch.no_grad():
        ref = sums(torch.tensor(1.0), b) + torch.randn(6, generator=g) * 2  # nonzero rewards
        ref_kl = sums(torch.tensor(1.0), b, "KL_") + kl_shift + torch.randn(6, generator=g) * 0.1
    trainer = trl_kto(loss_type, beta, desirable, undesirable)
    theirs = trainer._compute_loss(stub_model(scale), dict(b, ref_logps=ref, ref_KL_logps=ref_kl), False)
    (their_grad,) = torch.autograd.grad(theirs, scale)

    ours_scale = torch.tensor(1.0, requires_grad=True)
    policy = sums(ours_scale, b)
    with torch.no_grad():  # TRL scores the KL completions without gradient
        policy_kl = sums(ours_scale, b, "KL_")
    kl = kl_estimate(policy_kl, ref_kl) if loss_type == "kto" else torch.zeros(())
    out = kto_loss(policy, ref, b["label"], kl, beta=beta, desirable_weight=desirable,
                   undesirable_weight=undesirable, loss_type=loss_type)
    ours = out.losses.nanmean()
    (our_grad,) = torch.autograd.grad(ours, ours_scale)
    assert float(out.chosen_rewards.abs().min()) > 0.01
    if loss_type == "kto":
        assert trainer._metrics["train"]["kl"][-1] == pytest.approx(float(kl), abs=1e-6)
        assert (float(kl) > 0.5) == (kl_shift < 0)
    ours, theirs = ours.detach(), theirs.detach()
    assert abs(float(ours) - float(theirs)) <= 1e-6 * max(1.0, abs(float(theirs)))
    assert abs(float(our_grad) - float(their_grad)) <= 1e-6 * max(1.0, abs(float(their_grad)))
    assert trainer._metrics["train"]["rewards/chosen"][-1] == pytest.approx(float(out.chosen_rewards.mean()), abs=1e-6)


def test_kl_estimate_averages_ranks_then_clamps():
    gathered = lambda kl: torch.stack([kl, torch.tensor(-5.0)])  # noqa: E731 - another rank's mean
    assert float(kl_estimate(torch.tensor([2.0, 4.0]), torch.tensor([0.0, 0.0]), gathered)) == 0.0
    assert float(kl_estimate(torch.tensor([12.0, 14.0]), torch.tensor([0.0, 0.0]), gathered)) == 4.0
    assert float(kl_estimate(torch.tensor([-1.0]), torch.tensor([0.0]))) == 0.0


def test_kto_reference_formula():
    """Eq. 7 of the KTO paper by hand for one desirable and one undesirable example."""
    out = kto_loss(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5]), torch.tensor([True, False]),
                   torch.tensor(0.25), beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    sig = lambda x: 1 / (1 + torch.exp(-torch.tensor(x)))  # noqa: E731
    expected = [2.0 * (1 - sig(0.5 * (1.0 - 0.25))), 0.5 * (1 - sig(0.5 * (0.25 + 0.5)))]
    assert torch.allclose(out.losses, torch.stack(expected))


def test_bco_delta_is_the_running_mean_of_all_rewards():
    running = RunningMean()
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(4):
        policy, ref = torch.randn(5, generator=g) * 3, torch.randn(5, generator=g) * 3
        labels = torch.tensor([True, False, True, False, False])
        out = bco_loss(policy, ref, labels, running, beta=0.2)
        seen.append(0.2 * (policy - ref))
        everything = torch.cat(seen)
        assert float(out.delta) == pytest.approx(float(everything.mean()), abs=1e-6)
        assert running.var == pytest.approx(float(everything.var(unbiased=False)), rel=1e-5)
        chosen = 0.2 * (policy[labels] - ref[labels])
        rejected = 0.2 * (policy[~labels] - ref[~labels])
        expected = torch.cat([-torch.nn.functional.logsigmoid(chosen - everything.mean()),
                              -torch.nn.functional.logsigmoid(-(rejected - everything.mean()))])
        assert torch.allclose(out.losses, expected, atol=1e-6)


def test_bco_evaluation_leaves_delta_and_state_round_trips():
    running = RunningMean()
    bco_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0]), torch.tensor([True, False]), running, beta=1.0)
    state = running.state_dict()
    assert state["mean"] == 0.0 and state["var"] == 1.0
    bco_loss(torch.tensor([5.0]), torch.tensor([0.0]), torch.tensor([True]), running, beta=1.0, update=False)
    assert running.state_dict() == state
    again = RunningMean()
    again.load_state_dict(state)
    assert again == running
