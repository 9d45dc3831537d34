"""Experiment tracking: each step a run logs to metrics.jsonl, also sent to TensorBoard, trackio or Weights & Biases.

Names are TRL's where the metric is the same (:func:`trl_names`: `loss`, `rewards/chosen`, `logps/chosen`, `kl`,
`grad_norm`, `learning_rate`, `epoch`, `eval_loss`, `eval_rewards/chosen`, ...), and each tracker sees them as
transformers' TensorBoardCallback, TrackioCallback and WandbCallback send a TRL trainer's logs (:func:`tracker_names`:
`train/loss`, `eval/loss`, ...; trackio and W&B also get `train/global_step`), so a run reads like a TRL run there.
Only the rank that writes metrics.jsonl opens trackers. Each library is an optional extra of the same name.

Where the runs go: TensorBoard event files in RUN/runs/DATE_HOST (TENSORBOARD_LOGGING_DIR overrides, as in
transformers); trackio's local database (TRACKIO_DIR, default ~/.cache/huggingface/trackio; `trackio show`); W&B
in RUN/wandb (WANDB_MODE=offline keeps it there; `wandb sync` uploads it), project WANDB_PROJECT or "logitstore".
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from logitstore.errors import LogitstoreError

TRACKERS = ("tensorboard", "trackio", "wandb")
PROJECT = "logitstore"  # trackio's and W&B's project when none is set (transformers uses "huggingface")
NOT_SENT = ("storage_options",)  # config fields never sent to a tracker: they may hold credentials


class TrackerError(LogitstoreError, ValueError):
    """An unknown tracker name."""


class TrackerStartError(LogitstoreError, RuntimeError):
    """A tracker's library refused to start a run (no account, a server it cannot reach)."""


# What a user can do when a tracker does not start, after its own message.
START_HINTS = {"wandb": " (WANDB_MODE=offline keeps the run in RUN/wandb with no account; `wandb sync` uploads it "
                        "later)"}


def parse_report_to(values: str | Iterable[str] | None) -> tuple[str, ...]:
    """`--report-to` values (repeated, or separated by commas) as tracker names in TRACKERS' order; "none" alone
    means none."""
    if values is None:
        return ()
    items = [values] if isinstance(values, str) else list(values)
    names = [n.strip() for item in items for n in item.split(",")]
    unknown = [n for n in names if n not in (*TRACKERS, "none")]
    if unknown:
        raise TrackerError(f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} or none")
    if "none" in names and set(names) != {"none"}:
        raise TrackerError(f"none reports to no tracker and cannot be combined with "
                           f"{', '.join(n for n in names if n != 'none')}")
    return tuple(t for t in TRACKERS if t in names)


def require(names: Iterable[str]) -> None:
    """Raise ModuleNotFoundError naming the first tracker whose library is not installed (the CLI turns it into a
    line naming the extra), before anything is loaded or written."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def trl_names(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers under the names a TRL trainer logs them (`step` is the axis, not a value).

    Training metrics keep their names (TRL's DPOTrainer and KTOTrainer use the same: `loss`, `rewards/chosen`,
    `logps/chosen`, `kl`, `grad_norm`, `learning_rate`, `epoch`). metrics.jsonl writes an evaluation metric as
    `eval/` and the training name with `/` as `_` (`eval/rewards_accuracies`); TRL writes `eval_` and the name
    (`eval_rewards/accuracies`). The training metric of the same record says which `_` was a `/`."""
    evaluated = {"eval/" + k.replace("/", "_"): "eval_" + k for k in record if not k.startswith("eval/")}
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or not _number(value):
            continue
        if key.startswith("eval/"):
            out[evaluated.get(key, "eval_" + key[len("eval/"):])] = float(value)
        else:
            out[key] = float(value)
    return out


def tracker_names(record: dict[str, Any]) -> dict[str, float]:
    """What a tracker is sent for a record: TRL's names as transformers' callbacks rewrite them (`eval_x` becomes
    `eval/x`, everything else `train/x`)."""
    return {(f"eval/{k[len('eval_'):]}" if k.startswith("eval_") else f"train/{k}"): v
            for k, v in trl_names(record).items()}


def default_logdir(run_dir: Path) -> Path:
    """TensorBoard's folder: TENSORBOARD_LOGGING_DIR, else RUN/runs/DATE_HOST as transformers makes it."""
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return Path(os.environ["TENSORBOARD_LOGGING_DIR"]).expanduser()
    stamp = datetime.datetime.now().strftime("%b%d_%H-%M-%S")
    return run_dir / "runs" / f"{stamp}_{socket.gethostname()}"


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any], quiet: bool):
        import tensorboard  # noqa: F401 - torch's writer needs it; a missing one is then named as such
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(default_logdir(run_dir)))
        self.writer.add_text("args", json.dumps(config, indent=2, default=str))

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a run that stops later keeps every step logged so far

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, run_dir: Path, config: dict[str, Any], quiet: bool):
        import trackio

        self.trackio, self.quiet = trackio, quiet
        with self._talk():  # trackio prints where its database is and how to view it
            trackio.init(project=PROJECT, name=run_dir.name, config=config, resume="allow")

    def _talk(self) -> Any:
        return contextlib.redirect_stdout(io.StringIO()) if self.quiet else contextlib.nullcontext()

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log({**values, "train/global_step": step}, step=step)

    def close(self) -> None:
        with self._talk():
            self.trackio.finish()


class _Wandb:
    def __init__(self, run_dir: Path, config: dict[str, Any], quiet: bool):
        import wandb

        settings = wandb.Settings(silent=True) if quiet else None
        self.run = wandb.init(project=None if os.environ.get("WANDB_PROJECT") else PROJECT, name=run_dir.name,
                              dir=str(run_dir), config=config, settings=settings)
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "train/global_step": step}, step=step)

    def close(self) -> None:
        self.run.finish()


_OPENERS = {"tensorboard": _TensorBoard, "trackio": _Trackio, "wandb": _Wandb}


class Trackers:
    """The run's open trackers (none: every call does nothing). A run that stops with an error before `close` still
    leaves each tracker complete up to its last logged step: TensorBoard's file is flushed at every step, and trackio
    and W&B finish their runs when the process exits (W&B with its exit status)."""

    def __init__(self, opened: list[Any]):
        self.opened = opened

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.opened:
            values = tracker_names(record)
            for tracker in self.opened:
                tracker.log(values, step)

    def close(self) -> None:
        opened, self.opened = self.opened, []
        for tracker in opened:
            tracker.close()


def open_trackers(names: Iterable[str], run_dir: str | Path, config: dict[str, Any], *, main: bool = True,
                  quiet: bool = False) -> Trackers:
    """Open each named tracker for the run in `run_dir` with its `config` (fields in NOT_SENT left out); on any rank
    but the main one, none."""
    names = parse_report_to(list(names))
    if not main or not names:
        return Trackers([])
    require(names)
    sent = {k: v for k, v in config.items() if k not in NOT_SENT}
    sent = json.loads(json.dumps(sent, default=str))  # plain JSON values: what every tracker stores
    opened = Trackers([])
    for name in names:
        try:
            opened.opened.append(_OPENERS[name](Path(run_dir), sent, quiet))
        except Exception as exc:  # noqa: BLE001 - each library has its own errors; the user needs one line
            opened.close()
            said = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise TrackerStartError(f"--report-to {name} could not start a run: {said}{START_HINTS.get(name, '')}"
                                    ) from exc
    return opened

