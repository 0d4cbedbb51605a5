import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from mtnlg.data.indexed import IndexedDataset, IndexedDatasetWriter
from mtnlg.data.samples import blend_indices, build_datasets, split_ranges
from mtnlg.errors import UserError

EOD = 999


def make_dataset(prefix, num_docs, base, seed=0, max_len=60):
    """Documents whose tokens lie in [base, base + 100), each ending with EOD."""
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedDatasetWriter(str(prefix), 1000, EOD) as writer:
        for _ in range(num_docs):
            doc = np.append(rng.integers(base, base + 100, rng.integers(1, max_len)), EOD)
            writer.add_document(doc)
            docs.append(doc)
        writer.finalize()
    return str(prefix), docs


def test_samples_are_the_packed_token_stream(tmp_path):
    prefix, docs = make_dataset(tmp_path / "a", 40, 0)
    train, valid, test = build_datasets([(1.0, prefix)], (1, 0, 0), seq_len=16, seed=3,
                                        num_samples=(200, 0, 0), cache_dir=str(tmp_path / "c"))
    assert len(train) == 200 and len(valid) == 0 and len(test) == 0
    part = train.parts[0]
    stream = np.concatenate([docs[d] for d in part.doc_idx])
    seen = set()
    for k in range(len(train)):
        sample = train[k]
        j = int(part.shuffle_idx[k])
        assert sample.dtype == np.int64 and sample.shape == (17,)
        assert np.array_equal(sample, stream[j * 16 : j * 16 + 17])
        seen.add(j)
    assert len(seen) == 200  # no sample served twice (shuffled in whole-epoch blocks, see samples.py)
    epochs = len(part.doc_idx) // 40
    assert epochs >= 2 and all(sorted(part.doc_idx[e * 40 : (e + 1) * 40]) == list(range(40)) for e in range(epochs))
    assert not np.array_equal(part.doc_idx[:40], part.doc_idx[40:80])  # reshuffled per epoch


def test_blend_proportions_within_one_percent_on_100k(tmp_path):
    weights = [0.5, 0.3, 0.2]
    blend = [(w, make_dataset(tmp_path / f"d{i}", 300, 100 * i, seed=i)[0]) for i, w in enumerate(weights)]
    train, _, _ = build_datasets(blend, (1, 0, 0), seq_len=8, seed=0, num_samples=(100_000, 0, 0),
                                 cache_dir=str(tmp_path / "c"))
    counts = np.zeros(3)
    for k in range(len(train)):
        sample = train[k]
        source = sample[sample != EOD] // 100  # token ranges tell which dataset a sample came from
        assert len(set(source.tolist())) <= 1
        if source.size:
            counts[source[0]] += 1
        else:
            counts[train.dataset_index[k]] += 1
    assert np.abs(counts / counts.sum() - weights).max() < 0.01
    dataset_index, _ = blend_indices(weights, 1000)
    for n in (10, 100, 1000):  # every prefix is balanced too
        assert np.abs(np.bincount(dataset_index[:n], minlength=3) - np.array(weights) * n).max() <= 1


def _fingerprint(datasets) -> str:
    h = hashlib.sha256()
    for ds in datasets:
        for k in range(0, len(ds), 7):
            h.update(ds[k].tobytes())
    return h.hexdigest()


def test_indices_are_deterministic_across_runs_and_processes(tmp_path):
    a, _ = make_dataset(tmp_path / "a", 200, 0, seed=1)
    b, _ = make_dataset(tmp_path / "b", 150, 100, seed=2)
    kwargs = dict(split=(0.8, 0.1, 0.1), seq_len=32, seed=7, num_samples=(500, 50, 50))
    blend = [(0.7, a), (0.3, b)]
    first = _fingerprint(build_datasets(blend, cache_dir=str(tmp_path / "c1"), **kwargs))
    cached = _fingerprint(build_datasets(blend, cache_dir=str(tmp_path / "c1"), **kwargs))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_samples import _fingerprint; "
            "from mtnlg.data.samples import build_datasets; "
            f"print(_fingerprint(build_datasets({blend!r}, cache_dir=sys.argv[2], **{kwargs!r})))")
    other = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(tmp_path / "c2")],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert first == cached == other
    assert first != _fingerprint(build_datasets(blend, cache_dir=str(tmp_path / "c3"), **{**kwargs, "seed": 8}))


