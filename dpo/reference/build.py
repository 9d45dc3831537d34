"""The reference pass: fill a logitstore store from a Hugging Face causal LM and data of any store kind.

Plan first (read and validate every record, tokenize everything, write the plan) so that bad input stops the
build before anything is written; then fill shards. Each shard is tokenized again, batched by length under a
token budget, scored side by side (the sides the kind scores), and written whole. Under torchrun, ranks share the
shards; rank 0 plans and finalises.

With `reuse`, rows whose content key (token ids after truncation plus the scoring settings) matches a row in
another store built with the same model fingerprint take that row's values bit for bit, and only the others run
through the model. Shards go to ranks by what is left to compute in them, so ranks share the model's work.

What differs by kind (which data, how it is planned, which sides are scored, what else a row holds) is the kind's
(:mod:`dpo.kinds`); nothing here asks which kind it builds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import logitstore
from logitstore import derive
from logitstore import format as fmt
from logitstore.describe import human_bytes

from .. import kinds
from ..config import BuildConfig
from ..distributed import group as distributed
from ..inputs.plan import Plan
from ..model.loading import (check_attention, check_model_extras, input_device, load_model, load_tokenizer,
                             model_fingerprint, parse_max_memory, precision, resolve_device)
from .checks import check_device_map, check_teacher, placement
from .scoring import score_rows, shard_data
from .teacher import mass_of, new_mass

TOKENIZATION = "trl-1.16"


@dataclasses.dataclass
class BuildResult:
    path: str
    examples: int
    skipped: int
    shards_written: int
    already_complete: bool
    tokens: int
    seconds: float
    store_bytes: int
    computed: int = 0  # rows of the store whose values the model computes (in this run or an earlier one)
    reused: int = 0  # rows of the store whose values are copied from other stores
    pairs_scored: int = 0  # rows this process ran through the model in this run
    unit: str = "pair"  # what a row is in messages: "example" but for pairs
    digest: str | None = None  # the store digest from the writer that finalised it (rank 0); None on other ranks

    def summary(self) -> str:
        counts = f"{self.computed} computed, {self.reused} reused"
        units = f"{self.unit}s"
        if self.already_complete:
            return f"{self.path} is already complete ({self.examples} {units}: {counts}); nothing to do."
        per_pair = self.store_bytes / max(self.examples, 1)
        rate = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        return (f"Built {self.path}: {self.examples} {units} ({counts}){skipped}, {self.shards_written} "
                f"shard{'' if self.shards_written == 1 else 's'} written, {self.pairs_scored} "
                f"{self.unit}{'' if self.pairs_scored == 1 else 's'} ({self.tokens:,} tokens) scored in "
                f"{self.seconds:.1f} s ({rate:,.0f} tokens/s); store size "
                f"{human_bytes(self.store_bytes)} ({human_bytes(per_pair)} per {self.unit}).")


def build_fingerprint(cfg: BuildConfig, kind: kinds.StoreKind, examples: list[Any],
                      teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a resumed build must share with the one that started the store: model, tokenization, data, the kind's
    own settings, layout and teacher records."""
    fp = model_fingerprint(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, quantize=cfg.quantize,
                           revision=cfg.revision, adapter_revision=cfg.adapter_revision, device=cfg.device)
    fp["tokenization"] = {"scheme": TOKENIZATION, "max_length": cfg.max_length,
                          "max_prompt_length": cfg.max_prompt_length, "truncation": "keep_start"}
    fp["data"] = {"examples": len(examples), "sha256": kind.data_digest(examples)}
    entry = kind.fingerprint(cfg)
    if entry is not None:
        fp["kind"] = entry
    fp["layout"] = {"rows_per_shard": cfg.rows_per_shard, "per_token": cfg.per_token,
                    "codec": cfg.codec if cfg.per_token else None, "token_codec": cfg.token_codec}
    if teacher is not None:  # a resumed build must take the same records
        fp["teacher"] = dict(teacher)
    return fp


def assign_shards(shards: list[int], cost: list[int], world: int) -> list[list[int]]:
    """Shards per rank, balancing the model work left in them: the costliest shard goes to the least loaded rank
    (ties: lower shard, lower rank). Every rank computes the same assignment."""
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for c, shard in sorted(zip(cost, shards), key=lambda t: (-t[0], t[1])):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += c + 1  # +1: a shard with nothing to compute still costs its reads and writes
        out[r].append(shard)
    return [sorted(s) for s in out]


@dataclasses.dataclass
class _Planned:
    """A build once planned: what its later steps share."""

    cfg: BuildConfig
    kind: kinds.StoreKind
    plan: Plan
    tokenizer: Any
    teacher: dict[str, Any] | None
    fingerprint: dict[str, Any]
    reuse: derive.ReusePlan


