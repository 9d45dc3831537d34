"""Offline distillation in TRL: TRL 1.16's SFTTrainer trained on a completion store's teacher records, with no
teacher model and no server.

    from logitstore.integrations.trl import StoreDistillationConfig, StoreDistillationTrainer
    args = StoreDistillationConfig(output_dir="out", max_length=1024, beta=0.0)
    trainer = StoreDistillationTrainer(store="teacher.lstore", model=student, args=args, train_dataset=ds, ...)

Why SFTTrainer and not TRL's DistillationTrainer: DistillationTrainer (TRL 1.16) is on-policy. Its
``_prepare_inputs`` generates every completion from the student (``_generate_and_score_completions``), its dataset
keeps the raw ``prompt`` column only (completions are never tokenized), its sampler repeats prompts over generation
batches, and its loss runs the teacher's backbone on each batch (``_compute_loss``). It can be built without a
teacher (TRL's server trainer does), but a store's records are for the *dataset's* completions, so the generation,
the data pipeline and the loss would all be replaced, leaving only generation machinery that never runs.
SFTTrainer is TRL's trainer of exactly this data: prompt/completion examples tokenized as the store was built
(a completion store's tokenization is TRL 1.16 SFTTrainer's, docs/FORMAT.md), its collator and completion-only
labels, and the Trainer machinery (accelerate, DDP/FSDP/DeepSpeed, gradient accumulation by ``num_items_in_batch``).
Only the loss changes, to DistillationTrainer's: the generalized JSD at its ``beta`` (0 forward KL, 1 reverse KL),
summed over every scored completion token and divided by their count over all ranks.

The divergence is ``logitstore train --loss distill``'s (``logitstore.dpo``): over the K stored tokens plus one
tail bucket of a top-k record (exactly TRL's full-logit divergence at K = V), or the forward-KL estimator of a
sampled record. The student's backbone runs once and its LM head over the scored positions in slices, so no
[batch, sequence, vocabulary] tensor is held; the records are [batch, completion, K], read by example ID from the
memory-mapped store as each batch is collated. ``nll_weight`` (DistillationConfig has no such field) adds that
weight times the completion tokens' negative log-likelihood, reduced the same way.

The dataset is TRL's prompt/completion data; an ``id`` column names each example's store ID (without one, the ID
is the one ``logitstore build`` gives data without ``id``, a hash of prompt and completion). Before training, every
example's TRL tokens and scored positions are checked against the store's, so another tokenizer, chat template or
``max_length`` is refused naming the example. Not supported: ``temperature`` (records are at temperature 1),
packing and padding-free batches (one row per example), an IterableDataset (it cannot be checked up front).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
import torch
from trl import SFTConfig, SFTTrainer
from trl.models.utils import _ForwardRedirection

# From logitstore.dpo, only these: the build's example IDs, a batch's records aligned with its scored tokens, and
# the trainer's scoring pass (backbone once; log-probs and divergences through the LM head in slices).
from logitstore.dpo.inputs.completions import content_id
from logitstore.dpo.model.teacher_records import TeacherRecords
from logitstore.dpo.model.scoring import token_logps

from ..errors import LogitstoreError, UnknownIdError
from ..loader import pad_teacher, require_teacher
from ..reader import Store
from ..reader import open as open_store

TRAINER = "StoreDistillationTrainer"
CONFIG = "StoreDistillationConfig"
DEFAULT_BETA = 1.0  # TRL 1.16 DistillationConfig.beta: the reverse KL


@dataclasses.dataclass
class StoreDistillationConfig(SFTConfig):
    """SFTConfig plus TRL DistillationConfig's ``beta`` and an NLL weight."""

    beta: float | None = dataclasses.field(default=None, metadata={
        "help": "TRL DistillationConfig's beta: 0.0 forward KL, 1.0 reverse KL, between the generalized JSD. Unset: "
                "1.0 (TRL's default) on top-k records, 0.0 on sampled records (the only divergence they estimate)."})
    nll_weight: float = dataclasses.field(default=0.0, metadata={
        "help": "Weight of the completion tokens' negative log-likelihood added to the divergence."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta is not None and not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0.0, 1.0], got {self.beta}.")
        if not self.nll_weight >= 0.0:
            raise ValueError(f"nll_weight must be at least 0.0, got {self.nll_weight}.")


def completion_store(store: str | Store, beta: float | None) -> tuple[Store, float]:
    """The store opened and checked to serve distillation, and the beta its records train at."""
    store = store if isinstance(store, Store) else open_store(store)
    url = store.location.url
    if store.kind.name != "completion":
        raise LogitstoreError(f"{url} is a {store.kind.name} store; {TRAINER} trains on a completion store's teacher "
                              "records (logitstore build --data prompt-completion.jsonl --top-k K or --sample-k K)")
    require_teacher(store)
    if store.teacher["kind"] == "sampled":
        if beta not in (None, 0.0):
            raise LogitstoreError(f"{url} holds sampled teacher records, which estimate only the forward KL; pass "
                                  f"{CONFIG}(beta=0.0) (got {beta})")
        return store, 0.0
    return store, DEFAULT_BETA if beta is None else float(beta)


def check_args(store: Store, args: Any) -> None:
    """The SFT options under which TRL's rows are the store's rows, one example each."""
    if args.packing or args.padding_free:
        raise LogitstoreError(f"{TRAINER} scores each example against its own records; pass packing=False and "
                              "padding_free=False")
    if args.completion_only_loss is False:
        raise LogitstoreError(f"{TRAINER} trains on the completion tokens the store holds records for; leave "
                              "completion_only_loss unset (or True)")
    if args.loss_type != "nll":
        raise LogitstoreError(f"{TRAINER} adds the plain negative log-likelihood (nll_weight); pass loss_type='nll' "
                              f"(got {args.loss_type!r})")
    built_for = store.fingerprint.get("tokenization", {}).get("max_length")
    if built_for is not None and args.max_length != built_for:
        raise LogitstoreError(f"{store.location.url} holds teacher records for sequences cut at {built_for} tokens; "
                              f"pass {CONFIG}(max_length={built_for})")


def rows_of(store: Store, ids: list[str]) -> np.ndarray:
    try:
        return store.rows(ids)
    except UnknownIdError as error:
        raise LogitstoreError(f"{store.location.url}: {error}; the dataset's 'id' column (without one, the hash of "
                              "each prompt and completion) must name the store's examples") from None


def _message_text(value: Any) -> Any:
    """A prompt or completion as the data reader keeps it: a string, or messages reduced to role and content."""
    if isinstance(value, list):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return value


def with_ids(dataset: Any, name: str, store: Store) -> Any:
    """`dataset` with an ``id`` column of strings: its own IDs, and for a row without one the ID ``logitstore
    build`` gives it (a hash of its prompt and completion); every one must be the store's."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise LogitstoreError(f"{TRAINER} needs a datasets.Dataset as {name} (every example is checked against the "
                              f"store before training); got {type(dataset).__name__}")
    columns = dataset.column_names
    given = dataset["id"] if "id" in columns else [None] * len(dataset)
    if any(i is None for i in given) and not {"prompt", "completion"} <= set(columns):
        raise LogitstoreError(f"the {name} needs an 'id' column holding the store's example IDs, or 'prompt' and "
                              "'completion' columns to derive them from")
    if all(i is not None for i in given):
        ids = [str(i) for i in given]
    else:
        ids = [str(i) if i is not None else content_id(_message_text(p), _message_text(c))
               for i, p, c in zip(given, dataset["prompt"], dataset["completion"])]
    rows_of(store, ids)  # before TRL tokenizes anything
    if "id" in columns:
        dataset = dataset.remove_columns("id")
    return dataset.add_column("id", ids)


def check_tokens(store: Store, dataset: Any, name: str) -> None:
    """Every example of TRL's prepared `dataset` is the store's: the same prompt + completion ids, and TRL's labels
    score exactly its completion tokens."""
    for batch in dataset.select_columns(["id", "input_ids", "labels"]).iter(batch_size=1024):
        rows = rows_of(store, batch["id"])
        prompts, completions = store.ragged("prompt_ids", rows), store.ragged("completion_ids", rows)
        for key, ids, labels, prompt, completion in zip(batch["id"], batch["input_ids"], batch["labels"], prompts,
                                                        completions):
            if not np.array_equal(np.asarray(ids, dtype=np.int64), np.concatenate([prompt, completion])):
                raise LogitstoreError(f"{name} example {key!r}: TRL's tokens differ from the store's; the store was "
                                      "built with another tokenizer, chat template or data")
            scored = np.flatnonzero(np.asarray(labels) != -100)
            if not np.array_equal(scored, np.arange(len(prompt), len(prompt) + len(completion))):
                raise LogitstoreError(f"{name} example {key!r}: TRL scores other tokens than the store's completion "
                                      f"({len(scored)} instead of {len(completion)})")


@dataclasses.dataclass
class TeacherCollator:
    """TRL's collator, plus each row's teacher records read from the store by the example's ID
    (:func:`logitstore.loader.pad_teacher`'s keys and layout) and its store row (``rows``)."""

    collate: Any
    store: Store

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = rows_of(self.store, [str(e["id"]) for e in examples])
        batch = self.collate([{k: v for k, v in e.items() if k != "id"} for e in examples])
        prompts = self.store.ragged("prompt_ids", rows)
        completions = self.store.ragged("completion_ids", rows)
        batch.update(pad_teacher([self.store.top_k("completion", rows)], prompts, [completions]))
        batch["rows"] = torch.from_numpy(rows)
        return batch


def _score(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
           records: TeacherRecords) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs, scored positions and divergences [B, L-1(, 1)], as tensors (what a DDP forward may
    return)."""
    tokens = token_logps(model, input_ids, attention_mask, completion_mask, teacher=records)
    return tokens.per_token, tokens.scored, tokens.divergence  # type: ignore[return-value]


class StoreDistillationTrainer(SFTTrainer):
    """SFTTrainer whose loss is the divergence to a completion store's teacher records (module docstring)."""

    def __init__(self, *args: Any, store: str | Store, **kwargs: Any):
        bound = inspect.signature(SFTTrainer.__init__).bind(self, *args, **kwargs).arguments
        bound.pop("self")
        config = bound.get("args")
        if config is None:
            raise LogitstoreError(f"pass args={CONFIG}(...) with the store's max_length")
        self.logitstore, self.beta = completion_store(store, getattr(config, "beta", None))
        self.nll_weight = float(getattr(config, "nll_weight", 0.0))
        check_args(self.logitstore, config)
        if bound.get("train_dataset") is not None:
            bound["train_dataset"] = with_ids(bound["train_dataset"], "train_dataset", self.logitstore)
        evals = bound.get("eval_dataset")
        if isinstance(evals, dict):
            bound["eval_dataset"] = {k: with_ids(v, f"eval_dataset[{k!r}]", self.logitstore) for k, v in evals.items()}
        elif evals is not None:
            bound["eval_dataset"] = with_ids(evals, "eval_dataset", self.logitstore)
        super().__init__(**bound)
        self._check_student()
        check_tokens(self.logitstore, self.train_dataset, "train_dataset")
        prepared = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval_dataset": self.eval_dataset}
        for name, dataset in prepared.items():
            if dataset is not None:
                check_tokens(self.logitstore, dataset, name)
        self.data_collator = TeacherCollator(self.data_collator, self.logitstore)
        self._forward_redirection = _ForwardRedirection()

    def _check_student(self) -> None:
        vocab = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
        teacher = int(self.logitstore.teacher["vocab"])
        if teacher > vocab:
            raise LogitstoreError(f"{self.logitstore.location.url} holds a teacher of {teacher} tokens, more than the "
                                  f"student's vocabulary of {vocab}; the store was built for another tokenizer")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "id" not in self._signature_columns:  # the collator reads each example's records by its ID
            self._signature_columns = [*self._signature_columns, "id"]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        mode = "train" if self.model.training else "eval"
        records = TeacherRecords(inputs["teacher_ids"], (self.beta,), logps=inputs.get("teacher_logps"),
                                 tail_logp=inputs.get("teacher_tail_logp"), counts=inputs.get("teacher_counts"))
        completion_mask = (inputs["labels"] != -100).long()  # TRL's labels: position t scores token t + 1
        student = self.accelerator.unwrap_model(model)
        # through the DDP/FSDP wrapper's forward, so that its gradient hooks and parameter gathering take part
        per_token, scored, divergence = self._forward_redirection(
            model, student, _score, student, inputs["input_ids"], inputs["attention_mask"], completion_mask, records)
        sums = torch.stack([divergence[..., 0].sum(), -per_token.sum()])  # both zero off the scored positions
        local = scored.sum()
        world = self.accelerator.num_processes
        if num_items_in_batch is not None:  # every rank's scored tokens of the whole accumulated step
            scale = world if self.args.average_tokens_across_devices else 1
            terms = sums * scale / torch.as_tensor(num_items_in_batch).to(sums.device).clamp(min=1)
        elif mode == "train":  # DistillationTrainer's count: this micro-batch's scored tokens on every rank
            total = self.accelerator.gather(local.detach()[None]).sum()
            terms = sums * world / total.to(sums.device).clamp(min=1)
        else:
            terms = sums / local.clamp(min=1)
        loss = terms[0] + self.nll_weight * terms[1] if self.nll_weight else terms[0]
        self._log_terms(mode, sums.detach(), local.detach(), inputs)
        return (loss, None) if return_outputs else loss

    def _log_terms(self, mode: str, sums: torch.Tensor, local: torch.Tensor, inputs: dict[str, Any]) -> None:
        """``distill/loss`` and ``nll``, means over every rank's scored tokens, and SFT's ``num_tokens``."""
        totals = self.accelerator.gather(torch.cat([sums.float(), local.float()[None]])[None]).reshape(-1, 3).sum(0)
        count = max(float(totals[2]), 1.0)
        self._metrics[mode]["distill/loss"].append(float(totals[0]) / count)
        self._metrics[mode]["nll"].append(float(totals[1]) / count)
        if mode == "train":
            self._total_train_tokens += int(self.accelerator.gather(inputs["attention_mask"].sum()[None]).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


__all__ = ["StoreDistillationConfig", "StoreDistillationTrainer", "TeacherCollator", "check_tokens",
           "completion_store", "with_ids"]
