"""A key/value cache of independent sequence slots for continuous batching.

The serving engine keeps up to ``slots`` sequences alive at once, each at its
own length.  Every step it runs one forward over the step's tokens *packed*
into a single row of N tokens: sequence r contributes ``lengths[r]``
consecutive tokens (1 when decoding, a prompt chunk when prefilling) at
positions ``positions[...]``, and owns cache slot ``rows[r]``.  Everything
position-wise (embeddings, QKV/MLP projections, LayerNorms, the output head)
then runs on exactly N tokens, with no padding however mixed the step is.

Only attention needs the sequences apart.  :meth:`SlotKVCache.attend`
(called by every attention layer, see ``KVCache.attend``)

1. scatters the N new keys/values into their slots at their positions;
2. regroups the queries into a padded (R, T_max) batch, one row per
   sequence, and gathers those sequences' slots (R, H, span, D) — a view,
   without copying, when the slots are consecutive;
3. runs attention with a mask that lets a query at position p see its own
   slot's keys 0..p, and packs the outputs back into the single row.

Padding queries are discarded and never written, and no query sees past its
own position, so a slot needs no clearing when a new sequence takes it over:
positions 0..p are always rewritten before they are read.

Shapes: buffers (slots, H_local, max_len, D) per layer, allocated on first use
with the head count the layer hands in, so tensor-parallel ranks (which hold
H/tp heads) use the same code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SlotKVCache:
    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def plan(self, rows: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> None:
        """Describe the next forward: ``rows`` (R,) slot of each sequence,
        ``positions`` (N,) position of every packed token, ``lengths`` (R,)
        tokens per sequence (>= 1; sequence r's tokens follow sequence r-1's)."""
        R, dev = rows.shape[0], rows.device
        T = int(lengths.max())
        starts = torch.cumsum(lengths, 0) - lengths                       # offset of each sequence's first token
        t = torch.arange(T, device=dev)
        valid = t[None, :] < lengths[:, None]                             # (R, T)
        # packed index of every padded (r, t) cell; padding repeats the sequence's last token
        self._gather = starts[:, None] + torch.minimum(t[None, :], lengths[:, None] - 1)
        self._valid = valid
        self._token_slot = torch.repeat_interleave(rows, lengths)         # (N,)
        self._token_pos = positions
        qpos = positions[self._gather]                                    # (R, T) query positions
        span = int(positions.max()) + 1                                   # keys beyond the furthest query are unused
        self._mask = torch.arange(span, device=dev)[None, None, None, :] <= qpos[:, None, :, None]  # (R,1,T,span)
        self._span = span
        first = int(rows[0])
        contiguous = bool((rows == torch.arange(first, first + R, device=dev)).all())
        self._rows = slice(first, first + R) if contiguous else rows

    def attend(self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start) -> torch.Tensor:
        """q, k, v: (1, H, N, D) for the packed tokens; returns (1, H, N, D)."""
        _, H, N, D = k.shape
        if layer not in self.keys:
            self.keys[layer] = k.new_zeros(self.slots, H, self.max_len, D)
            self.values[layer] = v.new_zeros(self.slots, H, self.max_len, D)
        kbuf, vbuf = self.keys[layer], self.values[layer]
        kbuf[self._token_slot, :, self._token_pos] = k[0].transpose(0, 1)  # (N, H, D) into (slot, :, pos)
        vbuf[self._token_slot, :, self._token_pos] = v[0].transpose(0, 1)
        keys, values = kbuf[self._rows, :, :self._span], vbuf[self._rows, :, :self._span]  # (R, H, span, D)
        qpad = q[0][:, self._gather].transpose(0, 1)                       # (H, R, T, D) -> (R, H, T, D)
        y = F.scaled_dot_product_attention(qpad, keys, values, attn_mask=self._mask)
        return y.transpose(0, 1)[:, self._valid][None]                     # (1, H, N, D), packed order

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))
