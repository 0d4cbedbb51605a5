"""Sharded (DCP) checkpoints in one process: format, read APIs, fp32 master
weights, async save, the old format, disk full, damaged checkpoints and
checkpoints from another model.  Layout changes: tests/parallel/test_checkpoint_dist.py."""
from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess

import pytest
import torch

from ckpthelpers import make_trainer, params, tiny_config
from mtnlg.errors import UserError
from mtnlg.train import checkpoint as ck
from mtnlg.train.dcp import Checkpointer


def trained(tmp_path, steps=2, name="run", **kw):
    t = make_trainer(tiny_config(**kw), tmp_path / name)
    for _ in range(steps):
        t.train_step()
    return t


def test_sharded_checkpoint_contents_and_read_apis(tmp_path):
    t = trained(tmp_path)
    path = t.save()
    assert path == tmp_path / "run/checkpoints/step_00000002"
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_00000002\n"
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["dcp/.metadata", "dcp/__0_0.distcp", "rng_rank00000.pt", "trainer.json"]
    for name, f in manifest["files"].items():
        assert (path / name).stat().st_size == f["bytes"] and ck.file_digest(path / name) == f["sha256"]
    assert manifest["aliases"] == {"lm_head.weight": "tok_emb.weight"}
    # one-process read APIs: full tensors, tied head aliased to the embedding
    state = ck.load_model_state(path)
    assert sorted(state) == sorted(t.model.state_dict())
    assert state["lm_head.weight"] is state["tok_emb.weight"]
    for n, p in t.model.state_dict().items():
        assert torch.equal(state[n], p), n
    names = [n for n, _ in ck.iter_model_tensors(path)]
    assert sorted(names) == sorted(state) and len(names) == len(set(names))
    assert ck.model_shapes(path)["lm_head.weight"] == tuple(t.model.lm_head.weight.shape)
    # optimizer state under parameter names
    meta = ck.tensor_metadata(path)
    opt = {n: t.optimizer.state[p] for n, p in zip(t._opt_names(), t._opt_params())}
    assert {k for k in meta if k.startswith("optim.")} == {f"optim.{n}.{k}" for n in opt for k in opt[n]}
    one = {"optim.blocks.0.attn.qkv.weight.exp_avg": torch.empty(meta["optim.blocks.0.attn.qkv.weight.exp_avg"][0])}
    ck.load_tensors(path, one)
    assert torch.equal(one["optim.blocks.0.attn.qkv.weight.exp_avg"], opt["blocks.0.attn.qkv.weight"]["exp_avg"])
    assert ck.read_trainer_state(path)["step"] == 2


def test_bf16_checkpoint_holds_fp32_master_weights_and_resumes_bitwise(tmp_path):
    t = trained(tmp_path, precision="bf16")
    path = t.save()
    meta = ck.tensor_metadata(path)
    assert all(dtype == torch.float32 for k, (_, dtype) in meta.items() if k.startswith("model."))
    state = ck.load_model_state(path)
    for n, m in zip(t._opt_names(), t._opt_params()):
        assert torch.equal(state[n], m.detach()), n  # the master copy, not its bf16 rounding
    fresh = make_trainer(tiny_config(precision="bf16"), tmp_path / "run", seed=99)
    assert fresh.resume() and fresh.step == 2
    for (n, a), b in zip(t.model.named_parameters(), fresh.model.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), n
    a, b = t.train_step(), fresh.train_step()
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    assert all(torch.equal(x, y) for x, y in zip(t._opt_params(), fresh._opt_params()))


def test_async_save_commits_when_the_write_completes(tmp_path):
    t = trained(tmp_path, steps=1, async_save=True)
    at_save = params(t)
    root = tmp_path / "run/checkpoints"
    t.save()
    assert not (root / "latest").exists()  # not committed yet: training goes on
    t.train_step()  # changes the weights the background thread is writing: it wrote a staged copy
    assert t.finish_checkpoint() == root / "step_00000001"
    assert (root / "latest").read_text() == "step_00000001\n" and ck.checkpoint_problem(root / "step_00000001") is None
    state = ck.load_model_state(root / "step_00000001")
    assert all(torch.equal(state[n], at_save[n]) for n in at_save)
    # the next save waits for a pending one first; poll() commits a finished one
    t.save()
    t.train_step()
    t.save()
    while t.finish_checkpoint(wait=False) is None:
        pass
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert t.finish_checkpoint() is None  # nothing pending


def test_fit_with_async_saves_commits_each_checkpoint(tmp_path):
    cfg = tiny_config(async_save=True, keep=3)
    cfg.train.steps, cfg.train.save_interval, cfg.train.eval_interval = 4, 2, 0
    cfg.logging.progress_bar = "never"
    t = make_trainer(cfg, tmp_path / "run")
    t.fit()
    root = tmp_path / "run/checkpoints"
    assert (root / "latest").read_text() == "step_00000004\n" and t.finish_checkpoint() is None
    assert all(ck.checkpoint_problem(root / f"step_{s:08d}") is None for s in (2, 4))
    fresh = make_trainer(cfg, tmp_path / "run", seed=99)
    assert fresh.resume() and fresh.step == 4
    assert all(torch.equal(a, b) for a, b in zip(t.model.parameters(), fresh.model.parameters()))


