"""Layout-independent initialisation: every value is a function of (seed, name, index).

A parameter's full tensor is cut along its first dimension into fixed blocks
of ``rows_per_block(shape)`` rows (about 64k elements); block ``b`` of
parameter ``key`` is drawn from its own generator, seeded by a hash of
``(seed, key, b)``.  Any piece of the tensor, e.g. one rank's shard under
tensor, pipeline or ZeRO sharding, is filled by drawing only the blocks it
overlaps and slicing them (``fill_normal_slice``), so the whole model never
exists in one process, yet every layout starts from the same weights.

The block size depends only on the size of one row (``shape[1:]``), not on
the number of rows, so a padded embedding table (``padded_vocab(tp)`` adds
rows at larger tp) has the same values in its real rows at every tp.

This file knows nothing about parallelism: a caller passes the full shape,
the offset of its piece and the piece itself.
"""
from __future__ import annotations

import hashlib
import math

import torch

BLOCK_ELEMS = 1 << 16


def rows_per_block(full_shape: tuple[int, ...]) -> int:
    return max(1, BLOCK_ELEMS // max(1, math.prod(full_shape[1:])))


def block_seed(seed: int, key: str, block: int) -> int:
    digest = hashlib.sha256(f"mtnlg-init/{seed}/{key}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def fill_normal_slice(out: torch.Tensor, seed: int, key: str, std: float, full_shape: tuple[int, ...],
                      offset: tuple[int, ...]) -> None:
    """Write into ``out`` the piece ``[offset : offset + out.shape]`` of the
    full ``N(0, std)`` tensor of shape ``full_shape`` keyed by ``(seed, key)``."""
    full_shape, offset = tuple(full_shape), tuple(offset)
    if out.numel() == 0:
        return
    if len(full_shape) == 0:
        full_shape, offset, out = (1,), (0,), out.view(1)
    rows = rows_per_block(full_shape)
    lo, hi = offset[0], offset[0] + out.shape[0]
    inner = tuple(slice(o, o + n) for o, n in zip(offset[1:], out.shape[1:]))
    gen = torch.Generator(device="cpu")
    for b in range(lo // rows, (hi - 1) // rows + 1):
        b_lo, b_hi = b * rows, min((b + 1) * rows, full_shape[0])
        gen.manual_seed(block_seed(seed, key, b))
        block = torch.randn((b_hi - b_lo, *full_shape[1:]), generator=gen, dtype=torch.float32)
        s_lo, s_hi = max(lo, b_lo), min(hi, b_hi)
        piece = block[(slice(s_lo - b_lo, s_hi - b_lo), *inner)].mul_(std)
        out[s_lo - lo:s_hi - lo].copy_(piece.to(device=out.device, dtype=out.dtype))
