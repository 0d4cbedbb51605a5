"""The meta-device dry run against the analytic parameter counts."""
import pytest

from mtnlg.config import ModelConfig, load_config
from mtnlg.model.flops import param_count
from mtnlg.plan import Layout
from mtnlg.plan.dryrun import dry_run
from mtnlg.plan.memory import stage_params_local, total_params_all_ranks

BIG = load_config("configs/mtnlg-530b.toml").model


@pytest.mark.parametrize("rank,stage", [(0, 0), (8 * 17 + 5, 17), (2239, 34)])
def test_530b_dry_run_matches_analytic_per_rank(rank, stage):
    d = dry_run(BIG, Layout(tp=8, pp=35, dp=8), rank)
    assert d["coords"]["pp"] == stage
    assert d["params"] == stage_params_local(BIG, 8, 35, stage, BIG.padded_vocab(8))


def test_530b_dry_run_without_parallelism_is_param_count():
    d = dry_run(BIG, Layout(tp=1, pp=1, dp=1), 0)
    assert d["params"] == param_count(BIG)


@pytest.mark.parametrize("sp", [False, True])
def test_tiny_sum_over_ranks(sp):
    cfg = ModelConfig(n_layers=5, hidden=64, n_heads=4, seq_len=32, vocab_size=300)
    L = Layout(tp=2, pp=3, dp=1, sequence_parallel=sp)
    total = sum(dry_run(cfg, L, r)["params"] for r in range(L.world_size))
    assert total == total_params_all_ranks(cfg, 2, 3, cfg.padded_vocab(2))
