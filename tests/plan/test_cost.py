"""The per-operation cost model: hand-computed cases, agreement with the FLOP
formulas, shape-dependent efficiency, a planted calibration fit, and MT-NLG's
table under the documented A100 profile."""
import json

import pytest

from mtnlg.config import load_config
from mtnlg.errors import UserError
from mtnlg.model.flops import flops_per_token
from mtnlg.plan import Layout, make_cluster, plan_layout
from mtnlg.plan.calibrate import fit_roofline
from mtnlg.plan.cluster import Calibration
from mtnlg.plan.cost import (GPU_PROFILES, DeviceProfile, Rates, all_reduce_seconds, gemm_efficiency,
                             gemm_seconds, predict_memory, predict_step, step_ops)

HAND = Rates(gemm_tflops=1.0, gemm_gbps=100.0, gemm_overhead_us=10.0, attn_tflops=0.5, mem_gbps=10.0,
             op_overhead_us=2.0, optim_ns_per_param=3.0)
TINY = load_config("configs/tiny.toml").model


def test_gemm_time_by_hand():
    # 2·1000³ = 2e9 FLOPs at 1 TFLOP/s = 2 ms; 3e6 bf16 operands = 6 MB at 100 GB/s = 60 us; + 10 us
    assert gemm_seconds(1000, 1000, 1000, HAND) == pytest.approx(2e-3 + 60e-6 + 10e-6, rel=1e-12)
    # a 2 MB cache holds part of the operands: only the 4 MB beyond it stream
    cached = Rates(**{**HAND.__dict__, "gemm_cache_mb": 2.0})
    assert gemm_seconds(1000, 1000, 1000, cached) == pytest.approx(2e-3 + 40e-6 + 10e-6, rel=1e-12)
    # fp32 operands use the fp32 rate when there is one
    f32 = Rates(**{**HAND.__dict__, "fp32_gemm_tflops": 0.25})
    assert gemm_seconds(1000, 1000, 1000, f32, dtype_bytes=4) == pytest.approx(8e-3 + 120e-6 + 10e-6, rel=1e-12)


def test_ring_all_reduce_by_hand():
    # 2 ranks: each sends and receives half of 1 GB twice over -> 1 GB at 10 GB/s, + 2 steps of 5 us
    assert all_reduce_seconds(1e9, 2, 10.0, 5.0) == pytest.approx(0.1 + 10e-6)
    assert all_reduce_seconds(1e9, 1, 10.0, 5.0) == 0.0


def test_op_flops_equal_the_flop_formulas():
    cfg = TINY
    tokens = 16 * cfg.seq_len
    ops = step_ops(cfg, 8, 2)
    assert sum(o.flops for o in ops) == pytest.approx(tokens * flops_per_token(cfg), rel=1e-12)
    full = step_ops(cfg, 8, 2, recompute="full")
    assert sum(o.flops for o in full) == pytest.approx(tokens * flops_per_token(cfg, recompute=True), rel=1e-12)
    # tp=2 halves every sharded product; the replicated LayerNorms etc. carry no FLOPs
    half = step_ops(cfg, 8, 2, tp=2)
    assert 2 * sum(o.flops for o in half) == pytest.approx(sum(o.flops for o in ops), rel=1e-12)


def test_efficiency_follows_the_shape():
    """As on real hardware: bigger hidden sizes get a better GEMM rate and spend a
    smaller share of the layer in memory-bound kernels."""
    r = GPU_PROFILES["h100-80gb"].rates_for(1)
    effs = [gemm_efficiency(4096, h, 4 * h, r) for h in (256, 1024, 4096, 12288)]
    assert effs == sorted(effs) and effs[0] < 0.5 < effs[-1]
    prof = GPU_PROFILES["h100-80gb"]
    shares = []
    for h in (512, 2048, 8192):
        cfg = load_config(None, [f"model.hidden={h}", "model.n_heads=16", "model.n_layers=4", "model.seq_len=2048"]).model
        b = predict_step(cfg, prof, micro_batch=1, global_batch=1)["breakdown_s"]
        shares.append(b["elementwise"] / sum(b.values()))
    assert shares == sorted(shares, reverse=True)


