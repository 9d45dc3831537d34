"""What holds a training step's memory at its peak: torch.profiler's allocation records (profile_memory), split by
the region each live allocation was made in.

The profiler records every allocation and free of the profiled step with the op or labelled region it happened
under. Replaying them gives the step's largest instant and which allocations were live then. Each is put in one
piece by its innermost labelled region: logits / log-softmax (the LM head and what surrounds it), the reference
forward (TRL only), the loss, the forward pass (what is still live from it at the peak is what autograd saved for
backward), the backward pass (gradients in flight and the backward's buffers). Weights, the adapter and the
optimizer state exist before the step and are counted from the tensors themselves; so are the batch's tensors.

(torch.profiler's own tensor categorisation, `_memory_profile`, needs shapes and Python stacks; on this model it
took over 15 GB for two steps, so it is not used.)
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from typing import Any, Callable, Iterator

LABEL = "memory:"  # prefix of the regions labelled here


def labelled(name: str, fn: Callable) -> Callable:
    """`fn`, running inside a profiler region named LABEL + name."""
    import torch

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(LABEL + name):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def labelled_context(name: str, cm: Any) -> Iterator[Any]:
    import torch

    with torch.profiler.record_function(LABEL + name), cm as value:
        yield value


def profiler() -> Any:
    import torch

    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages among `tensors` (any nesting of lists, tuples and dicts)."""
    import torch

    seen: dict[int, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            s = x.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(tensors)
    return sum(seen.values())


def _piece(names: list[str], size: int, vocab: int) -> str:
    labels = [n[len(LABEL):] for n in names if n.startswith(LABEL)]
    inner = labels[0] if labels else None
    if any("HeadLogps" in n or "ChunkedLogProb" in n for n in names) or inner == "logits":
        return "logits / log-softmax"
    if inner == "reference":
        return "reference forward (TRL)"
    if inner == "loss":
        return "loss"
    if any(n.startswith("autograd::engine") for n in names):
        # Logits recomputed by a checkpointed head have no label of ours: [rows, vocab] in float32 or bfloat16.
        if size % (2 * vocab) == 0 and size >= 2 * vocab * 16:
            return "logits / log-softmax"
        return "backward: gradients in flight"
    if inner == "forward":
        return "activations saved for backward"
    return "other (optimizer step, loader)"


def peak_breakdown(prof: Any, *, vocab: int, device_type: str = "cpu") -> dict[str, Any]:
    """{"tracked_peak_bytes", "pieces": {piece: bytes}} at the largest instant of the profiled allocations."""
    from torch._C._profiler import _EventType

    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == device_type:
            allocations.append(event)
    allocations.sort(key=lambda e: (e.start_time_ns, e.extra_fields.alloc_size < 0))  # frees after allocs
    live: dict[int, tuple[int, Any]] = {}
    total, best, best_live = 0, 0, {}
    for event in allocations:
        fields = event.extra_fields
        if fields.alloc_size > 0:
            live[fields.ptr] = (fields.alloc_size, event)
            total += fields.alloc_size
            if total > best:
                best, best_live = total, dict(live)
        elif fields.ptr in live:  # a free of what the step allocated (frees of older blocks are not counted)
            total -= live.pop(fields.ptr)[0]
    pieces: dict[str, int] = defaultdict(int)
    for size, event in best_live.values():
        names, parent = [], event.parent
        while parent is not None:
            names.append(parent.name)
            parent = parent.parent
        pieces[_piece(names, size, vocab)] += size
    return {"tracked_peak_bytes": best, "pieces": dict(pieces)}


def _frame_piece(frames: list[dict]) -> str:
    """The piece of a GPU allocation, from the Python frames torch.cuda.memory recorded with it."""
    import linecache

    files = [f.get("filename", "") for f in frames]
    names = [f.get("name", "") for f in frames]
    if any(n in ("head_logps",) or "HeadLogps" in n for n in names) or any("chunked_logprob" in f for f in files):
        return "logits / log-softmax"
    if any(f.endswith("losses.py") for f in files):
        return "loss"
    if any("/optim" in f for f in files):
        return "optimizer state"
    if any(f.endswith("torch/autograd/__init__.py") or f.endswith("torch/autograd/graph.py") for f in files):
        return "backward: gradients in flight"
    if any("ref_outputs" in linecache.getline(f["filename"], f["line"]) or "ref_model" in
           linecache.getline(f["filename"], f["line"]) for f in frames if f.get("filename", "").endswith("dpo_trainer.py")):
        return "reference forward (TRL)"
    if any(n == "forward" for n in names):
        return "activations saved for backward"
    return "other (optimizer step, loader)"


def snapshot_breakdown(snapshot: dict) -> dict[str, Any]:
    """The largest instant of a torch.cuda.memory snapshot's allocation trace, split into pieces. Blocks that
    existed before recording began (the weights) are `before_recording_bytes`, read from the snapshot's segments
    less what the trace added."""
    trace = snapshot["device_traces"][0] if snapshot.get("device_traces") else []
    live: dict[int, tuple[int, list]] = {}
    total, best, best_live = 0, 0, {}
    for event in trace:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, event.get("frames", []))
            total += size
            if total > best:
                best, best_live = total, dict(live)
        elif action == "free_completed" and addr in live:
            total -= live.pop(addr)[0]
    pieces: dict[str, int] = defaultdict(int)
    for size, frames in best_live.values():
        pieces[_frame_piece(frames)] += size
    allocated_now = sum(b["size"] for seg in snapshot.get("segments", []) for b in seg.get("blocks", [])
                        if b.get("state") == "active_allocated")
    return {"tracked_peak_bytes": best, "pieces": dict(pieces),
            "before_recording_bytes": allocated_now - total}
