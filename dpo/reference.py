"""The reference pass: fill a logitstore store from a Hugging Face causal LM and preference data.

Plan first (read and validate every record, tokenize everything, write the plan) so that bad input stops the
build before anything is written; then fill shards. Each shard is tokenized again, batched by length under a
token budget, scored, and written whole. Under torchrun, rank r fills shards r, r+W, r+2W, ...; rank 0 plans
and finalises.

With `reuse`, pairs whose content key (token ids after truncation plus the scoring settings) matches a pair in
another store built with the same model fingerprint take that pair's values bit for bit, and only the others run
through the model. Shards go to ranks by what is left to compute in them, so ranks share the model's work.
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
from logitstore import kinds
from logitstore.describe import human_bytes
from logitstore.content_key import content_keys
from logitstore.errors import InputDataError
from logitstore.teacher import TeacherError

from . import distributed
from .preference_data import PreferenceExample, Skipped, data_digest, load_examples
from .models import (check_attention, check_model_extras, input_device, load_model, load_tokenizer, model_fingerprint,
                     parse_max_memory, precision, resolve_device)
from .teacher_pass import mass_of, new_mass
from .tokenization import TokenizedPair, tokenize_pair
from .unpaired_data import UnpairedExample, data_kind, load_unpaired, pair_kl, tokenize_example
from .unpaired_data import data_digest as unpaired_digest
from .completion_data import CompletionExample, load_completions, tokenize_completion
from .completion_data import data_digest as completion_digest

TOKENIZATION = "trl-1.16"
# How a pair's values follow from its token ids, apart from the model: enters every content key. Change it when
# the scoring rule changes (which tokens are scored, how), so that old values are no longer reused.
SCORING = {"scorer": "logitstore completion log-probs", "version": 1}
# Unpaired stores score prompt + completion and prompt + KL completion by the same rule; their keys hash those three
# sequences, and the kind keeps them apart from pairs' keys.
SCORING_UNPAIRED = dict(SCORING, kind="unpaired")
# Completion stores score prompt + completion alone; their keys hash (prompt, completion, nothing).
SCORING_COMPLETION = dict(SCORING, kind="completion")
DEFAULT_KL_BATCH_SIZE = 8  # TRL's default per_device_train_batch_size, whose chunks KTOTrainer pairs within


@dataclasses.dataclass
class BuildConfig:
    model: str
    data: str
    out: str
    adapter: str | None = None
    dtype: str = "auto"  # resolved by dpo.models.resolve_dtype; the fingerprint records the result
    quantize: str | None = None
    device: str = "auto"
    revision: str | None = None  # of a Hub model name
    adapter_revision: str | None = None
    attn_implementation: str = "sdpa"
    device_map: str | None = None  # "auto": layers over the GPUs, then CPU, then disk (accelerate big-model inference)
    max_memory: tuple[str, ...] = ()  # per device with device_map: "0=20GiB", "cpu=60GiB"
    split: str | None = None
    max_length: int = 1024
    max_prompt_length: int | None = None
    batch_size: int = 16
    batch_tokens: int = 16384
    per_token: bool = False
    codec: str = "fixed"
    token_codec: str = "zstd"
    rows_per_shard: int | None = None  # None: about fmt.SHARD_POSITIONS positions a shard (fmt.build_rows_per_shard)
    share_prompt: bool = False  # one pass measured faster on GPU and CPU (docs/benchmarks.md)
    length_bucketing: bool = True
    skip_invalid: bool = False
    storage_options: dict[str, Any] | None = None
    reuse: tuple[str, ...] = ()  # stores whose matching pairs are copied instead of computed
    kl_batch_size: int = DEFAULT_KL_BATCH_SIZE  # unpaired data: the chunk KL completions are paired within
    top_k: int | None = None  # teacher records: the K most likely next tokens at every scored position
    sample_k: int | None = None  # or K draws from the distribution (Sparse Logit Sampling)
    topk_codec: str = "sqrt"  # value preset of top-k records (logitstore/topk_codec.py; docs/teacher.md: which)
    seed: int = 0  # of sampled records: draws depend on (seed, row, side) only


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
    computed: int = 0  # pairs of the store whose values the model computes (in this run or an earlier one)
    reused: int = 0  # pairs of the store whose values are copied from other stores
    pairs_scored: int = 0  # pairs this process ran through the model in this run
    unit: str = "pair"  # "example" for an unpaired store
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


def build_fingerprint(cfg: BuildConfig, examples: list[Any], teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    fp = model_fingerprint(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, quantize=cfg.quantize,
                           revision=cfg.revision, adapter_revision=cfg.adapter_revision, device=cfg.device)
    fp["tokenization"] = {"scheme": TOKENIZATION, "max_length": cfg.max_length,
                          "max_prompt_length": cfg.max_prompt_length, "truncation": "keep_start"}
    unpaired = isinstance(examples[0], UnpairedExample)
    digest = (unpaired_digest if unpaired else completion_digest if isinstance(examples[0], CompletionExample)
              else data_digest)
    fp["data"] = {"examples": len(examples), "sha256": digest(examples)}
    if isinstance(examples[0], CompletionExample):
        fp["kind"] = {"name": "completion"}
    if unpaired:  # KL values depend on which completions share a chunk
        fp["kind"] = {"name": "unpaired", "kl_batch_size": cfg.kl_batch_size}
    fp["layout"] = {"rows_per_shard": cfg.rows_per_shard, "per_token": cfg.per_token,
                    "codec": cfg.codec if cfg.per_token else None, "token_codec": cfg.token_codec}
    if teacher is not None:  # a resumed build must take the same records
        fp["teacher"] = dict(teacher)
    return fp


@dataclasses.dataclass
class Plan:
    """The pairs to build, known before the model loads: each pair's content key and scoring cost."""

    examples: list[Any]  # PreferenceExample, or UnpairedExample for unpaired data
    skipped: list[Skipped]
    keys: np.ndarray  # uint8 [n, 16]
    cost: np.ndarray  # int64 [n]: prompt + longer completion, in tokens
    # int64 [n]: positions through the model in one pass over prompt + chosen and prompt + rejected
    positions: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    kind: kinds.Kind = kinds.PAIRS
    tokenized: list[TokenizedPair] | None = None  # unpaired: (prompt, completion, KL completion) per example

    @property
    def scoring(self) -> dict[str, Any]:
        return {"unpaired": SCORING_UNPAIRED, "completion": SCORING_COMPLETION}.get(self.kind.name, SCORING)

    def tokenize(self, cfg: BuildConfig, tokenizer: Any, row: int) -> TokenizedPair:
        if self.tokenized is not None:
            return self.tokenized[row]
        return tokenize_pair(tokenizer, self.examples[row], cfg.max_length, cfg.max_prompt_length)


