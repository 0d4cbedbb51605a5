import argparse
import json
import math
import shutil

import pytest
import torch

from trainhelpers import losses, read_metrics, tiny_overrides, train
from mtnlg.config import load_config
from mtnlg.errors import UserError
from mtnlg.model.gpt import build_model
from mtnlg.train import checkpoint as ckpt
from mtnlg.train.ac import apply_activation_checkpointing
from mtnlg.train.schedule import global_batch_at, lr_at


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bitwise_identical(tmp_path, sotu_small, precision):
    over = tiny_overrides(sotu_small, **{"train.precision": precision, "model.dropout": 0.1})
    train(tmp_path / "full", over)
    train(tmp_path / "split", over, stop_after=3)
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3]
    assert train(tmp_path / "split", [], config=None) == 0  # resume from the run directory alone
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    full = ckpt.load_model_state(tmp_path / "full/checkpoints/step_00000006")
    split = ckpt.load_model_state(tmp_path / "split/checkpoints/step_00000006")
    assert all(torch.equal(full[k], split[k]) for k in full)


def test_run_directory_contents_and_metrics(tmp_path, sotu_small):
    run_dir = tmp_path / "run"
    train(run_dir, tiny_overrides(sotu_small, **{"train.steps": 12, "train.eval_interval": 6,
                                                 "optim.lr": 3e-3, "optim.warmup_steps": 2}))
    assert (run_dir / "config.toml").exists() and (run_dir / "tokenizer.json").exists()
    assert load_config(run_dir / "config.toml").train.steps == 12
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "consumed_samples"):
        assert all(key in r for r in records), key
    assert records[-1]["consumed_samples"] == 12 * 8
    assert records[5]["val_loss"] is not None and records[11]["val_loss"] < records[5]["val_loss"]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    # keep_checkpoints=2 pruned step 3 and 6
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000009", "step_00000012"]
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_00000012"
    # running again is a no-op, not a crash
    assert train(run_dir, [], config=None) == 0


def test_failed_save_keeps_latest_good_checkpoint(tmp_path, sotu_small, monkeypatch):
    """A save that fails mid-write (here: the DCP writer raises) leaves the previous checkpoint and
    `latest` untouched and removes its partial .tmp; a crash that leaves a .tmp behind is ignored."""
    import torch.distributed.checkpoint.filesystem as fs
    run_dir = tmp_path / "run"
    train(run_dir, tiny_overrides(sotu_small), stop_after=3)
    good = (run_dir / "checkpoints/latest").read_text()

    def boom(*a, **k):
        raise OSError("simulated write failure")
    monkeypatch.setattr(fs, "_write_item", boom)
    with pytest.raises(UserError, match="saving checkpoint step 6 .* failed .*simulated write failure.*removed the "
                                        "partial step_00000006.tmp, step_00000003 is intact"):
        train(run_dir, [], config=None, stop_after=3)
    monkeypatch.undo()
    assert (run_dir / "checkpoints/latest").read_text() == good
    assert not (run_dir / "checkpoints/step_00000006.tmp").exists()
    (run_dir / "checkpoints/step_00000006.tmp/dcp").mkdir(parents=True)  # what a kill -9 mid-save leaves
    (run_dir / "checkpoints/step_00000006.tmp/dcp/__0_0.distcp").write_bytes(b"partial")
    assert train(run_dir, [], config=None) == 0  # resumes from step 3 and cleans up
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_config(tmp_path, sotu_small):
    run_dir = tmp_path / "run"
    train(run_dir, tiny_overrides(sotu_small), stop_after=2)
    with pytest.raises(UserError, match="may not change|different config"):
        train(run_dir, tiny_overrides(sotu_small, **{"model.hidden": 128}))
    with pytest.raises(UserError, match="no run yet"):
        train(tmp_path / "empty", [], config=None)


@pytest.mark.parametrize("precision", ["bf16-autocast", "fp16"])
def test_mixed_precision_modes_train(tmp_path, sotu_small, precision):
    train(tmp_path / "r", tiny_overrides(sotu_small, **{"train.precision": precision, "train.steps": 8,
                                                        "optim.lr": 3e-3, "train.eval_interval": 0}))
    records = read_metrics(tmp_path / "r")
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    if precision == "fp16":
        assert records[0]["loss_scale"] == 65536.0


def test_tensorboard_events_written(tmp_path, sotu_small):
    pytest.importorskip("tensorboard")
    train(tmp_path / "r", tiny_overrides(sotu_small, **{"logging.tensorboard": "true", "train.steps": 2}))
    assert list((tmp_path / "r/tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.1),    # SDPA with dropout
                                           (torch.bfloat16, 0.0)])  # the CPU bf16 attention kernel
