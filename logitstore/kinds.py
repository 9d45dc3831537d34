"""Store kinds: which per-row and ragged fields a store holds, and the format version that names them.

A **pairs** store (format version 2, no `kind` key: the format as it was) holds preference pairs for DPO. An
**unpaired** store (format version 3, `"kind": "unpaired"`) holds thumbs-up / thumbs-down examples for KTO and BCO:
one completion per example with its boolean label, and the example's mismatched KL completion, paired as TRL
1.16's KTOTrainer pairs them (header `kl_pairing`). A reader that knows only version 2 refuses an unpaired store on
its version number before reading anything else (docs/FORMAT.md, "Unpaired stores"). A **completion** store
(format version 4, `"kind": "completion"`) holds plain prompt/completion examples (TRL's prompt-completion format,
as its SFT and distillation trainers take it): one scored side, "completion", for distillation without pairs; a
reader that knows versions 2 and 3 only refuses it on its version number (docs/FORMAT.md, "Completion stores").

Every module that depends on field names takes them from a :class:`Kind`, so the layout of each kind is written
down once, here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import FormatError

KL_RULE = "rotate-within-batches"  # docs/FORMAT.md, "KL pairing"
MAX_KL_BATCH_SIZE = 1 << 20


@dataclasses.dataclass(frozen=True)
class Side:
    """One scored completion of a row: its sum, its scored-token count, its ids and its per-token values."""

    logps: str
    tokens: str
    ids: str
    per_token: str


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    format_version: int
    row_fields: dict[str, tuple[str, Any]]  # per-row arrays: name -> (dtype, fill value)
    token_fields: tuple[str, ...]  # prompt ids, then each scored completion's ids (the content key's order)
    sides: tuple[Side, ...]  # two for pairs and unpaired stores, one for completion stores

    @property
    def per_token_fields(self) -> tuple[str, ...]:
        return tuple(side.per_token for side in self.sides)

    @property
    def unit(self) -> str:
        """What one row is, in messages."""
        return "pair" if self.name == "pairs" else "example"


PAIRS = Kind(
    name="pairs", format_version=2,
    row_fields={
        "chosen_logps": ("float32", float("nan")),
        "rejected_logps": ("float32", float("nan")),
        "chosen_tokens": ("int32", -1),
        "rejected_tokens": ("int32", -1),
    },
    token_fields=("prompt_ids", "chosen_ids", "rejected_ids"),
    sides=(Side("chosen_logps", "chosen_tokens", "chosen_ids", "chosen_token_logps"),
           Side("rejected_logps", "rejected_tokens", "rejected_ids", "rejected_token_logps")),
)

UNPAIRED = Kind(
    name="unpaired", format_version=3,
    row_fields={
        "completion_logps": ("float32", float("nan")),
        "kl_logps": ("float32", float("nan")),
        "completion_tokens": ("int32", -1),
        "kl_tokens": ("int32", -1),
        "label": ("uint8", 255),  # 1 desirable, 0 undesirable; 255 (the fill value) never written
    },
    token_fields=("prompt_ids", "completion_ids", "kl_completion_ids"),
    sides=(Side("completion_logps", "completion_tokens", "completion_ids", "completion_token_logps"),
           Side("kl_logps", "kl_tokens", "kl_completion_ids", "kl_token_logps")),
)

COMPLETION = Kind(
    name="completion", format_version=4,
    row_fields={
        "completion_logps": ("float32", float("nan")),
        "completion_tokens": ("int32", -1),
    },
    token_fields=("prompt_ids", "completion_ids"),
    sides=(Side("completion_logps", "completion_tokens", "completion_ids", "completion_token_logps"),),
)

KINDS = {PAIRS.name: PAIRS, UNPAIRED.name: UNPAIRED, COMPLETION.name: COMPLETION}
VERSIONS = {PAIRS.format_version: PAIRS, UNPAIRED.format_version: UNPAIRED, COMPLETION.format_version: COMPLETION}


def key_parts(kind: Kind, token_ids: list[Any]) -> list[Any]:
    """The (prompt, first, second) id sequences a content key hashes, from a kind's token fields in order: a
    completion store's second sequence is empty for every row (its keys differ from pairs' by the scoring too)."""
    parts = list(token_ids)
    if len(parts) == 2:
        parts.append([np.zeros(0, dtype=np.int64)] * len(parts[0]))
    return parts


def kind_of(header: dict[str, Any]) -> Kind:
    """The kind a header declares: version 2 without `kind` is pairs, version 3 with `kind: "unpaired"` is unpaired,
    version 4 with `kind: "completion"` is completion; anything else is refused."""
    version = header.get("format_version")
    kind = VERSIONS.get(version) if type(version) is int else None
    if kind is None:
        names = [f"{v} ({k.name})" for v, k in VERSIONS.items()]
        known = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise FormatError(f"format version {version!r}; this logitstore reads versions {known}")
    declared = header.get("kind")
    if kind is PAIRS and "kind" in header:
        raise FormatError(f"format version 2 with a kind key ({declared!r}); version 2 stores are pairs and have none")
    if kind is not PAIRS and declared != kind.name:
        raise FormatError(f"format version {version} without the kind {kind.name!r} it requires (got {declared!r})")
    return kind


def kl_pairing(batch_size: int) -> dict[str, Any]:
    """The header's record of how KL completions are paired (docs/FORMAT.md, "KL pairing")."""
    return {"rule": KL_RULE, "batch_size": int(batch_size)}


def check_kl_pairing(entry: Any) -> int:
    """The batch size of a header's `kl_pairing`, checked; raises FormatError."""
    ok = (isinstance(entry, dict) and set(entry) == {"rule", "batch_size"} and entry["rule"] == KL_RULE
          and type(entry["batch_size"]) is int and 2 <= entry["batch_size"] <= MAX_KL_BATCH_SIZE)
    if not ok:
        raise FormatError(f"header kl_pairing must be {{\"rule\": \"{KL_RULE}\", \"batch_size\": an integer in "
                          f"[2, {MAX_KL_BATCH_SIZE}]}}")
    return int(entry["batch_size"])


def kl_rows(num_examples: int, batch_size: int) -> list[int]:
    """Row i's KL source: the row whose completion row i's KL completion is, TRL 1.16's rotation by one within each
    chunk of `batch_size` rows in row order (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}); the last chunk may be
    shorter (a chunk of one row pairs the row with itself)."""
    out = []
    for start in range(0, num_examples, batch_size):
        stop = min(start + batch_size, num_examples)
        out += [stop - 1] + list(range(start, stop - 1))
    return out
