"""The write stage: the kept documents of every part, in global order, into one PREFIX.bin/.idx.

Streaming: the header's counts are known up front from the parts' indexes, the
offsets and tokens are copied part by part (runs of kept documents as whole
slices), and the two CRCs are filled in at the end, so memory does not grow
with the corpus. The result is byte-identical to what ``IndexedDatasetWriter``
writes for the same documents (tested), and follows its durability rules:
temporary names, fsync, ``.bin`` renamed before ``.idx``, then the report.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections import Counter

import numpy as np
from datatrove.pipeline.base import PipelineStep

from mtnlg.data.clean import QualityFilter
from mtnlg.data.engine.options import EngineSettings
from mtnlg.data.engine.steps import part_dir, peak_rss_mb
from mtnlg.data.indexed import _HEADER, MAGIC, VERSION, IndexedDataset, _code
from mtnlg.data.tokenizer import Tokenizer

_CHUNK_DOCS = 1 << 16


def _runs(keep: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive True values."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def concat_parts(parts: list[tuple[IndexedDataset, np.ndarray]], output: str, vocab_size: int, eod_id: int,
                 fingerprint: bytes) -> tuple[int, int]:
    """Write the documents with ``keep`` true from each part, in order; returns (documents, tokens)."""
    dtype = parts[0][0].dtype if parts else np.dtype(np.uint16)
    num_docs = sum(int(keep.sum()) for _, keep in parts)
    num_tokens = sum(int(ds.doc_lengths[keep].sum()) for ds, keep in parts)
    head = _HEADER.pack(MAGIC, VERSION, _code(dtype), num_docs, num_tokens, vocab_size, eod_id, fingerprint, 0, 0)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    bin_tmp, idx_tmp = output + ".bin" + suffix, output + ".idx" + suffix
    try:
        bin_crc, body_crc, position = 0, zlib.crc32(head[:56]), 0
        with open(bin_tmp, "wb") as fbin, open(idx_tmp, "wb") as fidx:
            fidx.write(head)
            first = np.zeros(1, dtype=np.int64).tobytes()
            fidx.write(first)
            body_crc = zlib.crc32(first, body_crc)
            for ds, keep in parts:
                for start, end in _runs(keep):
                    for lo in range(start, end, _CHUNK_DOCS):
                        hi = min(end, lo + _CHUNK_DOCS)
                        data = ds.tokens[ds.offsets[lo]:ds.offsets[hi]].tobytes()
                        fbin.write(data)
                        bin_crc = zlib.crc32(data, bin_crc)
                        offsets = (position + np.cumsum(ds.doc_lengths[lo:hi])).astype(np.int64).tobytes()
                        fidx.write(offsets)
                        body_crc = zlib.crc32(offsets, body_crc)
                        position += int(ds.offsets[hi] - ds.offsets[lo])
            fidx.seek(56)
            fidx.write(struct.pack("<II", bin_crc, body_crc))
            for f in (fbin, fidx):
                f.flush()
                os.fsync(f.fileno())
        assert position == num_tokens
        os.replace(bin_tmp, output + ".bin")
        os.replace(idx_tmp, output + ".idx")
    except BaseException:
        for path in (bin_tmp, idx_tmp):
            if os.path.exists(path):
                os.remove(path)
        raise
    return num_docs, num_tokens


def _load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_report(s: EngineSettings, counters: list[dict], cluster: dict, documents: int, tokens: int,
                 tokenizer: Tokenizer, seconds: dict) -> dict:
    malformed, removed, stage = Counter(), Counter(), Counter()
    for c in counters:
        malformed.update(c["malformed_by_kind"])
        removed.update(c["removed_by_filter"])
        stage.update(c["stage_seconds"])
    stage.update(seconds)
    return {
        "documents_in": sum(c["documents_in"] for c in counters),
        "malformed": sum(malformed.values()),
        "malformed_by_kind": dict(malformed),
        "removed_by_filter": {name: removed.get(name, 0) for name in QualityFilter.ORDER},
        "exact_duplicates": cluster.get("exact_duplicates", 0),
        "fuzzy_duplicates": cluster.get("fuzzy_duplicates", 0),
        "documents_out": documents,
        "tokens_out": tokens,
        "bytes_in": sum(c["bytes_in"] for c in counters),
        "stage_seconds": {k: round(v, 3) for k, v in stage.items()},
        "inputs": s.files, "shard": "0/1", "dedup": s.dedup, "dedup_threshold": s.minhash.threshold,
        "filters": vars(s.filters),
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                      "fingerprint": tokenizer.fingerprint().hex()},
        "engine": {"tasks": s.tasks, "dedup_tasks": s.dedup_tasks, "work_dir": s.work_dir,
                   "malformed_by_task": [sum(c["malformed_by_kind"].values()) for c in counters],
                   "dedup": {k: v for k, v in cluster.items() if k.startswith("bucket_") or k == "edges"},
                   "peak_rss_mb": {"prepare": max((c["peak_rss_mb"] for c in counters), default=0),
                                   "buckets": cluster.get("bucket_peak_rss_mb", 0),
                                   "cluster": cluster.get("peak_rss_mb", 0), "write": peak_rss_mb()}},
    }


class WriteStep(PipelineStep):
    type = "mtnlg"
    name = "concatenate kept documents -> PREFIX.bin/.idx + report"

    def __init__(self, settings: EngineSettings):
        super().__init__()
        self.settings = settings

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from mtnlg.io import write_atomic

        s = self.settings
        t0 = time.process_time()
        tokenizer = Tokenizer.from_json(s.tokenizer_json)
        cluster = _load_json(os.path.join(s.work_dir, "cluster", "counts.json")) if s.dedup != "none" else {}
        parts, counters = [], []
        for task in range(s.tasks):
            folder = part_dir(s.work_dir, task)
            counters.append(_load_json(os.path.join(folder, "counters.json")))
            ds = IndexedDataset(os.path.join(folder, "tokens"), verify=False)
            keep = np.ones(len(ds), dtype=bool)
            if s.dedup != "none":
                removed = np.load(os.path.join(s.work_dir, "cluster", f"removed-{task:05d}.npy"))
                gid_path = os.path.join(folder, "gid.bin")
                gids = np.fromfile(gid_path, dtype=np.int64) if os.path.getsize(gid_path) else np.zeros(0, np.int64)
                keep = ~np.isin(gids, removed)
            parts.append((ds, keep))
        documents, tokens = concat_parts(parts, s.output, tokenizer.vocab_size, tokenizer.eod_id,
                                         tokenizer.fingerprint())
        seconds = {"write": time.process_time() - t0}
        if s.dedup != "none":
            seconds.update(dedup=cluster["seconds"] + cluster.get("bucket_seconds", 0))
        report = build_report(s, counters, cluster, documents, tokens, tokenizer, seconds)
        write_atomic(s.output + ".report.json", json.dumps(report, indent=2) + "\n")
        return iter(())
