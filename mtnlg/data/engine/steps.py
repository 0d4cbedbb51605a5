"""The prepare stage as datatrove pipeline steps wrapping our own code.

    ReadStep -> NormalizeStep -> QualityFilterStep -> DedupKeysStep -> TokenizeStep -> PartWriterStep

Each task (rank) reads its contiguous group of input files and leaves one
directory ``WORK/prepare/NNNNN/`` holding the tokens of every document that
passed the filters (a .bin/.idx part), their global ids, exact hashes and
MinHash signatures (raw arrays, read back by memory map), the band-bucket
entries cut by owner (``buckets-KKKKK.bin``, one file per bucket task) and the
task's counters. The directory is built under a temporary name and renamed
when complete, so a task that dies leaves nothing a later stage would read;
datatrove's completion marker is written only after that rename.

A document's global id is ``file_index << 32 | line``: sorting by it is the
input order, the "first seen" order of deduplication at any scale.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from typing import Iterator

import numpy as np
from datatrove.data import Document as DTDocument
from datatrove.pipeline.base import PipelineStep

from mtnlg.data.clean import QualityFilter, normalize
from mtnlg.data.dedup import MinHasher, exact_hash
from mtnlg.data.engine.options import EngineSettings
from mtnlg.data.indexed import IndexedDatasetWriter, dtype_for_vocab
from mtnlg.data.readers import Problem, read_documents
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.errors import UserError

FLUSH_DOCS = 4096


def global_id(file_index: int, line: int) -> int:
    return (file_index << 32) | line


def part_dir(work_dir: str, rank: int) -> str:
    return os.path.join(work_dir, "prepare", f"{rank:05d}")


class TaskCounters:
    """Counters of one prepare task, shared by its steps (reset by the reader at the start of a task)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.documents_in = 0
        self.bytes_in = 0
        self.malformed_by_kind: Counter = Counter()
        self.removed_by_filter: Counter = Counter()
        self.stage_seconds: Counter = Counter()
        self.shown = 0

    def as_dict(self) -> dict:
        return {"documents_in": self.documents_in, "bytes_in": self.bytes_in,
                "malformed_by_kind": dict(self.malformed_by_kind),
                "removed_by_filter": dict(self.removed_by_filter), "stage_seconds": dict(self.stage_seconds)}


class _Step(PipelineStep):
    type = "mtnlg"

    def __init__(self, settings: EngineSettings, counters: TaskCounters):
        super().__init__()
        self.settings, self.counters = settings, counters

    def problem(self, problem: Problem) -> None:
        if self.settings.strict:
            raise UserError(f"{problem} (--strict stops at the first malformed record)")
        self.counters.malformed_by_kind[problem.kind] += 1
        self.stat_update(f"malformed_{problem.kind}")
        if self.counters.shown < self.settings.max_problems_shown:
            from datatrove.utils.logging import logger

            logger.warning(f"{problem}; skipped")
        self.counters.shown += 1


class ReadStep(_Step):
    """Streams the task's files with our readers; every record (also a malformed one) counts in documents_in."""

    name = "read (mtnlg.data.readers)"

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[DTDocument]:
        self.counters.reset()
        counters = self.counters

        def on_problem(problem: Problem) -> None:
            counters.documents_in += 1
            self.problem(problem)

        for index in self.settings.partition[rank]:
            t0 = time.perf_counter()
            for doc in read_documents([self.settings.files[index]], self.settings.text_key, on_problem):
                counters.documents_in += 1
                counters.bytes_in += len(doc.text.encode("utf-8"))
                counters.stage_seconds["read"] += time.perf_counter() - t0
                self.stat_update("documents_in")
                yield DTDocument(text=doc.text, id=f"{index}:{doc.line}",
                                 metadata={"gid": global_id(index, doc.line), "path": doc.path, "line": doc.line})
                t0 = time.perf_counter()


class NormalizeStep(_Step):
    """ftfy + NFC + whitespace (``mtnlg.data.clean.normalize``); empty results are malformed ``empty``."""

    name = "normalize (mtnlg.data.clean)"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            t0 = time.process_time()
            doc.text = normalize(doc.text) if self.settings.normalize else doc.text.strip()
            self.counters.stage_seconds["clean"] += time.process_time() - t0
            if not doc.text:
                self.problem(Problem("empty", doc.metadata["path"], doc.metadata["line"], "empty after normalization"))
                continue
            yield doc


class QualityFilterStep(_Step):
    """Our ordered quality filters; a removed document is counted under the first filter it fails."""

    name = "quality filters (mtnlg.data.clean)"

    def run(self, data, rank: int = 0, world_size: int = 1):
        quality = QualityFilter(self.settings.filters)
        for doc in data:
            t0 = time.process_time()
            reason = quality.reason(doc.text)
            self.counters.stage_seconds["filter"] += time.process_time() - t0
            if reason is not None:
                self.counters.removed_by_filter[reason] += 1
                self.stat_update(f"removed_{reason}")
                continue
            yield doc


class DedupKeysStep(_Step):
    """Exact hash and MinHash signature (``mtnlg.data.dedup``), the same functions the local pipeline uses."""

    name = "dedup keys (mtnlg.data.dedup)"

    def run(self, data, rank: int = 0, world_size: int = 1):
        hasher = MinHasher(self.settings.minhash) if self.settings.dedup == "fuzzy" else None
        for doc in data:
            if self.settings.dedup != "none":
                t0 = time.process_time()
                doc.metadata["hash"] = exact_hash(doc.text)
                if hasher is not None:
                    doc.metadata["signature"] = hasher.signature(doc.text)
                self.counters.stage_seconds["dedup_hash"] += time.process_time() - t0
            yield doc


