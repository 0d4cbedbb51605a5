"""The document pipeline behind ``mtnlg preprocess``: clean -> dedup -> tokenize -> write.

The main process reads documents, makes the dedup decisions (they need one
global view, first seen wins) and writes the dataset in input order; worker
processes do the CPU-heavy, independent work per batch: normalization and
quality filters plus dedup hashes/signatures (stage 1), and tokenization of
the documents that survive (stage 2). At most ``2 * workers`` batches are in
flight per stage, so memory stays bounded.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterable, Iterator

import numpy as np

from mtnlg.data.clean import FilterConfig, QualityFilter, normalize
from mtnlg.data.dedup import Deduplicator, MinHasher, MinHashParams, exact_hash
from mtnlg.data.indexed import IndexedDatasetWriter, dtype_for_vocab
from mtnlg.data.readers import Document, Problem
from mtnlg.data.tokenizer import LONG_TEXT_CHARS, Tokenizer


@dataclass
class Stats:
    """Counters of one run; ``documents_in`` equals the sum of all outcomes."""

    documents_in: int = 0
    malformed_by_kind: Counter = field(default_factory=Counter)
    removed_by_filter: Counter = field(default_factory=Counter)
    exact_duplicates: int = 0
    fuzzy_duplicates: int = 0
    documents_out: int = 0
    tokens_out: int = 0
    bytes_in: int = 0
    stage_seconds: Counter = field(default_factory=Counter)

    def add_problem(self, problem: Problem) -> None:
        self.documents_in += 1
        self.malformed_by_kind[problem.kind] += 1

    def as_dict(self) -> dict:
        return {
            "documents_in": self.documents_in,
            "malformed": sum(self.malformed_by_kind.values()),
            "malformed_by_kind": dict(self.malformed_by_kind),
            "removed_by_filter": {name: self.removed_by_filter.get(name, 0) for name in QualityFilter.ORDER},
            "exact_duplicates": self.exact_duplicates,
            "fuzzy_duplicates": self.fuzzy_duplicates,
            "documents_out": self.documents_out,
            "tokens_out": self.tokens_out,
            "bytes_in": self.bytes_in,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
        }


@dataclass
class WorkerSetup:
    tokenizer_json: str
    filters: FilterConfig
    dedup: str
    minhash: MinHashParams
    normalize: bool = True


_STATE: dict = {}


def _init_worker(setup: WorkerSetup) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE["setup"] = setup
    _STATE["filter"] = QualityFilter(setup.filters)
    _STATE["hasher"] = MinHasher(setup.minhash) if setup.dedup == "fuzzy" else None
    _STATE["tokenizer"] = Tokenizer.from_json(setup.tokenizer_json)


def analyse_batch(texts: list[str]) -> tuple[list[tuple], dict]:
    """Stage 1: per text (clean text or None, filter reason, exact hash, signature)."""
    setup, quality, hasher = _STATE["setup"], _STATE["filter"], _STATE["hasher"]
    t0 = time.process_time()
    cleaned = [normalize(t) if setup.normalize else t.strip() for t in texts]
    t1 = time.process_time()
    reasons = [quality.reason(t) if t else "empty" for t in cleaned]
    t2 = time.process_time()
    out = []
    for text, reason in zip(cleaned, reasons):
        if reason is not None or setup.dedup == "none":
            out.append((text, reason, None, None))
        else:
            out.append((text, None, exact_hash(text), hasher.signature(text) if hasher else None))
    t3 = time.process_time()
    return out, {"clean": t1 - t0, "filter": t2 - t1, "dedup_hash": t3 - t2}


def tokenize_batch(texts: list[str]) -> tuple[list[np.ndarray], dict]:
    """Stage 2: token ids with EOD appended, in the dataset's dtype."""
    tokenizer: Tokenizer = _STATE["tokenizer"]
    t0 = time.process_time()
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    eod = np.array([tokenizer.eod_id], dtype=dtype)
    short = [t for t in texts if len(t) <= LONG_TEXT_CHARS]
    batched = iter(tokenizer.hf.encode_batch(short, add_special_tokens=False))
    ids = [np.array(next(batched).ids + [tokenizer.eod_id], dtype=dtype) if len(t) <= LONG_TEXT_CHARS
           else np.concatenate([tokenizer.encode_array(t, dtype), eod]) for t in texts]  # bounded memory
    return ids, {"tokenize": time.process_time() - t0}


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Executor:
    """multiprocessing.Pool with bounded submission; runs inline when workers <= 1."""

    def __init__(self, workers: int, setup: WorkerSetup):
        self.pool = None
        if workers > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (setup,))
        else:
            _init_worker(setup)

    def submit(self, fn, arg):
        return self.pool.apply_async(fn, (arg,)) if self.pool else _Done(fn(arg))

    def close(self) -> None:
        if self.pool:
            self.pool.terminate()
            self.pool.join()


