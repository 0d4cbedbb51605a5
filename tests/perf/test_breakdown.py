"""The step-time breakdown: classification rules and a real profiled step."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mtnlg.config import load_config
from mtnlg.model.gpt import build_model
from mtnlg.perf.breakdown import CLASSES, classify, format_table, profile_steps, tally
from mtnlg.train.precision import param_dtype
from mtnlg.train.trainer import Trainer


@pytest.mark.parametrize("name,cls", [
    ("aten::mm", "gemm"), ("aten::addmm", "gemm"), ("aten::bmm", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::native_layer_norm", "norm/elementwise"), ("aten::gelu_backward", "norm/elementwise"),
    ("aten::_log_softmax", "softmax/loss"), ("aten::nll_loss_forward", "softmax/loss"),
    ("aten::_foreach_addcdiv_", "optimizer"), ("c10d::allreduce_", "communication"),
    ("gloo:all_reduce", "communication"), ("Optimizer.step#AdamW.step", "optimizer"),
    ("something_unknown", "other"),
])
def test_classify(name, cls):
    assert classify(name) == cls


class Event:
    def __init__(self, name, us, parent=None):
        self.name, self.self_cpu_time_total, self.cpu_parent = name, us, parent


def test_kernels_inside_a_labelled_region_count_for_its_class():
    # the sliced loss's casts and copies are loss time, the attention kernel's GEMMs attention time;
    # the same kernels elsewhere count by their own names
    loss, attn = Event("_ChunkedCrossEntropy", 5), Event("_CausalGemmAttentionBackward", 7)
    got = tally([loss, Event("aten::copy_", 300, loss), Event("aten::mul_", 200, loss), attn,
                 Event("aten::bmm", 400, attn), Event("aten::copy_", 1000), Event("aten::mm", 2000)])
    assert got["softmax/loss"] == pytest.approx(505e-6)
    assert got["attention"] == pytest.approx(407e-6)
    assert got["norm/elementwise"] == pytest.approx(1000e-6) and got["gemm"] == pytest.approx(2000e-6)
    # the compiled bias + GeLU region's kernels (Inductor names, no aten op) are elementwise work
    gelu = Event("_BiasGeluBackward", 3)
    got = tally([gelu, Event("CompiledFunction", 900, gelu), Event("cpp_fused_add_mul_sigmoid_0", 50, gelu)])
    assert got["norm/elementwise"] == pytest.approx(953e-6) and got["other"] == 0


class DeviceEvent:
    """A profiler event on a GPU trace: ops (device_type CPU) carry the kernels they launched
    (``kernels``: name, device, duration), and every kernel is an event of its own too."""
    def __init__(self, name, device_us=0, parent=None, kind="DeviceType.CPU", cpu_us=1000, kernels=None):
        from types import SimpleNamespace
        self.name, self.cpu_parent, self.device_type = name, parent, kind
        self.self_cpu_time_total, self.is_async = cpu_us, False
        self.kernels = [SimpleNamespace(name=n, device=0, duration=us) for n, us in (kernels or [])]
        self.self_device_time_total = device_us if kind != "DeviceType.CPU" else sum(k.duration for k in self.kernels)


def test_on_a_gpu_each_kernel_counts_once_and_cpu_time_not_at_all():
    # a labelled region gets its GPU-side span (its own name, 200 us over its children's
    # kernels and the gaps between them) attached like a kernel: the span is no kernel
    opt = DeviceEvent("mtnlg::optimizer", kernels=[("mtnlg::optimizer", 200)])
    events = [DeviceEvent("aten::mm", kernels=[("sm90_xmma_gemm_bf16", 300)]),
              DeviceEvent("sm90_xmma_gemm_bf16", 300, kind="DeviceType.CUDA"),
              DeviceEvent("aten::view", cpu_us=5000),  # launches nothing: CPU time only
              opt, DeviceEvent("mtnlg::optimizer", 200, kind="DeviceType.CUDA"),
              DeviceEvent("aten::_foreach_mul_", parent=opt, kernels=[("multi_tensor_apply_kernel", 50)]),
              DeviceEvent("multi_tensor_apply_kernel", 50, kind="DeviceType.CUDA"),
              DeviceEvent("unlinked_kernel", 20, kind="DeviceType.CUDA")]
    got = tally(events, use_device=True)
    assert got["gemm"] == pytest.approx(300e-6) and got["optimizer"] == pytest.approx(50e-6)
    assert got["other"] == pytest.approx(20e-6)
    assert sum(got.values()) == pytest.approx(370e-6)  # the device's busy time, no more


class Tokens:
    def __init__(self, n, s, v):
        self.a = np.random.default_rng(0).integers(0, v, size=(n, s + 1))

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        return self.a[i]


def test_profiled_step_adds_up_and_classifies_the_heavy_ops(tmp_path):
    cfg = load_config(None, ["model.n_layers=2", "model.hidden=128", "model.n_heads=2", "model.seq_len=64",
                             "model.vocab_size=512", "train.micro_batch=4", "train.global_batch=8",
                             "train.precision=bf16", "train.steps=10", "train.eval_interval=0"])
    model = build_model(cfg.model, "cpu", seed=0).to(param_dtype("bf16"))
    data = Tokens(64, 64, 512)
    trainer = Trainer(cfg, model, data, data, Path(tmp_path), torch.device("cpu"))
    trace = tmp_path / "trace.json"
    r = profile_steps(trainer, steps=2, warmup=1, trace=trace)
    per = r["classes_s"]
    assert set(per) == set(CLASSES)
    assert sum(per.values()) == pytest.approx(r["wall_s"], rel=0.02)
    # every heavy class shows up; unclassified kernels stay a small remainder
    for c in ("gemm", "attention", "norm/elementwise", "softmax/loss", "optimizer", "data"):
        assert per[c] > 0, c
    assert per["other"] < 0.25 * r["wall_s"]
    assert trace.stat().st_size > 1000
    table = format_table(r, {"gemm": per["gemm"]})
    assert "gemm" in table and "step (wall)" in table
    # the patched methods are restored
    assert "_batch" not in trainer.__dict__ and "step" not in trainer.optimizer.__dict__


def test_train_profile_flag_prints_the_table_and_saves_nothing(sotu_small, tmp_path, capsys):
    from mtnlg.cli import main
    from trainhelpers import tiny_overrides
    run = tmp_path / "run"
    argv = ["train", "--config", "configs/tiny.toml", "--run", str(run), "--profile", "2"]
    for o in tiny_overrides(sotu_small, **{"train.precision": "bf16"}):
        argv += ["--set", o]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gemm" in out and "step (wall)" in out and "trace-rank0.json" in out
    assert (run / "profile" / "trace-rank0.json").stat().st_size > 1000
    assert not (run / "checkpoints" / "latest").exists()
    metrics = run / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()
    assert main(["train", "--run", str(run), "--profile", "0"]) == 2
    assert "at least 1 step" in capsys.readouterr().err
