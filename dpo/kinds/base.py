"""What a store kind decides, in the reference pass and in training: the interface each kind's module implements.

The reference pass (:mod:`dpo.reference`) and the training loop (:mod:`dpo.training`) take a kind from the registry
(:mod:`dpo.kinds`) and call these; they never ask which kind they hold. The fields a kind stores are
:mod:`logitstore.kinds`' (the one description of the layout); what a kind *does* with them is here.

No torch at import: the core install (`pip install logitstore`) exports and describes stores through these modules;
what needs torch is imported where a training method runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from logitstore.kinds import Kind

if TYPE_CHECKING:
    from ..config import BuildConfig, TrainConfig
    from ..inputs.plan import Plan
    from ..inputs.tokenization import TokenizedPair

# How a row's values follow from its token ids, apart from the model: enters every content key. Change it when the
# scoring rule changes (which tokens are scored, how), so that old values are no longer reused. Each kind adds its
# name (pairs excepted: their keys predate kinds), so equal token ids of two kinds never share values.
SCORING = {"scorer": "logitstore completion log-probs", "version": 1}


class StoreKind:
    """One store kind. Subclasses set :attr:`fields` and implement every method that raises NotImplementedError."""

    fields: Kind  # logitstore.kinds' description: row fields, token fields, scored sides, format version
    scoring: dict[str, Any] = SCORING  # the content keys' scoring entry

    @property
    def name(self) -> str:
        return self.fields.name

    @property
    def sides(self) -> list[str]:
        """The scored sides' names, in the store's order ("chosen", "rejected"; "completion", "kl"; "completion"),
        as messages name them."""
        return [side.logps.rsplit("_", 1)[0] for side in self.fields.sides]

    @property
    def teacher_sides(self) -> list[str]:
        """The names of the sides' teacher records (``store.top_k(side, rows)``, files ``teacher/SIDE``), in the
        store's order: "chosen", "rejected"; "completion", "kl_completion"; "completion"."""
        from logitstore.teacher_store import side_names

        return side_names(self.fields)

    # ---- data and the reference pass -----------------------------------------------------------------------

    def reads(self, record: Any) -> bool:
        """Whether a data file whose first record is `record` holds this kind's data (TRL reads the columns)."""
        raise NotImplementedError

    def plan(self, cfg: BuildConfig, tokenizer: Any) -> Plan:
        """Every example read, validated and tokenized (the first bad one stops the build unless
        ``cfg.skip_invalid``): the build's :class:`~dpo.inputs.plan.Plan`."""
        raise NotImplementedError

    def data_digest(self, examples: list[Any]) -> str:
        """SHA-256 of the examples' IDs and content, in order: the data part of a store's fingerprint."""
        raise NotImplementedError

    def fingerprint(self, cfg: BuildConfig) -> dict[str, Any] | None:
        """The fingerprint's ``kind`` entry (what else a resumed build must share), or None."""
        return None

    def writer_options(self, cfg: BuildConfig) -> dict[str, Any]:
        """What :func:`logitstore.create` takes for this kind beyond the layout every kind shares."""
        return {}

    def check_records(self, cfg: BuildConfig) -> None:
        """Refuse teacher records (--top-k / --sample-k) where this kind cannot keep them, in one line."""

    def row_values(self, examples: list[Any], rows: range) -> dict[str, list[Any]]:
        """Per-row values that come from the data rather than the model (an unpaired example's label), for every
        row of a shard, computed and reused alike."""
        return {}

    def sample_source(self, store: Any, cfg: BuildConfig, tokenizer: Any,
                      ) -> tuple[Callable[[str], TokenizedPair | None], list[str]]:
        """For `verify --model --data`: a lookup from example ID to its token ids in `cfg.data` (None when the
        data lacks it), and the disagreements found before any model work (an empty list to go on)."""
        raise NotImplementedError

    def export_records(self, store: Any, data: str, split: str | None) -> list[dict[str, Any]]:
        """The records `logitstore export` writes beside the stored values, read from the build's data."""
        raise NotImplementedError

    # ---- training --------------------------------------------------------------------------------------------

    def accept(self, store: Any, objective: Any, cfg: TrainConfig, world: int, *, evaluation: bool = False) -> Any:
        """`objective` checked against a store of this kind (refused in one line when it cannot train or evaluate
        on it), resolved for the store (distill's beta for its teacher records). `evaluation`: the store is the
        run's --eval-store."""
        raise NotImplementedError

    def task(self, cfg: TrainConfig, objective: Any) -> Any:
        """A :class:`Task` training or evaluating `objective` (as :meth:`accept` resolved it for the store)."""
        raise NotImplementedError


class Task:
    """Training (or evaluating) `objective` on one kind of store: what the loop calls at each step. A run has one
    for its training store and one for its --eval-store (`objective` resolved for that store's records), which
    takes the training task's state before each evaluation."""

    panels: list[tuple[str, str]] = []  # (metric, title) of metrics.png, left to right

    def __init__(self, cfg: TrainConfig, objective: Any):
        self.cfg = cfg
        self.objective = objective

    def loader(self, path: str, *, rank: int, world: int, device: Any, evaluation: bool = False,
               digest: str | None = None) -> tuple[Any, Any]:
        """(DataLoader, sampler) over the store at `path`: every rank sees the same global order and takes its own
        share of each batch; `evaluation`: in store order, the last short batch kept."""
        raise NotImplementedError

    def step(self, policy: Any, batch: dict[str, Any], device: Any, *, training: bool = True,
             ) -> tuple[Any, dict[str, Any]]:
        """The batch's mean loss (a scalar tensor) and its metrics (tensors, averaged by the loop)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep of this task beyond the weights and the optimizer (BCO's running mean)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s entries from a checkpoint's state."""
