"""`mtnlg eval`: the loss it reports on the validation split equals the trainer's val_loss."""
import gzip
import json
import subprocess
import sys

import pytest

from trainhelpers import read_metrics, tiny_overrides, train


def mtnlg(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "mtnlg", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sotu_small):
    d = tmp_path_factory.mktemp("evalrun") / "run"
    train(d, tiny_overrides(sotu_small, **{"train.steps": 4, "train.eval_interval": 0}))
    return d


def test_eval_on_valid_split_equals_trainer_val_loss(run_dir):
    val_loss = read_metrics(run_dir)[-1]["val_loss"]
    out = json.loads(mtnlg("eval", "--run", str(run_dir), "--split", "valid", "--json").stdout)
    assert out["loss"] == pytest.approx(val_loss, rel=1e-5)
    assert out["perplexity"] == pytest.approx(2.718281828 ** out["loss"], rel=1e-6)
    assert out["sequences"] == 8 and out["tokens"] == 8 * 32


def test_eval_on_a_text_file(run_dir, tmp_path):
    with gzip.open("data/sotu/sotu.jsonl.gz", "rt") as f:
        text = json.loads(f.readline())["text"][:3000]
    path = tmp_path / "speech.txt"
    path.write_text(text)
    out = json.loads(mtnlg("eval", "--run", str(run_dir), "--text", str(path), "--json").stdout)
    assert out["tokens"] > 100 and 0 < out["bits_per_byte"] < 8 and out["loss"] < 7.0
    p = mtnlg("eval", "--run", str(run_dir), "--text", str(tmp_path / "missing.txt"), check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
