"""Memory-bound operations of the cost model by the bytes the step's own code moves: the
trainer's cross-entropy (counted here on the real code path by a dispatch mode) and the
optimizer path (master gradients, clipping, fused AdamW, copy back), hand-computed."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mtnlg.config import load_config
from mtnlg.plan.cost import (GPU_PROFILES, LOSS_SLICE_ELEMS, SOFTMAX_PASSES, DeviceProfile, Op, Rates, local_params,
                             local_param_tensors, loss_traffic, op_seconds, optimizer_bytes_per_param, predict_step,
                             state_ops, step_ops)

HAND = Rates(gemm_tflops=1.0, gemm_gbps=100.0, gemm_overhead_us=10.0, attn_tflops=0.5, mem_gbps=10.0,
             op_overhead_us=2.0, optim_ns_per_param=0.0)
GPT13 = load_config("configs/gpt-1.3b.toml").model

_VIEWS = {"unsqueeze", "squeeze", "split", "slice", "select", "detach", "view", "expand", "t", "empty_like",
          "empty", "_unsafe_view", "as_strided"}
_SPARSE = {"nll_loss_forward", "scatter_add_", "gather"}  # touch the [rows, V] operand only at the targets


class _Traffic(TorchDispatchMode):
    """Bytes each aten op of a region reads and writes, and the ops that launch a kernel."""

    def __init__(self):
        super().__init__()
        self.bytes, self.kernels = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _VIEWS:
            return out
        flat = [a for x in list(args) + list((kwargs or {}).values()) for a in (x if isinstance(x, (list, tuple)) else [x])]
        ins = [a for a in flat if isinstance(a, torch.Tensor)]
        outs = [o for o in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(o, torch.Tensor)]
        if name in _SPARSE:
            big = max(t.nbytes for t in ins + outs)
            n = sum(t.nbytes for t in ins + outs if t.nbytes < big)
        elif name == "copy_":  # reads the source, writes the destination (not read)
            n = args[1].nbytes + args[0].nbytes
        elif name in ("_softmax", "_log_softmax"):  # cunn_SoftMaxForward: three passes, one write
            n = SOFTMAX_PASSES * ins[0].nbytes + outs[0].nbytes
        else:
            n = sum(t.nbytes for t in ins + outs)
        self.bytes += n
        self.kernels += 1
        return out


def test_loss_bytes_and_kernels_match_the_trainers_loss():
    """cross_entropy_fp32 on 16-bit logits, forward + backward, through the sliced path a GPU takes
    (fp16 on the CPU takes it too): every op's operands counted by a dispatch mode agree with
    loss_traffic: 58 bytes per logit (the old model charged 26) and 13 kernels per slice + 8."""
    from mtnlg.train.loss import DEFAULT_CHUNK_ELEMS, cross_entropy_fp32
    assert LOSS_SLICE_ELEMS == DEFAULT_CHUNK_ELEMS
    T, V, slice_elems = 64, 1024, 1024 * 16
    x = torch.randn(T, V, dtype=torch.float16).requires_grad_()
    t = torch.randint(0, V, (T,))
    with _Traffic() as m:
        cross_entropy_fp32(x, t, chunk_elems=slice_elems).backward()
    per_logit, cast, kernels = loss_traffic(T, V, "bf16", 1, slice_elems)
    assert (per_logit, cast, kernels) == (58.0, 12.0, 13 * 4 + 8)
    assert m.kernels == kernels
    # what the counter adds beyond the model: per-row tensors (targets, row scales), < 1 %
    assert m.bytes == pytest.approx(per_logit * T * V, rel=0.01)


def test_loss_op_by_hand_for_gpt_1_3b():
    # V padded to 50304: 4 Mi fp32 elements a slice = 83 rows, 8192 tokens = 99 slices
    T, V = 4 * 2048, 50304
    assert GPT13.padded_vocab() == V
    assert loss_traffic(T, V) == (58.0, 12.0, 13 * 99 + 8)
    assert loss_traffic(T, V, "fp32") == (36.0, 0.0, 8)          # F.cross_entropy through autograd
    assert loss_traffic(T, V // 2, "bf16", tp=2)[0] == 76.0      # vocabulary-parallel on DTensor logits
    op = {o.name: o for o in step_ops(GPT13, 4, 4)}["cross_entropy"]
    assert op.bytes == 4 * T * V * 58 and op.cast_bytes == 4 * T * V * 12 and op.count == 4 * 1295
    # priced by bytes: 46 B at 10 GB/s + 12 B at the casts' 4 GB/s, no dispatch (queued behind the forward)
    r = Rates(**{**HAND.__dict__, "cast_gbps": 4.0})
    assert op_seconds(op, r) == pytest.approx(4 * T * V * (46 / 10e9 + 12 / 4e9), rel=1e-12)
    # a profile without the casts' rate streams them at mem_gbps; a CPU profile's measured kind wins
    assert op_seconds(op, HAND) == pytest.approx(4 * T * V * 58 / 10e9, rel=1e-12)
    assert op_seconds(op, Rates(**{**HAND.__dict__, "kind_ns": {"loss": 2.0}})) == pytest.approx(4 * T * V * 2e-9)


def test_optimizer_bytes_by_hand():
    # clipping 4 + 8, fused AdamW 16 read + 12 written, copy back 4 + 2
    assert optimizer_bytes_per_param("bf16") == 12 + 28 + 6
    assert optimizer_bytes_per_param("fp32") == 12 + 28          # no master copy
    assert optimizer_bytes_per_param("bf16", tp=2) == 12 + 80 + 6  # DTensors: per-tensor AdamW, 7 kernels
    assert optimizer_bytes_per_param("bf16", dp=2) == 12 + 80      # replicate: fp32 parameters, no copy back
    n, k = local_params(GPT13), local_param_tensors(GPT13)
    assert (n, k) == (1315819520, 292)
    ops = {o.name: o for o in state_ops(GPT13, 4)}
    assert ops["master_grad_first"].bytes == ops["master_grad_first"].cast_bytes == 6 * n
    assert ops["master_grad_accumulate"].bytes == ops["master_grad_accumulate"].cast_bytes == 3 * 10 * n
    assert ops["master_grad_accumulate"].count == 3 * k                  # a kernel per tensor and micro-batch
    assert ops["optimizer_params"].bytes == 46 * n


def test_trainer_takes_the_path_the_bytes_describe(tmp_path):
    """The bytes above assume bf16 parameters with fp32 master copies, a fused AdamW over them and
    torch's clipping; a trainer built another way would move other bytes."""
    from mtnlg.config import Config
    from mtnlg.train.trainer import Trainer
    cfg = Config()
    cfg.train.precision = "bf16"
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    tr = Trainer(cfg, model, None, None, tmp_path, torch.device("cpu"))
    assert tr.master is not None and tr.optimizer.defaults["fused"]
    assert all(p.dtype == torch.float32 for p in tr.master.params)


