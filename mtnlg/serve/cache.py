"""A key/value cache of independent sequence slots for continuous batching.

The serving engine keeps up to ``slots`` sequences alive at once, each at its
own length.  Every step it runs one forward over a padded (B, T) batch whose
row b belongs to slot ``rows[b]`` and holds ``n_b`` real tokens (a decode step
has 1, a prefill chunk up to the step's token budget) at positions
``positions[b, :n_b]``; the rest of the row is padding.

Before the forward the engine calls :meth:`SlotKVCache.plan`; each attention
layer then calls :meth:`update` (scatter the real tokens' keys/values into
their slots, gather the rows' slots back) and :meth:`attn_mask` (a query at
position p sees its own slot's keys 0..p).  Padding tokens are never written
and no real query can see past its own position, so a slot needs no clearing
when a new sequence takes it over: positions 0..p are always rewritten before
they are read.

Shapes: buffers (slots, H_local, max_len, D) per layer, allocated on first use
with the head count the layer hands in, so tensor-parallel ranks (which hold
H/tp heads) use the same code.
"""
from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self._rows = self._mask = self._write = None
        self._span = 0

    def plan(self, rows: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> None:
        """Describe the next forward: ``rows`` (B,) slot of each row,
        ``positions`` (B, T) position of each token (padding repeats the row's
        last real position), ``lengths`` (B,) real tokens per row (>= 1)."""
        B, T = positions.shape
        valid = torch.arange(T, device=positions.device)[None, :] < lengths[:, None]
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        self._write = (b_idx, t_idx, rows[b_idx], positions[b_idx, t_idx])
        first = int(rows[0])
        # rows that are consecutive slots read their cache as a view instead of a gathered copy
        contiguous = bool((rows == torch.arange(first, first + B, device=rows.device)).all())
        self._rows = slice(first, first + B) if contiguous else rows
        self._span = int(positions.max()) + 1  # keys beyond the furthest query are never needed
        keys = torch.arange(self._span, device=positions.device)
        self._mask = (keys[None, None, None, :] <= positions[:, None, :, None])  # (B, 1, T, span)

    def update(self, layer: str, k: torch.Tensor, v: torch.Tensor, start) -> tuple[torch.Tensor, torch.Tensor]:
        _, H, _, D = k.shape
        if layer not in self.keys:
            self.keys[layer] = k.new_zeros(self.slots, H, self.max_len, D)
            self.values[layer] = v.new_zeros(self.slots, H, self.max_len, D)
        kbuf, vbuf = self.keys[layer], self.values[layer]
        b_idx, t_idx, slot_idx, pos_idx = self._write
        kbuf[slot_idx, :, pos_idx] = k[b_idx, :, t_idx]
        vbuf[slot_idx, :, pos_idx] = v[b_idx, :, t_idx]
        return kbuf[self._rows, :, :self._span], vbuf[self._rows, :, :self._span]  # (B, H, span, D)

    def attn_mask(self, start, T: int, L: int, device: torch.device) -> torch.Tensor:
        return self._mask

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))
