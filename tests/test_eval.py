"""`mtnlg eval`: perplexity equal to the trainer's val_loss and to a direct
forward pass; zero-/few-shot tasks through the CLI equal the library call;
bad input gives one line."""
import gzip
import json
import subprocess
import sys

import pytest

from trainhelpers import read_metrics, tiny_overrides, train


def cli(capsys, *args):
    """`mtnlg ...` in-process (same code path as the console command, no interpreter start-up)."""
    from mtnlg.cli import main
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


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
    assert out["sequences"] == 8 and out["tokens"] == 8 * 32


def test_eval_on_a_text_file_equals_a_direct_forward(run_dir, tmp_path, capsys):
    import math

    import torch
    import torch.nn.functional as F

    from mtnlg.infer.load import load_run
    with gzip.open("data/sotu/sotu.jsonl.gz", "rt") as f:
        text = json.loads(f.readline())["text"][:3000]
    path = tmp_path / "speech.txt"
    path.write_text(text)
    out_file = tmp_path / "ppl.json"
    rc, _, _ = cli(capsys, "eval", "--run", str(run_dir), "--text", str(path), "--json", str(out_file))
    out = json.loads(out_file.read_text())
    # independent: windows of 33 tokens (32 predicted, consecutive windows share one) and a shorter
    # last window, so every token after the first is scored exactly once; summed cross-entropy
    cfg, model, tok = load_run(run_dir)
    ids = tok.encode(text)
    T = cfg.model.seq_len
    windows = [ids[i:i + T + 1] for i in range(0, len(ids) - 1, T)]
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            nll += F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[0, 1:], reduction="sum").item()
    n_bytes = sum(len(tok.decode(w[1:]).encode()) for w in windows)
    assert len(windows[-1]) < T + 1  # the text does not end on a window boundary: the tail counts too
    assert out["tokens"] == len(ids) - 1
    assert out["loss"] == pytest.approx(nll / out["tokens"], rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    rc, _, err = cli(capsys, "eval", "--run", str(run_dir), "--text", str(tmp_path / "missing.txt"))
    assert rc == 2 and "does not exist" in err and "Traceback" not in err


# ---- zero-/few-shot tasks (`mtnlg eval --tasks`) ----

def test_task_eval_cli_table_json_and_library_agree(run_dir, tmp_path):
    from mtnlg.evaluate.harness import evaluate
    from mtnlg.evaluate.models import load_run_lm
    from mtnlg.evaluate.tasks import parse_tasks
    import torch

    out = tmp_path / "eval.json"
    p = mtnlg("eval", "--run", str(run_dir), "--tasks", "lambada,piqa,winogrande", "--limit", "6", "--shots", "1",
              "--json", str(out))
    assert "lambada" in p.stdout and "acc_norm" in p.stdout and "perplexity" in p.stdout  # the table
    assert "winogrande: 6 examples, 12 requests" in p.stderr  # progress
    report = json.loads(out.read_text())
    lam = report["tasks"]["lambada"]
    assert lam["samples"] == 6 and lam["shots"] == 1 and set(lam["stderr"]) == {"acc", "perplexity"}
    # LAMBADA passages exceed the tiny model's 32-token context: every request is left-truncated and counted
    assert lam["requests"] == 6 and lam["truncated"] == 6
    assert report["tasks"]["piqa"]["requests"] == 12 and report["tasks"]["winogrande"]["requests"] == 12
    lib = evaluate(load_run_lm(str(run_dir), torch.device("cpu")), parse_tasks("lambada,piqa,winogrande"),
                   shots=1, limit=6)
    for name, t in lib["tasks"].items():
        for k, v in t["metrics"].items():
            assert report["tasks"][name]["metrics"][k] == pytest.approx(v, rel=1e-6), (name, k)


def test_task_eval_bad_input_is_one_line(run_dir, tmp_path, capsys):
    def fails(*args, match):
        rc, _, err = cli(capsys, "eval", *args)
        assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err

    fails("--run", str(run_dir), "--tasks", "lambda", match="known tasks: lambada, hellaswag, piqa")
    fails("--run", str(run_dir), "--tasks", "arc_challenge", "--shots", "299", match="--shots 299 exceeds the 298")
    fails("--run", str(run_dir), "--hf", str(tmp_path), "--tasks", "piqa", match="exactly one model")
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    (bare / "tokenizer.json").unlink()
    fails("--run", str(bare), "--tasks", "piqa", match="tokenizer.json is missing")


def _torchrun_eval(nproc, run_dir, out, *extra):
    import os
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "mtnlg",
           "eval", "--run-dir", str(run_dir), "--tasks", "lambada,piqa,winogrande", "--limit", "9", "--shots", "1",
           "--device", "cpu", "--batch-size", "4", "--json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _assert_same_report(a, b, rel):
    for name, t in a["tasks"].items():
        u = b["tasks"][name]
        assert (t["samples"], t["requests"], t["truncated"]) == (u["samples"], u["requests"], u["truncated"])
        for k, v in t["metrics"].items():
            assert u["metrics"][k] == pytest.approx(v, rel=rel), (name, k)


def test_task_eval_under_torchrun_dp2_equals_one_process(run_dir, tmp_path):
    """9 examples split 5/4 over two ranks, gathered: same metrics as one process
    (float sums of differently-padded batches agree to ~1e-7; accuracy exactly)."""
    import torch

    from mtnlg.evaluate.harness import evaluate
    from mtnlg.evaluate.models import load_run_lm
    from mtnlg.evaluate.tasks import parse_tasks
    one = evaluate(load_run_lm(str(run_dir), torch.device("cpu")), parse_tasks("lambada,piqa,winogrande"),
                   shots=1, limit=9, batch_size=4)
    dp2 = _torchrun_eval(2, run_dir, tmp_path / "dp2.json")
    assert dp2["dp"] == 2
    _assert_same_report(one, dp2, rel=1e-5)


@pytest.mark.slow
def test_task_eval_under_torchrun_tp2_equals_one_process(run_dir, tmp_path):
    """The model sharded by the training engine's tensor-parallel plan (logits
    gathered) scores what the plain model scores."""
    import torch

    from mtnlg.evaluate.harness import evaluate
    from mtnlg.evaluate.models import load_run_lm
    from mtnlg.evaluate.tasks import parse_tasks
    one = evaluate(load_run_lm(str(run_dir), torch.device("cpu")), parse_tasks("lambada,piqa,winogrande"),
                   shots=1, limit=9, batch_size=4)
    tp2 = _torchrun_eval(2, run_dir, tmp_path / "tp2.json", "--tp", "2")
    assert tp2["dp"] == 1 and tp2["tp"] == 2
    _assert_same_report(one, tp2, rel=1e-5)
