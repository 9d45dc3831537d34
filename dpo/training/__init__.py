"""Training from a store: the loop (:mod:`.loop`), the policy and its optimizer (:mod:`.policy`), what a run refuses
(:mod:`.checks`), evaluation (:mod:`.evaluate`), checkpoints (:mod:`.checkpoint`), the saved weights
(:mod:`.weights`), peak memory (:mod:`.memory`) and the plot (:mod:`.plot`)."""

from ..config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
