"""A store's teacher records (part of :class:`logitstore.reader.Store`; the records themselves:
logitstore/teacher_store.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import teacher_store
from .errors import IncompleteStoreError


class TeacherRecords:
    """The teacher entry and each row's records."""

    header: dict[str, Any]

    @property
    def teacher(self) -> dict[str, Any] | None:
        """The header's teacher entry (kind, k, codec, seed, block_positions, vocab); None without records."""
        return dict(self.header["teacher"]) if "teacher" in self.header else None

    def top_k(self, side: str, rows: Sequence[int] | np.ndarray) -> dict[str, list[np.ndarray]]:
        """Each row's teacher records on `side` ("chosen", "rejected"): see `teacher_store.rows_records`."""
        rows = self._check_rows(rows)
        try:
            return teacher_store.rows_records(self, side, rows)
        except IncompleteStoreError:
            raise self._absent(rows) from None