def test_resume_from_sample_k_matches_without_replay(tmp_path):
    a, _ = make_dataset(tmp_path / "a", 100, 0)
    kwargs = dict(blend=[(1.0, a)], split=(1, 0, 0), seq_len=16, seed=0, num_samples=(300, 0, 0),
                  cache_dir=str(tmp_path / "c"))
    full = [build_datasets(**kwargs)[0][k] for k in range(300)]
    resumed = build_datasets(**kwargs)[0]  # a fresh process would build the same cached indices
    assert all(np.array_equal(resumed[k], full[k]) for k in (299, 150, 0))


def test_splits_use_disjoint_documents(tmp_path):
    prefix, docs = make_dataset(tmp_path / "a", 100, 0)
    train, valid, test = build_datasets([(1.0, prefix)], (0.8, 0.1, 0.1), 16, 0, (50, 20, 20),
                                        cache_dir=str(tmp_path / "c"))
    ranges = split_ranges(100, (0.8, 0.1, 0.1))
    assert ranges == [(0, 80), (80, 90), (90, 100)]
    for ds, (lo, hi) in zip((train, valid, test), ranges):
        assert set(np.unique(ds.parts[0].doc_idx)) == set(range(lo, hi))


def test_too_small_dataset_is_a_user_error(tmp_path):
    prefix, _ = make_dataset(tmp_path / "tiny", 3, 0, max_len=4)
    with pytest.raises(UserError, match="fewer than one sample"):
        build_datasets([(1.0, prefix)], (1, 0, 0), 512, 0, (10, 0, 0), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match="too few"):
        build_datasets([(1.0, prefix)], (0.98, 0.01, 0.01), 2, 0, (10, 5, 5), cache_dir=str(tmp_path / "c"))


def test_cache_defaults_next_to_prefix(tmp_path):
    prefix, _ = make_dataset(tmp_path / "a", 30, 0)
    build_datasets([(1.0, prefix)], (1, 0, 0), 8, 0, (20, 0, 0))
    files = os.listdir(tmp_path / "index-cache")
    assert len(files) == 5 and not any("tmp" in f for f in files)  # doc/sample/shuffle + blend pair
    assert IndexedDataset(prefix)  # the dataset itself is untouched


def test_more_samples_keep_the_order_of_the_first_ones(tmp_path):
    """Extending a run (more steps -> more samples) must not reorder data already planned."""
    prefix = _write_corpus_for_prefix_test(tmp_path)
    small = build_datasets([(0.6, prefix), (0.4, prefix + "b")], (1.0, 0.0, 0.0), 16, 7, (300, 0, 0), str(tmp_path / "c1"))[0]
    large = build_datasets([(0.6, prefix), (0.4, prefix + "b")], (1.0, 0.0, 0.0), 16, 7, (2000, 0, 0), str(tmp_path / "c2"))[0]
    assert len(small) == 300 and len(large) == 2000
    for k in range(300):
        assert np.array_equal(small[k], large[k]), k


def _write_corpus_for_prefix_test(tmp_path):
    from mtnlg.data.indexed import IndexedDatasetWriter
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "ds")
    for p in (prefix, prefix + "b"):
        with IndexedDatasetWriter(p, vocab_size=1000, eod_id=0) as w:
            for _ in range(40):
                w.add_document(list(rng.integers(1, 1000, size=int(rng.integers(5, 60)))) + [0])
            w.finalize()
    return prefix
