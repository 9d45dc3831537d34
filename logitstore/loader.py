"""Feeding training from a store: dataset, sampler, collate and background prefetch for torch.

The dataset, sampler and prefetcher are numpy and plain Python, usable without torch (the core install); the
padding, collation and DataLoader functions import torch when called. The dataset pickles as a path and opens its
own store in each worker process; the sampler shuffles deterministically from (seed, epoch), can group similar
lengths, gives each rank its own slice of every global batch, and saves its position so a run resumes mid-epoch.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

from .format import PER_TOKEN_FIELDS
from .ld_dpo import ld_reference, require_per_token
from .reader import Store
from .teacher_store import NoTeacherError, side_names
from .reader import open as open_store

if TYPE_CHECKING:
    import torch


class PairDataset:
    """Rows of a store as training examples (a map-style dataset for torch's DataLoader); batched reads through
    ``__getitems__``."""

    def __init__(self, path: str, *, storage_options: dict[str, Any] | None = None, fields: Sequence[str] = (),
                 digest: str | None = None, teacher: bool = False):
        self.path = str(path)
        self.storage_options = storage_options
        self.digest = digest  # every process (workers too) opens exactly the pinned contents
        self.extra_fields = tuple(fields)
        self.teacher = teacher  # batches carry each side's teacher records (Store.top_k)
        self._store: Store | None = None
        store = self.store
        if teacher:
            require_teacher(store)
        self.pad_token_id = int(store.tokenizer.get("pad_token_id") or 0)
        self._length = len(store)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.path, storage_options=self.storage_options, digest=self.digest)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # each process opens its own maps
        return state

    def __len__(self) -> int:
        return self._length

    def lengths(self) -> np.ndarray:
        """Prompt + longer completion, per row: what padding depends on."""
        spans = [self.store.offsets(f) for f in self.store.kind.token_fields]
        lens = [o[:, 1] - o[:, 0] for o in spans]
        return lens[0] + np.max(lens[1:], axis=0)  # one completion in a completion store

    def __getitems__(self, rows: Sequence[int]) -> dict[str, Any]:
        s = self.store
        rows = np.asarray(rows, dtype=np.int64)
        out: dict[str, Any] = {"rows": rows, **s.row_values(rows)}
        for field in (*s.kind.token_fields, *self.extra_fields):
            out[field] = s.ragged(field, rows)
        if self.teacher:
            out["teacher"] = {side: s.top_k(side, rows) for side in side_names(s.kind)}
        return out

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.__getitems__([row])


def pad_pairs(prompts: Sequence[Any], chosen: Sequence[Any], rejected: Sequence[Any],
              pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `completion_mask` in TRL's layout: prompt+chosen rows first, then
    prompt+rejected, right-padded. The reference pass and training both score exactly this layout."""
    import torch

    n = len(prompts)
    lengths = [len(p) + len(c) for p, c in zip(prompts, chosen)] + [len(p) + len(r) for p, r in zip(prompts, rejected)]
    width = max(lengths)
    input_ids = np.full((2 * n, width), pad_token_id, dtype=np.int64)
    attention = np.zeros((2 * n, width), dtype=np.int64)
    completion = np.zeros((2 * n, width), dtype=np.int64)
    for i, (p, comp) in enumerate(zip(list(prompts) * 2, list(chosen) + list(rejected))):
        lp, end = len(p), len(p) + len(comp)
        input_ids[i, :lp] = p
        input_ids[i, lp:end] = comp
        attention[i, :end] = 1
        completion[i, lp:end] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "completion_mask": torch.from_numpy(completion)}


def require_teacher(store: Store) -> None:
    """Teacher batches need a store built with --top-k or --sample-k: one line otherwise."""
    if store.teacher is None:
        raise NoTeacherError(f"{store.location.url} holds no top-k teacher records; rebuild with --top-k K "
                             "(or --sample-k K)")


