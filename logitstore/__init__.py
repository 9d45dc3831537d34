"""logitstore: a crash-safe, memory-mapped Zarr v3 store of DPO reference log-probabilities.

The public surface::

    import logitstore
    store = logitstore.open("pairs.lstore")          # read-only Store (digest=... pins its exact contents)
    store.get(["id-1", "id-2"])["chosen_logps"]      # float32, in the order asked
    writer = logitstore.create("new.lstore", ids, fingerprint={...}, vocab_size=32000, max_length=1024)
    writer.write_shard(0, {...}); writer.finalize()    # holds the store's write lock until it finalises

The torch-facing pieces live in :mod:`logitstore.loader`; importing this package never imports torch.
"""

from .errors import (
    DamagedFileError,
    DigestMismatchError,
    FingerprintMismatchError,
    FormatError,
    IncompleteStoreError,
    InputDataError,
    LogitstoreError,
    ModelError,
    StoreLockedError,
    StoreNotFoundError,
    StoreWriteError,
    UnknownIdError,
)
from .content_key import content_keys
from .derive import merge, subset
from .format import FORMAT_VERSION
from .reader import Store, open
from .verify import VerifyReport, verify
from .writer import StoreWriter, create, fingerprint_digest

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "DamagedFileError",
    "DigestMismatchError",
    "FingerprintMismatchError",
    "FormatError",
    "IncompleteStoreError",
    "InputDataError",
    "LogitstoreError",
    "ModelError",
    "Store",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreWriteError",
    "StoreWriter",
    "UnknownIdError",
    "VerifyReport",
    "__version__",
    "content_keys",
    "create",
    "fingerprint_digest",
    "merge",
    "open",
    "subset",
    "verify",
]