def test_fit_recovers_a_planted_roofline():
    planted = Rates(gemm_tflops=0.3, gemm_gbps=20.0, gemm_overhead_us=15.0, attn_tflops=1, mem_gbps=1,
                    op_overhead_us=1, optim_ns_per_param=1, gemm_cache_mb=2.5)
    shapes = [(n, n, n) for n in (64, 128, 256, 512, 1024, 2048)] + [(2048, 256, 8192), (256, 2048, 4096),
                                                                       (2048, 384, 1152), (512, 64, 64)]
    secs = [gemm_seconds(*s, planted) for s in shapes]
    P, W, t0, C = fit_roofline(shapes, secs, 2)
    assert P == pytest.approx(0.3, rel=0.02) and t0 == pytest.approx(15.0, rel=0.05)
    fitted = Rates(gemm_tflops=P, gemm_gbps=W, gemm_overhead_us=t0, attn_tflops=1, mem_gbps=1, op_overhead_us=1,
                   optim_ns_per_param=1, gemm_cache_mb=C)
    for s, t in zip(shapes, secs):
        assert gemm_seconds(*s, fitted) == pytest.approx(t, rel=0.05)


def test_predicted_step_adds_up_by_hand():
    prof = DeviceProfile("hand", "test", {1: HAND, 2: HAND}, link_gbps=1.0, link_latency_us=0.0, cores=2)
    one = predict_step(TINY, prof, micro_batch=8, global_batch=16)
    # optimizer: 3 ns per parameter of the (tied) model
    from mtnlg.model.flops import param_count
    assert one["breakdown_s"]["optimizer"] == pytest.approx(3e-9 * param_count(TINY), rel=1e-9)
    assert one["breakdown_s"]["communication"] == 0.0
    dp = predict_step(TINY, prof, micro_batch=8, global_batch=16, dp=2)
    # dp=2: one micro-batch each instead of two, plus one fp32 gradient all-reduce at 1 GB/s
    grads = 4 * param_count(TINY)
    assert dp["breakdown_s"]["communication"] == pytest.approx(grads / 1e9, rel=1e-9)
    assert dp["breakdown_s"]["gemm"] == pytest.approx(one["breakdown_s"]["gemm"] / 2, rel=1e-9)
    tp = predict_step(TINY, prof, micro_batch=8, global_batch=16, tp=2)
    act = 8 * TINY.seq_len * TINY.hidden * 2
    assert tp["breakdown_s"]["communication"] == pytest.approx(2 * (4 * TINY.n_layers + 2) * act / 1e9, rel=1e-9)


def test_memory_model_parts():
    m = predict_memory(TINY, None, micro_batch=8)
    z = predict_memory(TINY, None, micro_batch=8, dp=2, zero=1)
    assert z["parts"]["optimizer"] == pytest.approx(m["parts"]["optimizer"] / 2)
    assert z["parts"]["weights"] == m["parts"]["weights"]
    assert m["parts"]["baseline"] == 0


def test_mtnlg_table_within_10_percent_with_the_a100_profile():
    cfg = load_config("configs/mtnlg-530b.toml").model
    calib = Calibration(device=GPU_PROFILES["a100-80gb"])
    for nodes, seconds, tflops in [(280, 60.1, 126), (350, 50.2, 121), (420, 44.4, 113)]:
        p = plan_layout(cfg, make_cluster("a100-80gb", nodes=nodes),
                        Layout(tp=8, pp=35, dp=nodes // 35, micro_batch=1, recompute="full"), 1920, calib=calib)
        assert p["iteration_time_s"] == pytest.approx(seconds, rel=0.10)
        assert p["tflops_per_gpu"] == pytest.approx(tflops, rel=0.10)


def test_profile_round_trip_and_bad_file(tmp_path):
    prof = DeviceProfile("x", "test", {1: HAND, 2: HAND}, 2.0, 100.0, 0.5, 2)
    assert DeviceProfile.from_json(prof.to_json()) == prof
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(UserError, match="not a device profile"):
        DeviceProfile.load(bad)
    with pytest.raises(UserError, match="does not exist"):
        DeviceProfile.load(tmp_path / "missing.json")
