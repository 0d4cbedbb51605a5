import os
import struct

import numpy as np
import pytest

from mtnlg.data.indexed import HEADER_SIZE, IndexedDataset, IndexedDatasetWriter
from mtnlg.errors import UserError


def write(prefix, docs, vocab=1000):
    with IndexedDatasetWriter(str(prefix), vocab, eod_id=vocab - 1) as writer:
        for doc in docs:
            writer.add_document(doc)
        writer.finalize()


def random_docs(n=50, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(0, 300)) for _ in range(n)]


@pytest.mark.parametrize("vocab, dtype", [(1000, np.uint16), (65536, np.uint16), (70000, np.uint32)])
def test_round_trip(tmp_path, vocab, dtype):
    docs = random_docs(vocab=vocab)
    write(tmp_path / "ds", docs, vocab)
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert len(ds) == len(docs) and ds.tokens.dtype == dtype
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert list(ds.doc_lengths) == [len(d) for d in docs]
    for i, doc in enumerate(docs):
        assert np.array_equal(ds[i], doc)
    assert np.array_equal(ds[-1], docs[-1]) and ds.vocab_size == vocab and ds.eod_id == vocab - 1
    assert os.path.getsize(tmp_path / "ds.bin") == ds.num_tokens * np.dtype(dtype).itemsize
    with pytest.raises(IndexError):
        ds[len(docs)]


def test_empty_dataset(tmp_path):
    write(tmp_path / "e", [])
    assert len(IndexedDataset(str(tmp_path / "e"))) == 0


def test_truncated_bin_is_detected(tmp_path):
    write(tmp_path / "ds", random_docs())
    with open(tmp_path / "ds.bin", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "ds.bin") - 2)
    with pytest.raises(UserError, match="truncated"):
        IndexedDataset(str(tmp_path / "ds"))


def test_flipped_bin_byte_fails_checksum(tmp_path):
    write(tmp_path / "ds", random_docs())
    with open(tmp_path / "ds.bin", "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match="checksum"):
        IndexedDataset(str(tmp_path / "ds"))
    IndexedDataset(str(tmp_path / "ds"), verify=False)  # size-only check still passes


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"NOTMAGIC" + raw[8:], "bad magic"),
    (lambda raw: raw[:8] + struct.pack("<I", 99) + raw[12:], "version 99"),
    (lambda raw: raw[:-8], "truncated"),
    (lambda raw: raw[:HEADER_SIZE + 8] + b"\x07" + raw[HEADER_SIZE + 9:], "checksum"),
])
def test_damaged_index_gives_clear_error(tmp_path, damage, message):
    write(tmp_path / "ds", random_docs())
    raw = (tmp_path / "ds.idx").read_bytes()
    (tmp_path / "ds.idx").write_bytes(damage(raw))
    with pytest.raises(UserError, match=message):
        IndexedDataset(str(tmp_path / "ds"))


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="mtnlg preprocess"):
        IndexedDataset(str(tmp_path / "absent"))


def test_interrupted_write_leaves_nothing_that_opens(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "ds"), 1000) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_stale_bin_from_interrupted_rewrite_is_detected(tmp_path):
    write(tmp_path / "ds", random_docs(seed=0))
    old_idx = (tmp_path / "ds.idx").read_bytes()
    write(tmp_path / "ds", random_docs(seed=1))
    (tmp_path / "ds.idx").write_bytes(old_idx)  # as if killed between the two renames
    with pytest.raises(UserError):
        IndexedDataset(str(tmp_path / "ds"))


def test_out_of_vocabulary_ids_are_rejected(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "ds"), 100) as writer:
        with pytest.raises(ValueError):
            writer.add_document([5, 100])
