"""The CPU per-rank memory model of ``mtnlg plan --local`` (``mtnlg.plan.local_memory``):
its parts by hand, the heap's slack per activation element, and which gradients are alive at
the step's peak."""
import pytest

from mtnlg.config import load_config
from mtnlg.errors import UserError
from mtnlg.plan.cost import DeviceProfile, Rates
from mtnlg.plan.local_memory import predict_memory

HAND = Rates(gemm_tflops=1.0, gemm_gbps=100.0, gemm_overhead_us=10.0, attn_tflops=0.5, mem_gbps=10.0,
             op_overhead_us=2.0, optim_ns_per_param=3.0)
TINY = load_config("configs/tiny.toml").model


def test_memory_model_parts():
    from mtnlg.model.flops import param_count
    n = param_count(TINY)
    m = predict_memory(TINY, None, micro_batch=8)
    # bf16, one process: bf16 weights; fp32 master gradients of the earlier micro-batches (several by
    # default); fp32 master copy + Adam m, v
    assert (m["parts"]["weights"], m["parts"]["gradients"], m["parts"]["optimizer"]) == (2 * n, 4 * n, 12 * n)
    # data parallel (replicate: fp32 parameters + their bf16 compute copies, fp32 accumulated gradients)
    r = predict_memory(TINY, None, micro_batch=8, dp=2)
    assert (r["parts"]["weights"], r["parts"]["gradients"], r["parts"]["optimizer"]) == (6 * n, 4 * n, 8 * n)
    assert m["peak"] == r["peak"] == "loss" and m["bytes"] == sum(m["parts"].values())
    z = predict_memory(TINY, None, micro_batch=8, dp=2, zero=1)
    assert z["parts"]["optimizer"] == pytest.approx(r["parts"]["optimizer"] / 2)
    assert z["parts"]["weights"] == r["parts"]["weights"]
    assert m["parts"]["baseline"] == 0
    # the loss: logits (bf16) + what the loss adds per logit, measured when the profile has it
    T, V = 8 * TINY.seq_len, TINY.padded_vocab()
    assert m["parts"]["logits_and_loss"] == T * V * (2 + 6)
    prof = DeviceProfile("x", "test", {1: Rates(**{**HAND.__dict__, "kind_ns": {"loss_bytes": 3.5}})}, cores=1)
    assert predict_memory(TINY, prof, micro_batch=8)["parts"]["logits_and_loss"] == T * V * (2 + 3.5)
    # bf16 on CPU: the attention kernel's probabilities per layer, by the backward's query blocks of
    # 128 (s <= 128: one s x s block); none in fp32 (SDPA); heads split by tensor parallelism
    s, a = TINY.seq_len, TINY.n_heads
    assert s <= 512  # blocks of 128 up to 512 positions
    kept = sum((min(s, r0 + 128) - r0) * min(s, r0 + 128) for r0 in range(0, s, 128))
    assert m["parts"]["attention_probs"] == TINY.n_layers * 8 * a * kept * 2
    assert "attention_probs" not in predict_memory(TINY, None, micro_batch=8, precision="fp32")["parts"]
    assert predict_memory(TINY, None, micro_batch=8, tp=2)["parts"]["attention_probs"] == TINY.n_layers * 8 * a // 2 * kept * 2


def test_heap_slack_per_activation_element_by_hand():
    """The heap's slack (calibrate_heap) is bytes per activation element, n_layers x micro_batch x
    seq_len x hidden, the same in every layout; none without a profile; an old profile without
    the field loads with none."""
    import json
    prof = DeviceProfile("x", "test", {1: HAND, 2: HAND}, cores=2, heap_slack_bytes=16.0)
    elems = TINY.n_layers * 8 * TINY.seq_len * TINY.hidden
    for tp, dp in ((1, 1), (2, 1), (1, 2)):
        parts = predict_memory(TINY, prof, micro_batch=8, tp=tp, dp=dp)["parts"]
        assert parts["heap_slack"] == 16.0 * elems
    # tiny (4 layers, width 256, seq 256, micro-batch 8): 16 x 2,097,152 = 33.55 MB
    tiny = load_config(None, ["model.n_layers=4", "model.hidden=256", "model.n_heads=4", "model.seq_len=256"]).model
    assert predict_memory(tiny, prof, micro_batch=8)["parts"]["heap_slack"] == 33_554_432
    assert predict_memory(TINY, None, micro_batch=8)["parts"]["heap_slack"] == 0
    old = json.loads(prof.to_json())
    del old["heap_slack_bytes"]
    assert DeviceProfile.from_json(json.dumps(old)).heap_slack_bytes == 0.0


