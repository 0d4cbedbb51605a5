"""Each planner formula against hand-computed values."""
import pytest

from mtnlg.config import ModelConfig, load_config
from mtnlg.model.flops import flops_per_iteration, param_count
from mtnlg.plan import Calibration, GPUSpec, Cluster, Layout, plan_layout
from mtnlg.plan.memory import (activation_bytes_per_layer, in_flight_microbatches, model_state_bytes,
                               stage_params_local, total_params_all_ranks)
from mtnlg.plan.timing import all_gather_s, all_reduce_s, group_spans_nodes, layer_flops_split

BIG = load_config("configs/mtnlg-530b.toml").model


def test_530b_flops_match_narayanan_formula_and_paper():
    B, s, l, h, V = 1920, 2048, 105, 20480, BIG.padded_vocab(8)
    paper = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert flops_per_iteration(BIG, B, recompute=True, vocab=V) == pytest.approx(paper, rel=1e-12)
    no_recompute = 72 * B * s * l * h * h * (1 + s / (6 * h)) + 6 * B * s * h * V
    assert flops_per_iteration(BIG, B, recompute=False, vocab=V) == pytest.approx(no_recompute, rel=1e-12)
    assert paper == pytest.approx(1.69e19, rel=0.01)  # MTNLG.md


def test_layer_flops_split():
    split = layer_flops_split(BIG, 51200)
    h, s = 20480, 2048
    assert split["attn_core"] == 4 * s * h
    assert split["layer"] == 24 * h * h + 4 * s * h
    assert split["logits_train"] == 6 * h * 51200


def test_530b_params():
    V = BIG.padded_vocab(8)
    assert V == 51200
    n = param_count(BIG, V)
    assert 528e9 < n < 531e9
    # one layer sharded 8 ways: 12h²/8 + biases (column ones sharded, row ones replicated) + 2 LayerNorms
    h = 20480
    layer = 12 * h * h // 8 + (3 * h + 4 * h) // 8 + 2 * h + 4 * h
    assert stage_params_local(BIG, 8, 35, 1, V) == 3 * layer
    assert stage_params_local(BIG, 8, 35, 0, V) == 3 * layer + V * h // 8 + 2048 * h
    assert stage_params_local(BIG, 8, 35, 34, V) == 3 * layer + V * h // 8 + 2 * h


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 4), (2, 3)])
def test_sum_over_ranks(tp, pp):
    cfg = ModelConfig(n_layers=6, hidden=64, n_heads=4, seq_len=32, vocab_size=500)
    V, h = cfg.padded_vocab(tp), cfg.hidden
    replicated_per_layer = 4 * h + 2 * h       # LayerNorms and row-parallel biases on every tp rank
    extra = (tp - 1) * (cfg.n_layers * replicated_per_layer + cfg.seq_len * h + 2 * h)
    extra += V * h if pp > 1 else 0            # the last stage's copy of the tied embedding
    assert total_params_all_ranks(cfg, tp, pp, V) == param_count(cfg, V) + extra


def test_activation_memory_korthikanti():
    s, b, h, a, t = 2048, 1, 20480, 128, 8
    sbh = s * b * h
    # 5·a·s/(h·t) = 5·128·2048/(20480·8) = 8
    assert activation_bytes_per_layer(BIG, b, t, False, "none") == sbh * (10 + 3 + 8)
    assert activation_bytes_per_layer(BIG, b, t, True, "none") == sbh * (34 / 8 + 8)
    assert activation_bytes_per_layer(BIG, b, t, False, "selective") == sbh * 13
    assert activation_bytes_per_layer(BIG, b, t, True, "selective") == sbh * 34 / 8
    assert activation_bytes_per_layer(BIG, b, t, False, "full") == 2 * sbh
    assert activation_bytes_per_layer(BIG, b, t, True, "full") == 2 * sbh / 8
    # no parallelism: 34·sbh + 5·a·s²·b
    assert activation_bytes_per_layer(BIG, 2, 1, False, "none") == 2 * sbh * 34 + 5 * a * s * s * 2


