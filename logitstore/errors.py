"""One exception family for everything logitstore refuses.

Each class also subclasses the built-in that fits, so callers that catch ``KeyError`` or ``ValueError`` keep
working. The CLI turns any :class:`LogitstoreError` into one line on stderr and exit status 1.
"""

from __future__ import annotations


class LogitstoreError(Exception):
    """Base class: a refusal with a message meant for a person."""


class StoreNotFoundError(LogitstoreError, FileNotFoundError):
    """The path holds no logitstore store."""


class FormatError(LogitstoreError, ValueError):
    """The store's files break the format (unknown version, sizes out of range, undecodable chunk)."""


class FingerprintMismatchError(LogitstoreError, ValueError):
    """A store belongs to another model, tokenizer, data set or setting."""


class IncompleteStoreError(LogitstoreError, RuntimeError):
    """The store lacks shards that the operation needs."""


class UnknownIdError(LogitstoreError, KeyError):
    """Example IDs that the store does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputDataError(LogitstoreError, ValueError):
    """The preference data cannot be used as given."""


class ModelError(LogitstoreError, ValueError):
    """The model or tokenizer folder cannot be used as given."""
