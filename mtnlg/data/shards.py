"""Scale-out: shard outputs carry their dedup keys; a merge joins and re-deduplicates.

Two-pass design. Each ``--shard i/N`` run deduplicates within its own files
and saves, next to its dataset, the exact hash and MinHash signature of every
document it kept (PREFIX.dedup.npz: 16 + 4 * num_perm bytes per document).
``--merge`` replays those keys through the same first-seen-wins deduplicator
in shard order, so a document duplicated across shards is dropped exactly as
if one process had read all inputs, without re-reading or re-hashing text.
The merged output saves its keys too, so merges can be nested.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

from mtnlg.data.dedup import Deduplicator, MinHashParams
from mtnlg.data.indexed import IndexedDataset, IndexedDatasetWriter
from mtnlg.errors import UserError
from mtnlg.io import write_atomic

_SUMMED = ("documents_in", "malformed", "exact_duplicates", "fuzzy_duplicates", "bytes_in")
_COUNTERS = ("malformed_by_kind", "removed_by_filter", "stage_seconds")


def save_dedup_keys(prefix: str, kept, mode: str, params: MinHashParams) -> None:
    hashes = np.frombuffer(b"".join(kept.hashes), dtype=np.uint8).reshape(-1, 16)
    signatures = (np.stack(kept.signatures) if kept.signatures
                  else np.zeros((0, params.num_perm if mode == "fuzzy" else 0), dtype=np.uint32))
    tmp = f"{prefix}.dedup.tmp-{os.getpid()}.npz"
    np.savez(tmp, hashes=hashes, signatures=signatures, mode=np.array(mode),
             minhash=np.array([params.bands, params.rows, params.seed]), threshold=np.array(params.threshold))
    os.replace(tmp, prefix + ".dedup.npz")


def _load_keys(prefix: str, num_docs: int, mode: str, params: MinHashParams) -> tuple[np.ndarray, np.ndarray]:
    path = prefix + ".dedup.npz"
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: run the shard with --dedup exact/fuzzy, or merge with --dedup none")
    with np.load(path) as keys:
        hashes, signatures, shard_mode = keys["hashes"], keys["signatures"], str(keys["mode"])
        minhash = [int(v) for v in keys["minhash"]]
    if len(hashes) != num_docs:
        raise UserError(f"{path} has keys for {len(hashes)} documents but {prefix}.idx has {num_docs}; "
                        "the shard output is inconsistent, re-run that shard")
    if mode == "fuzzy":
        if shard_mode != "fuzzy":
            raise UserError(f"{prefix} was deduplicated with --dedup {shard_mode}; a fuzzy merge needs fuzzy shards")
        if minhash != [params.bands, params.rows, params.seed]:
            raise UserError(f"{prefix} used MinHash bands/rows/seed {minhash}; the merge uses "
                            f"{[params.bands, params.rows, params.seed]}: pass the shards' --minhash-* values")
    return hashes, signatures


def _load_report(prefix: str) -> dict:
    path = prefix + ".report.json"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read shard report {path}: {err}") from None


def merge_shards(prefixes: list[str], output: str, mode: str, params: MinHashParams) -> dict:
    """Join shard datasets into ``output`` (in the order given), deduplicating across them."""
    if os.path.abspath(output) in {os.path.abspath(p) for p in prefixes}:
        raise UserError("--output must differ from the --merge inputs")
    shards = [IndexedDataset(p) for p in prefixes]
    first = shards[0]
    for shard in shards[1:]:
        if shard.fingerprint != first.fingerprint or shard.vocab_size != first.vocab_size:
            raise UserError(f"{shard.prefix} was tokenized with a different tokenizer than {first.prefix}; "
                            "shards must share one tokenizer (train it once with --tokenizer-only)")
    reports = [_load_report(p) for p in prefixes]
    dedup = Deduplicator(mode, params)
    kept_hashes, kept_sigs = [], []
    cross = Counter()
    tokens_out = 0
    with IndexedDatasetWriter(output, first.vocab_size, first.eod_id, first.fingerprint) as writer:
        for prefix, shard in zip(prefixes, shards):
            hashes, sigs = _load_keys(prefix, len(shard), mode, params) if mode != "none" else (None, None)
            for i in range(len(shard)):
                digest = hashes[i].tobytes() if hashes is not None else None
                sig = sigs[i] if mode == "fuzzy" else None
                verdict = dedup.check(digest, sig)
                if verdict:
                    cross[verdict] += 1
                    continue
                writer.add_document(shard[i])
                tokens_out += int(shard.doc_lengths[i])
                if mode != "none":
                    kept_hashes.append(digest)
                    if sig is not None:
                        kept_sigs.append(np.asarray(sig))
        writer.finalize()
    if mode != "none":
        from mtnlg.data.pipeline import KeptDoc

        save_dedup_keys(output, KeptDoc(kept_hashes, kept_sigs), mode, params)
    report: dict = {key: sum(r.get(key, 0) for r in reports) for key in _SUMMED}
    for key in _COUNTERS:
        total: Counter = Counter()
        for r in reports:
            total.update(r.get(key, {}))
        report[key] = dict(total)
    report["exact_duplicates"] += cross["exact"]
    report["fuzzy_duplicates"] += cross["fuzzy"]
    report.update(documents_out=writer.num_docs, tokens_out=tokens_out, merged_from=list(prefixes), dedup=mode,
                  cross_shard_exact_duplicates=cross["exact"], cross_shard_fuzzy_duplicates=cross["fuzzy"],
                  tokenizer=reports[0].get("tokenizer"))
    write_atomic(output + ".report.json", json.dumps(report, indent=2) + "\n")
    return report