def test_activation_memory_with_a_fused_attention_kernel_and_no_dropout():
    """A flash kernel keeps no a·s² scores; dropout 0 keeps no residual masks (2 of the 10
    bytes tp replicates).  The H100 measurement behind it: gpt-1.3b (24 layers, h 2048, 16
    heads) at s = 2048, b = 4 x 4 micro-batches held 38.4 GB; 36.4 GB planned, 68.6 with
    the score term."""
    s, b, h, t = 2048, 1, 20480, 8
    sbh = s * b * h
    flash = dict(attention="flash")
    assert activation_bytes_per_layer(BIG, b, t, False, "none", **flash) == sbh * (10 + 3)
    assert activation_bytes_per_layer(BIG, b, t, True, "none", **flash) == sbh * 34 / 8
    assert activation_bytes_per_layer(BIG, b, t, False, "none", dropout=False, **flash) == sbh * (8 + 3)
    assert activation_bytes_per_layer(BIG, b, t, True, "none", dropout=False, **flash) == sbh * 32 / 8
    assert activation_bytes_per_layer(BIG, b, t, True, "full", dropout=False, **flash) == 2 * sbh / 8
    from mtnlg.plan.cluster import make_cluster
    cfg = load_config("configs/gpt-1.3b.toml", [])
    cluster = make_cluster("h100-80gb", gpus=1, gpus_per_node=1)
    run = dict(micro_batch=4, recompute="none")
    flash_gb = plan_layout(cfg.model, cluster, Layout(**run), 16, "bf16")["memory_per_gpu_gb"]
    scores_gb = plan_layout(cfg.model, cluster, Layout(**run, attention="materialized"), 16, "bf16")["memory_per_gpu_gb"]
    # 24 layers x the score term, 5·a·s²·b bytes (dropout is 0 in this config: no masks either way)
    assert scores_gb - flash_gb == pytest.approx(24 * 5 * 16 * 2048 * 2048 * 4 / 1e9, rel=1e-6)
    assert abs(flash_gb / 38.4 - 1) < 0.15


def test_in_flight_microbatches():
    assert in_flight_microbatches("1f1b", 4, 0, 16) == 4
    assert in_flight_microbatches("1f1b", 4, 3, 16) == 1
    assert in_flight_microbatches("1f1b", 4, 0, 2) == 2
    assert in_flight_microbatches("gpipe", 4, 3, 16) == 16
    assert in_flight_microbatches("interleaved", 4, 0, 16, 2) == pytest.approx(4 * (1 + 3 / 8))


def test_model_state_zero_stages():
    n = 10**9
    gb = lambda d: tuple(round(v / 1e9, 6) for v in d.values())
    assert gb(model_state_bytes(n, 8, 0, "bf16")) == (2, 2, 12)
    assert gb(model_state_bytes(n, 8, 1, "bf16")) == (2, 2, 1.5)
    assert gb(model_state_bytes(n, 8, 2, "bf16")) == (2, 0.25, 1.5)
    assert gb(model_state_bytes(n, 8, 3, "bf16")) == (0.25, 0.25, 1.5)
    assert gb(model_state_bytes(n, 1, 0, "fp32")) == (4, 4, 8)
    # parallel.zero_reduce = "step" in a pipeline: FSDP2 accumulates unsharded fp32 gradients until
    # the step's last micro-batch (4 bytes per parameter), whatever the dp degree
    assert gb(model_state_bytes(n, 8, 3, "bf16", reduce_per_step=True)) == (0.25, 4, 1.5)
    assert gb(model_state_bytes(n, 8, 2, "bf16", reduce_per_step=True)) == (2, 4, 1.5)
    assert gb(model_state_bytes(n, 8, 1, "bf16", reduce_per_step=True)) == (2, 2, 1.5)  # zero 1: no sharded grads