def legacy_save(t, root):
    """What mtnlg wrote before DCP checkpoints (the old Trainer.save, kept as a fixture)."""
    from mtnlg.train.legacy_checkpoint import _save_legacy
    names = t._opt_names()
    opt_state = {names[int(i)]: {k: v.clone() for k, v in st.items()}
                 for i, st in t.optimizer.state_dict()["state"].items()}
    master = {n: m.detach().clone() for n, m in zip(names, t._opt_params())} if t.master else None
    model_state = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    model_state["lm_head.weight"] = model_state["tok_emb.weight"]  # tied: stored once, aliased
    return _save_legacy(root, t.step, model_state, {"format": "by-name", "state": opt_state, "master": master},
                        t.state())


def test_old_format_loads_converts_and_resumes(tmp_path, capsys):
    t = trained(tmp_path, precision="bf16")
    path = legacy_save(t, tmp_path / "run/checkpoints")
    at_save_master = [m.detach().clone() for m in t._opt_params()]
    assert (path / "model.safetensors").exists() and ck.is_legacy(path)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    # read APIs on the old format
    assert ck.latest_checkpoint(tmp_path / "run/checkpoints") == path
    state = ck.load_model_state(path)
    assert state["lm_head.weight"] is state["tok_emb.weight"]
    assert all(torch.equal(state[n], p) for n, p in t.model.state_dict().items())
    # the trainer converts it in place and resumes bit for bit
    fresh = make_trainer(tiny_config(precision="bf16"), tmp_path / "run", seed=99)
    assert fresh.resume() and fresh.step == 2
    assert "converting" in capsys.readouterr().err
    assert not ck.is_legacy(path) and not (path / "model.safetensors").exists() and ck.checkpoint_problem(path) is None
    a, b = t.train_step(), fresh.train_step()
    assert a["loss"] == b["loss"]
    assert all(torch.equal(x, y) for x, y in zip(t._opt_params(), fresh._opt_params()))
    # the one-line command
    from mtnlg.cli import main
    capsys.readouterr()
    assert main(["checkpoint", "convert", str(tmp_path / "copy")]) == 0
    assert "step_00000002: converted to sharded DCP" in capsys.readouterr().out
    converted = ck.load_model_state(tmp_path / "copy/checkpoints/step_00000002")
    assert converted.keys() == state.keys()
    assert converted["tok_emb.weight"].dtype == torch.float32  # the fp32 master copy
    assert all(torch.equal(converted[n], m) for n, m in zip(t._opt_names(), at_save_master))
    assert main(["checkpoint", "verify", str(tmp_path / "copy")]) == 0
    assert "step_00000002: ok" in capsys.readouterr().out


