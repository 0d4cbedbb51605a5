"""Distributed fuzzy deduplication: band buckets -> verified edges -> union-find.

* Bucket entries (written by each prepare task): for every document, one entry
  per LSH band, ``(key, gid, idx, band)``, where ``key`` is a 64-bit hash of the
  band's rows mixed with the band number, plus one entry for its exact hash
  (``band == bands``). The entry goes to the bucket task ``key % dedup_tasks``:
  each bucket task owns one slice of the bucket space and sees every document
  that falls in its buckets, from every prepare task.
* Bucket task: sorts its entries by (band, key, gid); documents sharing a
  bucket are candidates. Within a bucket, in global order, a document is
  compared with the bucket's representatives so far (signature estimate of
  Jaccard, fetched from the prepare tasks' signature files by memory map): if
  one is >= threshold it gets an edge to each such representative, else it
  becomes a representative. Exact buckets compare the full 16-byte hashes.
  An exact band match alone never makes an edge, as in the local deduplicator.
* Cluster task: union-find over all edges (vectorized: hook the larger root
  under the smaller, compress paths, repeat); documents are numbered in
  global order, so each cluster's root is its first-seen document, which is
  kept; every other member is removed. A removed document counts as an exact
  duplicate when its exact hash equals its root's, else as fuzzy (as the local
  pipeline counts). This task holds edges (17 bytes per verified duplicate),
  never signatures.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from datatrove.pipeline.base import PipelineStep

from mtnlg.data.dedup import _splitmix64
from mtnlg.data.engine.options import EngineSettings
from mtnlg.data.engine.steps import fresh_tmp_dir, maybe_fail, part_dir, peak_rss_mb, replace_dir

ENTRY = np.dtype([("key", "<u8"), ("gid", "<i8"), ("idx", "<u4"), ("band", "<u2")])
EDGE = np.dtype([("dup", "<i8"), ("rep", "<i8"), ("exact", "u1")])


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n, bands] uint64 keys: equal exactly when all ``rows`` minima of that band are equal (up to 2^-64)."""
    n = signatures.shape[0]
    keys = np.empty((n, bands), dtype=np.uint64)
    sig = signatures.astype(np.uint64).reshape(n, bands, rows)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(n, _splitmix64(np.array([b + 1], dtype=np.uint64))[0], dtype=np.uint64)
            for r in range(rows):
                h = _splitmix64(h ^ sig[:, b, r])
            keys[:, b] = h
    return keys


def bucket_entries(gids: np.ndarray, hashes: np.ndarray, sigs: np.ndarray, first_idx: int,
                   s: EngineSettings) -> dict[int, np.ndarray]:
    """Entries of a block of documents, grouped by the bucket task that owns them."""
    n = len(gids)
    columns = [hashes[:, :8].copy().view("<u8").reshape(n, 1)]
    if s.dedup == "fuzzy":
        columns.insert(0, band_keys(sigs, s.minhash.bands, s.minhash.rows))
    keys = np.concatenate(columns, axis=1)
    bands = np.arange(keys.shape[1], dtype=np.uint16)
    if s.dedup != "fuzzy":
        bands = np.array([s.minhash.bands], dtype=np.uint16)
    entries = np.empty(keys.size, dtype=ENTRY)
    entries["key"] = keys.ravel()
    entries["gid"] = np.repeat(gids, keys.shape[1])
    entries["idx"] = np.repeat(np.arange(first_idx, first_idx + n, dtype=np.uint32), keys.shape[1])
    entries["band"] = np.tile(bands, n)
    owner = entries["key"] % np.uint64(s.dedup_tasks)
    return {int(k): entries[owner == k] for k in np.unique(owner)}