def test_gradients_alive_at_the_peak_by_hand():
    """The step's peak is in the last micro-batch's loss, before its backward: only the fp32
    gradient accumulators of earlier micro-batches exist then (none with one micro-batch per rank).
    tiny (4 layers, width 256, vocab 8192 padded, seq 256), one micro-batch of 8, bf16, no profile:
    n = 4·(12·256² + 13·256) + 8192·256 + 256·256 + 2·256 = 5,322,240 parameters;
    activations 4·2048·256·16·2 = 67,108,864; logits and loss 2048·8192·(2 + 6) = 134,217,728;
    attention probabilities 4·8·4·(128·(128+256))·2 = 12,582,912."""
    tiny = load_config(None, ["model.n_layers=4", "model.hidden=256", "model.n_heads=4", "model.seq_len=256",
                              "model.vocab_size=8192"]).model
    n = 5_322_240
    rest = 67_108_864 + 134_217_728 + 12_582_912
    one = predict_memory(tiny, None, micro_batch=8, global_batch=8)
    assert one["parts"]["gradients"] == 0 and one["peak"] == "loss"
    assert one["bytes"] == (2 + 12) * n + rest                   # 288,420,864
    dp = predict_memory(tiny, None, micro_batch=8, dp=2, global_batch=16)
    assert dp["bytes"] == (4 + 2 + 8) * n + rest                 # fp32 params, bf16 copies, Adam
    # two micro-batches: the first one's fp32 accumulators (master gradients / replicate's
    # unsharded_accumulated_grad) are alive in the second's loss; ZeRO-2 keeps them sharded
    assert predict_memory(tiny, None, micro_batch=8, global_batch=16)["parts"]["gradients"] == 4 * n
    assert predict_memory(tiny, None, micro_batch=8, dp=2, global_batch=32)["parts"]["gradients"] == 4 * n
    assert predict_memory(tiny, None, micro_batch=8, dp=2, zero=2, global_batch=32)["parts"]["gradients"] == 2 * n
    with pytest.raises(UserError, match="not a multiple"):
        predict_memory(tiny, None, micro_batch=8, dp=2, global_batch=24)
    # states outweighing the activations (width 1024, 2 layers, seq 16, vocab 256, one sequence): the
    # peak is the end of the backward, all 20 bytes per parameter and no activations
    wide = load_config(None, ["model.n_layers=2", "model.hidden=1024", "model.n_heads=8", "model.seq_len=16",
                              "model.vocab_size=256"]).model
    nw = 2 * (12 * 1024 ** 2 + 13 * 1024) + 256 * 1024 + 16 * 1024 + 2 * 1024
    end = predict_memory(wide, None, micro_batch=1, global_batch=1)
    assert end["peak"] == "end of backward" and end["bytes"] == 20 * nw
    assert end["parts"]["activations"] == 0 and end["parts"]["gradients"] == 6 * nw


def test_the_compiled_regions_runtime_counts_where_the_run_uses_them():
    """Compiling the bias + GeLU region adds Inductor's runtime to a process (``region_rss_gb``,
    measured by --calibrate): counted for bf16 runs whose weights are plain tensors at forward
    time (one process, data parallel) and whose micro-batch activation reaches MIN_ELEMS; not
    at tp=2 (DTensor weights: the unfused path), not in fp32, not below MIN_ELEMS, not off."""
    from mtnlg.model import regions
    prof = DeviceProfile("x", "test", {1: HAND}, cores=1, region_rss_gb=0.25)
    cfg = load_config(None, ["model.n_layers=2", "model.hidden=256", "model.n_heads=4", "model.seq_len=256"]).model
    big = regions.MIN_ELEMS // (cfg.seq_len * cfg.ffn)  # micro-batch whose activation is exactly MIN_ELEMS
    assert big * cfg.seq_len * cfg.ffn == regions.MIN_ELEMS
    part = lambda **kw: predict_memory(cfg, prof, **kw)["parts"]["compiled_regions"]  # noqa: E731
    assert part(micro_batch=big) == part(micro_batch=big, dp=2) == 0.25e9
    assert part(micro_batch=big, tp=2) == part(micro_batch=big - 1) == part(micro_batch=big, precision="fp32") == 0
    assert part(micro_batch=big, compiled_regions=False) == 0
    assert predict_memory(cfg, None, micro_batch=big)["parts"]["compiled_regions"] == 0  # no profile, no figure
