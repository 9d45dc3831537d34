"""Every DPO objective against TRL 1.16's own code: `DPOTrainer._compute_loss` on the same per-token log-probs
(values and gradients), its live forward for WPO and LD-DPO, its refusals, and each loss's value at step 0."""

from __future__ import annotations

import collections
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from logitstore.dpo.model.scoring import TokenLogps, token_logps
from logitstore.dpo.objectives.pair_inputs import ld_weighted_sums, pair_logps
from logitstore.dpo.objectives.pair_losses import PairLogps, dpo_loss
from logitstore.dpo.objectives.objective import F_DIVERGENCE_LOSSES, F_DIVERGENCES, LOSS_TYPES, Objective, ObjectiveError
from logitstore.ld_dpo import ld_reference

TOLERANCE = 1e-6


def close(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """Largest difference, relative above magnitude 1 (float32 spacing at 50 is 4e-6)."""
    a, b = (torch.as_tensor(v).detach().to(torch.float64) for v in (a, b))
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max())


def _training_module() -> torch.nn.Module:
    module = torch.nn.Module()
    module.is_gradient_checkpointing = False
    return module.train()


def trl_trainer(objective: Objective, ref_model=None):
    """A DPOTrainer carrying only what `_compute_loss` reads, set from `objective` as TRL's __init__ sets it."""
    from trl import DPOTrainer

    trainer = DPOTrainer.__new__(DPOTrainer)
    identity = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x, device=torch.device("cpu"),
                               unwrap_model=lambda m: m)
    trainer.__dict__.update(
        beta=objective.beta, loss_types=list(objective.loss_types), loss_weights=list(objective.weights),
        f_divergence_type=objective.f_divergence, f_alpha_divergence_coef=objective.alpha_coef,
        ld_alpha=objective.ld_alpha, precompute_ref_logps=ref_model is None, use_weighting=objective.use_weighting,
        aux_loss_enabled=False, label_smoothing=objective.label_smoothing, ref_model=ref_model,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        model=_training_module(), accelerator=identity,
        args=SimpleNamespace(discopop_tau=objective.tau, gradient_checkpointing_kwargs=None))
    return trainer


def stub_model(per_token: torch.Tensor, log_sum_sq: torch.Tensor | None = None):
    """Stands in for TRL's fused-LM-head forward: returns given per-token values."""
    zeros = torch.zeros_like(per_token.detach())
    out = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                          log_sum_sq_probs=log_sum_sq)
    return lambda **kw: out


def random_batch(seed: int = 1, n: int = 6, width: int = 14):
    """Per-token policy and reference values of n pairs with varied lengths (one pair with an empty prompt)."""
    g = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * n, width, dtype=torch.long)
    prompts = torch.randint(1, 4, (n,), generator=g)
    prompts[0] = 0  # TRL never scores the first token: its count differs from the scored count
    for i in range(2 * n):
        p = int(prompts[i % n])
        k = int(torch.randint(1, width - p, (1,), generator=g))
        completion[i, p:p + k] = 1
    scored = completion[:, 1:].bool()
    policy = (-torch.rand(scored.shape, generator=g) * 3) * scored
    ref = (-torch.rand(scored.shape, generator=g) * 3) * scored
    # log Σ p² lies in [log p_max², 0]; any value below 0 exercises the weights
    sum_sq = (-torch.rand(scored.shape, generator=g) * 2) * scored
    return completion, scored, policy, ref, sum_sq


def trl_loss_and_grad(objective: Objective, completion, policy, ref, sum_sq, *, live_reference: bool):
    """TRL's loss and d loss / d policy per-token values."""
    from trl import DPOTrainer

    leaf = policy.clone().requires_grad_(True)
    n2, width = completion.shape
    inputs = {"input_ids": torch.ones(n2, width, dtype=torch.long), "attention_mask": torch.ones(n2, width),
              "completion_mask": completion}
    ref_model = None
    if live_reference:  # TRL computes the (LD-weighted) reference from per-token values itself
        ref_model = stub_model(ref)
    else:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref.sum(dim=1).chunk(2)
    trainer = trl_trainer(objective, ref_model)
    loss = DPOTrainer._compute_loss(trainer, stub_model(leaf, sum_sq), inputs, return_outputs=False)
    loss.backward()
    return loss.detach(), leaf.grad


