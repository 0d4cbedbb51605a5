"""The per-operation cost model: hand-computed cases, agreement with the FLOP
formulas, shape-dependent efficiency, a planted calibration fit, and MT-NLG's
table under the documented A100 profile."""
import json
import sys

import pytest

from mtnlg.config import load_config
from mtnlg.errors import UserError
from mtnlg.model.flops import flops_per_token
from mtnlg.plan import Layout, make_cluster, plan_layout
from mtnlg.plan.calibrate import fit_roofline
from mtnlg.plan.cluster import Calibration
from mtnlg.plan.cost import (GPU_PROFILES, DeviceProfile, Rates, all_reduce_seconds, gemm_efficiency,
                             gemm_seconds, predict_step, step_ops)

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
    # optimizer: the measured 3 ns per parameter of the (tied) model for clipping + AdamW + copy back,
    # and the fp32 master gradients' bytes at 10 GB/s: 6 per parameter (first micro-batch), 10 (second)
    from mtnlg.model.flops import param_count
    assert one["breakdown_s"]["optimizer"] == pytest.approx((3e-9 + 16 / 10e9) * param_count(TINY), rel=1e-9)
    assert one["breakdown_s"]["communication"] == 0.0
    dp = predict_step(TINY, prof, micro_batch=8, global_batch=16, dp=2)
    # dp=2: one micro-batch each instead of two, plus one fp32 gradient all-reduce at 1 GB/s
    grads = 4 * param_count(TINY)
    assert dp["breakdown_s"]["communication"] == pytest.approx(grads / 1e9, rel=1e-9)
    assert dp["breakdown_s"]["gemm"] == pytest.approx(one["breakdown_s"]["gemm"] / 2, rel=1e-9)
    tp = predict_step(TINY, prof, micro_batch=8, global_batch=16, tp=2)
    act = 8 * TINY.seq_len * TINY.hidden * 2
    assert tp["breakdown_s"]["communication"] == pytest.approx(2 * (4 * TINY.n_layers + 2) * act / 1e9, rel=1e-9)


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


# ---------------------------------------------------------------- the step's non-GEMM kinds (CPU profiles)
SMALL = load_config(None, ["model.n_layers=2", "model.hidden=8", "model.n_heads=2", "model.seq_len=4",
                           "model.vocab_size=100", "model.make_vocab_divisible_by=64", "model.dropout=0.0"]).model


def _by_name(ops):
    return {o.name: o for o in ops}


