"""The MLP of every decoder layer over the sequence in chunks of N tokens (`train --mlp-chunk N`, after the
Mini-Sequence Transformer, arXiv:2407.15892).

A decoder layer's MLP is position-wise, and its intermediates (gate, up, their activation and product, each
intermediate_size wide: 3.5x the hidden size in Mistral) are the largest tensors a layer keeps for backward. Each
chunk runs under its own activation checkpoint, so what the backward pass holds of a layer's MLP is the chunk inputs
(views of the layer's input) and, while one chunk's gradient is computed, that chunk's intermediates. The price is
one more forward of each MLP chunk, in the backward pass. Under --gradient-checkpointing the layer's recompute runs
the same chunked MLP, so the recompute stays chunked. The LM head is already computed in slices bounded in bytes
(dpo/model/head.py), whatever this option says.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils.checkpoint

from logitstore.errors import LogitstoreError


def _chunked(forward: Callable[[torch.Tensor], torch.Tensor], tokens: int) -> Callable[..., torch.Tensor]:
    def chunked_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() < 2 or x.shape[-2] <= tokens or args or kwargs:
            return forward(x, *args, **kwargs)
        pieces = []
        for start in range(0, x.shape[-2], tokens):
            piece = x[..., start:start + tokens, :]
            if torch.is_grad_enabled():
                pieces.append(torch.utils.checkpoint.checkpoint(forward, piece, use_reentrant=False))
            else:
                pieces.append(forward(piece))
        return torch.cat(pieces, dim=-2)

    return chunked_forward


def chunk_mlps(model: Any, tokens: int) -> int:
    """Make every decoder layer's MLP (a module named `mlp`) run in chunks of `tokens` positions; returns how many.
    Refuses a model without such modules in one line."""
    count = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "mlp" and isinstance(module, torch.nn.Module):
            module.forward = _chunked(module.forward, tokens)
            count += 1
    if count == 0:
        raise LogitstoreError(f"--mlp-chunk: {type(model).__name__} has no MLP modules named 'mlp' to chunk; "
                              "train without --mlp-chunk")
    return count
