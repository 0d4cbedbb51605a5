"""Exact and fuzzy (MinHash + LSH) deduplication, vectorized with NumPy.

Design (docs/data.md has the measurements):
* Exact: BLAKE2b-128 of the text lower-cased with whitespace collapsed.
* Fuzzy: Jaccard similarity of the sets of 5-character shingles (the shingle
  Megatron's public dedup tools use). A signature is ``num_perm`` minima of
  multiply-shift hashes of the shingles, computed with NumPy over all shingles
  at once. Candidates come from LSH banding (``bands`` x ``rows``) tuned for
  high recall well below the threshold; each candidate is then verified by the
  signature estimate of Jaccard >= ``threshold``, which restores precision.
* First seen wins: a document is dropped when it matches a document already
  kept. Signatures and hashes of kept documents can be saved next to a shard's
  output so a later merge deduplicates across shards (two-pass design).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

SHINGLE = 5
_SPACE = re.compile(r"\s+")
_MASK40 = np.uint64((1 << (8 * SHINGLE)) - 1)


def canonical(text: str) -> str:
    """The text both dedup stages compare: lower-cased, whitespace collapsed."""
    return _SPACE.sub(" ", text.lower()).strip()


def exact_hash(text: str) -> bytes:
    return hashlib.blake2b(canonical(text).encode("utf-8"), digest_size=16).digest()


@dataclass(frozen=True)
class MinHashParams:
    threshold: float = 0.8
    bands: int = 20
    rows: int = 5
    seed: int = 1

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, 2**63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)
        return a, b


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def shingle_ids(text: str) -> np.ndarray:
    """Distinct 5-byte shingles of the canonical UTF-8 text, as mixed uint64 ids."""
    return _mixed_shingles(canonical(text).encode("utf-8"))


def _mixed_shingles(raw: bytes) -> np.ndarray:
    data = np.frombuffer(raw, dtype=np.uint8).astype(np.uint64)
    if data.size < SHINGLE:
        data = np.concatenate([data, np.zeros(SHINGLE - data.size, dtype=np.uint64)])
    n = data.size - SHINGLE + 1
    ids = np.zeros(n, dtype=np.uint64)
    for k in range(SHINGLE):  # exact 40-bit packing of the 5 bytes: no collisions
        ids |= data[k : k + n] << np.uint64(8 * k)
    return _splitmix64(np.unique(ids & _MASK40))


class MinHasher:
    """Computes ``num_perm`` uint32 minima of h_i(x) = (a_i x + b_i) >> 32 (mod 2^64)."""

    def __init__(self, params: MinHashParams, block: int = 2048, window: int = 1 << 18):
        self.params = params
        a, b = params.coefficients()
        self.a, self.b = a[:, None], b[:, None]
        self.block = block
        self.window = window  # shingles hashed per pass: bounds memory (~50 bytes each) for huge documents

    def signature(self, text: str) -> np.ndarray:
        data = canonical(text).encode("utf-8")
        sig = np.full(self.params.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            # minima over windows of shingles = minima over all of them (a shingle seen twice changes nothing)
            for first in range(0, max(len(data) - SHINGLE + 1, 1), self.window):
                ids = _mixed_shingles(data[first : first + self.window + SHINGLE - 1])
                for start in range(0, ids.size, self.block):
                    chunk = ids[None, start : start + self.block]
                    np.minimum(sig, (chunk * self.a + self.b).min(axis=1), out=sig)
        return (sig >> np.uint64(32)).astype(np.uint32)


class Deduplicator:
    """Streaming first-seen-wins dedup over exact hashes and/or MinHash signatures.

    ``check(hash, signature)`` returns ``None`` for a document to keep (and
    remembers it) or ``"exact"`` / ``"fuzzy"`` for a duplicate.
    """

    def __init__(self, mode: str, params: MinHashParams | None = None):
        if mode not in ("none", "exact", "fuzzy"):
            raise ValueError(f"dedup mode must be none, exact or fuzzy, not {mode!r}")
        self.mode = mode
        self.params = params or MinHashParams()
        self._hashes: set[bytes] = set()
        self._bands: list[dict[bytes, list[int]]] = [{} for _ in range(self.params.bands)]
        self._signatures = np.zeros((1024, self.params.num_perm), dtype=np.uint32)
        self._count = 0

    def _similar(self, sig: np.ndarray) -> bool:
        p = self.params
        candidates: set[int] = set()
        keys = [sig[i * p.rows : (i + 1) * p.rows].tobytes() for i in range(p.bands)]
        for band, key in zip(self._bands, keys):
            candidates.update(band.get(key, ()))
        if candidates:
            rows = self._signatures[np.fromiter(candidates, dtype=np.int64)]
            if (rows == sig).mean(axis=1).max() >= p.threshold:
                return True
        if self._count == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.zeros_like(self._signatures)])
        self._signatures[self._count] = sig
        for band, key in zip(self._bands, keys):
            band.setdefault(key, []).append(self._count)
        self._count += 1
        return False

    def check(self, digest: bytes | None, signature: np.ndarray | None) -> str | None:
        if self.mode == "none":
            return None
        if digest in self._hashes:
            return "exact"
        if self.mode == "fuzzy" and self._similar(signature):
            return "fuzzy"
        self._hashes.add(digest)
        return None
