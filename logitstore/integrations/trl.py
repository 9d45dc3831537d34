"""Use a logitstore store as TRL's reference: TRL 1.16's DPOTrainer without a reference forward pass.

TRL reads precomputed `ref_chosen_logps`/`ref_rejected_logps` only from its own `_precompute_ref_logps`, which
recomputes them unless its Arrow cache of an identical earlier run exists, and it hashes the whole model on every
start to key that cache. :class:`StoreDPOTrainer` overrides that one method to join the values from a store by
example ID, and keys TRL's cache on the store's fingerprint instead of hashing the model.

    from logitstore.integrations.trl import StoreDPOTrainer
    trainer = StoreDPOTrainer(store="pairs.lstore", model=model, args=DPOConfig(...), train_dataset=ds, ...)

The datasets need an ``id`` column with the store's example IDs (``logitstore export --to trl`` writes one).

With ``DPOConfig(ld_alpha=...)`` (LD-DPO), TRL's reference values depend on α, and TRL's own precompute bakes one α
into its cache (whose key does not include α). Here they are computed from the store's per-token values for the
configured α when the trainer starts, so changing α needs no new reference pass (the store needs ``--per-token``).

:class:`StoreKTOTrainer` does the same for TRL 1.16's KTOTrainer from an unpaired store: ``ref_logps`` and
``ref_KL_logps`` by example ID. TRL pairs each example with a KL completion within chunks of
``per_device_train_batch_size`` rows in data order; the store was paired in chunks of its KL batch size, so the
trainer refuses another batch size and checks that TRL's KL completions are the store's, example by example.

:class:`StoreDistillationTrainer` (with :class:`StoreDistillationConfig`; :mod:`.trl_distill`) is TRL 1.16's
SFTTrainer distilling from a completion store's teacher records, with no teacher model and no server.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import LogitstoreError
from ..ld_dpo import require_per_token, store_ld_reference
from ..reader import Store
from ..reader import open as open_store


def reference_columns(store: Store, ids: list[str], ld_alpha: float | None = None) -> dict[str, np.ndarray]:
    """TRL's ``ref_chosen_logps``/``ref_rejected_logps`` for `ids`: the stored sums, or LD-DPO's values for
    `ld_alpha` from the per-token values."""
    if ld_alpha is None:
        values = store.get(ids)
        return {"ref_chosen_logps": values["chosen_logps"], "ref_rejected_logps": values["rejected_logps"]}
    chosen, rejected = store_ld_reference(store, store.rows(ids), ld_alpha)
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def with_reference(dataset: Any, store: Store, ld_alpha: float | None = None) -> Any:
    """`dataset` (a datasets.Dataset with an ``id`` column) plus the store's reference columns."""
    if "id" not in dataset.column_names:
        raise LogitstoreError("the dataset needs an 'id' column holding the store's example IDs")
    columns = reference_columns(store, [str(i) for i in dataset["id"]], ld_alpha)
    for name in columns:
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
    for name, values in columns.items():
        dataset = dataset.add_column(name, values.astype(np.float32).tolist())
    return dataset


def unpaired_reference_columns(store: Store, ids: list[str]) -> dict[str, np.ndarray]:
    """TRL KTOTrainer's ``ref_logps``/``ref_KL_logps`` for `ids` from an unpaired store."""
    if store.kind.name != "unpaired":
        raise LogitstoreError(f"{store.location.url} holds preference pairs; KTO needs an unpaired store")
    values = store.get(ids)
    return {"ref_logps": values["completion_logps"], "ref_KL_logps": values["kl_logps"]}


def with_unpaired_reference(dataset: Any, store: Store) -> Any:
    """A dataset prepared by TRL's KTOTrainer (an ``id`` column, ``prompt_ids``, ``completion_ids`` and, for KTO,
    ``KL_completion_ids``) plus the store's reference columns; every example's ids must be the store's."""
    if "id" not in dataset.column_names:
        raise LogitstoreError("the dataset needs an 'id' column holding the store's example IDs")
    ids = [str(i) for i in dataset["id"]]
    rows = store.rows(ids)
    fields = [("prompt_ids", "prompt_ids"), ("completion_ids", "completion_ids")]
    if "KL_completion_ids" in dataset.column_names:
        fields.append(("KL_completion_ids", "kl_completion_ids"))
    for theirs, ours in fields:
        for key, row, trl_ids in zip(ids, rows.tolist(), dataset[theirs]):
            stored = store.ragged(ours, [row])[0].tolist()
            if trl_ids[:len(stored)] != stored or (theirs == "prompt_ids" and trl_ids != stored):
                hint = (" (the data's order or per_device_train_batch_size differ from the store's build: KL "
                        "completions are paired by position)" if ours == "kl_completion_ids" else "")
                raise LogitstoreError(f"example {key!r}: TRL's {theirs} differ from the store's{hint}")
    columns = unpaired_reference_columns(store, ids)
    for name in columns:
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
    for name, values in columns.items():
        dataset = dataset.add_column(name, values.astype(np.float32).tolist())
    return dataset


