"""Layout checks that match what runs: presets at the cluster sizes they name,
fewer micro-batches than stages (legal, warned, GPipe), batch ramp-up sizes
checked as the sizes the ramp actually reaches.  No processes are spawned."""
from __future__ import annotations

from pathlib import Path

import pytest

from mtnlg.config import load_config
from mtnlg.errors import UserError
from mtnlg.parallel.setup import check_layout, layout_warnings
from mtnlg.train.schedule import global_batch_at

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# world sizes each preset names (processes / GPUs); MT-NLG trained on 280, 350 and 420 DGX nodes of 8 GPUs
CLUSTERS = {"tiny": [1], "gpt-125m": [1], "gpt-1.3b": [1], "gpt-760m": [8],
            "mtnlg-530b": [280 * 8, 350 * 8, 420 * 8]}


def test_every_preset_is_listed():
    assert sorted(p.stem for p in CONFIGS.glob("*.toml")) == sorted(CLUSTERS)


@pytest.mark.parametrize("preset,world", [(k, w) for k, ws in CLUSTERS.items() for w in ws])
def test_preset_passes_the_layout_check_at_its_cluster_size(preset, world):
    cfg = load_config(CONFIGS / f"{preset}.toml")
    dims = check_layout(cfg, world)
    assert dims.dp * dims.pp * dims.tp == world
    warnings = layout_warnings(cfg, dims)
    if preset == "mtnlg-530b":
        assert (dims.tp, dims.pp, dims.dp) == (8, 35, world // 280)
        # the ramp-up starts at 32 sequences: 4 micro-batches on 35 stages at dp 8 -> GPipe, warned
        assert any("leave most stages idle" in w and "gpipe" in w for w in warnings), warnings
        unit = dims.dp * cfg.train.micro_batch
        sizes = {global_batch_at(n, cfg.train, unit) for n in range(0, 5_859_375, 50_000)}
        assert all(s % unit == 0 and s >= unit for s in sizes)
        assert global_batch_at(10**9, cfg.train, unit) == 1920
        if dims.dp == 12:  # 32 is not a multiple of 12: runs as 24, warned
            assert global_batch_at(0, cfg.train, unit) == 24
            assert any("rounded down" in w for w in warnings), warnings


def _cfg(**over):
    base = {"model.n_layers": 8, "model.hidden": 64, "model.n_heads": 4, "train.micro_batch": 1,
            "train.global_batch": 64, "train.precision": "fp32"}
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_fewer_micro_batches_than_stages_is_legal_and_warned():
    cfg = _cfg(**{"parallel.pp": 4, "train.global_batch": 2})  # 2 micro-batches on 4 stages
    dims = check_layout(cfg, 4)
    (w,) = layout_warnings(cfg, dims)
    assert "2 micro-batches on pp=4" in w and "gpipe" in w and "60%" in w
    from mtnlg.parallel.stages import effective_schedule
    assert effective_schedule("1f1b", 2, 4, 1) == "gpipe" and effective_schedule("1f1b", 4, 4, 1) == "1f1b"
    assert effective_schedule("interleaved", 6, 4, 2) == "interleaved"  # torch's flexible rounds: 6 % 1 == 0
    assert effective_schedule("interleaved", 7, 2, 2) == "loopedbfs"   # 3 rounds do not divide 7


def test_rampup_increment_is_not_a_batch_size():
    """start 64, increment 8 on mb 1 x dp 8 with pp 4: every size reached (64, 72, ...,
    128) gives >= 8 micro-batches; the old check took the increment 8 for a batch of
    one micro-batch and refused the layout."""
    cfg = _cfg(**{"parallel.pp": 4, "train.global_batch": 128, "train.batch_rampup": "[64, 8, 1000]"})
    dims = check_layout(cfg, 32)
    assert dims.dp == 8 and layout_warnings(cfg, dims) == []


def test_layout_errors_name_the_problem():
    with pytest.raises(UserError, match="train.global_batch=60 must be a multiple of micro_batch x dp = 1 x 8"):
        check_layout(_cfg(**{"train.global_batch": 60}), 8)
    with pytest.raises(UserError, match="zero=3 with parallel.pp_schedule=zbv"):
        check_layout(_cfg(**{"parallel.pp": 2, "parallel.zero": 3, "parallel.pp_schedule": "zbv"}), 4)
    with pytest.raises(UserError, match="zbv needs at least pp=4 micro-batches"):
        check_layout(_cfg(**{"parallel.pp": 4, "parallel.pp_schedule": "zbv", "train.global_batch": 2}), 4)
    with pytest.raises(UserError, match="pp_schedule must be one of"):
        _cfg(**{"parallel.pp_schedule": "dualpipe"})
    with pytest.raises(UserError, match="interleaved needs parallel.virtual_stages >= 2"):
        _cfg(**{"parallel.pp": 2, "parallel.pp_schedule": "interleaved"})
    with pytest.raises(UserError, match="parallel.pp=4 x 2 chunk"):
        _cfg(**{"parallel.pp": 4, "parallel.pp_schedule": "interleaved", "parallel.virtual_stages": 2,
                "model.n_layers": 6})
