"""Where a training step's time goes, by class of operation, from torch.profiler.

Every profiler event is attributed by its *self* time (time inside the op,
excluding ops it called), so the classes add up without double counting:

    gemm           mm / addmm / bmm / linear's matmuls (forward and backward)
    attention      scaled-dot-product attention kernels (forward and backward); on CPU in
                   bf16 everything inside mtnlg.model.attention's kernel
    norm/elementwise  LayerNorm, GeLU, adds, copies, casts, dropout, embedding
    softmax/loss   log-softmax, NLL / cross-entropy and their backward
    optimizer      AdamW, gradient clipping, master-weight copies, zero_grad
    communication  collectives and point-to-point (gloo / NCCL)
    data           reading and stacking the batch
    other          everything else the profiler saw (autograd bookkeeping, Python)
    idle           step wall time the profiler saw no op in: Python overhead,
                   waiting for other ranks (the pipeline bubble), allocator

On CUDA the same table counts kernel (device) time only, each kernel once, in the class of
the op that launched it; idle is then the time the GPU ran no kernel.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

CLASSES = ("gemm", "attention", "norm/elementwise", "softmax/loss", "optimizer", "communication", "data",
           "other", "idle")

_RULES = [
    ("communication", ("c10d", "gloo", "nccl", "allreduce", "all_reduce", "allgather", "all_gather",
                       "reduce_scatter", "reducescatter", "broadcast", "send", "recv", "barrier")),
    ("data", ("mtnlg::data",)),
    ("optimizer", ("optimizer", "adam", "_foreach", "clip_grad", "mtnlg::optimizer", "zero_grad")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "_sdpa", "cudnn_attention",
                   "_causalgemmattention")),
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "gemm", "cutlass", "sm90_", "sm80_", "ampere_", "mkldnn_matmul", "aten::_addmm")),
    ("softmax/loss", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("norm/elementwise", ("layer_norm", "gelu", "aten::add", "aten::mul", "aten::copy", "aten::to", "_to_copy",
                          "aten::div", "aten::sub", "dropout", "embedding", "aten::cat", "aten::clone",
                          "aten::contiguous", "aten::fill", "aten::zero", "aten::sum", "aten::tanh", "aten::pow",
                          "elementwise", "vectorized", "aten::where", "aten::index", "aten::masked",
                          "aten::transpose", "aten::view", "aten::reshape", "aten::split", "aten::empty",
                          "aten::t", "aten::permute", "aten::expand", "aten::slice", "aten::select",
                          "aten::unsqueeze", "aten::squeeze", "aten::as_strided", "aten::detach",
                          "aten::ones", "aten::zeros", "aten::arange", "aten::stack", "aten::resize",
                          "aten::flatten", "aten::unbind", "aten::native", "aten::_unsafe_view")),
]


def classify(name: str) -> str:
    """The class of a profiler event name (case-insensitive substring rules, first match wins)."""
    low = name.lower()
    for cls, keys in _RULES:
        if any(k in low for k in keys):
            return cls
    return "other"


# regions whose kernels count for one class: the trainer's labels (``labelled``), the CPU
# attention kernel's autograd function (its GEMMs and softmax are the attention core) and the
# sliced loss's (its casts, copies and scaling are the loss: 35 of ~40 ms at the 14M shapes)
LABELS = {"mtnlg::data": "data", "mtnlg::optimizer": "optimizer",
          "_CausalGemmAttention": "attention", "_CausalGemmAttentionBackward": "attention",
          "_ChunkedCrossEntropy": "softmax/loss", "_ChunkedCrossEntropyBackward": "softmax/loss",
          # the compiled bias + GeLU region (mtnlg.model.bias_gelu): its Inductor kernels carry no aten name
          "_BiasGelu": "norm/elementwise", "_BiasGeluBackward": "norm/elementwise"}
_MISSING = object()


def _labelled_ancestor(e) -> str | None:
    p = e.cpu_parent
    while p is not None:
        if p.name in LABELS:
            return LABELS[p.name]
        if p.name.startswith("Optimizer."):
            return "optimizer"
        p = p.cpu_parent
    return None


def _class_of(e) -> str:
    name = getattr(e, "name", None) or e.key
    return LABELS.get(name) or (_labelled_ancestor(e) if hasattr(e, "cpu_parent") else None) or classify(name)


def _own_kernel_us(e) -> float:
    """Device time of the kernels ``e`` itself launched.  A record_function region (the
    trainer's labels, ``Optimizer.step``) also gets a GPU-side span of its own name attached
    as if a kernel, covering its children's kernels and the gaps between them: not counted."""
    kernels = getattr(e, "kernels", None)
    if kernels is None:
        return e.self_device_time_total
    return sum(k.duration for k in kernels if k.name != e.name)


def _is_annotation(k, cpu_names: set) -> bool:
    return bool(getattr(k, "is_user_annotation", False)) or k.name in cpu_names


def tally(events, use_device: bool = False) -> dict[str, float]:
    """Seconds per class over profiler events (``prof.events()``): an event inside a labelled
    region (data, optimizer) counts for that region, any other by its name.

    On CPU each op's self CPU time.  On a GPU (``use_device``) kernel time alone: each op's
    own kernels (its self device time; the CPU time that launched them overlaps them and is
    not counted), the kernel events themselves skipped (counting both counted every kernel
    twice; a labelled region's GPU-side span is not a kernel), and kernel time no op launched
    as other.  What is left of the
    wall time is then the GPU's idle time: launch overhead, synchronisation, the bubble."""
    out = {c: 0.0 for c in CLASSES}
    if use_device:
        attributed, kernels, annotations = 0.0, [], set()
        for e in events:
            if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CPU"):
                annotations.add(e.name)
                us = 0 if getattr(e, "is_async", False) else _own_kernel_us(e)
                if us:
                    out[_class_of(e)] += us / 1e6
                    attributed += us
            else:
                kernels.append(e)
        rest = sum(k.self_device_time_total for k in kernels if not _is_annotation(k, annotations)) - attributed
        if rest > 0:  # kernels no op in the trace launched (not linked to one)
            out["other"] += rest / 1e6
        return out
    for e in events:
        us = e.self_cpu_time_total
        if us:
            out[_class_of(e)] += us / 1e6
    return out


@contextlib.contextmanager
def labelled(trainer):
    """Label the trainer's data reads and optimizer work (step, clipping, master-weight
    copies and fp32 gradient accumulation) so their kernels land in their classes."""
    patches = [(trainer, "_batch", "mtnlg::data"), (trainer.optimizer, "step", "mtnlg::optimizer"),
               (getattr(trainer, "topo", None), "clip_grad_norm", "mtnlg::optimizer")]
    master = getattr(trainer, "master", None)
    if master is not None:
        patches += [(master, "master_to_model", "mtnlg::optimizer"), (master, "accumulate_grads", "mtnlg::optimizer")]
    saved = []
    for obj, attr, label in patches:
        if obj is None or not hasattr(obj, attr):
            continue
        fn = getattr(obj, attr)

        def wrapped(*a, _fn=fn, _label=label, **k):
            with record_function(_label):
                return _fn(*a, **k)
        saved.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
        setattr(obj, attr, wrapped)
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


def profile_steps(trainer, steps: int = 3, warmup: int = 1, trace: str | Path | None = None) -> dict:
    """Run ``warmup`` + ``steps`` training steps, profile the last ``steps``;
    return seconds per step by class (they add up to the measured wall time)."""
    cuda = trainer.device.type == "cuda"
    for _ in range(warmup):
        trainer.train_step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with labelled(trainer), profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(str(trace))
    per = {k: v / steps for k, v in tally(prof.events(), use_device=cuda).items()}
    busy = sum(per.values())
    per["idle"] = max(0.0, wall / steps - busy)
    return {"wall_s": wall / steps, "classes_s": per}


def format_table(result: dict, predicted: dict | None = None) -> str:
    """Measured seconds per step by class (and a prediction beside it, if given)."""
    wall = result["wall_s"]
    head = f"{'class':<18} {'ms/step':>9} {'share':>7}" + (f" {'predicted ms':>13}" if predicted else "")
    lines = [head, "-" * len(head)]
    for c in CLASSES:
        s = result["classes_s"][c]
        row = f"{c:<18} {1e3 * s:>9.1f} {100 * s / wall:>6.1f}%"
        if predicted:
            p = predicted.get(c)
            row += f" {'' if p is None else f'{1e3 * p:.1f}':>13}"
        lines.append(row)
    lines.append(f"{'step (wall)':<18} {1e3 * wall:>9.1f} {100.0:>6.1f}%" +
                 (f" {1e3 * sum(v for v in predicted.values() if v):>13.1f}" if predicted else ""))
    return "\n".join(lines)