def plan_build(cfg: BuildConfig, teacher: dict[str, Any] | None, *, log: Callable[[str], None]) -> _Planned:
    """Everything a build knows before it writes: the kind of the data, its plan, the fingerprint, the rows that
    other stores' values can fill. Bad input stops here, before anything is written."""
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    kind = kinds.of_data(cfg.data, cfg.split)
    plan = kind.plan(cfg, tokenizer)
    if teacher is not None:
        kind.check_records(cfg)
    if cfg.rows_per_shard is None:  # sized by the model work in a shard; the same data always gives the same size
        cfg = dataclasses.replace(cfg, rows_per_shard=fmt.build_rows_per_shard(plan.positions))
    check_model_extras(quantize=cfg.quantize, adapter=cfg.adapter)  # before anything is written
    fingerprint = build_fingerprint(cfg, kind, plan.examples, teacher)
    check_attention(cfg.attn_implementation, device=resolve_device(cfg.device), dtype=fingerprint["precision"]["dtype"])
    per_token_specs = {s.name: s for s in fmt.ragged_specs(len(tokenizer), cfg.token_codec, cfg.per_token, cfg.codec,
                                                           kind=kind.fields)
                       if s.name in kind.fields.per_token_fields}
    reuse = derive.plan_reuse(plan.keys, cfg.reuse, fingerprint=fingerprint, scoring=kind.scoring,
                              per_token=per_token_specs, out=cfg.out, storage_options=cfg.storage_options, log=log)
    return _Planned(cfg, kind, plan, tokenizer, teacher, fingerprint, reuse)


def open_writer(p: _Planned, rank: int) -> logitstore.StoreWriter:
    """Rank 0 creates the store (or reopens one with the same fingerprint to resume); the other ranks attach."""
    cfg, tokenizer = p.cfg, p.tokenizer
    if rank == 0:
        settings = {"batch_size": cfg.batch_size, "batch_tokens": cfg.batch_tokens, "share_prompt": cfg.share_prompt,
                    "length_bucketing": cfg.length_bucketing, "attn_implementation": cfg.attn_implementation,
                    "codec": cfg.codec, "token_codec": cfg.token_codec}
        tok_header = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                      "bos_token_id": tokenizer.bos_token_id, "vocab_size": len(tokenizer)}
        writer = logitstore.create(
            cfg.out, [ex.id for ex in p.plan.examples], fingerprint=p.fingerprint, vocab_size=len(tokenizer),
            max_length=cfg.max_length, per_token=cfg.per_token, token_codec=cfg.token_codec, logp_codec=cfg.codec,
            rows_per_shard=cfg.rows_per_shard, tokenizer=tok_header, settings=settings,
            skipped=[s.as_dict() for s in p.plan.skipped], storage_options=cfg.storage_options,
            scoring=p.kind.scoring, provenance=p.reuse.provenance(), kind=p.kind.name,
            teacher=p.teacher, **p.kind.writer_options(cfg))
    distributed.barrier()
    if rank != 0:
        writer = logitstore.StoreWriter.attach(cfg.out, p.fingerprint, storage_options=cfg.storage_options)
    return writer


def load_reference(cfg: BuildConfig, dtype: str, offload: contextlib.ExitStack, log: Callable[[str], None]) -> Any:
    """The reference model in eval mode (spread over devices with --device-map, its disk-offload folder living as
    long as `offload`)."""
    model = load_model(cfg.model, dtype=dtype, quantize=cfg.quantize, device=cfg.device, adapter=cfg.adapter,
                       revision=cfg.revision, adapter_revision=cfg.adapter_revision,
                       attn_implementation=cfg.attn_implementation, device_map=cfg.device_map,
                       max_memory=parse_max_memory(cfg.max_memory) or None,
                       offload_folder=offload.enter_context(tempfile.TemporaryDirectory(prefix="logitstore-"))
                       if cfg.device_map else None)
    model.eval()
    if cfg.device_map:
        log(f"--device-map {cfg.device_map}: {placement(model)}")
    return model


def fill_shard(p: _Planned, writer: logitstore.StoreWriter, shard: int, model: Any,
               on_batch: Callable[[int, int], None]) -> None:
    """Score one shard's rows that no other store provides, take the rest from the reuse plan, write it whole."""
    cfg, kind, compute = p.cfg, p.kind, p.reuse.to_compute
    rows = writer.shard_rows(shard)
    tokenized = [p.plan.tokenize(i) for i in rows]
    fresh = [i for i, row in enumerate(rows) if compute[row]]
    sides = kind.teacher_sides
    mass = new_mass(p.teacher, sides) if p.teacher is not None else None  # the shard's prior, its rows alone
    values, records = score_rows(model, [tokenized[i] for i in fresh], sides=len(kind.sides),
                                 pad_id=p.tokenizer.pad_token_id, batch_size=cfg.batch_size,
                                 batch_tokens=cfg.batch_tokens, share_prompt=cfg.share_prompt,
                                 bucketing=cfg.length_bucketing, on_batch=on_batch, teacher=p.teacher,
                                 store_rows=[rows[i] for i in fresh],
                                 mass=list(mass.values()) if mass is not None else None)
    part = shard_data(kind.fields, [tokenized[i] for i in fresh], values, cfg.per_token)
    if records is not None:  # every row is computed (check_teacher refuses --reuse)
        part.update({f"teacher/{side}": side_records for side, side_records in zip(sides, records)})
    tokens_by_field = {f: [getattr(t, attr) for t in tokenized]
                       for f, attr in zip(kind.fields.token_fields, fmt.TOKEN_FIELDS)}
    parts = [(fresh, part), *derive.reused_part(p.reuse, list(rows), tokens_by_field, per_token=cfg.per_token)]
    extra = kind.row_values(p.plan.examples, rows)
    if extra:
        parts.append((list(range(len(rows))), extra))
    writer.write_shard(shard, derive.combine(len(rows), parts, kind.fields), teacher_mass=mass_of(mass))


