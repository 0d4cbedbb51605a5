"""ZeRO data parallelism (FSDP2 over the dp mesh) equals the single-process model.

One spawn of 4 gloo ranks drives the real ``Trainer`` through
``parallelize`` for zero 1, 2 and 3 over dp=4 (some shards uneven) and for
dp2 x tp2 (2-D FSDP x TP, with and without sequence parallelism), each with
two micro-batches per rank so gradient accumulation is exercised.  After three
AdamW steps with clipping: losses, gradient norms, every parameter and the
AdamW moments equal a single-process trainer on the same global batches (fp32);
each rank stores 1/dp of parameters and optimizer state; a checkpoint saved
from the sharded run resumes into a fresh sharded model and continues
identically.  The end-to-end test runs ``torchrun -m mtnlg train`` with
``parallel.zero=3`` and resumes its checkpoint as zero=0.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from test_train_torchrun import assert_same_curve, curve, launch
from trainhelpers import tiny_overrides

# fp32; see tests/parallel/test_tensor.py for why the post-step tolerance is looser than the gradients'
STEP_ATOL, RTOL = 1e-5, 1e-5
BF16_ATOL = 3e-2  # bf16 compute: per-step losses


def tiny_config(zero=0, tp=1, dp=1, precision="fp32", sp=False, ac=False):
    from mtnlg.config import Config
    cfg = Config()
    m, t, o = cfg.model, cfg.train, cfg.optim
    m.n_layers, m.hidden, m.n_heads, m.seq_len, m.vocab_size, m.make_vocab_divisible_by = 2, 32, 4, 16, 250, 64
    t.global_batch, t.steps, t.precision, t.device = 16, 4, precision, "cpu"
    t.micro_batch = 16 // (2 * dp) if dp > 1 else 8  # two micro-batches per rank when sharded
    t.activation_checkpointing = ac
    o.lr, o.warmup_steps, o.grad_clip = 3e-3, 1, 0.1  # a tight clip: clipping is active
    cfg.parallel.tp, cfg.parallel.dp, cfg.parallel.zero, cfg.parallel.sequence_parallel = tp, dp, zero, sp
    return cfg


def dataset(cfg, n=64):
    g = np.random.default_rng(0)
    return [g.integers(0, cfg.model.vocab_size, cfg.model.seq_len + 1) for _ in range(n)]


def make_trainer(cfg, run_dir, world=1, rank=0):
    from mtnlg.parallel.setup import build, check_layout
    from mtnlg.train.trainer import Trainer
    device = torch.device("cpu")
    dims = check_layout(cfg, world) if world > 1 else None
    model, topo = build(cfg, dims, device, rank, seed=7)  # meta-device build, local shards initialised
    data = dataset(cfg)
    return Trainer(cfg, model, data, data, run_dir, device, topo)


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float()


def compare(cfg, world, rank, tmp):
    """Three steps sharded and single-process; differences and local sizes."""
    from mtnlg.parallel.data import local_numel
    ref = make_trainer(tiny_config(precision=cfg.train.precision), tmp / f"ref{rank}")
    par = make_trainer(cfg, tmp / "par", world, rank)
    ref_rec = [ref.train_step() for _ in range(2)]
    par_rec = [par.train_step() for _ in range(2)]
    # 8 validation samples on both (no-grad forwards: zero 1/2 keep parameters gathered after them)
    val = abs(ref.evaluate(8 // ref.cfg.train.micro_batch) - par.evaluate(8 // cfg.train.micro_batch))
    # fewer validation samples than dp ranks' micro-batches (dp4 x mb 2: 2 samples, two ranks empty): every
    # rank must still run the same forwards, which are collective under ZeRO (this hung before)
    mb = cfg.train.micro_batch
    with torch.no_grad():
        want = ref._loss(*ref._batch(ref.valid_data, 0, mb)).item()
    val_uneven = abs(par.evaluate(1) - want)
    ref_rec.append(ref.train_step())
    par_rec.append(par.train_step())
    r = {"loss": max(abs(a["loss"] - b["loss"]) for a, b in zip(ref_rec, par_rec)),
         "norm": max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(ref_rec, par_rec)),
         "clipped": all(a["grad_norm"] > cfg.optim.grad_clip for a in ref_rec),
         "master": par.master is None, "val": val, "val_uneven": val_uneven}
    rp = dict(ref.model.named_parameters())
    params = list(par.model.named_parameters())
    r["params"] = max((full(p) - rp[n].float()).abs().max().item() for n, p in params)
    ref_state = {n: ref.optimizer.state[p] for n, p in zip(ref._opt_names(), ref._opt_params())}
    par_state = {n: par.optimizer.state[p] for n, p in zip(par._opt_names(), par._opt_params())}
    r["moments"] = max((full(par_state[n][k]) - ref_state[n][k]).abs().max().item()
                       for n in ref_state for k in ("exp_avg", "exp_avg_sq"))
    # memory: what this rank stores (tied embedding counted once by named_parameters)
    r["numel_param"] = sum(p.numel() for _, p in params)  # global shapes
    r["local_param"] = local_numel(p for _, p in params)
    r["local_moments"] = local_numel(s["exp_avg"] for s in par_state.values())
    r["param_types"] = sorted({type(p).__name__ for _, p in params})

    # checkpoint: save the sharded run, resume into a fresh sharded model, one more step on both
    par.save()
    at_save = {n: full(p) for n, p in params}
    if cfg.train.precision == "bf16":  # into one process: bf16 weights, fp32 master = the fp32 shards
        one = make_trainer(copy.deepcopy(cfg), tmp / "par")  # world=1: the parallel section is ignored
        assert one.resume() and one.master is not None
        names = one._opt_names()
        r["to_master"] = max((m - at_save[n]).abs().max().item() for n, m in zip(names, one._opt_params()))
    fresh = make_trainer(cfg, tmp / "par", world, rank)
    assert fresh.resume()
    a, b = par.train_step(), fresh.train_step()
    fp = dict(fresh.model.named_parameters())
    r["resume"] = max([abs(a["loss"] - b["loss"])] + [(full(p) - full(fp[n])).abs().max().item() for n, p in params])
    return r


def between_micro_batches(zero, world, rank, tmp):
    """After a non-final micro-batch's backward: is the block's weight still gathered
    (a plain full Parameter) and does it hold an unreduced gradient?  And after the final one?"""
    t = make_trainer(tiny_config(zero=zero, dp=4), tmp, world, rank)
    x, y = t._batch(t.train_data, 0, 2)
    seen = []
    for last in (False, True):
        t.topo.before_micro_batch(last)
        t._loss(x, y).backward()
        w = t.model.blocks["0"].mlp.fc.weight
        seen.append((type(w).__name__, w.grad is not None))
    return seen


def worker(rank, world_size, tmp):
    from pathlib import Path
    tmp = Path(tmp)
    out = {}
    for name, kw in [("dp4_z3", dict(zero=3, dp=4)), ("dp4_z2", dict(zero=2, dp=4)),
                     ("dp4_z1", dict(zero=1, dp=4)), ("dp2tp2_z3", dict(zero=3, dp=2, tp=2)),
                     ("dp2tp2_z2_sp", dict(zero=2, dp=2, tp=2, sp=True)),
                     ("dp4_z3_bf16_ac", dict(zero=3, dp=4, precision="bf16", ac=True))]:
        out[name] = compare(tiny_config(**kw), world_size, rank, tmp / name)
    out["modes"] = {z: between_micro_batches(z, world_size, rank, tmp / f"modes{z}") for z in (1, 2, 3)}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(worker, world_size=4, args=(str(tmp_path_factory.mktemp("zero")),), timeout_s=180)


@pytest.mark.parametrize("layout", ["dp4_z3", "dp4_z2", "dp4_z1", "dp2tp2_z3", "dp2tp2_z2_sp"])
def test_zero_matches_single_process(results, layout):
    for rank, res in enumerate(results):
        r = res[layout]
        assert r["clipped"] and r["master"], (rank, r)
        assert r["loss"] < STEP_ATOL and r["val"] < STEP_ATOL and r["norm"] < RTOL, (rank, layout, r)
        assert r["val_uneven"] < STEP_ATOL, (rank, layout, r)
        assert r["params"] < STEP_ATOL and r["moments"] < STEP_ATOL, (rank, layout, r)
        assert r["resume"] < 1e-6, (rank, layout, r)
        assert r["param_types"] == ["DTensor"]


@pytest.mark.parametrize("layout", ["dp4_z3", "dp4_z1", "dp2tp2_z3"])
def test_each_rank_stores_a_shard(results, layout):
    """Parameters and AdamW moments: ~1/(dp*tp) of the model per rank (FSDP chunks dim 0;
    under tp the small replicated norms and biases are sharded over dp only)."""
    for rank, res in enumerate(results):
        r = res[layout]
        assert r["local_param"] <= r["numel_param"] / 4 * 1.05, (rank, r)
        assert r["local_moments"] == r["local_param"], (rank, r)
    if layout.startswith("dp4"):  # tp also replicates norms and biases: no exact sum there
        assert sum(r[layout]["local_param"] for r in results) == results[0][layout]["numel_param"]


def test_what_each_level_keeps_between_micro_batches(results):
    gathered, sharded = "Parameter", "DTensor"
    for res in results:
        m = res["modes"]
        assert m[1] == [(gathered, True), (sharded, True)]  # zero 1: full params, full local gradient
        assert m[2] == [(gathered, False), (sharded, True)]  # zero 2: full params, gradient reduce-scattered
        assert m[3] == [(sharded, True), (sharded, True)]  # zero 3: resharded, gradient reduce-scattered


def test_bf16_with_activation_checkpointing(results):
    """bf16 under ZeRO: fp32 shards and the FSDP mixed-precision policy, no MasterWeights;
    close to the single-process bf16 trainer (which keeps bf16 weights + fp32 master), and
    its checkpoint resumes there with the fp32 shards as the master copy."""
    for rank, res in enumerate(results):
        r = res["dp4_z3_bf16_ac"]
        assert r["master"] and r["loss"] < BF16_ATOL and r["resume"] < 1e-6 and r["to_master"] == 0, (rank, r)


def test_layout_errors():
    from mtnlg.errors import UserError
    from mtnlg.parallel.setup import check_layout
    check_layout(_with(tiny_config(zero=3), pp=2, dp=0), 4)  # ZeRO composes with pipeline parallelism
    with pytest.raises(UserError, match="does not support train.precision=fp16"):
        check_layout(tiny_config(zero=2, dp=2, precision="fp16"), 2)
    cfg = tiny_config()
    cfg.parallel.zero = 4
    with pytest.raises(UserError, match="parallel.zero must be"):
        cfg.validate()


def _with(cfg, **parallel):
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def test_torchrun_zero3_matches_one_process_and_resumes_as_zero0(tmp_path, sotu_small):
    """`torchrun -m mtnlg train --set parallel.zero=3` on 2 processes follows the single-process
    curve; its checkpoint (full tensors) resumes as plain data parallelism and continues on it."""
    over = tiny_overrides(sotu_small, **{"train.steps": 4, "train.eval_interval": 2, "train.save_interval": 2})
    launch(1, tmp_path / "single", over + ["train.threads=1"])
    out = launch(2, tmp_path / "zero3", over + ["parallel.zero=3"])
    assert "(dp 2, zero 3)" in out.stdout
    assert_same_curve(curve(tmp_path / "single"), curve(tmp_path / "zero3"))
    out = launch(2, tmp_path / "zero3", ["train.steps=6", "parallel.zero=0"], config=None)
    assert "resumed at step 4" in out.stdout
    launch(1, tmp_path / "single", ["train.steps=6"], config=None)
    assert_same_curve(curve(tmp_path / "single"), curve(tmp_path / "zero3"))


def _chunked_reduce_scatter_worker(rank, world_size):
    import torch.distributed as dist
    from mtnlg.parallel.data import ChunkedReduceScatter
    out = {}
    for n, chunk in ((1000, 64), (1001 * world_size, 300), (7, 1 << 22)):  # ragged last slice, one slice
        inputs = [torch.randn(n * world_size, generator=torch.Generator().manual_seed(r + 10 * n))
                  for r in range(world_size)]  # every rank's input, so each rank can sum them itself
        got = torch.empty(n)
        ChunkedReduceScatter(chunk)(got, inputs[rank].clone(), dist.group.WORLD, dist.ReduceOp.SUM)
        terms = torch.stack(inputs).double()[:, rank * n:(rank + 1) * n]
        want, scale = terms.sum(0), terms.abs().sum(0)  # error bound of a float sum: roundings x sum of |terms|
        err = ((got.double() - want).abs() / scale).max().item()
        out[n] = (err, want.abs().max().item())
    return out  # plain values: tensors would go back through shared memory the exiting worker owns


def test_chunked_reduce_scatter_gives_each_rank_its_summed_shard():
    """The gloo reduce-scatter FSDP uses on CPU, in slices (ragged last slice, and a single
    slice), gives every rank its shard of the sum over 3 ranks: checked against a float64 sum
    (tolerance: 2 fp32 roundings of the terms' magnitude, what a 3-term sum in any order can be
    off by; a wrong slice or rank order is off by O(1))."""
    results = run_distributed(_chunked_reduce_scatter_worker, world_size=3, timeout_s=60)
    for rank in range(3):
        for n, (err, size) in results[rank].items():
            assert err <= 2 * 2 ** -24 and size > 0, (rank, n, err)