def test_step_ops_elementwise_counts_by_hand():
    # 2 layers, h=8, f=32, s=4, micro-batch 3 (T = 12 tokens), 2 micro-batches, V padded to 128
    ops = _by_name(step_ops(SMALL, 3, 2))
    T, h, f, V, L, n = 12, 8, 32, 128, 2, 2
    assert ops["layernorm"].elems == 2 * T * h * L * n                       # two per block
    assert ops["gelu"].elems == T * f * L * n
    assert ops["residual_add"].elems == 4 * T * h * L * n
    lin_out = T * (3 * h + h + f + h)                                        # 12 · 72 = 864
    assert ops["bias_grad"].elems == lin_out * L * n == 864 * 4
    assert ops["bias_add"].elems == lin_out * L * n
    assert ops["qkv_layout"].elems == 3 * T * 3 * h * L * n
    assert ops["cross_entropy"].elems == T * V * n and ops["cross_entropy"].kind == "loss"
    assert ops["final_layernorm"].elems == T * h * n
    # tensor parallel: the sharded widths halve, the loss is the vocabulary-parallel kind
    tp = _by_name(step_ops(SMALL, 3, 2, tp=2))
    assert tp["gelu"].elems == T * f // 2 * L * n
    assert tp["bias_grad"].elems == T * (3 * h // 2 + h + f // 2 + h) * L * n
    assert tp["cross_entropy"].elems == T * V // 2 * n and tp["cross_entropy"].kind == "loss_tp"


def test_kinds_price_ops_when_measured_and_fall_back_to_bandwidth():
    from mtnlg.plan.cost import Op, op_seconds
    op = Op("gelu", "elementwise", bytes=4e6, count=3, kind="gelu", elems=1e6)
    # measured: 1e6 elements at 4 ns = 4 ms, no extra dispatch (the timing includes it)
    measured = Rates(**{**HAND.__dict__, "kind_ns": {"gelu": 4.0}})
    assert op_seconds(op, measured) == pytest.approx(4e-3, rel=1e-12)
    # not measured: 4 MB at 10 GB/s = 0.4 ms + 3 kernels x 2 us
    assert op_seconds(op, HAND) == pytest.approx(0.4e-3 + 6e-6, rel=1e-12)


def test_gelu_is_priced_by_the_configured_activation():
    """tanh and erf GeLU have their own measured rates (calibrate_ops: gelu, gelu_erf): the same
    model with model.activation = gelu costs the erf rate on its T·f GeLU elements.  SMALL, micro-
    batch 3, 2 micro-batches: T·f·L·n = 12·32·2·2 = 1536 elements, at 4 ns (tanh) = 6.144 us and
    at 1 ns (erf) = 1.536 us; everything else is priced alike."""
    import dataclasses
    erf_cfg = dataclasses.replace(SMALL, activation="gelu")
    assert SMALL.activation == "gelu_tanh"
    tanh_ops, erf_ops = _by_name(step_ops(SMALL, 3, 2)), _by_name(step_ops(erf_cfg, 3, 2))
    # SMALL's activation is below the compiled region's MIN_ELEMS: F.gelu's rates, which a
    # profile from before the region priced under the plain names (the fallback used here)
    assert (tanh_ops["gelu"].kind, erf_ops["gelu"].kind) == ("gelu_eager", "gelu_erf_eager")
    assert tanh_ops["gelu"].elems == erf_ops["gelu"].elems == 1536
    kinds = {k: 1.0 for k in ("layernorm", "add", "copy", "bias_grad", "loss")}
    r = Rates(**{**HAND.__dict__, "kind_ns": {**kinds, "gelu": 4.0, "gelu_erf": 1.0}})
    prof = DeviceProfile("hand", "test", {1: r}, cores=1)
    tanh = predict_step(SMALL, prof, micro_batch=3, global_batch=6)["breakdown_s"]
    erf = predict_step(erf_cfg, prof, micro_batch=3, global_batch=6)["breakdown_s"]
    assert tanh["elementwise"] - erf["elementwise"] == pytest.approx(1536 * 3e-9, rel=1e-9)
    assert {k: v for k, v in tanh.items() if k != "elementwise"} == {k: v for k, v in erf.items() if k != "elementwise"}
    from mtnlg.plan.cost import op_seconds
    assert op_seconds(tanh_ops["gelu"], r) == pytest.approx(6.144e-6, rel=1e-12)
    assert op_seconds(erf_ops["gelu"], r) == pytest.approx(1.536e-6, rel=1e-12)
    # a profile saved before gelu_erf was calibrated: the erf GeLU falls back to the bandwidth
    # model like any kind the profile lacks: 2·T·f bf16 bytes x 3 (fwd + bwd) x L·n = 18432 B at
    # 10 GB/s, and 3 kernels x L·n = 12 launches x 2 us
    old = Rates(**{**HAND.__dict__, "kind_ns": {**kinds, "gelu": 4.0}})
    assert op_seconds(erf_ops["gelu"], old) == pytest.approx(18432 / 10e9 + 12 * 2e-6, rel=1e-12)
    assert op_seconds(tanh_ops["gelu"], old) == pytest.approx(6.144e-6, rel=1e-12)
    # recomputation repeats the forward of the configured form
    rec = _by_name(step_ops(erf_cfg, 3, 2, recompute="full"))
    assert rec["gelu.recompute"].kind == "gelu_erf_eager" and rec["gelu.recompute"].elems == 1536 / 3


def test_state_ops_by_hand():
    from mtnlg.plan.cost import local_param_tensors, state_ops
    from mtnlg.model.flops import param_count
    n = param_count(SMALL)
    one = _by_name(state_ops(SMALL, 3))
    # bf16, one process: the first micro-batch makes the fp32 master gradients, the other two add
    assert one["master_grad_first"].elems == n and one["master_grad_first"].kind == "grad_to_fp32"
    assert one["master_grad_accumulate"].elems == 2 * n
    assert one["optimizer_tensors"].elems == 12 * 2 + 4 == local_param_tensors(SMALL)
    assert one["optimizer_params"].kind == "optim_param" and one["optimizer_params"].elems == n
    # data parallel (replicate, fp32 parameters): a bf16 cast of the parameters per micro-batch and
    # one fp32 cast of the gradients; no master copy; the DTensor optimizer path
    dp = _by_name(state_ops(SMALL, 3, dp=2))
    assert "master_grad_first" not in dp
    assert dp["param_cast_bf16"].elems == 3 * n and dp["grad_cast_fp32"].elems == n
    assert dp["optimizer_params"].kind == "optim_replicate_param"
    assert dp["dp_blocks_fixed"].elems == 3 * 2 and dp["dp_root_fixed"].elems == 3
    tp = _by_name(state_ops(SMALL, 3, tp=2))
    assert tp["optimizer_params"].kind == "optim_dtensor_param"
    # the plan's fixed cost: per block per micro-batch, and once per micro-batch
    assert tp["tp_blocks_fixed"].elems == 3 * 2 and tp["tp_embed_head_loss_fixed"].elems == 3
    assert tp["tp_blocks_fixed"].category == "framework"
    assert "tp_blocks_fixed" not in one and "fp32" not in {o.kind for o in state_ops(SMALL, 3, precision="fp32")}


def test_predicted_step_with_measured_kinds_by_hand():
    # every kind at 1 ns per unit: the state ops add their units x 1 ns to their categories
    from mtnlg.plan.cost import state_ops
    kinds = {k: 1.0 for k in ("layernorm", "gelu", "add", "copy", "bias_grad", "loss", "cast", "grad_to_fp32",
                              "grad_accumulate", "optim_tensor", "optim_param")}
    r = Rates(**{**HAND.__dict__, "kind_ns": kinds})
    prof = DeviceProfile("hand", "test", {1: r}, cores=1)
    got = predict_step(SMALL, prof, micro_batch=3, global_batch=6)
    ew = sum(o.elems for o in step_ops(SMALL, 3, 2) if o.category == "elementwise")
    assert got["breakdown_s"]["elementwise"] == pytest.approx(ew * 1e-9, rel=1e-12)
    opt = sum(o.elems for o in state_ops(SMALL, 2) if o.category == "optimizer")
    assert got["breakdown_s"]["optimizer"] == pytest.approx(opt * 1e-9, rel=1e-12)
    assert got["breakdown_s"]["loss"] == pytest.approx(12 * 128 * 2 * 1e-9, rel=1e-12)


def test_tensor_and_parameter_costs_are_separated():
    from mtnlg.plan.calibrate_ops import _fit_tensor_param
    # planted: 20 us per tensor, 3 ns per parameter
    rows = [(96, 96 * 64 * 33, 96 * 20e-6 + 96 * 64 * 33 * 3e-9), (6, 3 * 1025 * 1024, 6 * 20e-6 + 3 * 1025 * 1024 * 3e-9)]
    a, b = _fit_tensor_param(rows)
    assert a == pytest.approx(20e3, rel=1e-9) and b == pytest.approx(3.0, rel=1e-9)


def test_calibrated_kinds_are_positive_and_round_trip():
    from mtnlg.plan.calibrate_ops import elementwise_ns
    got = elementwise_ns([SMALL], 2, budget_s=0.002)
    assert set(got) >= {"layernorm", "gelu", "gelu_erf", "add", "copy", "bias_grad", "cast", "loss", "grad_to_fp32",
                        "grad_accumulate", "optim_tensor", "optim_param"}
    assert all(v >= 0 for v in got.values()) and got["gelu"] > 0 and got["gelu_erf"] > 0 and got["loss"] > 0
    r = Rates(**{**HAND.__dict__, "kind_ns": got})
    prof = DeviceProfile("x", "test", {1: r}, cores=1)
    assert DeviceProfile.from_json(prof.to_json()) == prof


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc statistics")
def test_heap_slack_is_measured_through_the_trainer():
    """calibrate_heap runs the config's transformer body through the real Trainer in a fresh
    process: glibc's heap ends above its most bytes in use (measured 34-40 MB for this body, 16-19
    bytes per activation element), never below (the heap holds what is in use)."""
    from mtnlg.plan.calibrate_heap import heap_slack_bytes
    body = load_config(None, ["model.n_layers=4", "model.hidden=256", "model.n_heads=4", "model.seq_len=256"]).model
    got = heap_slack_bytes([body], 8, steps=2)
    assert 2.0 < got < 64.0, got


def test_gelu_is_priced_by_the_path_the_run_takes():
    """bf16 one process (or dp) with an activation of MIN_ELEMS or more takes the compiled
    bias + GeLU region (kind gelu); tensor parallel (DTensor weights), fp32 and smaller
    activations take F.gelu (gelu_eager), each at its own measured rate."""
    from mtnlg.model import regions
    from mtnlg.plan.cost import op_seconds
    big = load_config(None, ["model.n_layers=1", "model.hidden=256", "model.n_heads=4", "model.seq_len=256"]).model
    mb = regions.MIN_ELEMS // (big.seq_len * big.ffn)
    r = Rates(**{**HAND.__dict__, "kind_ns": {"gelu": 2.0, "gelu_eager": 5.0}})
    one = _by_name(step_ops(big, mb, 1))["gelu"]
    tp2 = _by_name(step_ops(big, mb, 1, tp=2))["gelu"]
    fp32 = _by_name(step_ops(big, mb, 1, precision="fp32"))["gelu"]
    small = _by_name(step_ops(big, mb - 1, 1))["gelu"]
    assert (one.kind, tp2.kind, fp32.kind, small.kind) == ("gelu", "gelu_eager", "gelu_eager", "gelu_eager")
    assert op_seconds(one, r) == pytest.approx(one.elems * 2e-9)
    assert op_seconds(tp2, r) == pytest.approx(tp2.elems * 5e-9)