def test_zero_reduce_step_counts_unsharded_gradients_only_where_the_trainer_keeps_them():
    from mtnlg.plan.memory import reduces_per_step
    cfg = load_config(None, ["model.n_layers=4", "model.hidden=256", "model.n_heads=4", "model.seq_len=256"]).model
    cluster = Cluster(GPUSpec("x", 80, 312, 2000, 300, 25), 1)  # one node of 8
    base = dict(tp=1, pp=2, dp=4, micro_batch=1, schedule="1f1b", zero=3, recompute="none")
    per_micro, per_step = Layout(**base), Layout(**base, zero_reduce="step")
    assert not reduces_per_step(per_micro) and reduces_per_step(per_step)
    assert not reduces_per_step(Layout(**{**base, "pp": 1, "dp": 8}, zero_reduce="step"))  # no pipeline
    assert not reduces_per_step(Layout(**{**base, "zero": 1}, zero_reduce="step"))          # nothing sharded
    a, b = (plan_layout(cfg, cluster, L, global_batch=32) for L in (per_micro, per_step))
    for sa, sb in zip(a["stages"], b["stages"]):
        n = sa["params"]
        # by hand: bf16 sharded gradients 2 bytes / dp against 4 bytes unsharded, everything else equal
        assert sb["memory_gb"]["gradients"] * 1e9 == pytest.approx(4 * n)
        assert sa["memory_gb"]["gradients"] * 1e9 == pytest.approx(2 * n / 4)
        # zero 3 still reshards each unit after its forward: two blocks gathered in bf16 either way
        assert sb["memory_gb"]["gathered_weights"] * 1e9 == pytest.approx(2 * 2 * (12 * 256 ** 2 + 13 * 256))
        assert {k: v for k, v in sa["memory_gb"].items() if k != "gradients"} == \
            {k: v for k, v in sb["memory_gb"].items() if k != "gradients"}
    # the zero-bubble schedules always reduce once per step (PipelineStage drives FSDP)
    assert reduces_per_step(Layout(**{**base, "zero": 2, "schedule": "zb"}))


def test_collectives_and_placement():
    assert all_reduce_s(1e9, 8, 100) == pytest.approx(2 * 7 / 8 * 1e9 / 100e9)
    assert all_gather_s(1e9, 4, 10) == pytest.approx(0.75 * 1e9 / 10e9)
    assert all_reduce_s(1e9, 1, 10) == 0
    assert not group_spans_nodes(1, 8, 8)      # tp 8 inside a DGX
    assert group_spans_nodes(1, 16, 8)
    assert group_spans_nodes(8, 35, 8)         # pp across nodes
    assert not group_spans_nodes(2, 2, 8)      # tp 2 x pp 2 inside a node
    assert group_spans_nodes(2, 3, 8)          # tp 2 x pp 3: some groups straddle nodes


def _toy_cluster(nodes=1, gpn=8):
    return Cluster(GPUSpec("toy", 80, 100, 1000, 100, 10, gpn), nodes)


def test_time_single_gpu_by_hand():
    cfg = ModelConfig(n_layers=2, hidden=64, n_heads=4, seq_len=32, vocab_size=128)
    calib = Calibration(compute_efficiency=0.5, link_efficiency=1.0, hbm_efficiency=1.0, reserved_gb=0)
    p = plan_layout(cfg, _toy_cluster(1, 1), Layout(recompute="none", micro_batch=2), 8, "bf16", calib)
    flops = flops_per_iteration(cfg, 8, recompute=False)
    assert p["flops_per_iteration"] == flops
    optim = 2 * 16 * param_count(cfg) / 1e12
    assert p["iteration_time_s"] == pytest.approx(flops / 50e12 + optim)
    assert p["microbatches_per_replica"] == 4 and p["bubble_fraction"] == 0


