"""Training from a store: the loop (:mod:`.loop`), the policy and its optimizer (:mod:`.policy`), what a run refuses
(:mod:`.checks`), evaluation (:mod:`.evaluate`), checkpoints (:mod:`.checkpoint`), the saved weights
(:mod:`.weights`), peak memory (:mod:`.memory`), experiment trackers (:mod:`.trackers`) and the plot
(:mod:`.plot`)."""

from typing import Any

from ..config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":  # imported on use: the loop needs torch, and the CLI reads options without it
        from .loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
