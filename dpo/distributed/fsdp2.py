"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for full fine-tuning: which modules are its units, mixed precision
on a GPU, and on CPU (gloo) a gradient reduction without a second copy of each unit's gradients."""

from __future__ import annotations

from typing import Any

from .group import DistributedSetupError


def shard(scorer: Any, model: Any, *, dtype: str, device: Any) -> None:
    """Shard `model` (inside `scorer`, the root) in place: every rank keeps 1/world of each weight."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # On a GPU, parameters are gathered and computed in the model's dtype, gradients reduced in float32; on a CPU
    # (gloo) in float32 as in one process.
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    # Units: each decoder layer, and the input embeddings and the LM head on their own (at a 32k vocabulary they
    # hold half of a small model: in the root unit they would stay gathered for the whole step).
    units = decoder_layers(model)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = head is not None and head.weight is not embeddings.weight  # tied ones stay together in the root
    if untied:
        units += [embeddings, head]
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    if untied:
        # An embedding's backward needs only the token ids, never its weight: no all-gather of the vocabulary-sized
        # table (and no buffer for it) at the end of the backward pass, where memory peaks.
        embeddings.set_unshard_in_backward(False)
    fully_shard(scorer, mp_policy=mp)  # the root: what is left (the final norm)
    if device.type == "cpu":
        for unit in (*units, scorer):
            unit.set_custom_reduce_scatter(CpuReduceScatter())


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks transformers itself never splits across devices (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedSetupError(f"{type(model).__name__} names no decoder layer class (_no_split_modules), so "
                                    "it cannot be sharded per layer; train it with LoRA, or in one process")
    return layers


class CpuReduceScatter:
    """FSDP2's gradient reduce-scatter on gloo (CPU), at the memory it must have and no more.

    - gloo's reduce_scatter_tensor clones its whole input before reducing it (measured: +94 MiB of peak for the
      98 MB gradient of a 32k x 768 embedding), on top of FSDP2's own flat input buffer, at the end of the backward
      pass where memory peaks. An in-place all-reduce of that buffer, then this rank's chunk copied out, moves the
      same data and computes the same sums (and the same average) with no clone.
    - FSDP2 calls this as each unit's backward ends, just after that unit's activations were freed: glibc keeps
      freed blocks below its mmap threshold resident in the heap, while the gradient buffers that follow are fresh
      mappings, so the heap's free pages are handed back first (:func:`release_free_heap`; measured: the peak RSS
      of a rank about 150 MiB lower on a 4 x 768 model, see docs/scaling.md).

    NCCL keeps its own reduce-scatter: this is set for CPU runs only.
    """

    def allocate(self, size: Any, *, dtype: Any, device: Any) -> Any:
        import torch

        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Any, input_tensor: Any, group: Any, op: Any, async_op: bool = False) -> Any:
        import torch.distributed as dist

        release_free_heap()
        average = op == dist.ReduceOp.AVG
        if not (average or op == dist.ReduceOp.SUM):  # a pre-multiplied sum (a custom divide factor): gloo's own
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        dist.all_reduce(input_tensor, op=dist.ReduceOp.SUM, group=group)
        mine = input_tensor.view(group.size(), -1)[group.rank()]
        if average:
            mine.div_(group.size())
        output_tensor.copy_(mine)
        return None


_LIBC: Any = None


def release_free_heap() -> None:
    """Hand the pages of freed heap blocks back to the system (glibc's malloc_trim); a no-op without glibc."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc.malloc_trim if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC(0)
