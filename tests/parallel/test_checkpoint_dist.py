"""Sharded checkpoints across layouts (gloo, 2 processes).

One spawn trains tp2, dp2 x zero3 and pp2 for two steps and saves each
(every rank writes its own shards), then resumes checkpoints into other
layouts (zero3 -> tp2, tp2 -> dp2 x zero1, one process -> pp2 and -> pp2 zbv, pp2 -> tp2)
and takes one more step (zbv, 4 layers: rank 0 holds both the embedding and the
last stage's tied copy); then a save in which one rank's disk is full
fails cleanly on both ranks.  The parent resumes the tp2 / zero3 / pp2 / zbv
checkpoints in one process.  Every resumed step-3 loss equals the
uninterrupted single-process run's (rel 1e-4; observed 0 with the layout-independent
meta-device init, `pytest -s` prints it; up to ~1e-7 would be fp32 reductions in another order).  A second spawn kills a rank in the middle of
an asynchronous save: the previous checkpoint stays `latest`, intact and
resumable.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ckpthelpers import make_trainer, params, tiny_config
from dist_utils import run_distributed
from mtnlg.train import checkpoint as ck

REL = 1e-4
# zbv: two chunks per rank in a V, so rank 0 holds the embedding *and* the last stage's tied copy
ZBV = dict(pp=2, schedule="zbv", layers=4)
SAVE_LAYOUTS = {"tp2": dict(tp=2), "zero3": dict(dp=2, zero=3), "pp2": dict(pp=2), "zbv": ZBV}
# (checkpoint written by, resumed as)
CROSS = [("zero3", dict(tp=2)), ("tp2", dict(dp=2, zero=1)), ("single", dict(pp=2)), ("pp2", dict(tp=2)),
         ("single4", ZBV)]


def layers(name: str) -> int:
    return 4 if name in ("zbv", "single4") else 2


def worker(rank, world, tmp):
    tmp = Path(tmp)
    out = {"saved": {}, "resumed": {}}
    for name, kw in SAVE_LAYOUTS.items():
        t = make_trainer(tiny_config(**kw), tmp / name, world, rank)
        losses = [t.train_step()["loss"] for _ in range(2)]
        t.save()
        out["saved"][name] = losses
        weights = params(t) if kw.get("pp", 1) == 1 else dict(t.model.named_parameters())  # pp: this stage's
        out.setdefault("weights", {})[name] = {n: w.detach().numpy().copy() for n, w in weights.items()}
    for src, kw in CROSS:
        t = make_trainer(tiny_config(**kw), tmp / src, world, rank, seed=99)  # other initial weights
        assert t.resume() and t.step == 2
        out["resumed"][(src, "_".join(f"{k}{v}" for k, v in kw.items()))] = t.train_step()["loss"]
    out["disk_full"] = disk_full_on_one_rank(rank, world, tmp / "tp2")
    return out


def disk_full_on_one_rank(rank, world, run_dir):
    """Rank 1's writes fail with ENOSPC: every rank raises the same one-line UserError."""
    import errno
    import torch.distributed.checkpoint.filesystem as fs
    from mtnlg.errors import UserError
    t = make_trainer(tiny_config(tp=2), run_dir, world, rank)
    assert t.resume()
    t.train_step()
    real = fs._write_item
    if rank == 1:
        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        fs._write_item = full
    try:
        t.save()
    except UserError as e:
        return str(e)
    finally:
        fs._write_item = real
    return "saved"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_layouts")
    losses, at_step2 = {}, {}
    for n, name in ((2, "single"), (4, "single4")):  # uninterrupted single-process runs, saved at step 2
        ref = make_trainer(tiny_config(layers=n), tmp / name)
        losses[n] = [ref.train_step()["loss"] for _ in range(2)]
        at_step2[n] = params(ref)
        ref.save()
        losses[n].append(ref.train_step()["loss"])
    results = run_distributed(worker, world_size=2, args=(str(tmp),), timeout_s=240)
    return tmp, losses, at_step2, results