def our_loss_and_grad(objective: Objective, completion, scored, policy, ref, sum_sq):
    """Ours: the reference from the store's form (per-token arrays and their sums) through logitstore.ld_dpo."""
    leaf = policy.clone().requires_grad_(True)
    sums = ref.sum(dim=1)
    if objective.ld_alpha is None:
        ref_chosen, ref_rejected = sums.chunk(2)
    else:
        rows = [ref[i][scored[i]].numpy() for i in range(ref.shape[0])]
        n = len(rows) // 2
        c, r = ld_reference(rows[:n], rows[n:], sums[:n].numpy(), sums[n:].numpy(), objective.ld_alpha)
        ref_chosen, ref_rejected = torch.from_numpy(c), torch.from_numpy(r)
    tokens = TokenLogps(leaf, scored, sum_sq)
    out = dpo_loss(pair_logps(tokens, completion, ref_chosen, ref_rejected, objective), objective)
    loss = out.losses.mean()
    loss.backward()
    return loss.detach(), leaf.grad, out


def assert_matches_trl(objective: Objective, seed: int = 1, live_reference: bool = False) -> tuple[float, float]:
    completion, scored, policy, ref, sum_sq = random_batch(seed)
    expected, expected_grad = trl_loss_and_grad(objective, completion, policy, ref, sum_sq,
                                                live_reference=live_reference)
    got, grad, _ = our_loss_and_grad(objective, completion, scored, policy, ref, sum_sq)
    value_diff, grad_diff = close(got, expected), close(grad, expected_grad)
    assert value_diff <= TOLERANCE and grad_diff <= TOLERANCE, (float(got), float(expected), value_diff, grad_diff)
    assert float(expected_grad.abs().sum()) > 0  # the comparison has something to compare
    return value_diff, grad_diff


def smoothing_for(types) -> float:
    return 0.1 if any(t in ("robust", "exo_pair", "aot", "aot_unpaired") for t in types) else 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_every_loss_type_matches_trl(loss_type, beta):
    assert_matches_trl(Objective(loss_types=(loss_type,), beta=beta, label_smoothing=smoothing_for([loss_type])))


@pytest.mark.parametrize("loss_type,smoothing", [(t, ls) for t in ("robust", "exo_pair", "aot", "aot_unpaired")
                                                for ls in (0.0, 0.001, 0.3) if (t, ls) != ("exo_pair", 0.0)])
def test_label_smoothing_matches_trl(loss_type, smoothing):
    assert_matches_trl(Objective(loss_types=(loss_type,), label_smoothing=smoothing))


@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_discopop_tau_matches_trl(tau):
    assert_matches_trl(Objective(loss_types=("discopop",), discopop_tau=tau))


