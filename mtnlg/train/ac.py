"""Activation checkpointing, applied to a built model from outside.

Each transformer block's forward is wrapped in non-reentrant
``torch.utils.checkpoint``: activations inside the block are dropped after
forward and recomputed in backward (RNG state preserved, so dropout masks
match).  Wrapping the bound ``forward`` instead of the module keeps parameter
names unchanged, so checkpoints and gradient comparisons line up with the
unwrapped model.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    for block in model.blocks.values():
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
    return model