def tokenize_each(cfg: BuildConfig, examples: list[Any], tokenize: Callable[[Any], Any], noun: str,
                  ) -> tuple[list[Any], list[Skipped], list[Any]]:
    """`tokenize` applied to every example: the examples kept, the ones skipped (with `skip_invalid`) and what
    `tokenize` returned for each kept one. The first bad one stops the build unless `skip_invalid`; none left stops
    it too."""
    keep, skipped, tokenized = [], [], []
    for ex in examples:
        try:
            tokenized.append(tokenize(ex))
        except InputDataError as exc:
            if not cfg.skip_invalid:
                raise InputDataError(f"{cfg.data}: {exc} (use --skip-invalid to leave such {noun} out)") from None
            skipped.append(Skipped(ex.id, ex.line, str(exc)))
            continue
        keep.append(ex)
    if not keep:
        raise InputDataError(f"{cfg.data}: every {noun[:-1]} was invalid; nothing to build")
    return keep, skipped, tokenized


def plan_examples(cfg: BuildConfig, tokenizer: Any) -> Plan:
    """Load and tokenize every record once: the first bad one stops the build unless `skip_invalid`."""
    found = data_kind(cfg.data, cfg.split)
    if found == "unpaired":
        return plan_unpaired(cfg, tokenizer)
    if found == "completion":
        return plan_completion(cfg, tokenizer)

    def summary(ex: Any) -> tuple[np.ndarray, int, int]:  # not the token ids: a pair is tokenized again when scored
        pair = tokenize_pair(tokenizer, ex, cfg.max_length, cfg.max_prompt_length)
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        key = content_keys([pair.prompt_ids], [pair.chosen_ids], [pair.rejected_ids], SCORING)[0]
        return key, p + max(c, r), 2 * p + c + r

    keep, skipped, summaries = tokenize_each(cfg, load_examples(cfg.data, cfg.split), summary, "pairs")
    keys, cost, positions = zip(*summaries)
    return Plan(keep, skipped, np.array(keys, dtype=np.uint8), np.array(cost, dtype=np.int64),
                np.array(positions, dtype=np.int64))


