"""The reference pass: fill a store from a causal LM and data (:mod:`.build`), score a shard's rows
(:mod:`.scoring`) with teacher records where asked (:mod:`.teacher`), refuse what cannot be built (:mod:`.checks`),
and recompute a sample for `verify --model` (:mod:`.recompute`)."""

from ..config import BuildConfig
from .build import BuildResult, build
from .checks import check_teacher
from .recompute import recompute_sample

__all__ = ["BuildConfig", "BuildResult", "build", "check_teacher", "recompute_sample"]