def test_activation_checkpointing_gives_identical_gradients(dtype, dropout):
    cfg = load_config(None, ["model.n_layers=2", "model.hidden=64", "model.n_heads=4", "model.seq_len=16",
                             "model.vocab_size=128", f"model.dropout={dropout}"]).model
    a, b = build_model(cfg, "cpu", seed=0).to(dtype), build_model(cfg, "cpu", seed=0).to(dtype)
    apply_activation_checkpointing(b)
    x = torch.randint(0, 128, (2, 16))
    for m in (a, b):
        torch.manual_seed(1)
        m(x).float().square().mean().backward()
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


def test_lr_schedule_and_batch_rampup():
    cfg = load_config(None, ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=10", "train.steps=110",
                             "train.global_batch=64", "train.micro_batch=8", "train.batch_rampup=[16, 16, 300]"])
    assert lr_at(0, cfg.optim, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg.optim, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg.optim, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg.optim, 110) == pytest.approx(0.1)
    assert lr_at(500, cfg.optim, 110) == pytest.approx(0.1)
    # 3 increments (16 -> 32 -> 48 -> 64), one every 100 samples
    assert [global_batch_at(n, cfg.train) for n in (0, 99, 100, 250, 299, 300, 10**6)] == [16, 16, 32, 48, 48, 64, 64]


def test_batch_rampup_changes_accumulation_not_results(tmp_path, sotu_small):
    train(tmp_path / "r", tiny_overrides(sotu_small, **{"train.batch_rampup": "[4, 4, 8]", "train.steps": 4}))
    assert [r["global_batch"] for r in read_metrics(tmp_path / "r")] == [4, 4, 8, 8]
    assert [r["consumed_samples"] for r in read_metrics(tmp_path / "r")] == [4, 8, 16, 24]


def test_resume_may_extend_steps_but_not_change_the_model(tmp_path, sotu_small):
    run_dir = tmp_path / "run"
    train(run_dir, tiny_overrides(sotu_small, **{"train.steps": 2}))
    with pytest.raises(UserError, match="may not change the model"):
        train(run_dir, ["model.n_layers=3"], config=None)
    train(run_dir, ["train.steps=3"], config=None)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_damaged_checkpoint_falls_back_and_torn_metrics_line(tmp_path, sotu_small, capsys):
    run_dir = tmp_path / "run"
    train(run_dir, tiny_overrides(sotu_small, **{"train.save_interval": 1, "train.keep_checkpoints": 3}), stop_after=3)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a crash mid-write
    shard = run_dir / "checkpoints/step_00000003/dcp/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    assert train(run_dir, ["train.steps=3"], config=None) == 0  # falls back to step 2, trains step 3 again
    err = capsys.readouterr().err
    assert "skipped damaged checkpoint(s) step_00000003" in err and "__0_0.distcp has 100 bytes" in err
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    for step in (1, 2, 3):
        (run_dir / f"checkpoints/step_{step:08d}/trainer.json").write_text("{")
    with pytest.raises(UserError, match="no intact checkpoint in .*step_00000003 .*trainer.json has 1 bytes"):
        train(run_dir, [], config=None)


def test_resume_drops_a_torn_metrics_line(tmp_path, sotu_small):
    run_dir = tmp_path / "run"
    train(run_dir, tiny_overrides(sotu_small), stop_after=3)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')
    train(run_dir, [], config=None)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_extending_a_run_continues_the_lr_schedule(tmp_path, sotu_small):
    over = tiny_overrides(sotu_small, **{"train.steps": 4, "optim.warmup_steps": 1})
    train(tmp_path / "r", over)
    train(tmp_path / "r", ["train.steps=6"], config=None)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "r")]
    assert lrs[1:] == sorted(lrs[1:], reverse=True)  # decays monotonically across the extension
    assert lrs[4:] == [pytest.approx(1e-4), pytest.approx(1e-4)]  # continues at min_lr, no jump back up


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    from mtnlg.train.dcp import Checkpointer
    root = tmp_path / "ckpt"
    state = {"model.w": torch.zeros(2)}
    saver = Checkpointer(root, keep=2)
    for step in (100, 200, 300):
        saver.save(step, state, {"step": step})
    (root / "latest").write_text("step_00000200\n")  # a user points latest back (e.g. after a bad step)
    saver.save(250, state, {"step": 250})
    assert ckpt.latest_checkpoint(root).name == "step_00000250"
    assert (root / "step_00000200").exists()


def test_dataset_tokenized_with_another_tokenizer_is_refused(tmp_path, sotu_small):
    from mtnlg.data.tokenizer import train_tokenizer
    other = tmp_path / "other.json"
    train_tokenizer(["a different corpus entirely " * 50, "with other words " * 40], 300).save(str(other))
    with pytest.raises(UserError, match="was tokenized with a different tokenizer"):
        train(tmp_path / "r", tiny_overrides(sotu_small, **{"data.tokenizer": f'"{other}"'}))
    assert not (tmp_path / "r").exists()