@pytest.mark.parametrize("types,weights", [
    (("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)),  # MPO
    (("sigmoid", "sft"), None),
    (("ipo", "hinge", "sigmoid_norm"), (1.0, -0.5, 2.0)),
    (("aot", "apo_zero", "nca_pair", "sppo_hard"), (0.25, 0.25, 0.25, 0.25)),
    (("exo_pair", "robust", "discopop", "apo_down", "aot_unpaired"), (0.1, 0.2, 0.3, 0.4, 0.5)),
])
def test_weighted_combinations_match_trl(types, weights):
    assert_matches_trl(Objective(loss_types=types, loss_weights=weights, label_smoothing=smoothing_for(types)))


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSSES)
def test_f_divergences_match_trl(divergence, loss_type):
    alpha = {"alpha_divergence": 0.3}.get(divergence)
    assert_matches_trl(Objective(loss_types=(loss_type,), f_divergence=divergence, f_alpha_coef=alpha,
                                 label_smoothing=smoothing_for([loss_type]), beta=0.5))


@pytest.mark.parametrize("coef", [0.5, 1.0, 1.5, -1.0])
def test_alpha_divergence_coefficients_match_trl(coef):
    assert_matches_trl(Objective(loss_types=("sigmoid", "ipo"), f_divergence="alpha_divergence", f_alpha_coef=coef))


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("types", [("sigmoid",), ("ipo",), ("sigmoid", "sft"), ("aot",), ("apo_down", "bco_pair")])
def test_ld_alpha_matches_trl_computing_the_reference_live(ld_alpha, types):
    """TRL weighs its own reference forward's per-token values; ours weighs the store's per-token arrays."""
    assert_matches_trl(Objective(loss_types=types, ld_alpha=ld_alpha, label_smoothing=smoothing_for(types)),
                       live_reference=True)


@pytest.mark.parametrize("types", [("sigmoid",), ("ipo",), ("exo_pair", "robust"), ("nca_pair",), ("discopop",),
                                   ("sigmoid_norm", "apo_zero", "apo_down"), ("bco_pair", "sppo_hard")])
@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_wpo_weighting_matches_trl(types, ld_alpha):
    assert_matches_trl(Objective(loss_types=types, use_weighting=True, ld_alpha=ld_alpha,
                                 label_smoothing=smoothing_for(types)), live_reference=ld_alpha is not None)


def test_wpo_weighting_of_hinge_is_trls_forward_with_a_working_backward():
    """TRL 1.16 computes hinge x WPO weights but fails in backward (it scales relu's saved output in place). Ours
    gives TRL's value, and each pair's gradient is TRL's unweighted hinge gradient times that pair's weight."""
    completion, scored, policy, ref, sum_sq = random_batch()
    weighted = Objective(loss_types=("hinge",), use_weighting=True, beta=0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        trl_loss_and_grad(weighted, completion, policy, ref, sum_sq, live_reference=False)
    from trl import DPOTrainer

    leaf = policy.clone()
    n2, width = completion.shape
    inputs = {"input_ids": torch.ones(n2, width, dtype=torch.long), "attention_mask": torch.ones(n2, width),
              "completion_mask": completion, "ref_chosen_logps": ref.sum(1)[:n2 // 2],
              "ref_rejected_logps": ref.sum(1)[n2 // 2:]}
    with torch.no_grad():
        expected = DPOTrainer._compute_loss(trl_trainer(weighted), stub_model(leaf, sum_sq), inputs, False)
    got, grad, out = our_loss_and_grad(weighted, completion, scored, policy, ref, sum_sq)
    assert close(got, expected) <= TOLERANCE
    _, plain_grad = trl_loss_and_grad(Objective(loss_types=("hinge",), beta=0.5), completion, policy, ref, sum_sq,
                                      live_reference=False)
    from logitstore.dpo.objectives.pair_inputs import wpo_weights

    weights = wpo_weights(policy, sum_sq, scored).repeat(2)[:, None]
    assert close(grad, plain_grad * weights) <= TOLERANCE
    assert float(grad.abs().sum()) > 0


def test_ld_weighted_sums_are_shared_plus_alpha_tail():
    per_token = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-10.0, -20.0, 0.0, 0.0]])
    scored = per_token != 0
    assert ld_weighted_sums(per_token, scored, 0.25).tolist() == [-3.0 + 0.25 * -7.0, -30.0]
    c, r = ld_reference([np.array([-1.0, -2.0, -3.0, -4.0])], [np.array([-10.0, -20.0])], np.array([-10.0]),
                        np.array([-30.0]), 0.25)
    assert (c.tolist(), r.tolist()) == ([-3.0 + 0.25 * -7.0], [-30.0])


# ---- TRL's live forward (fused LM head) on a real model -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return MistralForCausalLM(config).eval()


def live_batch(seed: int = 3):
    from logitstore.loader import pad_pairs

    g = np.random.default_rng(seed)
    prompts = [g.integers(0, 300, int(g.integers(1, 6))) for _ in range(4)]
    chosen = [g.integers(0, 300, int(g.integers(1, 9))) for _ in range(4)]
    rejected = [g.integers(0, 300, int(g.integers(1, 9))) for _ in range(4)]
    return pad_pairs(prompts, chosen, rejected, 0)


@pytest.mark.parametrize("objective", [
    Objective(use_weighting=True),
    Objective(loss_types=("ipo", "sigmoid"), use_weighting=True, beta=0.5),
    Objective(ld_alpha=0.3),
    Objective(loss_types=("sigmoid", "sft"), loss_weights=(1.0, 0.5), ld_alpha=0.7, f_divergence="js_divergence"),
    Objective(loss_types=("discopop",), ld_alpha=0.5, use_weighting=True),
], ids=["wpo", "wpo-ipo-sigmoid", "ld0.3", "ld0.7-sft-js", "ld-wpo-discopop"])
def test_live_forward_matches_trl(tiny_lm, objective):
    """Our scorer (per-token log-probs, log Σ p², LD sums) and loss against TRL's fused LM head and _compute_loss,
    gradients compared on every model parameter."""
    import copy

    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    batch = live_batch()
    theirs = copy.deepcopy(tiny_lm)
    add_fused_lm_head(theirs, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    g = torch.Generator().manual_seed(5)
    n = batch["input_ids"].shape[0] // 2
    ref = (-torch.rand(2 * n, generator=g) * 30).chunk(2)
    inputs = dict(batch, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
    expected = DPOTrainer._compute_loss(trl_trainer(objective), theirs, inputs, return_outputs=False)
    expected.backward()

    ours = copy.deepcopy(tiny_lm)
    tokens = token_logps(ours, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                         sum_sq=objective.use_weighting)
    got = dpo_loss(pair_logps(tokens, batch["completion_mask"], ref[0], ref[1], objective), objective).losses.mean()
    got.backward()
    assert close(got, expected) <= TOLERANCE
    grads = {name: p.grad for name, p in ours.named_parameters()}
    worst = max(close(grads[name], p.grad) for name, p in theirs.named_parameters())
    assert worst <= TOLERANCE


# ---- refusals: TRL's, with TRL's words, and options that would do nothing -------------------------------------

@pytest.fixture(scope="module")
def trl_refusal(tmp_path_factory):
    """The message TRL 1.16 raises for a DPOConfig (its __init__ checks run before any data is touched)."""
    import datasets
    from transformers import ByT5Tokenizer, MistralConfig, MistralForCausalLM
    from trl import DPOConfig, DPOTrainer

    tokenizer = ByT5Tokenizer()
    output = str(tmp_path_factory.mktemp("trl-refusal"))

    def refusal(**config) -> str:
        model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        with pytest.raises((ValueError, NotImplementedError)) as info:
            args = DPOConfig(output_dir=output, report_to=[], use_cpu=True, bf16=False, **config)
            DPOTrainer(model=model, args=args, processing_class=tokenizer,
                       train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
        return str(info.value)

    return refusal


@pytest.mark.parametrize("ours,trl", [
    (dict(loss_types=("bco_pair",), f_divergence="forward_kl"), dict(loss_type=["bco_pair"],
                                                                     f_divergence_type="forward_kl")),
    (dict(loss_types=("sigmoid", "aot"), f_divergence="js_divergence"),
     dict(loss_type=["sigmoid", "aot"], f_divergence_type="js_divergence")),
    (dict(loss_types=("aot_unpaired",), use_weighting=True), dict(loss_type=["aot_unpaired"], use_weighting=True)),
    (dict(loss_types=("exo_pair",)), dict(loss_type=["exo_pair"])),
])
def test_refusals_are_trls(ours, trl, trl_refusal):
    with pytest.raises(ObjectiveError) as info:
        Objective(**ours)
    assert str(info.value).startswith(trl_refusal(**trl))


def test_a_weight_count_mismatch_is_refused_as_trl_refuses_it_in_the_flags_words(trl_refusal):
    assert trl_refusal(loss_type=["sigmoid", "sft"], loss_weights=[1.0]).startswith(
        "`loss_weights` must have the same length as `loss_type`")
    with pytest.raises(ObjectiveError) as info:
        Objective(loss_types=("sigmoid", "sft"), loss_weights=(1.0,))
    assert str(info.value) == ("--loss-weights gives 1 weight for 2 --loss types (sigmoid, sft); give one weight per "
                               "type, in the same order")


def test_f_divergence_refusal_gives_trls_reason():
    with pytest.raises(ObjectiveError) as info:
        Objective(loss_types=("sigmoid", "apo_zero"), f_divergence="forward_kl")
    assert str(info.value) == (
        "`f_divergence_type='forward_kl'` is only supported for the following loss types: ['discopop', 'exo_pair', "
        "'hinge', 'ipo', 'robust', 'sft', 'sigmoid', 'sigmoid_norm']. You provided ['sigmoid', 'apo_zero']. Use the "
        "default `f_divergence_type='reverse_kl'` with these losses. The f-DPO reparameterization leaves a β·log Z(x) "
        "term that only cancels in the chosen-rejected reward difference.")


@pytest.mark.parametrize("kwargs,message", [
    (dict(label_smoothing=0.1), "label smoothing has no effect on sigmoid; only robust, exo_pair, aot, aot_unpaired "
                                "use it"),
    (dict(loss_types=("ipo", "hinge"), label_smoothing=0.2), "label smoothing has no effect on ipo, hinge; only "
                                                              "robust, exo_pair, aot, aot_unpaired use it"),
    (dict(loss_types=("robust",), label_smoothing=0.5), "The `label_smoothing` parameter should lie in [0.0, 0.5) for "
                                                         "the 'robust' loss. You provided 0.5."),
    (dict(loss_types=("aot",), label_smoothing=1.0), "label smoothing is a probability in [0, 1), got 1.0"),
    (dict(discopop_tau=0.1), "--discopop-tau only applies to the discopop loss"),
    (dict(loss_types=("discopop",), discopop_tau=0.0), "--discopop-tau must be a positive number, got 0.0"),
    (dict(f_alpha_coef=0.3), "the alpha coefficient only applies to the alpha_divergence f-divergence"),
    (dict(ld_alpha=1.5), "--ld-alpha must be in [0.0, 1.0], got 1.5"),
    (dict(beta=0.0), "--beta must be a positive number, got 0.0"),
    (dict(loss_types=("sigmoid", "sft"), use_weighting=True),
     "WPO-style weighting does not apply to the 'sft' loss: it is one batch-level average, not a per-pair value to "
     "weight"),
    (dict(loss_types="sigmoid,dpo"), "unknown loss type 'dpo'; choose from sigmoid, hinge, ipo, exo_pair, nca_pair, "
                                     "robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, "
                                     "sft, sigmoid_norm, distill, tdpo1, tdpo2 (a preference-pair store) or kto, "
                                     "apo_zero_unpaired, bco (an unpaired store)"),
    (dict(loss_types="sigmoid,,sft"), "expected one or more loss types separated by commas, got 'sigmoid,,sft'"),
    (dict(loss_types=("sft", "sft")), "loss type 'sft' is listed twice; give it one weight instead"),
    (dict(f_divergence="kl"), "unknown f-divergence 'kl'; choose from reverse_kl, forward_kl, js_divergence, "
                              "alpha_divergence"),
])
def test_meaningless_or_impossible_options_are_refused(kwargs, message):
    with pytest.raises(ObjectiveError) as info:
        Objective(**kwargs)
    assert str(info.value) == message


def test_trl_crashes_on_sft_with_wpo_weighting():
    """Why we refuse it: TRL 1.16 accepts the configuration and then fails in the loss."""
    as_trl_takes_it = SimpleNamespace(loss_types=("sft",), weights=(1.0,), use_weighting=True, beta=0.1,
                                      label_smoothing=0.0, f_divergence="reverse_kl", alpha_coef=0.5, ld_alpha=None,
                                      tau=0.05)
    completion, _, policy, ref, sum_sq = random_batch()
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        trl_loss_and_grad(as_trl_takes_it, completion, policy, ref, sum_sq, live_reference=False)


# ---- step 0: policy == reference ------------------------------------------------------------------------------

STEP_ZERO = {  # β = 0.1, label smoothing 0.1 where used; the value every loss starts from
    "sigmoid": math.log(2), "hinge": 1.0, "ipo": 25.0,
    "exo_pair": 0.5 * (math.log(0.5) - math.log(0.9)) + 0.5 * (math.log(0.5) - math.log(0.1)),
    "nca_pair": 2 * math.log(2), "robust": math.log(2), "bco_pair": 2 * math.log(2), "sppo_hard": 50.0,
    "aot": math.log(2), "aot_unpaired": math.log(2), "apo_zero": 1.0, "apo_down": 1.0,
    "discopop": 0.5 * math.log(2) + 0.5, "sigmoid_norm": math.log(2),
}


@pytest.mark.parametrize("loss_type,divergence", [(t, d) for t in sorted(STEP_ZERO) for d in F_DIVERGENCES
                                                   if d == "reverse_kl" or t in F_DIVERGENCE_LOSSES])
def test_step_zero_values(loss_type, divergence):
    """At step 0 the policy is the reference; f-divergences leave the value unchanged."""
    logps = -torch.rand(8) * 50
    x = PairLogps(logps[:4], logps[4:], logps[:4].clone(), logps[4:].clone(), torch.full((4,), 7),
                  torch.full((4,), 5))
    objective = Objective(loss_types=(loss_type,), label_smoothing=smoothing_for([loss_type]), f_divergence=divergence)
    out = dpo_loss(x, objective)
    assert float(out.losses.mean()) == pytest.approx(STEP_ZERO[loss_type], abs=1e-6)
    assert float(out.chosen_rewards.abs().max()) == 0.0 and float(out.rejected_rewards.abs().max()) == 0.0


def test_sft_starts_at_the_mean_token_nll():
    x = PairLogps(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2),
                  chosen_token_mean=torch.tensor(-2.5))
    assert float(dpo_loss(x, Objective(loss_types=("sft",))).losses.mean()) == 2.5


def test_sigmoid_loss_reference_formula():
    x = PairLogps(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))
    out = dpo_loss(x, Objective(beta=0.5))
    assert float(out.losses[0]) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * 2.0))))
    assert float(out.chosen_rewards[0]) == pytest.approx(0.5) and float(out.rejected_rewards[0]) == pytest.approx(-0.5)


def test_docs_list_every_loss_type_with_its_paper():
    import re
    from pathlib import Path

    from logitstore.dpo.objectives.objective import PAPERS, TEACHER_PAPERS

    doc = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    table = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", doc, re.M)}
    for loss_type, paper in {**PAPERS, **TEACHER_PAPERS}.items():
        arxiv = re.search(r"arXiv:\d{4}\.\d{5}", paper)
        assert loss_type in table and (arxiv is None or arxiv.group(0) in table[loss_type]), loss_type
