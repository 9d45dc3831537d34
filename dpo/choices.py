"""The values that build and training options accept, in a module without torch, so the command line can list
them (and check them) before any extra is installed. The training loop accepts exactly these;
the loss types and f-divergences live in dpo.objective, also without torch."""

from __future__ import annotations

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
QUANTIZATIONS = ("4bit",)
