"""One exception family for everything logitstore refuses.

Each class also subclasses the built-in that fits, so callers that catch ``KeyError`` or ``ValueError`` keep
working. The CLI turns any :class:`LogitstoreError` into one line on stderr and exit status 1.
"""

from __future__ import annotations

import unicodedata


class LogitstoreError(Exception):
    """Base class: a refusal with a message meant for a person."""


class StoreNotFoundError(LogitstoreError, FileNotFoundError):
    """The path holds no logitstore store."""


class FormatError(LogitstoreError, ValueError):
    """The store's files break the format (unknown version, sizes out of range, undecodable chunk)."""


class DamagedFileError(FormatError):
    """A file differs from its record (size or SHA-256), or a committed file is missing."""


class DigestMismatchError(LogitstoreError, ValueError):
    """The store is not the one a pinned digest names."""


class RowOutOfRangeError(LogitstoreError, IndexError):
    """A row number outside the store."""


class FingerprintMismatchError(LogitstoreError, ValueError):
    """A store belongs to another model, tokenizer, data set or setting."""


class IncompleteStoreError(LogitstoreError, RuntimeError):
    """The store lacks shards that the operation needs."""


class StoreLockedError(LogitstoreError, RuntimeError):
    """Another process holds the store's write lock: a second writer is refused, and a store still being planned
    cannot be opened."""


class StoreWriteError(LogitstoreError, OSError):
    """The file system refused a write (disk full, no permission, read-only); what is committed is kept."""


class UnknownIdError(LogitstoreError, KeyError):
    """Example IDs that the store does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputDataError(LogitstoreError, ValueError):
    """The preference data cannot be used as given."""


class ModelError(LogitstoreError, ValueError):
    """The model or tokenizer folder cannot be used as given."""


def printable(text: object) -> str:
    """`text` safe for a terminal: control and formatting characters (escape sequences, bidirectional overrides)
    are written as Python escapes, so a store's IDs or fingerprint cannot drive the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch)[0] in "CZ" else ch for ch in text)