class TokenizeStep(_Step):
    """Our tokenizer (HF byte-level BPE), in batches, with EOD appended; dropped from metadata after writing."""

    name = "tokenize (mtnlg.data.tokenizer)"

    def __init__(self, settings: EngineSettings, counters: TaskCounters, batch_size: int = 32):
        super().__init__(settings, counters)
        self.batch_size = batch_size

    def run(self, data, rank: int = 0, world_size: int = 1):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tokenizer = Tokenizer.from_json(self.settings.tokenizer_json)
        dtype = dtype_for_vocab(tokenizer.vocab_size)
        batch: list[DTDocument] = []

        def flush():
            t0 = time.process_time()
            encoded = tokenizer.hf.encode_batch([d.text for d in batch], add_special_tokens=False)
            for doc, enc in zip(batch, encoded):
                doc.metadata["tokens"] = np.array(enc.ids + [tokenizer.eod_id], dtype=dtype)
            self.counters.stage_seconds["tokenize"] += time.process_time() - t0
            yield from batch
            batch.clear()

        for doc in data:
            batch.append(doc)
            if len(batch) == self.batch_size:
                yield from flush()
        if batch:
            yield from flush()


class PartWriterStep(_Step):
    """Writes the task's part directory (tokens, ids, keys, bucket entries, counters), atomically."""

    name = "part writer (mtnlg.data.indexed)"

    def run(self, data, rank: int = 0, world_size: int = 1):
        from mtnlg.data.engine.minhash import bucket_entries

        s = self.settings
        tokenizer = Tokenizer.from_json(s.tokenizer_json)
        final = part_dir(s.work_dir, rank)
        tmp = fresh_tmp_dir(final)
        for name in ("gid.bin", "hash.bin", "signature.bin"):
            open(os.path.join(tmp, name), "wb").close()
        pending: dict[str, list] = {"gid": [], "hash": [], "signature": []}
        written = 0

        def flush():
            if not pending["gid"]:
                return
            gids = np.array(pending["gid"], dtype=np.int64)
            _append(tmp, "gid.bin", gids)
            if s.dedup != "none":
                hashes = np.frombuffer(b"".join(pending["hash"]), dtype=np.uint8).reshape(len(gids), 16)
                sigs = (np.stack(pending["signature"]) if pending["signature"]
                        else np.zeros((len(gids), 0), dtype=np.uint32))
                _append(tmp, "hash.bin", hashes)
                if sigs.shape[1]:
                    _append(tmp, "signature.bin", sigs)
                for owner, entries in bucket_entries(gids, hashes, sigs, written - len(gids), s).items():
                    _append(tmp, f"buckets-{owner:05d}.bin", entries)
            for values in pending.values():
                values.clear()

        try:
            with IndexedDatasetWriter(os.path.join(tmp, "tokens"), tokenizer.vocab_size, tokenizer.eod_id,
                                      tokenizer.fingerprint()) as writer:
                for doc in data:
                    t0 = time.perf_counter()
                    writer.add_document(doc.metadata.pop("tokens"))
                    pending["gid"].append(doc.metadata["gid"])
                    if s.dedup != "none":
                        pending["hash"].append(doc.metadata.pop("hash"))
                        if "signature" in doc.metadata:
                            pending["signature"].append(doc.metadata.pop("signature"))
                    written += 1
                    if len(pending["gid"]) >= FLUSH_DOCS:
                        flush()
                    self.counters.stage_seconds["write"] += time.perf_counter() - t0
                    self.stat_update("documents_kept_by_filters")
                    maybe_fail(s.fault, "prepare", rank, written)
                    yield doc
                flush()
                writer.finalize()
            meta = {**self.counters.as_dict(), "documents": written, "tokens": writer.num_tokens,
                    "peak_rss_mb": peak_rss_mb()}
            with open(os.path.join(tmp, "counters.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _append(folder: str, name: str, array: np.ndarray) -> None:
    with open(os.path.join(folder, name), "ab") as f:
        f.write(np.ascontiguousarray(array).tobytes())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (the worker running the task), in MB."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def fresh_tmp_dir(final: str) -> str:
    """An empty ``final.tmp-PID`` folder; leftovers of earlier attempts that died are removed first."""
    for stale in glob.glob(glob.escape(final) + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    return tmp


def replace_dir(tmp: str, final: str) -> None:
    """Move a finished directory into place (an older copy from a task that died after its rename goes first)."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)


def maybe_fail(fault: str | None, stage: str, rank: int, count: int) -> None:
    """Test hook (``MTNLG_ENGINE_FAULT=stage:rank:count[:raise]``): die like a lost worker at that point."""
    if not fault:
        return
    parts = fault.split(":")
    if parts[0] != stage or int(parts[1]) != rank or int(parts[2]) != count:
        return
    if len(parts) > 3 and parts[3] == "raise":
        raise RuntimeError(f"injected fault in {stage} task {rank} after {count} documents")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def prepare_pipeline(settings: EngineSettings) -> list[PipelineStep]:
    counters = TaskCounters()
    return [ReadStep(settings, counters), NormalizeStep(settings, counters), QualityFilterStep(settings, counters),
            DedupKeysStep(settings, counters), TokenizeStep(settings, counters), PartWriterStep(settings, counters)]