def plan_unpaired(cfg: BuildConfig, tokenizer: Any) -> Plan:
    """Unpaired data: tokenize every example, drop or refuse the unusable ones, then pair each with its KL
    completion within chunks of `kl_batch_size` of the examples kept (TRL pairs after dropping, too)."""
    if cfg.kl_batch_size < 2:
        raise InputDataError(f"--kl-batch-size {cfg.kl_batch_size}: KTO's KL term needs batches of at least 2 "
                             "(TRL refuses a per-device batch size of 1)")
    if cfg.max_prompt_length is not None:
        raise InputDataError("--max-prompt-length does not apply to unpaired data (TRL's KTOTrainer has no such "
                             "option: prompt + completion is cut at the end)")
    keep, skipped, tokenized = tokenize_each(cfg, load_unpaired(cfg.data, cfg.split),
                                             lambda ex: tokenize_example(tokenizer, ex, cfg.max_length), "examples")
    if len(keep) < cfg.kl_batch_size:
        raise InputDataError(f"{cfg.data}: {len(keep)} examples are fewer than one KL batch of {cfg.kl_batch_size} "
                             "(--kl-batch-size); use a smaller --kl-batch-size, and train with that batch size")
    triples = pair_kl(tokenized, cfg.kl_batch_size, cfg.max_length)
    keys = content_keys([t.prompt_ids for t in triples], [t.chosen_ids for t in triples],
                        [t.rejected_ids for t in triples], SCORING_UNPAIRED)
    cost = np.array([len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) for t in triples],
                    dtype=np.int64)
    positions = np.array([2 * len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in triples],
                         dtype=np.int64)
    return Plan(keep, skipped, keys, cost, positions=positions, kind=kinds.UNPAIRED, tokenized=triples)


def plan_completion(cfg: BuildConfig, tokenizer: Any) -> Plan:
    """Prompt/completion data: tokenize every example as TRL's SFTTrainer does, dropping or refusing the unusable
    ones. The scorer takes (prompt, completion, completion): the second copy's values are not stored (the pair
    scorer runs both sides, so a completion store's build costs a pairs store's)."""
    if cfg.max_prompt_length is not None:
        raise InputDataError("--max-prompt-length does not apply to prompt/completion data (TRL's SFTTrainer has no "
                             "such option: prompt + completion is cut at the end)")
    keep, skipped, tokenized = tokenize_each(cfg, load_completions(cfg.data, cfg.split),
                                             lambda ex: tokenize_completion(tokenizer, ex, cfg.max_length),
                                             "examples")
    pairs = [TokenizedPair(prompt, completion, completion) for prompt, completion in tokenized]
    keys = content_keys(*kinds.key_parts(kinds.COMPLETION, [[p.prompt_ids for p in pairs],
                                                            [p.chosen_ids for p in pairs]]), SCORING_COMPLETION)
    cost = np.array([len(p.prompt_ids) + len(p.chosen_ids) for p in pairs], dtype=np.int64)
    return Plan(keep, skipped, keys, cost, positions=2 * cost, kind=kinds.COMPLETION, tokenized=pairs)


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