def test_every_layout_trains_like_one_process(runs):
    _, ref, _, results = runs
    for res in results:
        for name, losses in res["saved"].items():
            assert losses == pytest.approx(ref[layers(name)][:2], rel=REL), name
    worst = max(abs(a / b - 1) for res in results for name, losses in res["saved"].items()
                for a, b in zip(losses, ref[layers(name)]))
    print(f"layouts' first two losses: max relative difference from one process {worst:.1e}")  # pytest -s


def test_each_rank_writes_its_own_shards(runs):
    tmp, _, at_step2, results = runs
    for name in SAVE_LAYOUTS:
        path = ck.latest_checkpoint(tmp / name / "checkpoints")
        files = {f.name: f.stat().st_size for f in (path / "dcp").glob("*.distcp")}
        assert sorted(files) == ["__0_0.distcp", "__1_0.distcp"], (name, files)
        assert min(files.values()) > 0.25 * sum(files.values()), (name, files)  # both ranks hold a real share
        meta = ck.tensor_metadata(path)
        assert "model.lm_head.weight" not in meta  # pp: the last stage's tied copy is not saved
        state = ck.load_model_state(path)  # one process, no process group: full tensors
        assert sorted(state) == sorted([*at_step2[layers(name)], "lm_head.weight"])
        for res in results:  # exactly the weights the layout held when it saved
            for n, w in res["weights"][name].items():
                if not (name in ("pp2", "zbv") and n == "lm_head.weight"):
                    assert torch.equal(state[n], torch.from_numpy(w)), (name, n)


def test_disk_full_on_one_rank_fails_every_rank_cleanly(runs):
    tmp, _, _, results = runs
    for res in results:
        assert "no space left on device" in res["disk_full"] and "\n" not in res["disk_full"], res["disk_full"]
        assert "removed the partial step_00000003.tmp, step_00000002 is intact" in res["disk_full"]
    root = tmp / "tp2" / "checkpoints"
    assert not list(root.glob("*.tmp")) and ck.latest_checkpoint(root) == root / "step_00000002"


def test_resume_under_another_layout_continues_the_curve(runs):
    tmp, ref, _, results = runs
    worst = 0.0
    for res in results:
        assert len(res["resumed"]) == len(CROSS)
        for (src, layout), loss in res["resumed"].items():
            assert loss == pytest.approx(ref[layers(src)][2], rel=REL), (src, layout, loss)
            worst = max(worst, abs(loss / ref[layers(src)][2] - 1))
    for src in SAVE_LAYOUTS:  # ... and in one process
        t = make_trainer(tiny_config(layers=layers(src)), tmp / src, seed=99)
        assert t.resume() and t.step == 2
        loss = t.train_step()["loss"]
        assert loss == pytest.approx(ref[layers(src)][2], rel=REL), src
        worst = max(worst, abs(loss / ref[layers(src)][2] - 1))
    print(f"resumed step-3 losses: max relative difference from the uninterrupted run {worst:.1e}")  # pytest -s


def killed_during_async_save(rank, world, tmp):
    import torch.distributed.checkpoint.filesystem as fs
    t = make_trainer(tiny_config(tp=2, async_save=True), Path(tmp), world, rank)
    t.train_step()
    t.save()
    assert t.finish_checkpoint() is not None  # step 1 committed
    t.train_step()
    if rank == 1:
        def die(*a, **k):
            os._exit(9)  # the process dies in the middle of writing its shard
        fs._write_item = die
    t.save()
    t.train_step()
    t.finish_checkpoint()
    return "survived"


def test_rank_killed_during_async_save_leaves_the_previous_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="rank 1: exited with code 9|rank 0"):
        run_distributed(killed_during_async_save, world_size=2, args=(str(tmp_path),), timeout_s=30)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000001\n"
    assert ck.latest_checkpoint(root) == root / "step_00000001"
    t = make_trainer(tiny_config(), tmp_path, seed=99)
    assert t.resume() and t.step == 1
    t.train_step()
    t.save()
    assert not list(root.glob("*.tmp"))