def pad_teacher(records: Sequence[dict[str, list[np.ndarray]]], prompts: Sequence[Any],
                completions: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
    """Teacher records of rows in :func:`pad_pairs`' layout (each side's rows, sides in order) as [R, T, K] tensors,
    T the longest completion. Entry [i, t] is the teacher's distribution over the t-th completion token of row i
    (input position prompt_len + t, predicted from the position before it); a row with an empty prompt has no
    record at t = 0 (that token is not scored). Top-k: ``teacher_ids`` (0 as padding), ``teacher_logps`` and
    ``teacher_tail_logp`` [R, T] (-inf as padding); sampled: ``teacher_ids`` and ``teacher_counts`` (0 as padding).

    The entries that are not padding, in row-major order, are the batch's scored positions in the order
    ``hidden[:, :-1][completion_mask[:, 1:].bool()]`` takes them (tests/test_teacher_build.py)."""
    import torch

    rows = [(rec, i) for rec in records for i in range(len(rec["ids"]))]
    comp = [c for side in completions for c in side]
    lengths = [len(c) for c in comp]
    width = max(lengths, default=0)
    k = rows[0][0]["ids"][rows[0][1]].shape[1] if rows else 0  # every record has K columns, even with no rows
    n = len(rows)
    top = "logps" in records[0]
    ids = np.zeros((n, width, k), np.int64)
    if top:
        logps = np.full((n, width, k), -np.inf, np.float32)
        tail = np.full((n, width), -np.inf, np.float32)
    else:
        counts = np.zeros((n, width, k), np.int64)
    for j, ((rec, i), length) in enumerate(zip(rows, lengths)):
        t = rec["ids"][i].shape[0]
        start = length - t  # 1 when the prompt is empty (the first completion token is not scored), else 0
        if not 0 <= start <= 1 or (start == 1 and len(prompts[j % len(prompts)])):
            raise ValueError(f"teacher records of batch row {j} do not match its completion ({t} records for "
                             f"{length} tokens)")
        ids[j, start:length] = rec["ids"][i]
        if top:
            logps[j, start:length] = rec["logps"][i]
            tail[j, start:length] = rec["tail_logp"][i]
        else:
            counts[j, start:length] = rec["counts"][i]
    out = {"teacher_ids": torch.from_numpy(ids)}
    if top:
        out.update(teacher_logps=torch.from_numpy(logps), teacher_tail_logp=torch.from_numpy(tail))
    else:
        out["teacher_counts"] = torch.from_numpy(counts)
    return out


def collate(batch: dict[str, Any], pad_token_id: int, ld_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A batch of store rows as tensors: :func:`pad_pairs` plus the reference values and token counts. With
    `ld_alpha`, the reference values are LD-DPO's for that α, from the per-token values (:mod:`.ld_dpo`). A batch
    read with teacher records adds them (:func:`pad_teacher`), chosen rows then rejected rows."""
    import torch
    out = pad_pairs(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], pad_token_id)
    ref_chosen, ref_rejected = batch["chosen_logps"], batch["rejected_logps"]
    if ld_alpha is not None:
        ref_chosen, ref_rejected = ld_reference(*(batch[f] for f in PER_TOKEN_FIELDS), ref_chosen, ref_rejected,
                                                ld_alpha)
    out.update({
        "ref_chosen_logps": torch.from_numpy(np.asarray(ref_chosen, dtype=np.float32)),
        "ref_rejected_logps": torch.from_numpy(np.asarray(ref_rejected, dtype=np.float32)),
        "chosen_tokens": torch.from_numpy(np.asarray(batch["chosen_tokens"], dtype=np.int64)),
        "rejected_tokens": torch.from_numpy(np.asarray(batch["rejected_tokens"], dtype=np.int64)),
        "rows": torch.from_numpy(np.asarray(batch["rows"], dtype=np.int64)),
    })
    if "teacher" in batch:
        out.update(pad_teacher([batch["teacher"]["chosen"], batch["teacher"]["rejected"]], batch["prompt_ids"],
                               [batch["chosen_ids"], batch["rejected_ids"]]))
    return out


class PairBatchSampler:
    """Batches of rows for torch's DataLoader: global batches of `batch_size`, of which this rank takes every
    `world_size`-th row.

    The order is a pure function of (seed, epoch), so every rank agrees on it without communication, and a saved
    (epoch, batches done) position restores it exactly.
    """

    def __init__(self, num_rows: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, lengths: np.ndarray | None = None, group_size: int = 0,
                 rank: int = 0, world_size: int = 1, rows: np.ndarray | None = None):
        if batch_size < world_size or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be a multiple of the world size {world_size}")
        self.rows = np.arange(num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.lengths, self.group_size = lengths, group_size
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.rows) if self.shuffle else self.rows.copy()
        if self.lengths is not None and self.group_size > 1:
            # Sort inside windows of group_size batches, then shuffle the batches: little padding, random order.
            window = self.group_size * self.batch_size
            order = np.concatenate([w[np.argsort(-self.lengths[w], kind="stable")]
                                    for w in np.array_split(order, max(1, -(-order.size // window)))])
        cut = order.size - order.size % self.batch_size if self.drop_last else order.size
        batches = [order[i:i + self.batch_size] for i in range(0, cut, self.batch_size)]
        if self.lengths is not None and self.group_size > 1 and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        n = self.rows.size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch[self.rank::self.world_size].tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, int]:
        """Where the order stands: epoch, batches of the epoch done, seed.

        The sampler counts batches handed out; a loader that fetches ahead (worker processes, a prefetch thread)
        takes more than the consumer has used, so a consumer saving a checkpoint passes the batches it consumed.
        """
        position = self.position if batches_consumed is None else batches_consumed
        return {"epoch": self.epoch, "position": position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead (store reads release the GIL in numpy and
    the OS page cache, so this overlaps I/O and collation with the training step)."""

    _END = object()

    def __init__(self, iterable: Any, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), daemon=True)
        self._thread.start()

    def _run(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                self._queue.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._queue.put(exc)
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def make_loader(path: str, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                group_by_length: bool = False, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                prefetch: int = 2, storage_options: dict[str, Any] | None = None, ld_alpha: float | None = None,
                digest: str | None = None, pin_memory: bool | None = None,
                teacher: bool = False) -> tuple[Any, PairBatchSampler]:
    """A DataLoader over the store at `path` and its sampler (for `set_epoch` and saving the position). With
    `ld_alpha`, batches carry LD-DPO reference values for that α (the store needs per-token values); with
    `digest`, every process reads only the contents that digest names.

    `pin_memory` (default: whether CUDA is available) puts batches in page-locked memory, from which copies to the
    GPU run asynchronously (`tensor.to("cuda", non_blocking=True)`); pass False when training on the CPU.

    `teacher` adds the store's teacher records to every batch (:func:`pad_teacher`: ``teacher_ids``,
    ``teacher_logps``, ``teacher_tail_logp`` of a top-k store, ``teacher_ids``, ``teacher_counts`` of a sampled one);
    a store without them is refused in one line.
    """
    fields = PER_TOKEN_FIELDS if ld_alpha is not None else ()
    dataset = PairDataset(path, storage_options=storage_options, fields=fields, digest=digest, teacher=teacher)
    if ld_alpha is not None:
        require_per_token(dataset.store)
    lengths = dataset.lengths() if group_by_length else None
    sampler = PairBatchSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                               lengths=lengths, group_size=50 if group_by_length else 0, rank=rank,
                               world_size=world_size)
    pad = dataset.pad_token_id
    loader = torch_loader(dataset, sampler, functools.partial(collate, pad_token_id=pad, ld_alpha=ld_alpha),
                          seed=seed, num_workers=num_workers, prefetch=prefetch, pin_memory=pin_memory)
    return loader, sampler


def torch_loader(dataset: PairDataset, sampler: Any, collate_fn: Any, *, seed: int, num_workers: int, prefetch: int,
                 pin_memory: bool | None) -> Any:
    """torch's DataLoader over `dataset` in the batches of `sampler`, as every loader of this package sets it up:
    `num_workers` spawned worker processes `prefetch` batches ahead (none: batches made in this process), page-locked
    batches when CUDA is there unless `pin_memory` says otherwise."""
    import torch

    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
        prefetch_factor=prefetch if num_workers else None,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, persistent_workers=False,
        multiprocessing_context="spawn" if num_workers else None,
        # Its own generator: creating an iterator must not draw from the global RNG (dropout), or a resumed run
        # would see other dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed))