class _Parts:
    """Lazily memory-maps each prepare task's hash and signature files."""

    def __init__(self, s: EngineSettings):
        self.s, self.hashes, self.sigs = s, {}, {}

    def _map(self, rank: int, name: str, width: int, dtype) -> np.ndarray:
        path = os.path.join(part_dir(self.s.work_dir, rank), name)
        if not os.path.getsize(path):
            return np.zeros((0, width), dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r").reshape(-1, width)

    def hash(self, rank: int, idx: np.ndarray) -> np.ndarray:
        if rank not in self.hashes:
            self.hashes[rank] = self._map(rank, "hash.bin", 16, np.uint8)
        return self.hashes[rank][idx]

    def signature(self, rank: int, idx) -> np.ndarray:
        if rank not in self.sigs:
            self.sigs[rank] = self._map(rank, "signature.bin", self.s.minhash.num_perm, np.uint32)
        return self.sigs[rank][idx]


def _group_edges(group: np.ndarray, tasks: np.ndarray, exact: bool, parts: _Parts, threshold: float,
                 counts: dict) -> list[tuple[int, int, int]]:
    rows = [parts.hash(int(t), int(i)) if exact else parts.signature(int(t), int(i))
            for t, i in zip(tasks, group["idx"])]
    gids = group["gid"]
    edges = []
    reps: list[int] = [0]
    for m in range(1, len(group)):
        if exact:
            match = [r for r in reps if np.array_equal(rows[r], rows[m])]
        else:
            sims = (np.stack([rows[r] for r in reps]) == rows[m]).mean(axis=1)
            match = [r for r, sim in zip(reps, sims) if sim >= threshold]
        counts["candidates"] += len(reps)
        if match:
            edges += [(int(gids[m]), int(gids[r]), int(exact)) for r in match]
        else:
            counts["rejected"] += 1
            reps.append(m)
    return edges


def find_edges(s: EngineSettings, owner: int) -> tuple[np.ndarray, dict]:
    """Verified duplicate edges among the documents in bucket task ``owner``'s buckets."""
    blocks, tasks = [], []
    for rank in range(s.tasks):
        path = os.path.join(part_dir(s.work_dir, rank), f"buckets-{owner:05d}.bin")
        if os.path.exists(path):
            blocks.append(np.fromfile(path, dtype=ENTRY))
            tasks.append(np.full(len(blocks[-1]), rank, dtype=np.uint32))
    counts = {"entries": 0, "buckets_with_candidates": 0, "candidates": 0, "rejected": 0}
    if not blocks:
        return np.zeros(0, dtype=EDGE), counts
    entries, task = np.concatenate(blocks), np.concatenate(tasks)
    order = np.lexsort((entries["gid"], entries["key"], entries["band"]))
    entries, task = entries[order], task[order]
    counts["entries"] = len(entries)
    change = np.flatnonzero((entries["key"][1:] != entries["key"][:-1]) | (entries["band"][1:] != entries["band"][:-1]))
    starts, ends = np.concatenate([[0], change + 1]), np.concatenate([change + 1, [len(entries)]])
    parts, edges = _Parts(s), []
    for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        counts["buckets_with_candidates"] += 1
        exact = int(entries["band"][start]) == s.minhash.bands
        edges += _group_edges(entries[start:end], task[start:end], exact, parts, s.minhash.threshold, counts)
    return np.array(edges, dtype=EDGE), counts


def union_find_roots(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Root of each of ``n`` nodes given edges (u, v): the smallest node index of its connected component."""
    parent = np.arange(n, dtype=np.int64)
    while True:
        pu, pv = parent[u], parent[v]
        lo, hi = np.minimum(pu, pv), np.maximum(pu, pv)
        differ = lo != hi
        if not differ.any():
            return parent
        np.minimum.at(parent, hi[differ], lo[differ])  # hook roots under smaller ones
        while True:  # path compression until every node points at a root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def cluster(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Removed global ids (sorted) and whether each is an exact duplicate of its cluster's kept document."""
    if not len(edges):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    nodes, inverse = np.unique(np.concatenate([edges["dup"], edges["rep"]]), return_inverse=True)
    u, v = inverse[: len(edges)], inverse[len(edges):]
    root = union_find_roots(u, v, len(nodes))
    removed = np.flatnonzero(root != np.arange(len(nodes)))
    exact_nodes = u[(edges["exact"] == 1) & (root[u] == v)]
    return nodes[removed], np.isin(removed, exact_nodes)


def _save_atomic(path: str, array: np.ndarray) -> None:
    from mtnlg.io import atomic_open

    with atomic_open(path, "wb") as f:
        np.save(f, array)


class BucketStep(PipelineStep):
    type = "mtnlg"
    name = "band buckets + Jaccard verification"

    def __init__(self, settings: EngineSettings):
        super().__init__()
        self.settings = settings

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        t0 = time.process_time()
        edges, counts = find_edges(self.settings, rank)
        maybe_fail(self.settings.fault, "buckets", rank, 0)
        folder = os.path.join(self.settings.work_dir, "buckets")
        os.makedirs(folder, exist_ok=True)
        counts["seconds"] = time.process_time() - t0
        counts["peak_rss_mb"] = peak_rss_mb()
        _save_atomic(os.path.join(folder, f"edges-{rank:05d}.npy"), edges)
        with open(os.path.join(folder, f"counts-{rank:05d}.json"), "w") as f:
            json.dump(counts, f)
        for key in ("candidates", "rejected"):
            self.stat_update(key, value=counts[key])
        return iter(())


class ClusterStep(PipelineStep):
    type = "mtnlg"
    name = "union-find clusters, first seen kept"

    def __init__(self, settings: EngineSettings):
        super().__init__()
        self.settings = settings

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        s = self.settings
        t0 = time.process_time()
        folder = os.path.join(s.work_dir, "buckets")
        edges = np.concatenate([np.load(os.path.join(folder, f"edges-{k:05d}.npy")) for k in range(s.dedup_tasks)])
        removed, exact = cluster(edges)
        final = os.path.join(s.work_dir, "cluster")
        tmp = fresh_tmp_dir(final)
        owner = np.array(s.task_of_file(), dtype=np.int64)[removed >> 32] if len(removed) else removed
        for task in range(s.tasks):
            np.save(os.path.join(tmp, f"removed-{task:05d}.npy"), removed[owner == task])
        counts = {"edges": len(edges), "exact_duplicates": int(exact.sum()),
                  "fuzzy_duplicates": int(len(removed) - exact.sum()), "seconds": time.process_time() - t0,
                  "peak_rss_mb": peak_rss_mb()}
        for k in range(s.dedup_tasks):
            with open(os.path.join(folder, f"counts-{k:05d}.json")) as f:
                for key, value in json.load(f).items():
                    merge = max if key == "peak_rss_mb" else (lambda a, b: a + b)
                    counts[f"bucket_{key}"] = merge(counts.get(f"bucket_{key}", 0), value)
        with open(os.path.join(tmp, "counts.json"), "w") as f:
            json.dump(counts, f)
        replace_dir(tmp, final)
        return iter(())