def length_batches(pairs: list[TokenizedPair], batch_size: int, batch_tokens: int,
                   bucketing: bool = True) -> list[list[int]]:
    """Group pairs of similar length so padding stays small: sorted by length, cut by count and token budget."""
    cost = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: (cost[i], i)) if bucketing else list(range(len(pairs)))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max([cost[j] for j in current] + [cost[i]])
        if current and (len(current) >= batch_size or 2 * width * (len(current) + 1) > batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def score_pairs(model: Any, pairs: list[TokenizedPair], *, pad_id: int, batch_size: int, batch_tokens: int,
                share_prompt: bool, bucketing: bool = True, on_batch: Callable[[int, int], None] | None = None,
                teacher: dict[str, Any] | None = None, rows: list[int] | None = None,
                records: dict[str, list[Any]] | None = None, mass: dict[str, np.ndarray] | None = None,
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-token log-probs of the scored chosen and rejected tokens of every pair, in input order. With `teacher`
    (the header's entry), also each side's teacher record per pair, into `records["chosen"]`, `["rejected"]`
    (`rows`: the pairs' store rows, which seed sampled records), and with `mass` each side's tail mass added up
    (``teacher_pass.new_mass``)."""
    import torch

    from .logps import pair_logps_full, pair_logps_shared
    from .teacher_pass import pair_logps_teacher

    scorer = pair_logps_shared if share_prompt else pair_logps_full
    chosen: list[np.ndarray] = [np.zeros(0, np.float32)] * len(pairs)
    rejected: list[np.ndarray] = [np.zeros(0, np.float32)] * len(pairs)
    if records is not None:
        records["chosen"], records["rejected"] = [None] * len(pairs), [None] * len(pairs)
    for batch in length_batches(pairs, batch_size, batch_tokens, bucketing):
        sel = [pairs[i] for i in batch]
        inputs = ([torch.from_numpy(p.prompt_ids) for p in sel], [torch.from_numpy(p.chosen_ids) for p in sel],
                  [torch.from_numpy(p.rejected_ids) for p in sel], pad_id)
        if teacher is not None and records is not None and rows is not None:
            c, r, rc, rr = pair_logps_teacher(model, *inputs, entry=teacher, rows=[rows[i] for i in batch],
                                              mass=mass)
            for i, a, b in zip(batch, rc, rr):
                records["chosen"][i], records["rejected"][i] = a, b
        else:
            c, r = scorer(model, *inputs)
        for i, ci, ri in zip(batch, c, r):
            chosen[i], rejected[i] = ci.numpy(), ri.numpy()
        if on_batch is not None:
            on_batch(len(batch), sum(len(x) + len(y) for x, y in zip(c, r)))
    return chosen, rejected


def shard_data(pairs: list[TokenizedPair], chosen: list[np.ndarray], rejected: list[np.ndarray],
               per_token: bool, kind: kinds.Kind = kinds.PAIRS) -> dict[str, Any]:
    data: dict[str, Any] = {
        "prompt_ids": [p.prompt_ids for p in pairs],
        "chosen_ids": [p.chosen_ids for p in pairs],
        "rejected_ids": [p.rejected_ids for p in pairs],
        # Sums in float64 then stored as float32: the per-sequence values stay exact to float32.
        "chosen_logps": np.array([c.sum(dtype=np.float64) for c in chosen]),
        "rejected_logps": np.array([r.sum(dtype=np.float64) for r in rejected]),
        "chosen_tokens": np.array([len(c) for c in chosen]),
        "rejected_tokens": np.array([len(r) for r in rejected]),
    }
    if per_token:
        data["chosen_token_logps"] = chosen
        data["rejected_token_logps"] = rejected
    if kind is not kinds.PAIRS:  # the same two scored sequences under the kind's names
        names = dict(zip(kinds.PAIRS.token_fields, kind.token_fields))
        for ours, theirs in zip(kinds.PAIRS.sides, kind.sides):
            names.update({ours.logps: theirs.logps, ours.tokens: theirs.tokens, ours.per_token: theirs.per_token})
        data = {names[k]: v for k, v in data.items() if k in names}  # a completion store keeps the first side
    return data


def placement(model: Any) -> str:
    """Where accelerate put the model's modules: "12 modules on 0, 3 on cpu, 2 on disk" (in placement order)."""
    counts: dict[str, int] = {}
    for where in getattr(model, "hf_device_map", {}).values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    parts = [f"{n} module{'s' if n > 1 else ''} on {where}" for where, n in counts.items()]
    return ", ".join(parts) or "one device"


def check_device_map(cfg: BuildConfig) -> None:
    """--device-map and --max-memory: refused where they cannot apply, before anything is read or written."""
    from logitstore.errors import LogitstoreError

    from .models import DEVICE_MAPS

    if cfg.max_memory and cfg.device_map is None:
        raise LogitstoreError("--max-memory limits what --device-map places on each device; pass --device-map auto")
    if cfg.device_map is None:
        return
    if cfg.device_map not in DEVICE_MAPS:
        raise LogitstoreError(f"unknown --device-map {cfg.device_map!r}; choose one of {', '.join(DEVICE_MAPS)}")
    if cfg.device != "auto":
        raise LogitstoreError(f"--device-map places the layers itself; drop --device {cfg.device}")
    if cfg.share_prompt:
        raise LogitstoreError("--prompt-sharing runs on one device; drop it with --device-map")
    parse_max_memory(cfg.max_memory)


def check_teacher(cfg: BuildConfig) -> dict[str, Any] | None:
    """The header's teacher entry of a build with --top-k or --sample-k (None without), after refusing in one line
    what cannot be stored or combined: read from the model's config, before any data is read or weights load."""
    if cfg.top_k is None and cfg.sample_k is None:
        return None
    from .teacher_pass import model_vocab, teacher_entry

    entry = teacher_entry(top_k=cfg.top_k, sample_k=cfg.sample_k, codec=cfg.topk_codec, seed=cfg.seed,
                          vocab=model_vocab(cfg.model, cfg.revision))
    flag = "--top-k" if cfg.top_k is not None else "--sample-k"
    if cfg.reuse:
        raise TeacherError(f"{flag} needs the model's logits at every row; --reuse copies values without them: "
                           "drop one")
    if cfg.share_prompt:
        raise TeacherError(f"{flag} takes records in the one-pass scoring; drop --prompt-sharing")
    return entry


def build(cfg: BuildConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> BuildResult:
    """Run the reference pass described by `cfg`; resumes a partial store with the same fingerprint."""
    import torch
    from tqdm import tqdm

    check_device_map(cfg)
    rank, world = distributed.rank_and_world()
    start = time.perf_counter()
    teacher = check_teacher(cfg)  # before the data is read: nothing is written when records cannot be stored
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    plan = plan_examples(cfg, tokenizer)
    if teacher is not None and plan.kind is kinds.UNPAIRED:
        raise InputDataError(f"{cfg.data}: --top-k and --sample-k take teacher records of preference pairs or of "
                             "prompt/completion data; this data is unpaired (prompt/completion/label)")
    examples, skipped = plan.examples, plan.skipped
    if cfg.rows_per_shard is None:  # sized by the model work in a shard; the same data always gives the same size
        cfg = dataclasses.replace(cfg, rows_per_shard=fmt.build_rows_per_shard(plan.positions))
    check_model_extras(quantize=cfg.quantize, adapter=cfg.adapter)  # before anything is written
    fingerprint = build_fingerprint(cfg, examples, teacher)
    check_attention(cfg.attn_implementation, device=resolve_device(cfg.device), dtype=fingerprint["precision"]["dtype"])
    kind = plan.kind
    per_token_specs = {s.name: s for s in fmt.ragged_specs(len(tokenizer), cfg.token_codec, cfg.per_token, cfg.codec,
                                                           kind=kind)
                       if s.name in kind.per_token_fields}
    reuse = derive.plan_reuse(plan.keys, cfg.reuse, fingerprint=fingerprint, scoring=plan.scoring,
                              per_token=per_token_specs, out=cfg.out, storage_options=cfg.storage_options,
                              log=log if rank == 0 else (lambda _: None))
    provenance = reuse.provenance()
    settings = {"batch_size": cfg.batch_size, "batch_tokens": cfg.batch_tokens, "share_prompt": cfg.share_prompt,
                "length_bucketing": cfg.length_bucketing, "attn_implementation": cfg.attn_implementation,
                "codec": cfg.codec, "token_codec": cfg.token_codec}
    tok_header = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "bos_token_id": tokenizer.bos_token_id, "vocab_size": len(tokenizer)}
    if rank == 0:
        writer = logitstore.create(
            cfg.out, [ex.id for ex in examples], fingerprint=fingerprint, vocab_size=len(tokenizer),
            max_length=cfg.max_length, per_token=cfg.per_token, token_codec=cfg.token_codec,
            logp_codec=cfg.codec, rows_per_shard=cfg.rows_per_shard, tokenizer=tok_header, settings=settings,
            skipped=[s.as_dict() for s in skipped], storage_options=cfg.storage_options, scoring=plan.scoring,
            provenance=provenance, kind=kind.name,
            kl_batch_size=cfg.kl_batch_size if kind is kinds.UNPAIRED else None, teacher=teacher)
    distributed.barrier()
    if rank != 0:
        writer = logitstore.StoreWriter.attach(cfg.out, fingerprint, storage_options=cfg.storage_options)
    counts = {"computed": provenance["computed"], "reused": provenance["reused"], "unit": kind.unit}
    if writer.complete:
        return BuildResult(writer.loc.url, len(examples), len(skipped), 0, True, 0, 0.0, writer.loc.total_bytes(),
                           digest=writer.digest if rank == 0 else None, **counts)
    missing = writer.missing_shards
    compute = reuse.to_compute
    work = np.where(compute, plan.cost, 0)  # model work left per pair, in tokens
    spans = {k: writer.shard_rows(k) for k in missing}
    todo = assign_shards(missing, [int(work[spans[k].start:spans[k].stop].sum()) for k in missing], world)[rank]
    total_rows = sum(int(compute[spans[k].start:spans[k].stop].sum()) for k in todo)
    if rank == 0 and cfg.reuse:
        log(f"Reusing {reuse.reused} of {len(examples)} pairs from {len(cfg.reuse)} "
            f"store{'' if len(cfg.reuse) == 1 else 's'}; {len(examples) - reuse.reused} to compute.")
    if rank == 0 and len(missing) < writer.geometry.num_shards:
        log(f"Resuming {writer.loc.url}: {writer.geometry.num_shards - len(missing)} of "
            f"{writer.geometry.num_shards} shards already written.")
    dtype = fingerprint["precision"]["dtype"]
    model = None
    offload = contextlib.ExitStack()  # the disk-offload folder of a --device-map build lives as long as the model
    if total_rows:  # a rank with only copies to make never loads the model
        model = load_model(cfg.model, dtype=dtype, quantize=cfg.quantize, device=cfg.device, adapter=cfg.adapter,
                           revision=cfg.revision, adapter_revision=cfg.adapter_revision,
                           attn_implementation=cfg.attn_implementation, device_map=cfg.device_map,
                           max_memory=parse_max_memory(cfg.max_memory) or None,
                           offload_folder=offload.enter_context(tempfile.TemporaryDirectory(prefix="logitstore-"))
                           if cfg.device_map else None)
        model.eval()
        if cfg.device_map:
            log(f"--device-map {cfg.device_map}: {placement(model)}")
    pad_id = tokenizer.pad_token_id
    tokens = 0
    pairs_scored = 0
    bar = tqdm(total=total_rows, unit="pair", disable=not progress, desc=f"build[{rank}]" if world > 1 else "build")
    t0 = time.perf_counter()

    def on_batch(n_pairs: int, n_tokens: int) -> None:
        nonlocal tokens, pairs_scored
        tokens += n_tokens
        pairs_scored += n_pairs
        bar.update(n_pairs)
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

    autocast = precision(input_device(model), dtype) if model is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for shard in todo:
            rows = writer.shard_rows(shard)
            pairs = [plan.tokenize(cfg, tokenizer, i) for i in rows]
            fresh = [p for p, row in enumerate(rows) if compute[row]]
            records: dict[str, list[Any]] = {}
            mass = new_mass(teacher) if teacher is not None else None  # the shard's prior, from its rows alone
            chosen, rejected = score_pairs(model, [pairs[p] for p in fresh], pad_id=pad_id,
                                           batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens,
                                           share_prompt=cfg.share_prompt, bucketing=cfg.length_bucketing,
                                           on_batch=on_batch, teacher=teacher, rows=[rows[p] for p in fresh],
                                           records=records, mass=mass)
            part = shard_data([pairs[p] for p in fresh], chosen, rejected, cfg.per_token, kind)
            if teacher is not None and kind is kinds.COMPLETION:  # the first side's records, under its name
                part["teacher/completion"] = records["chosen"]
                mass = {"completion": mass["chosen"]} if mass is not None else None
            elif teacher is not None:  # every row is computed (check_teacher refuses --reuse)
                part.update({f"teacher/{side}": records[side] for side in ("chosen", "rejected")})
            parts = [(fresh, part)]
            tokens_by_field = {f: [getattr(p, attr) for p in pairs]
                               for f, attr in zip(kind.token_fields, fmt.TOKEN_FIELDS)}
            parts += derive.reused_part(reuse, list(rows), tokens_by_field, per_token=cfg.per_token)
            if kind is kinds.UNPAIRED:  # labels come from the data, for computed and reused rows alike
                parts.append((list(range(len(rows))), {"label": [int(examples[i].label) for i in rows]}))
            writer.write_shard(shard, derive.combine(len(rows), parts, kind), teacher_mass=mass_of(mass))
    bar.close()
    distributed.barrier()
    if rank == 0:
        writer.finalize()
    distributed.barrier()
    offload.close()
    return BuildResult(writer.loc.url, len(examples), len(skipped), len(todo), False, tokens,
                       time.perf_counter() - start, writer.loc.total_bytes(), pairs_scored=pairs_scored,
                       digest=writer.digest if rank == 0 else None, **counts)


def recompute_sample(store: Any, model: str, data: str, *, adapter: str | None = None, revision: str | None = None,
                     adapter_revision: str | None = None, sample: int = 16, seed: int = 0,
                     tolerance: float = 1e-3) -> list[str]:
    """Recompute a random sample of a store's rows with `model` (plus `adapter`) on `data`, in the precision and
    tokenization the store records; return the disagreements. For an unpaired store the KL completion is the one
    the store's KL pairing names, so a sample checks the pairing as well as the values."""
    import torch

    recorded = store.fingerprint.get("precision", {})
    tokenization = store.fingerprint.get("tokenization", {})
    cfg = BuildConfig(model=model, data=data, out=store.location.url, adapter=adapter, revision=revision,
                      adapter_revision=adapter_revision, dtype=recorded.get("dtype", "float32"),
                      quantize=recorded.get("quantize"), max_prompt_length=tokenization.get("max_prompt_length"),
                      max_length=store.header["max_length"], kl_batch_size=store.kl_batch_size or 2)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    kind = store.kind
    if kind is kinds.UNPAIRED:
        plan = plan_unpaired(dataclasses.replace(cfg, skip_invalid=True), tokenizer)
        if [ex.id for ex in plan.examples] != store.ids:
            return [f"{cfg.data} does not hold the store's examples in the store's order (the KL pairing follows "
                    "the order)"]
        tokenized = {ex.id: t for ex, t in zip(plan.examples, plan.tokenized)}  # type: ignore[arg-type]
        labels = store.row_values(np.arange(len(store)))["label"]
        wrong = [ex.id for ex, label in zip(plan.examples, labels.tolist()) if int(ex.label) != label]
        if wrong:
            problems_first = [f"example {wrong[0]!r}: stored label differs from the data ({len(wrong)} examples)"]
            return problems_first
    elif kind is kinds.COMPLETION:
        plan = plan_completion(dataclasses.replace(cfg, skip_invalid=True), tokenizer)
        tokenized = {ex.id: t for ex, t in zip(plan.examples, plan.tokenized)}  # type: ignore[arg-type]
    else:
        tokenized = {}
        by_id = {ex.id: ex for ex in load_examples(cfg.data, cfg.split)}
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(store), size=min(sample, len(store)), replace=False))
    problems = []
    pairs = []
    for row in rows.tolist():
        key = store.id_of(row)
        if kind is kinds.UNPAIRED:
            pair = tokenized[key]
        elif kind is kinds.COMPLETION:
            if key not in tokenized:
                problems.append(f"example {key!r} is not in {cfg.data}")
                continue
            pair = tokenized[key]
        else:
            ex = by_id.get(key)
            if ex is None:
                problems.append(f"example {key!r} is not in {cfg.data}")
                continue
            pair = tokenize_pair(tokenizer, ex, store.header["max_length"], cfg.max_prompt_length)
        for field, attr in zip(kind.token_fields, fmt.TOKEN_FIELDS):
            if not np.array_equal(store.ragged(field, [row])[0], getattr(pair, attr)):
                problems.append(f"example {key!r}: stored {field} differ from the tokenized data")
        pairs.append((row, pair))
    if not pairs:
        return problems
    model = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, device=cfg.device, adapter=cfg.adapter,
                       revision=cfg.revision, adapter_revision=cfg.adapter_revision,
                       attn_implementation=cfg.attn_implementation)
    model.eval()
    records: dict[str, list[Any]] = {}
    with torch.no_grad(), precision(next(model.parameters()).device, cfg.dtype):
        chosen, rejected = score_pairs(model, [p for _, p in pairs], pad_id=tokenizer.pad_token_id,
                                       batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens, share_prompt=False,
                                       teacher=store.teacher, rows=[r for r, _ in pairs], records=records)
    if store.teacher is not None:
        from .teacher_pass import compare_records

        if kind is kinds.COMPLETION:
            records = {"completion": records["chosen"]}
        problems += compare_records(store, [r for r, _ in pairs], records)
    stored = store.row_values([r for r, _ in pairs])
    for i, (row, _) in enumerate(pairs):
        for side, values in zip(kind.sides, (chosen, rejected)):
            name = side.logps.rsplit("_", 1)[0]
            got, want = float(values[i].sum(dtype=np.float64)), float(stored[side.logps][i])
            if abs(got - want) > tolerance:
                problems.append(f"example {store.id_of(row)!r}: {name} log-prob {want:.5f} stored, {got:.5f} "
                                f"recomputed (tolerance {tolerance})")
    return problems