def test_gpu_step_prices_the_state_by_bytes_or_by_the_calibrated_optimizer():
    """gpt-1.3b, 4 micro-batches of 4, one GPU: a datasheet profile (optim_ns_per_param 0) prices
    every state op by its bytes; a calibrated one times clipping + AdamW + copy per parameter
    and streams the master gradients' 36 bytes per parameter at its casts' rate."""
    n = local_params(GPT13)
    h200 = GPU_PROFILES["h200-141gb"]
    r = h200.rates_for(1)
    assert r.optim_ns_per_param == 0.0 and r.mem_gbps == pytest.approx(0.8 * 4800)
    got = predict_step(GPT13, h200, micro_batch=4, global_batch=16)["breakdown_s"]
    # (6 + 30 + 46) bytes per parameter at 3840 GB/s; the multi-tensor launches queue (no dispatch)
    assert got["optimizer"] == pytest.approx(82 * n / 3840e9, rel=1e-12)
    cal = Rates(**{**r.__dict__, "optim_ns_per_param": 0.0125, "cast_gbps": 2400.0})
    got = predict_step(GPT13, DeviceProfile("c", "test", {1: cal}), micro_batch=4, global_batch=16)["breakdown_s"]
    assert got["optimizer"] == pytest.approx(n * (0.0125e-9 + 36 / 2400e9), rel=1e-12)
    # the loss: 4 micro-batches of 8192 x 50304 logits, 46 bytes at 3840 GB/s + 12 at 2400 GB/s
    assert got["loss"] == pytest.approx(4 * 8192 * 50304 * (46 / 3840e9 + 12 / 2400e9), rel=1e-12)


def test_cast_rate_is_calibrated_and_round_trips():
    from mtnlg.plan.calibrate import cast_gbps
    got = cast_gbps(torch.device("cpu"), 1 << 16, budget_s=0.002)
    assert got > 0
    prof = DeviceProfile("x", "test", {1: Rates(**{**HAND.__dict__, "cast_gbps": got})})
    assert DeviceProfile.from_json(prof.to_json()).rates[1].cast_gbps == got
    # a profile written before the field existed loads with cast_gbps 0 (streams casts at mem_gbps)
    old = prof.to_json().replace('"cast_gbps"', '"unknown_field"')
    assert DeviceProfile.from_json(old).rates[1].cast_gbps == 0.0
    assert op_seconds(Op("c", "optimizer", bytes=10e9, cast_bytes=10e9, queued=True), HAND) == pytest.approx(1.0)


def test_profile_step_predict_only_prints_the_h200_prediction():
    """`benchmarks/profile_step.py --predict-only` needs no GPU: with the H200 profile of the lead's
    call 5 (no casts' rate: everything at its 4134 GB/s) the loss is 58 B x 4 x 8192 x 50304 logits
    and the optimizer its measured rate per parameter + the master gradients' 36 B."""
    import subprocess
    import sys
    path = "docs/gpu/profile-h200-141gb-calibrated.json"
    out = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--predict-only", "--config", "gpt-1.3b",
                          "--device-profile", path], capture_output=True, text=True, check=True).stdout
    got = {line.split()[0]: float(line.split()[-1]) for line in out.splitlines()[2:]}
    r = DeviceProfile.load(path).rates_for(1)
    n, gbps = local_params(GPT13), r.mem_gbps * 1e9
    assert r.cast_gbps == 0.0
    assert got["softmax/loss"] == pytest.approx(1e3 * 4 * 8192 * 50304 * 58 / gbps, abs=0.05)
    assert got["optimizer"] == pytest.approx(1e3 * n * (r.optim_ns_per_param * 1e-9 + 36 / gbps), abs=0.05)
    assert (got["softmax/loss"], got["optimizer"]) == (23.1, 30.1)
