"""Initialise this rank's shards of a model built on the meta device.

After ``to_empty`` every parameter is uninitialised memory: a plain tensor
(whole), or a DTensor whose local piece is a shard of a larger tensor
(tensor parallelism, ZeRO/FSDP, or both).  ``init_local_shards`` asks the
model how each parameter starts (``GPT.init_rule``) and fills only the local
piece with the values the whole tensor would have (``mtnlg.model.init``):
no rank ever holds the full model, and every layout (one process, tp, pp,
dp, zero) starts from the same weights.  The last pipeline stage's copy of
the tied embedding (``lm_head.weight``) draws from ``tok_emb.weight``'s
stream, so both ends start equal.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from mtnlg.model.init import fill_normal_slice


def local_piece(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, full shape, offset of the local piece in the full tensor)."""
    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if tuple(shape) != tuple(local.shape):
            raise RuntimeError(f"local shard of shape {tuple(local.shape)} does not match the placement's "
                               f"{tuple(shape)}")
        return local, tuple(p.shape), tuple(offset)
    return p, tuple(p.shape), (0,) * p.ndim


@torch.no_grad()
def init_local_shards(model: nn.Module, seed: int, rule=None) -> None:
    """Fill every parameter's local piece by ``rule(name) -> (kind, std, key)``
    (default: ``model.init_rule``), keyed by ``seed``.  Buffers are left alone."""
    rule = rule or model.init_rule
    for name, p in model.named_parameters():
        local, full_shape, offset = local_piece(p)
        kind, std, key = rule(name)
        if kind == "normal":
            fill_normal_slice(local, seed, key, std, full_shape, offset)
        else:
            local.fill_(1.0 if kind == "ones" else 0.0)
