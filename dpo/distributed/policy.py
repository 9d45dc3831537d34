"""The policy as the trainer sees it in a distributed run: one module whose forward is `token_logps`, wrapped by
DDP (a LoRA adapter) or sharded by FSDP2 (every weight); in one process, the model itself.

Both engines hook the module that is called, and `token_logps` calls the backbone and the LM head separately, so
the trainer scores every batch through :func:`score` and the :class:`_Scorer` around the model.
"""

from __future__ import annotations

from typing import Any

from .group import is_distributed, is_wrapped


def _scorer_class() -> type:
    import torch

    from ..model.scoring import token_logps

    class _Scorer(torch.nn.Module):
        """The policy as one module whose forward is `token_logps` (what DDP and FSDP2 hook)."""

        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, completion_mask: Any, sum_sq: bool = False,
                    teacher: Any = None) -> Any:
            t = token_logps(self.model, input_ids, attention_mask, completion_mask, sum_sq=sum_sq, teacher=teacher)
            return t.per_token, t.scored, t.log_sum_sq, t.divergence

    return _Scorer


def score(policy: Any, input_ids: Any, attention_mask: Any, completion_mask: Any, *, sum_sq: bool = False,
          teacher: Any = None, split: bool = False) -> Any:
    """`token_logps` through the wrapped policy where there is one, else on the model itself; `split`
    (--split-sequences, one process only): one sequence at a time (dpo/model/split_rows.py)."""
    from ..model.scoring import TokenLogps, token_logps

    if split:
        from ..model.split_rows import split_token_logps

        return split_token_logps(policy, input_ids, attention_mask, completion_mask, sum_sq=sum_sq, teacher=teacher)
    if is_wrapped(policy):
        return TokenLogps(*policy(input_ids, attention_mask, completion_mask, sum_sq, teacher))
    return token_logps(policy, input_ids, attention_mask, completion_mask, sum_sq=sum_sq, teacher=teacher)


def wrap_policy(model: Any, *, lora: bool, dtype: str, device: Any, weights_from: Any = None) -> Any:
    """In a distributed run, the policy wrapped for its engine (FSDP2 for every weight, DDP for an adapter); in one
    process, the model itself. For DDP `model` is on `device`. For FSDP2 it is on the CPU, or with `weights_from`
    (a model folder) on the meta device from :func:`sharded_io.empty_model`, and each rank then reads only its
    shards."""
    import torch

    if not is_distributed():
        return model
    scorer = _scorer_class()(model)
    if lora:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        # Buffers (rotary tables) are computed identically on every rank: no broadcast before each forward, which
        # would make every forward a collective (evaluation's included). torch 2.13 renamed the switch (the old name
        # warns on every rank).
        import inspect

        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
        wrapped = DistributedDataParallel(scorer, device_ids=ids, **no_sync)
        wrapped._logitstore_engine = "ddp"
        return wrapped
    from . import fsdp2, sharded_io

    fsdp2.shard(scorer, model, dtype=dtype, device=device)
    if weights_from is not None:
        buffers = {name: b.clone() for name, b in scorer.named_buffers()}  # computed on the CPU, not meta
        scorer.to_empty(device=device)
        with torch.no_grad():
            for name, b in scorer.named_buffers():
                b.copy_(buffers[name])
        scorer._logitstore_engine = "fsdp2"
        sharded_io.load_shards(scorer, weights_from)
    scorer.to(device)  # only this rank's shards reach the device
    scorer._logitstore_engine = "fsdp2"
    return scorer


def accumulating(policy: Any, last: bool) -> Any:
    """Context for one micro-batch's forward and backward: under DDP, no all-reduce but on the step's last
    micro-batch (gradients accumulate locally, then one all-reduce averages their sums). FSDP2 reduce-scatters
    every micro-batch: skipping it would keep a whole unsharded gradient on every rank."""
    import contextlib

    if not last and getattr(policy, "_logitstore_engine", None) == "ddp":
        return policy.no_sync()
    return contextlib.nullcontext()


def grad_norm_value(norm: Any) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor over FSDP2's sharded gradients)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
