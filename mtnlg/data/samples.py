"""Packed fixed-length training samples with split, shuffle and blend indices.

For one indexed dataset and one split (a contiguous range of its documents):
* ``doc_idx``: the split's documents, reshuffled for every epoch, repeated for
  as many epochs as ``num_samples`` needs;
* ``sample_idx[j]`` = (position in doc_idx, token offset) where sample j
  starts; sample j covers tokens [j*seq_len, j*seq_len + seq_len] of the
  concatenated stream (seq_len + 1 tokens, consecutive samples share one);
* ``shuffle_idx``: a permutation of the samples.
Blending several datasets interleaves them by weight (``blend_indices``).
Documents already end in EOD (written by preprocess), so packing needs no
separator. All indices are cached as .npy files keyed by a hash of their
inputs, written atomically and memory-mapped, so ``ds[k]`` is O(1): a few
NumPy slices, and resuming from sample k needs no replay.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

from mtnlg.data.indexed import IndexedDataset
from mtnlg.errors import UserError

INDEX_VERSION = 2
_SLACK = 1.005  # each blended dataset builds 0.5% more samples than its share (as Megatron)


def split_ranges(num_docs: int, split: tuple[float, float, float]) -> list[tuple[int, int]]:
    """Contiguous document ranges for train/valid/test by ratio."""
    if len(split) != 3 or any(r < 0 for r in split) or sum(split) <= 0:
        raise UserError(f"split must be three non-negative ratios with a positive sum, got {split}")
    total = float(sum(split))
    bounds = np.round(np.cumsum([0.0, *split]) / total * num_docs).astype(int)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


def blend_indices(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of sample k, index within that dataset) for k < num_samples.

    Dataset i places its j-th sample at (j + 0.5) / w_i; merging these
    positions keeps every prefix within one sample of its weighted share.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.ceil(w * num_samples * _SLACK).astype(np.int64) + 1
    positions = np.concatenate([(np.arange(c) + 0.5) / wi for c, wi in zip(counts, w) if wi > 0])
    owners = np.concatenate([np.full(c, i, dtype=np.int16) for i, (c, wi) in enumerate(zip(counts, w)) if wi > 0])
    order = np.argsort(positions, kind="stable")[:num_samples]
    dataset_index = owners[order]
    within = np.empty(num_samples, dtype=np.int64)
    for i in range(len(w)):
        mask = dataset_index == i
        within[mask] = np.arange(int(mask.sum()))
    return dataset_index, within


def _cache_dir(prefix: str, cache_dir: str | None) -> str:
    """``cache_dir`` if given (must be writable), else next to the dataset, else a temp folder."""
    if cache_dir:
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create cache directory {cache_dir!r}: {err}") from None
        if not os.access(cache_dir, os.W_OK):
            raise UserError(f"cache directory {cache_dir!r} is not writable")
        return cache_dir
    beside = os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")
    try:
        os.makedirs(beside, exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    fallback = os.path.join(tempfile.gettempdir(), "mtnlg-index-cache")
    os.makedirs(fallback, exist_ok=True)
    return fallback


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _cached(directory: str, key: dict, names: tuple[str, ...], build) -> list[np.ndarray]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    paths = [os.path.join(directory, f"{digest}_{name}.npy") for name in names]
    if all(os.path.isfile(p) for p in paths):
        try:
            return [np.load(p, mmap_mode="r") for p in paths]
        except (ValueError, OSError):
            pass  # unreadable cache entry: rebuild it
    arrays = build()
    for path, array in zip(paths, arrays):
        _save_atomic(path, array)
    return arrays


def _build_packed_indices(lengths: np.ndarray, first_doc: int, seq_len: int, num_samples: int,
                          seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices whose first k entries do not depend on ``num_samples`` (for any
    k <= num_samples): documents are permuted per epoch from one stream, and
    samples are shuffled in fixed blocks of one epoch's worth, each block from
    its own seed.  So extending a run (more steps, hence more samples) keeps
    the order of every sample already planned."""
    tokens_per_epoch = int(lengths.sum())
    block = max(1, tokens_per_epoch // seq_len)  # samples per shuffle block
    n_blocks = -(-num_samples // block)
    built = n_blocks * block  # whole blocks, so the last one is a full permutation
    epochs = max(1, -(-(built * seq_len + 1) // tokens_per_epoch))
    doc_rng = np.random.default_rng([seed, INDEX_VERSION, 0])
    docs = np.arange(first_doc, first_doc + len(lengths), dtype=np.int64)
    doc_idx = np.concatenate([doc_rng.permutation(docs) for _ in range(epochs)])
    ends = np.cumsum(lengths[doc_idx - first_doc])
    starts = np.arange(built + 1, dtype=np.int64) * seq_len
    pos = np.searchsorted(ends, starts, side="right")
    offset = starts - (ends[pos] - lengths[doc_idx[pos] - first_doc])
    sample_idx = np.stack([pos, offset], axis=1).astype(np.int64)
    shuffle_idx = np.concatenate([b * block + np.random.default_rng([seed, INDEX_VERSION, 1, b]).permutation(block)
                                  for b in range(n_blocks)])[:num_samples].astype(np.int64)
    return doc_idx, sample_idx, shuffle_idx


class PackedDataset:
    """Samples of seq_len + 1 tokens packed from one dataset's document range."""

    def __init__(self, data: IndexedDataset, doc_range: tuple[int, int], seq_len: int, num_samples: int,
                 seed: int, cache_dir: str):
        first, last = doc_range
        lengths = np.asarray(data.doc_lengths[first:last], dtype=np.int64)
        if lengths.sum() < seq_len + 1:
            raise UserError(f"dataset {data.prefix} has {int(lengths.sum())} tokens in documents "
                            f"{first}..{last}, fewer than one sample of seq_len+1 = {seq_len + 1}: "
                            "use more data, a shorter seq_len or different split ratios")
        self.data, self.seq_len, self.num_samples = data, seq_len, num_samples
        key = {"v": INDEX_VERSION, "prefix": os.path.abspath(data.prefix), "checksum": list(data.checksum),
               "range": [first, last], "seq_len": seq_len, "num_samples": num_samples, "seed": seed}
        self.doc_idx, self.sample_idx, self.shuffle_idx = _cached(
            cache_dir, key, ("doc", "sample", "shuffle"),
            lambda: _build_packed_indices(lengths, first, seq_len, num_samples, seed))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, k: int) -> np.ndarray:
        j = self.shuffle_idx[k]
        (p0, o0), (p1, o1) = self.sample_idx[j], self.sample_idx[j + 1]
        if p0 == p1:
            return self.data.get(self.doc_idx[p0], o0, o1 - o0 + 1).astype(np.int64)
        pieces = [self.data.get(self.doc_idx[p0], o0)]
        pieces += [self.data[self.doc_idx[p]] for p in range(p0 + 1, p1)]
        pieces.append(self.data.get(self.doc_idx[p1], 0, o1 + 1))
        return np.concatenate(pieces).astype(np.int64)


class SampleDataset:
    """A (possibly blended) split: ``len()`` samples, ``ds[k]`` -> int64[seq_len + 1]."""

    def __init__(self, parts: list[PackedDataset], dataset_index: np.ndarray, within: np.ndarray,
                 seq_len: int):
        self.parts, self.dataset_index, self.within, self.seq_len = parts, dataset_index, within, seq_len

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self):
            raise IndexError(f"sample {k} out of range for {len(self)} samples")
        return self.parts[self.dataset_index[k]][self.within[k]]

    @classmethod
    def empty(cls, seq_len: int) -> "SampleDataset":
        return cls([], np.zeros(0, np.int16), np.zeros(0, np.int64), seq_len)


def build_datasets(blend: list[tuple[float, str]], split: tuple[float, float, float], seq_len: int, seed: int,
                   num_samples: tuple[int, int, int], cache_dir: str | None = None,
                   ) -> tuple[SampleDataset, SampleDataset, SampleDataset]:
    """Train, valid and test sample datasets blended from ``(weight, prefix)`` pairs."""
    if not blend:
        raise UserError("the data blend is empty: give at least one (weight, prefix)")
    if any(w < 0 for w, _ in blend) or sum(w for w, _ in blend) <= 0:
        raise UserError(f"blend weights must be non-negative with a positive sum, got {[w for w, _ in blend]}")
    if seq_len < 1:
        raise UserError(f"seq_len must be positive, got {seq_len}")
    datasets = [IndexedDataset(prefix) for _, prefix in blend]
    weights = [w for w, _ in blend]
    result = []
    for s, name in enumerate(("train", "valid", "test")):
        if split[s] == 0 or num_samples[s] == 0:
            result.append(SampleDataset.empty(seq_len))
            continue
        key = {"v": INDEX_VERSION, "weights": weights, "num_samples": num_samples[s]}
        dataset_index, within = _cached(_cache_dir(blend[0][1], cache_dir), key, ("blend", "blend_within"),
                                        lambda n=num_samples[s]: blend_indices(weights, n))
        parts = []
        for i, ((weight, prefix), data) in enumerate(zip(blend, datasets)):
            doc_range = split_ranges(len(data), split)[s]
            if doc_range[0] == doc_range[1] and weight > 0:
                raise UserError(f"dataset {prefix} has {len(data)} documents: too few for a {name} split "
                                f"of ratio {split[s]} (split {split})")
            need = int((dataset_index == i).sum())
            parts.append(PackedDataset(data, doc_range, seq_len, need, seed + 1000 * s + i,
                                       _cache_dir(prefix, cache_dir)) if need else None)
        result.append(SampleDataset(parts, dataset_index, within, seq_len))
    return tuple(result)


def split_capacity(blend: list[tuple[float, str]], split: tuple[float, float, float], seq_len: int,
                   index: int) -> int:
    """How many blended samples split ``index`` (0 train, 1 valid, 2 test) yields before
    any dataset repeats a sample: one epoch of packed samples of each dataset, in the
    blend's proportions.  Evaluating "the whole split" means scoring this many."""
    caps, weights = [], [float(w) for w, _ in blend]
    for weight, prefix in blend:
        data = IndexedDataset(prefix, verify=False)
        first, last = split_ranges(len(data), split)[index]
        tokens = int(np.asarray(data.doc_lengths[first:last]).sum())
        caps.append(max(0, (tokens - 1) // seq_len) if weight > 0 else None)
    used = [(c, w) for c, w in zip(caps, weights) if c is not None]
    if not used or min(c for c, _ in used) == 0:
        return 0
    if len(used) == 1:
        return used[0][0]

    def fits(n: int) -> bool:
        owners, _ = blend_indices(weights, n)
        return all(cap is None or int((owners == i).sum()) <= cap for i, cap in enumerate(caps))
    total = sum(weights)
    lo, hi = 0, int(min(cap * total / w for cap, w in used)) + 2
    while lo < hi:  # largest n that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
