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
# What lowers a training step's peak at the same batch and length, from the least step time it costs to the most
# (measured on CPU at max length 512: docs/benchmarks.md, "Training memory on CPU at long context"; checkpointing
# recomputes the layers, about a third more compute), as (option, what it costs, whether
# it runs only on a GPU); then what changes the batch or the data.
TRADES = (("--mlp-chunk 256", "+2% step time at 512 tokens", False),
          ("--split-sequences", "+21% step time at 512 tokens", False),
          ("--gradient-checkpointing", "one more forward of the layers", False),
          ("--offload-activations", "the copies to CPU memory and back", True))
# The TrainConfig field behind each option that trades step time for memory.
OPTION_FIELDS = {"--split-sequences": "split_sequences", "--mlp-chunk": "mlp_chunk",
                 "--offload-activations": "offload_activations", "--gradient-checkpointing": "gradient_checkpointing"}
LAST_RESORTS = ("a smaller --batch-size (--grad-accum keeps the effective batch)",
                "a store built with a shorter --max-length")


def options_in_use(cfg: Any) -> list[str]:
    """The memory options a run's config turns on, as flags, in OPTION_FIELDS' order."""
    return [flag for flag, field in OPTION_FIELDS.items() if getattr(cfg, field)]


def remedies(*, gpu: bool, in_use: frozenset[str] = frozenset()) -> str:
    """"lower it with ...": the options not in use yet, cheapest first, each with its cost; then the batch and the
    data."""
    trades = [f"{option} ({cost})" for option, cost, gpu_only in TRADES
              if option.split()[0] not in in_use and (gpu or not gpu_only)]
    first = f"{', '.join(trades)} (cheapest in step time first); or " if trades else ""
    return f"lower it with {first}{LAST_RESORTS[0]} or {LAST_RESORTS[1]}"


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
    in_use: frozenset[str] = frozenset()  # the memory options the run already has ("--split-sequences", ...)

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
        gpu = self.device is not None and self.device.type == "cuda"
        return OutOfMemoryError(f"out of memory {where}{wanted}: {self.summary()}{of}; "
                                f"{remedies(gpu=gpu, in_use=self.in_use)}")


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
