"""`mtnlg eval` counts exactly: 0 = the whole split, more than the split holds is
clamped with a message (never repeated), texts shorter than the context are
scored as they are, and every token of a text after the first is predicted once."""
import json

import pytest
import torch
import torch.nn.functional as F

from trainhelpers import tiny_overrides, train
from mtnlg.cli import main as mtnlg_main
from mtnlg.data.indexed import IndexedDataset
from mtnlg.data.samples import split_ranges


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sotu_small):
    d = tmp_path_factory.mktemp("evalcounts") / "run"
    train(d, tiny_overrides(sotu_small, **{"train.steps": 2, "train.eval_interval": 0}))
    return d


def evaluate(capsys, *args):
    capsys.readouterr()
    code = mtnlg_main(["eval", *args, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_whole_split_and_clamping(run_dir, sotu_small, capsys):
    data = IndexedDataset(sotu_small)
    first, last = split_ranges(len(data), (0.9, 0.05, 0.05))[1]
    tokens = int(data.doc_lengths[first:last].sum())
    expected = (tokens - 1) // 32  # packed sequences of 33 tokens sharing one: each token once
    _, whole, _ = evaluate(capsys, "--run", str(run_dir), "--max-samples", "0", "--batch-size", "256")
    assert whole["sequences"] == expected and whole["tokens"] == expected * 32
    _, some, _ = evaluate(capsys, "--run", str(run_dir), "--max-samples", "5")
    assert some["sequences"] == 5
    _, clamped, err = evaluate(capsys, "--run", str(run_dir), "--max-samples", "100000", "--batch-size", "256")
    assert f"holds {expected} sequences" in err and "not 100000" in err
    assert clamped == whole
    code, _, err = evaluate(capsys, "--run", str(run_dir), "--max-samples", "-1")
    assert code == 2 and err.count("\n") == 1 and "--max-samples >= 0" in err


def test_short_and_ragged_texts_are_scored_as_they_are(run_dir, tmp_path, capsys):
    from mtnlg.infer.load import load_run
    cfg, model, tok = load_run(run_dir)
    for text in ("The Congress shall", "The state of the Union is strong. " * 7):
        path = tmp_path / "t.txt"
        path.write_text(text)
        _, out, _ = evaluate(capsys, "--run", str(run_dir), "--text", str(path))
        ids = torch.tensor(tok.encode(text))
        assert out["tokens"] == len(ids) - 1  # every token after the first, once
        # independent: each window of <= 33 tokens scored with the model directly
        losses = []
        for i in range(0, len(ids) - 1, 32):
            w = ids[i:i + 33][None]
            with torch.no_grad():
                losses.append(F.cross_entropy(model(w[:, :-1])[0], w[0, 1:], reduction="sum"))
        assert out["loss"] == pytest.approx(float(sum(losses)) / (len(ids) - 1), rel=1e-5)
    path.write_text("a")
    code, _, err = evaluate(capsys, "--run", str(run_dir), "--text", str(path))
    assert code == 2 and "fewer than 2 tokens" in err


def test_progress_bar_counts_sequences(run_dir, capsys, monkeypatch):
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    capsys.readouterr()
    assert mtnlg_main(["eval", "--run", str(run_dir), "--max-samples", "12", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "eval:" in err and "/12 " in err