def test_time_pipeline_bubble_and_comm_by_hand():
    cfg = ModelConfig(n_layers=4, hidden=64, n_heads=4, seq_len=32, vocab_size=128)
    calib = Calibration(1.0, 1.0, 1.0, 0)
    L = Layout(tp=2, pp=2, dp=2, micro_batch=1, recompute="full")
    p = plan_layout(cfg, _toy_cluster(1, 8), L, 8, "bf16", calib)
    m = 4                                          # 8 / (dp 2 · mb 1)
    last = p["stages"][-1]["time_per_microbatch_s"]
    split = layer_flops_split(cfg, cfg.padded_vocab(2))   # 256: padded to 128·tp
    flops_last = 32 * (2 * 4 * split["layer"] + split["logits_train"])
    assert last["compute_s"] == pytest.approx(flops_last / 2 / 100e12)
    act = 32 * 64 * 2
    assert last["tp_comm_s"] == pytest.approx((2 * 6 + 1) * 2 * 0.5 * act / 100e9)
    assert last["p2p_s"] == pytest.approx(2 * (act / 2 / 100e9 + 0.5 * act / 100e9))
    assert p["time_breakdown_s"]["pipeline"] == pytest.approx((m + 1) * last["total_s"])
    assert p["bubble_fraction"] == pytest.approx(1 / 4)
    assert p["flops_per_iteration"] == pytest.approx(flops_per_iteration(cfg, 8, recompute=True, vocab=256))


def test_fsdp_buffers_of_the_760m_drill_layouts_by_hand():
    """The buffers FSDP2 holds at the end of backward (mtnlg.plan.memory.fsdp_buffer_bytes), worked
    out by hand for the scale drill's two layouts (gpt-760m, bf16: 2-byte gathered weights and
    gradients, fp32 reduce-scatter input and output)."""
    cfg = load_config("configs/gpt-760m.toml").model
    emb = 50432 * 1536 // 2  # vocabulary-parallel embedding, tp 2: 50257 padded to a multiple of 128 x tp
    block = 14_170_368                                         # 12h²/2 + (3h + 4h)/2 biases + 2 replicated biases + 4h norms
    assert 12 * 1536 ** 2 // 2 + (3 * 1536 + 6144) // 2 + 2 * 1536 + 4 * 1536 == block
    pp1 = plan_layout(cfg, _toy_cluster(1, 8), Layout(tp=2, pp=1, dp=4, zero=3, recompute="none"), 4, "bf16")
    m = pp1["stages"][0]["memory_gb"]
    assert m["reduce_buffers"] * 1e9 == pytest.approx(emb * (2 + 4 + 4 / 4))
    assert m["gathered_weights"] * 1e9 == pytest.approx((2 * block + emb) * 2)  # the root keeps the tied table
    pp2 = plan_layout(cfg, _toy_cluster(1, 8), Layout(tp=2, pp=2, dp=2, zero=3, recompute="none"), 4, "bf16")
    first, last = (s["memory_gb"] for s in pp2["stages"])
    assert first["reduce_buffers"] * 1e9 == pytest.approx(emb * (2 + 4 + 4 / 2))
    assert last["reduce_buffers"] * 1e9 == pytest.approx(block * (2 + 4 + 4 / 2))
    assert first["gathered_weights"] * 1e9 == last["gathered_weights"] * 1e9 == pytest.approx(2 * block * 2)
    z0 = plan_layout(cfg, _toy_cluster(1, 8), Layout(tp=2, pp=2, dp=2, zero=0, recompute="none"), 4, "bf16")
    assert "reduce_buffers" not in z0["stages"][0]["memory_gb"]  # replicate all-reduces in place


def test_planning_a_gpu_cluster_does_not_load_torch():
    """`mtnlg plan` for a GPU cluster is arithmetic: it must not pay torch's import (the CPU
    model's region check once pulled it in through mtnlg.model.regions)."""
    import subprocess
    import sys
    code = ("import sys, io, contextlib\n"
            "from mtnlg.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['plan', '--config', 'configs/mtnlg-530b.toml', '--gpus', '2240', '--tp', '8', '--pp', '35',\n"
            "          '--global-batch', '1920', '--gpu', 'a100-80gb'])\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
