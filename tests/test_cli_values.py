"""Every CLI value that used to escape validation now gives one line (exit 2)
before any work; --help shows defaults; preprocess refuses to produce nothing."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mtnlg.cli import main as mtnlg_main

SOTU = Path(__file__).resolve().parents[1] / "data" / "sotu" / "sotu.jsonl.gz"


def cli(capsys, *args):
    capsys.readouterr()
    code = mtnlg_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, message", [
    (["--top-k", "-3"], "--top-k must be >= 0 (0 = no limit), got -3"),
    (["--temperature", "0"], "--temperature must be a positive number, got 0.0"),
    (["--temperature", "nan"], "--temperature must be a positive number, got nan"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--beams", "3", "--temperature", "0.5"], "--beams 3 is deterministic beam search: --temperature only apply"),
    (["--beams", "2", "--top-k", "5", "--top-p", "0.5"], "--top-k, --top-p only apply to sampling"),
    (["--beams", "2", "--greedy"], "--beams 2 is deterministic beam search: --greedy"),
    (["--beams", "2", "--num-samples", "3"], "--num-samples 3 would repeat it"),
    (["--greedy", "--top-k", "4"], "--greedy always takes the most likely token: --top-k"),
])
def test_generate_values(capsys, tmp_path, args, message):
    code, _, err = cli(capsys, "generate", "--run", str(tmp_path / "none"), *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        mtnlg_main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text wraps
    for text in ("(default: 64)", "(default: 0.8)", "(default: 0.95)", "(default: 0 = all)", "(default: 1)"):
        assert text in out, text
    with pytest.raises(SystemExit):
        mtnlg_main(["eval", "--help"])
    assert "(default: 8)" in " ".join(capsys.readouterr().out.split())


@pytest.fixture
def short_docs(tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": f"Too short {i}."}) + "\n" for i in range(5)))
    return path


def test_preprocess_with_no_surviving_document_writes_nothing(capsys, tmp_path, sotu_small, short_docs):
    out = str(tmp_path / "out")
    code, _, err = cli(capsys, "preprocess", "--input", str(short_docs), "--output", out,
                       "--tokenizer", sotu_small + ".tokenizer.json", "--workers", "1", "--quiet")
    assert code == 2 and "no document survived (5 read: 0 malformed or empty, 5 removed by quality filters" in err
    assert not os.path.exists(out + ".bin") and not os.path.exists(out + ".idx")
    assert json.loads(Path(out + ".report.json").read_text())["documents_out"] == 0
    # an earlier dataset under that prefix is left as it was
    for ext in (".bin", ".idx"):
        Path(out + ext).write_bytes(Path(sotu_small + ext).read_bytes())
    assert cli(capsys, "preprocess", "--input", str(short_docs), "--output", out,
               "--tokenizer", sotu_small + ".tokenizer.json", "--workers", "1", "--quiet")[0] == 2
    assert Path(out + ".bin").read_bytes() == Path(sotu_small + ".bin").read_bytes()


def test_train_tokenizer_refuses_empty_input_and_warns_on_small(capsys, tmp_path, short_docs):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"other": "x"}) + "\n")
    code, _, err = cli(capsys, "preprocess", "--input", str(empty), "--output", str(tmp_path / "e"),
                       "--train-tokenizer", "--workers", "1", "--quiet")
    assert code == 2 and "--train-tokenizer found no text to learn from" in err and err.count("\n") == 1
    assert not (tmp_path / "e.tokenizer.json").exists()
    code, _, err = cli(capsys, "preprocess", "--input", str(short_docs), "--output", str(tmp_path / "s"),
                       "--train-tokenizer", "--no-filters", "--workers", "1", "--quiet", "--vocab-size", "8192")
    assert code == 0 and "warning: the tokenizer has" in err and "not the 8192 asked for" in err


def test_long_documents_are_tokenized_and_hashed_piecewise_with_identical_results(sotu_small):
    """A huge single-line document is encoded in pieces and MinHashed in windows (bounded memory);
    the ids and the signature equal the one-piece results."""
    import gzip
    from mtnlg.data.dedup import MinHasher, MinHashParams
    from mtnlg.data.pipeline import _init_worker, tokenize_batch, WorkerSetup
    from mtnlg.data.clean import FilterConfig
    from mtnlg.data.tokenizer import LONG_TEXT_CHARS, load_tokenizer
    with gzip.open(SOTU, "rt") as f:
        text = " ".join(json.loads(line)["text"] for _, line in zip(range(12), f))
    text = (text + "  double  spaces\n\nand\tTabs 's  ") * 2
    assert len(text) > 2 * LONG_TEXT_CHARS
    tok = load_tokenizer(sotu_small + ".tokenizer.json")
    whole = np.asarray(tok.encode(text))
    assert np.array_equal(tok.encode_array(text, chunk_chars=997), whole)
    _init_worker(WorkerSetup(tok.to_json(), FilterConfig.disabled(), "none", MinHashParams()))
    (ids,), _ = tokenize_batch([text])
    assert np.array_equal(ids[:-1], whole) and ids[-1] == tok.eod_id
    small = MinHasher(MinHashParams(), window=4096).signature(text)
    assert np.array_equal(small, MinHasher(MinHashParams(), window=10 ** 9).signature(text))


def test_documents_over_the_size_limit_are_skipped_and_reported(capsys, tmp_path, sotu_small):
    import gzip
    with gzip.open(SOTU, "rt") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(3), f)]
    big = " ".join(texts)
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": big}) + "\n" + "".join(json.dumps({"text": t}) + "\n" for t in texts))
    limit_mb = (len(big) - 100) / 2**20
    out = str(tmp_path / "o")
    code, _, err = cli(capsys, "preprocess", "--input", str(path), "--output", out, "--max-document-mb",
                       str(limit_mb), "--tokenizer", sotu_small + ".tokenizer.json", "--workers", "1")
    assert code == 0 and f"{path}:1: too_long:" in err and "exceeds --max-document-mb" in err
    report = json.loads(Path(out + ".report.json").read_text())
    assert report["malformed_by_kind"] == {"too_long": 1} and report["documents_out"] == 3
    assert cli(capsys, "preprocess", "--input", str(path), "--output", out, "--max-document-mb", "-1",
               "--tokenizer", sotu_small + ".tokenizer.json")[0] == 2
