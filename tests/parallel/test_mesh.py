"""Layout validation (no processes needed) and the mesh's rank placement."""
from __future__ import annotations

import pytest

from dist_utils import run_distributed
from mtnlg.config import ModelConfig, ParallelConfig
from mtnlg.errors import UserError
from mtnlg.parallel.mesh import ParallelDims, init_distributed

MODEL = ModelConfig(n_layers=4, hidden=64, n_heads=4, seq_len=32)


def dims(world, **kw):
    return ParallelDims.from_config(ParallelConfig(**kw), MODEL, world)


def test_dp_inferred_and_coords():
    d = dims(8, tp=2, pp=2)
    assert (d.dp, d.pp, d.tp, d.world_size) == (2, 2, 2, 8)
    # tp innermost: consecutive ranks share a tensor-parallel group (a node)
    assert [d.coords(r)["tp"] for r in range(4)] == [0, 1, 0, 1]
    assert d.coords(5) == {"dp": 1, "pp": 0, "tp": 1}


@pytest.mark.parametrize("world, kw, match", [
    (6, dict(tp=4), r"world size 6 is not divisible by tp\*pp = 4\*1 = 4"),
    (8, dict(tp=2, dp=3), r"dp\*pp\*tp = 3\*1\*2 = 6 does not equal the world size 8"),
    (8, dict(tp=8), r"tp=8 must divide model.n_heads=4"),
    (8, dict(pp=8), r"pp=8 exceeds model.n_layers=4"),
    (2, dict(tp=0), r"parallel.tp must be >= 1"),
    (4, dict(tp=4, sequence_parallel=True), None),
])
def test_invalid_layouts_fail_clearly(world, kw, match):
    if match is None:
        assert dims(world, **kw).tp == 4
        return
    with pytest.raises(UserError, match=match):
        dims(world, **kw)


def test_single_process_creates_no_group(monkeypatch):
    import torch.distributed as dist
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(device="cpu")[:2] == (0, 1)
    assert not dist.is_initialized()


def _mesh_worker(rank, world_size):
    d = ParallelDims.from_config(ParallelConfig(tp=2), MODEL, world_size)
    mesh = d.build_mesh("cpu")
    return mesh.mesh_dim_names, mesh["tp"].mesh.tolist(), mesh["dp"].mesh.tolist()


def test_mesh_tp_innermost():
    res = run_distributed(_mesh_worker, world_size=4)
    assert res[0] == (("dp", "pp", "tp"), [0, 1], [0, 2])
    assert res[3][1:] == ([2, 3], [1, 3])