def _check_trl_args(store: Store, args_obj: Any, config: str) -> None:
    if args_obj is None or not getattr(args_obj, "precompute_ref_log_probs", False):
        raise LogitstoreError(f"pass a {config} with precompute_ref_log_probs=True")
    built_for = store.fingerprint.get("tokenization", {}).get("max_length")
    if built_for is not None and args_obj.max_length != built_for:
        raise LogitstoreError(f"{store.location.url} holds reference values for sequences cut at {built_for} "
                              f"tokens; pass {config}(max_length={built_for})")


@contextlib.contextmanager
def _store_identifies_reference(trainer_module: Any, store: Store) -> Iterator[None]:
    """While a TRL trainer is built, its cache key for the reference model is the store's fingerprint digest
    instead of a hash of the whole model."""
    original = trainer_module.hash_module
    trainer_module.hash_module = lambda module: store.header["fingerprint_digest"]
    try:
        yield
    finally:
        trainer_module.hash_module = original


@functools.lru_cache(maxsize=1)
def _kto_trainer_class() -> Any:
    from trl import KTOTrainer

    class StoreKTOTrainer(KTOTrainer):
        """KTOTrainer whose reference log-probs (completions and KL completions) come from an unpaired store."""

        def __init__(self, *args: Any, store: str | Store, **kwargs: Any):
            import trl.trainer.kto_trainer as kto_module

            self.logitstore = store if isinstance(store, Store) else open_store(store)
            if self.logitstore.kind.name != "unpaired":
                raise LogitstoreError(f"{self.logitstore.location.url} holds preference pairs; StoreKTOTrainer needs "
                                      "an unpaired store (build one from prompt/completion/label data)")
            args_obj = kwargs.get("args", args[1] if len(args) > 1 else None)
            _check_trl_args(self.logitstore, args_obj, "KTOConfig")
            chunk = self.logitstore.kl_batch_size
            if args_obj.loss_type != "apo_zero_unpaired" and args_obj.per_device_train_batch_size != chunk:
                raise LogitstoreError(f"{self.logitstore.location.url} pairs KL completions within batches of "
                                      f"{chunk}; pass KTOConfig(per_device_train_batch_size={chunk}), or rebuild "
                                      f"the store with --kl-batch-size {args_obj.per_device_train_batch_size}")
            with _store_identifies_reference(kto_module, self.logitstore):
                super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            return with_unpaired_reference(dataset, self.logitstore)

    return StoreKTOTrainer


@functools.lru_cache(maxsize=1)
def _trainer_class() -> Any:
    from trl import DPOTrainer

    class StoreDPOTrainer(DPOTrainer):
        """DPOTrainer whose reference log-probs come from a logitstore store."""

        def __init__(self, *args: Any, store: str | Store, **kwargs: Any):
            import trl.trainer.dpo_trainer as dpo_module

            self.logitstore = store if isinstance(store, Store) else open_store(store)
            args_obj = kwargs.get("args", args[1] if len(args) > 1 else None)
            if args_obj is None or not getattr(args_obj, "precompute_ref_log_probs", False):
                raise LogitstoreError("pass a DPOConfig with precompute_ref_log_probs=True")
            if args_obj.ld_alpha is not None:
                require_per_token(self.logitstore)
            built_for = self.logitstore.fingerprint.get("tokenization", {}).get("max_length")
            if built_for is not None and args_obj.max_length != built_for:
                raise LogitstoreError(f"{self.logitstore.location.url} holds reference values for sequences cut at "
                                      f"{built_for} tokens; pass DPOConfig(max_length={built_for})")
            with _store_identifies_reference(dpo_module, self.logitstore):
                super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            return with_reference(dataset, self.logitstore, self.ld_alpha)

    return StoreDPOTrainer


def __getattr__(name: str) -> Any:  # the trainers are built on first use, so importing needs no trl
    if name == "StoreDPOTrainer":
        return _trainer_class()
    if name == "StoreKTOTrainer":
        return _kto_trainer_class()
    if name in ("StoreDistillationTrainer", "StoreDistillationConfig"):
        from . import trl_distill

        return getattr(trl_distill, name)
    raise AttributeError(name)


__all__ = ["StoreDPOTrainer", "StoreDistillationConfig", "StoreDistillationTrainer", "StoreKTOTrainer",
           "reference_columns", "unpaired_reference_columns", "with_reference", "with_unpaired_reference"]