@pytest.fixture
def small_fs(tmp_path):
    """A size-limited tmpfs (we run as root in CI containers); None where mounting is not permitted."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    size_kb = 1000
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                        capture_output=True).returncode == 0
    yield mnt if ok else None
    if ok:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, small_fs, monkeypatch, capsys):
    """On a 1000 KB tmpfs the first checkpoint (~620 KB) fits and the second does not.  Without
    permission to mount, the writer is made to raise ENOSPC instead (simulated disk full)."""
    run = (small_fs or tmp_path) / "run"
    t = make_trainer(tiny_config(keep=2), run)
    t.train_step()
    first = t.save()
    size = ck.checkpoint_bytes(first)
    assert 450_000 < size < 800_000, size
    if small_fs is None:
        import torch.distributed.checkpoint.filesystem as fs

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(fs, "_write_item", full)
    t.train_step()
    with pytest.raises(UserError) as info:
        t.save()
    msg = str(info.value)
    assert "\n" not in msg
    assert f"no space left on device in {run / 'checkpoints'} for checkpoint step 2: it needs about" in msg
    assert "removed the partial step_00000002.tmp, step_00000001 is intact and resumable" in msg
    if small_fs is not None:
        assert "free but checkpoint step 2 needs about" in capsys.readouterr().err  # warned before trying
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert (run / "checkpoints/latest").read_text() == "step_00000001\n"
    monkeypatch.undo()
    fresh = make_trainer(tiny_config(), run, seed=99)
    assert fresh.resume() and fresh.step == 1


def _saved(root, steps=(1, 2, 3)):
    saver = Checkpointer(root, keep=5)
    for s in steps:
        saver.save(s, {"model.tok_emb.weight": torch.full((4, 3), float(s)), "optim.tok_emb.weight.step":
                       torch.tensor(float(s))}, {"step": s, "consumed_samples": 0})
    return root


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"__0_0.distcp has \d+ bytes, the manifest says \d+ \(truncated"),
    ("flip", r"__0_0.distcp fails its sha256 checksum"),
    ("remove", r"__0_0.distcp is missing"),
    ("manifest", r"manifest.json is missing"),
])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, capsys, damage, message):
    root = _saved(tmp_path / "ckpt")
    newest = root / "step_00000003"
    shard = newest / "dcp/__0_0.distcp"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    elif damage == "remove":
        shard.unlink()
    else:
        (newest / "manifest.json").unlink()
    assert ck.latest_checkpoint(root) == root / "step_00000002"
    err = capsys.readouterr().err
    assert "skipped damaged checkpoint(s) step_00000003" in err and "using" in err
    import re
    assert re.search(message, err), err
    with pytest.raises(UserError, match=message):  # an explicitly chosen checkpoint is never replaced
        ck.verify_checkpoint(newest)


def test_no_intact_checkpoint_and_unreadable_shard_are_one_line_errors(tmp_path):
    root = _saved(tmp_path / "ckpt", steps=(1, 2))
    (root / "step_00000001/dcp/__0_0.distcp").unlink()
    with pytest.raises(UserError, match=r"cannot read checkpoint .*step_00000001: .*No such file.*__0_0.distcp"):
        ck.load_model_state(root / "step_00000001")  # read without verifying: the missing file is named
    (root / "step_00000002/trainer.json").write_text("{}")
    with pytest.raises(UserError, match=r"no intact checkpoint in .*step_00000002 \(.*trainer.json has 2 bytes.*"
                                        r"step_00000001 \(.*__0_0.distcp is missing"):
        ck.latest_checkpoint(root)


def test_checkpoint_from_another_model_is_refused(tmp_path):
    from mtnlg.config import dump_toml
    from mtnlg.infer.load import load_run
    from mtnlg.train.dcp import load_targets
    path = trained(tmp_path, steps=1).save()
    for cfg, message in [(tiny_config(hidden=64), r"stores 'model.tok_emb.weight' with shape \(256, 32\), the model "
                                                  r"has \(256, 64\)"),
                         (tiny_config(layers=3), r"has no tensor 'model.blocks.2.\S+': it was written for a different")]:
        other = make_trainer(cfg, tmp_path / "other")
        targets, _ = load_targets(other._named_opt_params(), other.optimizer, {}, ck.tensor_metadata(path))
        with pytest.raises(UserError, match=message):
            other._checkpointer().load(path, targets)
        run = tmp_path / f"run{cfg.model.n_layers}{cfg.model.hidden}"
        run.mkdir()
        (run / "config.toml").write_text(dump_toml(cfg))
        with pytest.raises(UserError, match="written for a different model"):
            load_run(run, checkpoint=path)


def test_load_run_skips_a_damaged_newest_checkpoint(tmp_path, sotu_small, capsys):
    """generate / eval load through load_run: a truncated newest checkpoint is skipped with a warning."""
    from mtnlg.config import dump_toml
    from mtnlg.infer.load import load_run
    cfg = tiny_config(keep=3)
    t = make_trainer(cfg, tmp_path / "run")
    t.train_step()
    t.save()
    first = params(t)
    t.train_step()
    second = t.save()
    (tmp_path / "run/config.toml").write_text(dump_toml(cfg))
    shutil.copy(sotu_small + ".tokenizer.json", tmp_path / "run/tokenizer.json")
    shard = second / "dcp/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    _, model, _ = load_run(tmp_path / "run")
    assert "skipped damaged checkpoint(s) step_00000002" in capsys.readouterr().err
    assert model.lm_head.weight is model.tok_emb.weight
    assert all(torch.equal(p, first[n]) for n, p in model.named_parameters())
    with pytest.raises(UserError, match="step_00000002 is damaged: .*__0_0.distcp has"):
        load_run(tmp_path / "run", checkpoint=second)


def test_missing_latest_marker_uses_the_newest_intact_checkpoint(tmp_path, capsys):
    """A crash between renaming the first checkpoint into place and writing `latest`."""
    root = _saved(tmp_path / "ckpt", steps=(1, 2))
    (root / "latest").unlink()
    assert ck.latest_checkpoint(root) == root / "step_00000002"
    assert "latest is missing" in capsys.readouterr().err
    assert ck.latest_checkpoint(tmp_path / "nothing") is None


def test_short_write_on_a_full_disk_is_named_as_disk_full(tmp_path, monkeypatch):
    """On a full ext4 disk torch's zip writer fails with "unexpected pos" and no errno (seen in the
    760M scale drill, 8.5 GB checkpoints); with less free space than the last checkpoint took, that
    is reported as a full disk.  With space to spare the same error is reported as it is."""
    import shutil as sh
    import torch.distributed.checkpoint.filesystem as fs

    from mtnlg.train import dcp
    run = tmp_path / "run"
    t = make_trainer(tiny_config(keep=2), run)
    t.train_step()
    t.save()

    def short(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(fs, "_write_item", short)
    real = sh.disk_usage
    for free, expected in ((1000, "no space left on device in"), (10**12, "failed (RuntimeError")):
        monkeypatch.setattr(dcp.shutil, "disk_usage", lambda p, free=free: real(p)._replace(free=free))
        t.train_step()
        with pytest.raises(UserError, match=re.escape(expected)):
            t.save()
    assert (run / "checkpoints/latest").read_text() == "step_00000001\n"
