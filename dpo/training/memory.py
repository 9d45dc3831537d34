"""A training run's peak memory, so a user sees their margin: on a GPU the most memory PyTorch had allocated on it
since the model was loaded (what must fit in the card, CUDA context aside); on CPU the process's peak resident set
size (what the operating system counts against the machine, model load included).

Running out of memory on a step becomes one line naming the peak reached and what lowers it.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from typing import Any

import torch

from logitstore.errors import LogitstoreError

GIB = 1 << 30
# What lowers a training step's peak, in the order it helps most (docs/benchmarks.md, "Where a step's memory goes").
REMEDIES = ("--gradient-checkpointing", "a smaller --batch-size (--grad-accum keeps the effective batch)",
            "a store built with a shorter --max-length")


class OutOfMemoryError(LogitstoreError, MemoryError):
    """A training step needed more memory than the device or machine had."""


def process_peak_rss() -> int:
    """Bytes: the most this process has held resident (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's failure to get memory from the system."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in text
                                               or "DefaultCPUAllocator: not enough memory" in text)


@dataclasses.dataclass
class PeakMeter:
    """Peak memory of the training steps on one device; `step` is the step being computed (1-based)."""

    device: Any = None
    step: int | None = None

    def start(self, device: Any) -> None:
        """From here on (after the model load) the GPU peak counts; the CPU peak is the whole process's."""
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def kind(self) -> str:
        return "GPU, max allocated" if self.device is not None and self.device.type == "cuda" else "CPU, peak RSS"

    def peak_bytes(self) -> int:
        if self.device is not None and self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return process_peak_rss()

    def record(self) -> dict[str, Any]:
        """What each logged step of metrics.jsonl carries."""
        return {"peak_memory_gib": self.peak_bytes() / GIB, "peak_memory_kind": self.kind}

    def summary(self) -> str:
        return f"peak memory {self.peak_bytes() / GIB:.2f} GiB ({self.kind})"

    def out_of_memory(self, exc: BaseException) -> OutOfMemoryError:
        """The one-line error for `exc`, an out-of-memory failure."""
        where = f"at step {self.step}" if self.step is not None else "before the first step"
        of = ""
        if self.device is not None and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            limit = f"{total / GIB:.2f} GiB"
            of = f" of the device's {limit}"
        wanted = _wanted(str(exc))
        return OutOfMemoryError(f"out of memory {where}{wanted}: {self.summary()}{of}; lower it with "
                                f"{', '.join(REMEDIES[:-1])} or {REMEDIES[-1]}")


def _wanted(text: str) -> str:
    """", needing 2.00 GiB more" from CUDA's or the CPU allocator's message, when it says."""
    import re

    cuda = re.search(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)", text)
    if cuda:
        return f" (one more allocation of {cuda.group(1)})"
    cpu = re.search(r"you tried to allocate (\d+) bytes", text)
    if cpu:
        return f" (one more allocation of {int(cpu.group(1)) / GIB:.2f} GiB)"
    return ""