def fill(p: _Planned, writer: logitstore.StoreWriter, rank: int, world: int, *, progress: bool,
         log: Callable[[str], None]) -> tuple[int, dict[str, int]]:
    """This rank's share of the missing shards, each scored and written whole: (shards written, tokens and rows
    scored)."""
    import torch
    from tqdm import tqdm

    cfg, examples = p.cfg, p.plan.examples
    missing, compute = writer.missing_shards, p.reuse.to_compute
    # Every rank computes the assignment from the shards it sees missing: none may commit one before all have
    # looked, or a rank that attached late sees fewer, and a shard goes to no rank (or to two).
    distributed.barrier()
    work = np.where(compute, p.plan.cost, 0)  # model work left per row, in tokens
    spans = {k: writer.shard_rows(k) for k in missing}
    todo = assign_shards(missing, [int(work[spans[k].start:spans[k].stop].sum()) for k in missing], world)[rank]
    total_rows = sum(int(compute[spans[k].start:spans[k].stop].sum()) for k in todo)
    if rank == 0 and cfg.reuse:
        log(f"Reusing {p.reuse.reused} of {len(examples)} pairs from {len(cfg.reuse)} "
            f"store{'' if len(cfg.reuse) == 1 else 's'}; {len(examples) - p.reuse.reused} to compute.")
    if rank == 0 and len(missing) < writer.geometry.num_shards:
        log(f"Resuming {writer.loc.url}: {writer.geometry.num_shards - len(missing)} of "
            f"{writer.geometry.num_shards} shards already written.")
    dtype = p.fingerprint["precision"]["dtype"]
    done = {"tokens": 0, "rows": 0}
    bar = tqdm(total=total_rows, unit="pair", disable=not progress, desc=f"build[{rank}]" if world > 1 else "build")
    t0 = time.perf_counter()

    def on_batch(n_rows: int, n_tokens: int) -> None:
        done["tokens"] += n_tokens
        done["rows"] += n_rows
        bar.update(n_rows)
        bar.set_postfix_str(f"{done['tokens'] / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

    # The disk-offload folder of a --device-map build lives as long as the model.
    with contextlib.ExitStack() as offload:
        model = load_reference(cfg, dtype, offload, log) if total_rows else None  # copies alone need no model
        autocast = precision(input_device(model), dtype) if model is not None else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            for shard in todo:
                fill_shard(p, writer, shard, model, on_batch)
    bar.close()
    return len(todo), done


def build(cfg: BuildConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> BuildResult:
    """Run the reference pass described by `cfg`; resumes a partial store with the same fingerprint. Rank 0 holds
    the store's write lock from planning it to finalising it, and lets go of it however the build ends (what is
    committed is kept: the same command resumes)."""
    check_device_map(cfg)
    rank, world = distributed.rank_and_world()
    start = time.perf_counter()
    teacher = check_teacher(cfg)  # before the data is read: nothing is written when records cannot be stored
    p = plan_build(cfg, teacher, log=log if rank == 0 else (lambda _: None))
    examples, skipped = p.plan.examples, p.plan.skipped
    provenance = p.reuse.provenance()
    counts = {"computed": provenance["computed"], "reused": provenance["reused"], "unit": p.kind.fields.unit}
    with open_writer(p, rank) as writer:
        if writer.complete:
            return BuildResult(writer.loc.url, len(examples), len(skipped), 0, True, 0, 0.0,
                               writer.loc.total_bytes(), digest=writer.digest if rank == 0 else None, **counts)
        written, done = fill(p, writer, rank, world, progress=progress, log=log)
        distributed.barrier()
        if rank == 0:
            writer.finalize()
        distributed.barrier()
        return BuildResult(writer.loc.url, len(examples), len(skipped), written, False, done["tokens"],
                           time.perf_counter() - start, writer.loc.total_bytes(), pairs_scored=done["rows"],
                           digest=writer.digest if rank == 0 else None, **counts)
