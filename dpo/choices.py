"""The values that build and training options accept, in a module without torch, so the command line can list
them (and check them) before any extra is installed. The losses and the training loop accept exactly these."""

from __future__ import annotations

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm")
SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
QUANTIZATIONS = ("4bit",)
