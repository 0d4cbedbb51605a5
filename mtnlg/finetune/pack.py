"""Rows of fine-tuning examples for the trainer: packing, padding and masks.

A row holds ``row_len = seq_len + 1`` tokens (inputs are the first
``seq_len``, targets the last ``seq_len``).  With packing, examples are
placed into rows best-fit-decreasing (few padding tokens) and each token
carries the id of its example within the row; attention then stays inside
each example (``document_attention``: causal and same-example, positions
restarting at 0), so an example's logits are those it would get alone.
Without packing, each row holds one example padded at the end; plain causal
attention is already exact there (earlier tokens never see later padding),
so the model gets tokens only, which every parallel layout, pipeline
parallelism included, accepts.

A target counts (is not ``IGNORE_INDEX``) where the token is trained on
(the example's mask) and belongs to the same example as the token that
predicts it.  ``FinetuneDataset`` serves rows to ``mtnlg.train.Trainer``:
sample ``i`` of the stream is row ``perm_e[i mod R]`` of epoch
``e = i // R`` (a seeded permutation per epoch), so the data order is a pure
function of ``consumed_samples``, as the trainer's resume requires.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from mtnlg.finetune.data import Example
from mtnlg.train.trainer import IGNORE_INDEX

PAD_DOC = -1


@dataclass
class Rows:
    tokens: np.ndarray  # (R, row_len) int32
    doc: np.ndarray  # (R, row_len) int16/int32: example index within the row, PAD_DOC on padding
    train: np.ndarray  # (R, row_len) bool: token is a training target of its example

    def __len__(self) -> int:
        return len(self.tokens)

    def target_mask(self, index) -> np.ndarray:
        """(n, row_len - 1) bool: which targets of rows ``index`` carry loss."""
        doc = self.doc[index]
        return self.train[index][:, 1:] & (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] != PAD_DOC)


def assign_rows(lengths: list[int], row_len: int, pack: bool) -> list[list[int]]:
    """Example indices per row: best-fit decreasing when packing, else one each."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row) sorted: the tightest row that fits comes first
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = row_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n >= 2:  # a one-token example could not be learned from anyway
            bisect.insort(free, (space - n, r))
    return rows


def build_rows(examples: list[Example], row_len: int, pad_id: int, pack: bool) -> Rows:
    layout = assign_rows([len(e.ids) for e in examples], row_len, pack)
    R = len(layout)
    tokens = np.full((R, row_len), pad_id, dtype=np.int32)
    doc = np.full((R, row_len), PAD_DOC, dtype=np.int32)
    train = np.zeros((R, row_len), dtype=bool)
    for r, members in enumerate(layout):
        at = 0
        for j, i in enumerate(members):
            e = examples[i]
            n = len(e.ids)
            tokens[r, at:at + n], doc[r, at:at + n], train[r, at:at + n] = e.ids, j, e.mask
            at += n
    return Rows(tokens, doc, train)


def document_attention(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) restarting at 0 at each example, and the (B, 1, T, T)
    boolean attention mask letting a token see only earlier tokens of its own example
    (padding, one run of ``PAD_DOC``, sees itself the same way)."""
    B, T = doc.shape
    t = torch.arange(T, device=doc.device)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return t - first, ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class FinetuneDataset:
    """Rows as the trainer's sample stream (see the module doc)."""

    def __init__(self, rows: Rows, seed: int, shuffle: bool = True, document_mask: bool = True):
        self.rows, self.seed, self.shuffle, self.document_mask = rows, seed, shuffle, document_mask
        self._row_tokens = rows.target_mask(slice(None)).sum(axis=1).astype(np.int64)
        self._perm: dict[int, np.ndarray] = {}

    def __len__(self) -> int:  # rows per epoch; indices beyond it continue into later epochs
        return len(self.rows)

    def row(self, i: int) -> int:
        epoch, j = divmod(i, len(self.rows))
        if not self.shuffle:
            return j
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            self._perm[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return int(self._perm[epoch][j])

    def indices(self, first: int, count: int) -> np.ndarray:
        return np.array([self.row(i) for i in range(first, first + count)], dtype=np.int64)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rows.tokens[self.row(i)]

    def loss_tokens(self, first: int, count: int) -> int:
        """Targets that carry loss in samples ``[first, first + count)``."""
        return int(self._row_tokens[self.indices(first, count)].sum())

    def batch(self, first: int, count: int, device: torch.device):
        """(model inputs, targets) of samples ``[first, first + count)``: the
        inputs are a token tensor, or with packing the keyword arguments
        ``x``, ``start`` (per-token positions) and ``mask`` of ``GPT.forward``."""
        index = self.indices(first, count)
        tokens = torch.from_numpy(self.rows.tokens[index].astype(np.int64))
        keep = torch.from_numpy(self.rows.target_mask(index))
        targets = torch.where(keep, tokens[:, 1:], IGNORE_INDEX).to(device)
        x = tokens[:, :-1].to(device)
        if not self.document_mask:
            return x, targets
        positions, mask = document_attention(torch.from_numpy(self.rows.doc[index][:, :-1]).to(device))
        return {"x": x, "start": positions, "mask": mask}, targets