@dataclass
class KeptDoc:
    """Dedup keys of written documents (saved for a cross-shard merge)."""

    hashes: list = field(default_factory=list)
    signatures: list = field(default_factory=list)


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def run_pipeline(docs: Iterable[Document], setup: WorkerSetup, writer: IndexedDatasetWriter, stats: Stats,
                 on_problem: Callable[[Problem], None], workers: int = 1, batch_size: int = 64,
                 progress=None) -> KeptDoc:
    """Push every document through the stages and write the survivors in input order."""
    dedup = Deduplicator(setup.dedup, setup.minhash)
    kept = KeptDoc()
    executor = _Executor(workers, setup)
    stage1: deque = deque()
    stage2: deque = deque()
    depth = max(2, 2 * workers)

    def add_times(times: dict) -> None:
        for name, seconds in times.items():
            stats.stage_seconds[name] += seconds

    def finish_stage2(block: bool) -> None:
        while stage2 and (block or len(stage2) > depth or getattr(stage2[0], "ready", lambda: True)()):
            ids_list, times = stage2.popleft().get()
            add_times(times)
            t0 = time.perf_counter()
            for ids in ids_list:
                writer.add_document(ids)
                stats.documents_out += 1
                stats.tokens_out += len(ids)
            stats.stage_seconds["write"] += time.perf_counter() - t0
            if progress is not None:
                progress.set_postfix_str(progress_rates(stats, progress), refresh=False)
                progress.update(len(ids_list))

    def finish_stage1(batch: list[Document], handle) -> None:
        results, times = handle.get()
        add_times(times)
        t0 = time.perf_counter()
        survivors = []
        for doc, (text, reason, digest, signature) in zip(batch, results):
            if reason == "empty":
                on_problem(Problem("empty", doc.path, doc.line, "empty after normalization"))
                stats.documents_in -= 1  # add_problem counted it again
                continue
            if reason is not None:
                stats.removed_by_filter[reason] += 1
                continue
            verdict = dedup.check(digest, signature)
            if verdict == "exact":
                stats.exact_duplicates += 1
            elif verdict == "fuzzy":
                stats.fuzzy_duplicates += 1
            else:
                survivors.append(text)
                if setup.dedup != "none":
                    kept.hashes.append(digest)
                    if signature is not None:
                        kept.signatures.append(signature)
        stats.stage_seconds["dedup"] += time.perf_counter() - t0
        if survivors:
            stage2.append(executor.submit(tokenize_batch, survivors))
        finish_stage2(block=False)

    try:
        read_start = time.perf_counter()
        for batch in _batches(docs, batch_size):
            stats.stage_seconds["read"] += time.perf_counter() - read_start
            stats.documents_in += len(batch)
            stats.bytes_in += sum(len(d.text.encode("utf-8")) for d in batch)
            stage1.append((batch, executor.submit(analyse_batch, [d.text for d in batch])))
            while len(stage1) > depth:
                finish_stage1(*stage1.popleft())
            read_start = time.perf_counter()
        while stage1:
            finish_stage1(*stage1.popleft())
        finish_stage2(block=True)
    finally:
        executor.close()
    return kept


def progress_rates(stats: Stats, progress) -> str:
    elapsed = max(progress.format_dict.get("elapsed", 0.0), 1e-9)
    return f"{stats.tokens_out / elapsed:,.0f} tokens/s, {stats.bytes_in / elapsed / 1e6:,.2f} MB/s in"
