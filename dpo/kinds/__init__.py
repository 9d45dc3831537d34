"""Store kinds: one module each for everything that differs by kind (its data and plan, the sides it scores, its
loader, how a batch becomes a loss and metrics, what it refuses, what its plot shows; :mod:`.base` says what each
implements), and the one registry the reference pass, the training loop and the CLI look them up in.

A new kind is one module and one line below (its fields go to :mod:`logitstore.kinds`).
"""

from __future__ import annotations

from typing import Any

from .base import StoreKind, Task
from .completion import KIND as COMPLETION
from .pairs import KIND as PAIRS
from .unpaired import KIND as UNPAIRED

# In the order a data file's first record is tried against them: the first kind that reads it builds it.
REGISTRY: tuple[StoreKind, ...] = (COMPLETION, UNPAIRED, PAIRS)

__all__ = ["REGISTRY", "StoreKind", "Task", "of_data", "of_store"]


def of_store(store: Any) -> StoreKind:
    """The kind of an open store (``store.kind``, from its header)."""
    return next(kind for kind in REGISTRY if kind.fields is store.kind)


def of_data(path: str, split: str | None = None) -> StoreKind:
    """The kind of the data at `path`, from its first record's columns, as TRL reads them."""
    from ..inputs.records import first_record

    record = first_record(path, split)
    return next(kind for kind in REGISTRY if kind.reads(record))
