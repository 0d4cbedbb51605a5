"""A cost model per operation: what one training step of one rank spends on
GEMMs, attention, memory-bound kernels, the loss, the optimizer and
communication, from a *device profile*.

GEMMs follow an additive roofline with a cache knee,

    t(m, k, n) = 2mkn / P + max(0, bytes(m, k, n) - C) / W + t0,

with P the in-cache matrix rate, C the operand bytes that stay in cache, W
the bandwidth the excess streams at and t0 the fixed cost of one call (on a
GPU C = 0 and W is HBM); efficiency = (2mkn / t) / P
therefore grows with the shape (a bigger hidden size does more FLOPs per
byte and per call), as cuBLAS and oneDNN do.  The kernels between the GEMMs
(LayerNorm, GeLU, residual adds, copies, bias-gradient sums, casts, the loss)
cost their elements times a rate measured per kind where the profile has one
(CPU: they are compute-bound there), else bytes moved over the streaming
bandwidth plus a dispatch overhead per kernel (GPU profiles; the loss's, the
master gradients' and the optimizer's bytes are counted from their code in
``traffic.py``, dtype-converting kernels at their own measured rate); the attention
core runs at its own rate (a flash kernel's FLOP rate at the model's head
size); the optimizer costs a measured time per parameter; collectives are
ring algorithms with a per-message latency.

A profile comes from ``mtnlg plan --calibrate`` (timed here: the model's own
GEMM shapes plus a sweep, SDPA, elementwise bandwidth, AdamW, gloo
collectives, see ``calibrate.py``) or from a GPU datasheet (``GPU_PROFILES``,
documented in docs/plan.md).  The op list mirrors ``mtnlg/model/gpt.py`` and
the trainer's step; FLOPs agree with ``mtnlg.model.flops`` (tested).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from mtnlg.config import ModelConfig
from mtnlg.errors import UserError
from mtnlg.plan.traffic import (LOSS_SLICE_ELEMS, SOFTMAX_PASSES, loss_traffic,  # noqa: F401 (re-exported)
                                multi_tensor_launches, optimizer_bytes_per_param)

CATEGORIES = ("gemm", "attention", "elementwise", "loss", "optimizer", "communication", "framework")
# model.activation -> the measured kind that prices the MLP's GeLU ("gelu" is the tanh form: profiles
# written before the erf form was calibrated hold only it, and price the erf GeLU by bandwidth)
GELU_KINDS = {"gelu_tanh": "gelu", "gelu": "gelu_erf"}


@dataclass(frozen=True)
class Rates:
    """What one rank achieves with a given number of threads (CPU) or on one GPU."""
    gemm_tflops: float          # P: asymptotic GEMM rate in the training dtype
    gemm_gbps: float            # W: operand streaming bandwidth of a GEMM
    gemm_overhead_us: float     # t0 per GEMM call
    attn_tflops: float          # attention core (SDPA fwd+bwd) FLOP rate, flops counted as in model.flops
    mem_gbps: float             # streaming bandwidth of elementwise kernels
    op_overhead_us: float       # dispatch cost of one elementwise kernel / autograd node
    optim_ns_per_param: float   # AdamW step (+ grad clipping, master copy) per local parameter, measured
                                # (0: priced by the bytes state_ops gives it)
    fp32_gemm_tflops: float = 0.0   # fp32 GEMM rate, for train.precision=fp32 (0: same as gemm_tflops)
    gemm_cache_mb: float = 0.0      # operand bytes a GEMM keeps in cache; only the excess streams at W
    # measured ns per unit of each non-GEMM kind (CPU; see calibrate_ops.py): an op of a kind
    # listed here costs elems x kind_ns[kind], one that is not (GPU datasheets) bytes / mem_gbps
    kind_ns: dict = field(default_factory=dict)
    # streaming rate of torch's dtype-converting elementwise kernels (a bf16 -> fp32 copy, an
    # fp32 += bf16 add: TensorIterator's unrolled loop, no vector loads), measured by --calibrate;
    # 0 (datasheets, older profiles): mem_gbps
    cast_gbps: float = 0.0


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    source: str                           # "measured <date> on <host>" or "datasheet: ..."
    rates: dict[int, Rates]               # threads per rank -> rates (GPUs: {1: ...})
    link_gbps: float = 0.0                # collective bus bandwidth between ranks (per direction)
    link_latency_us: float = 0.0          # per ring step
    baseline_rss_gb: float = 0.0          # CPU: resident memory of a process with torch + mtnlg loaded
    heap_slack_bytes: float = 0.0         # CPU: heap resident beyond its most in use, per activation element
    region_rss_gb: float = 0.0            # CPU: what compiling the bias + GeLU region adds (Inductor's runtime)
    cores: int = 1
    extra: dict = field(default_factory=dict)

    def rates_for(self, ranks_per_device: int = 1) -> Rates:
        """Rates of one rank when ``ranks_per_device`` ranks share this device's cores."""
        threads = max(1, self.cores // max(1, ranks_per_device))
        best = min(self.rates, key=lambda t: (abs(t - threads), -t))
        return self.rates[best]

    def to_json(self) -> str:
        d = asdict(self)
        d["rates"] = {str(k): v for k, v in d["rates"].items()}
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str = "profile") -> "DeviceProfile":
        try:
            d = json.loads(text)
            known = {f.name for f in fields(Rates)}
            d["rates"] = {int(k): Rates(**{a: b for a, b in v.items() if a in known}) for k, v in d["rates"].items()}
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"{origin} is not a device profile ({e}); write one with `mtnlg plan --calibrate`")

    @classmethod
    def load(cls, path: str | Path) -> "DeviceProfile":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"device profile {p} does not exist; write one with `mtnlg plan --calibrate --out {p}`")
        return cls.from_json(p.read_text(), str(p))


def _gpu(name: str, peak: float, gemm_eff: float, attn_eff: float, hbm: float, nvlink: float) -> DeviceProfile:
    # memory-bound kernels stream at 80 % of HBM bandwidth; kernel launches ~5 us.  The optimizer is
    # not timed (optim_ns_per_param 0): its bytes (state_ops) over that bandwidth.
    rates = Rates(gemm_tflops=peak * gemm_eff, gemm_gbps=0.8 * hbm, gemm_overhead_us=5.0,
                  attn_tflops=peak * attn_eff, mem_gbps=0.8 * hbm, op_overhead_us=5.0,
                  optim_ns_per_param=0.0, fp32_gemm_tflops=peak / 16)
    return DeviceProfile(name, "datasheet (docs/plan.md#device-profiles)", {1: rates}, link_gbps=0.8 * nvlink,
                         link_latency_us=10.0)


# Datasheet profiles.  gemm efficiency: sustained fraction of the dense bf16 peak on large
# transformer GEMMs; attention: the fused softmax/attention path of the era the profile
# describes (see docs/plan.md for sources and how sensitive the MT-NLG table is to them).
GPU_PROFILES: dict[str, DeviceProfile] = {
    "a100-40gb": _gpu("a100-40gb", 312, 0.62, 0.30, 1555, 300),
    "a100-80gb": _gpu("a100-80gb", 312, 0.62, 0.30, 2039, 300),
    "h100-80gb": _gpu("h100-80gb", 989, 0.62, 0.40, 3350, 450),
    "h200-141gb": _gpu("h200-141gb", 989, 0.62, 0.40, 4800, 450),
}


@dataclass(frozen=True)
class Op:
    name: str
    category: str
    flops: float = 0.0
    bytes: float = 0.0
    shape: tuple[int, int, int] | None = None   # (m, k, n) of a GEMM
    count: int = 1                               # kernels this op launches
    kind: str = ""                               # measured primitive that prices it (Rates.kind_ns)
    elems: float = 0.0                           # its units of that kind (elements, parameters)
    cast_bytes: float = 0.0                      # the part of `bytes` moved by dtype-converting kernels
    # its launches overlap device work queued before them (no host sync between them and the
    # model's kernels), so by bandwidth it costs its bytes alone, no dispatch per kernel
    queued: bool = False


def gemm_seconds(m: int, k: int, n: int, r: Rates, dtype_bytes: int = 2) -> float:
    flops = 2.0 * m * k * n
    nbytes = max(0.0, dtype_bytes * (m * k + k * n + m * n) - r.gemm_cache_mb * 1e6)
    rate = r.gemm_tflops if dtype_bytes == 2 or not r.fp32_gemm_tflops else r.fp32_gemm_tflops
    return flops / (rate * 1e12) + nbytes / (r.gemm_gbps * 1e9) + r.gemm_overhead_us * 1e-6


def gemm_efficiency(m: int, k: int, n: int, r: Rates, dtype_bytes: int = 2) -> float:
    """Achieved fraction of the asymptotic GEMM rate at this shape."""
    rate = r.gemm_tflops if dtype_bytes == 2 or not r.fp32_gemm_tflops else r.fp32_gemm_tflops
    return 2.0 * m * k * n / gemm_seconds(m, k, n, r, dtype_bytes) / (rate * 1e12)


def _gemm(name: str, m: int, k: int, n: int, ab: int) -> list[Op]:
    """A weight GEMM's forward, input-gradient and weight-gradient products."""
    out = []
    for suffix, (a, b, c) in (("fwd", (m, k, n)), ("dgrad", (m, n, k)), ("wgrad", (k, m, n))):
        out.append(Op(f"{name}.{suffix}", "gemm", 2.0 * a * b * c, ab * (a * b + b * c + a * c), (a, b, c)))
    return out


def uses_compiled_regions(cfg: ModelConfig, micro_batch: int, tp: int, precision: str, enabled: bool = True) -> bool:
    """Whether a CPU run's MLP takes the compiled bias + GeLU region (``mtnlg.model.bias_gelu``):
    bf16, plain-tensor weights at forward time (not tensor-parallel; FSDP/replicate unshard
    theirs to plain bf16 tensors) and a micro-batch activation of ``regions.MIN_ELEMS`` elements
    or more (measured: region calls in dp=2, none at tp=2)."""
    from mtnlg.model import regions  # loads no torch (tests/plan: a GPU plan never imports it)
    return (enabled and precision == "bf16" and tp == 1
            and micro_batch * cfg.seq_len * cfg.ffn >= regions.MIN_ELEMS)


def step_ops(cfg: ModelConfig, micro_batch: int, n_micro: int, *, tp: int = 1, layers: int | None = None,
             first: bool = True, last: bool = True, vocab: int | None = None, precision: str = "bf16",
             recompute: str = "none") -> list[Op]:
    """Every operation one rank runs in one training step (all micro-batches,
    forward + backward, then the optimizer), excluding communication."""
    V = vocab or cfg.padded_vocab(tp)
    L = cfg.n_layers if layers is None else layers
    T, s, h, f = micro_batch * cfg.seq_len, cfg.seq_len, cfg.hidden, cfg.ffn
    ab = 4 if precision == "fp32" else 2
    drop = cfg.dropout > 0
    layer: list[Op] = []
    layer += _gemm("qkv", T, h, 3 * h // tp, ab) + _gemm("attn_proj", T, h // tp, h, ab)
    layer += _gemm("mlp_fc", T, h, f // tp, ab) + _gemm("mlp_proj", T, f // tp, h, ab)
    attn_fwd = 4.0 * T * s * h / tp            # QK^T and AV over the full s x s matrix (model.flops convention)
    layer.append(Op("attention_core", "attention", 3 * attn_fwd, 0.0, count=2))
    # the kernels between the GEMMs, forward + backward.  `elems` is what a measured kind
    # (Rates.kind_ns, calibrate_ops.py) prices; `bytes` (forward bytes x 3) is the bandwidth model
    # used where the profile has no such kind (GPU datasheets).
    Tha = T * h * ab
    lin_out = T * (3 * h // tp + h + f // tp + h)   # the four Linears' outputs: bias broadcast in, bias grad out
    ew = [  # name, kind, elements (fwd + bwd), forward bytes, forward kernels
        ("layernorm", "layernorm", 2 * T * h, 2 * 2 * Tha, 2),
        ("residual_add", "add", 4 * T * h, 2 * 3 * Tha, 2),            # 2 adds forward, 2 gradient sums backward
        ("qkv_layout", "copy", 3 * T * 3 * h // tp, 2 * 3 * Tha / tp, 3),  # split's copy fwd; cat + copy bwd
        ("attn_out_layout", "copy", 5 * T * h // tp, 2 * Tha / tp, 1),  # transpose back fwd, bwd; SDPA's zeroed grads
        ("bias_add", "copy", lin_out, 0.0, 0),                          # addmm copies the bias into its output
        ("bias_grad", "bias_grad", lin_out, lin_out * ab / 3, 1),       # column sums in the Linears' backward
        ("gelu", GELU_KINDS[cfg.activation] + ("" if uses_compiled_regions(cfg, micro_batch, tp, precision)
                                               else "_eager"), T * f // tp, 2 * T * f // tp * ab, 1)]
    if drop:
        ew += [("dropout", "add", 2 * 3 * T * h, 2 * 3 * Tha, 2)]
    for name, kind, elems, nbytes, count in ew:
        layer.append(Op(name, "elementwise", 0.0, 3 * nbytes, count=3 * count, kind=kind, elems=elems))
    if recompute in ("full", "selective"):  # one more forward of the layer (or of its attention core)
        extra = []
        for o in layer:
            if recompute == "selective" and o.category != "attention":
                continue
            if o.category == "gemm":
                if o.name.endswith(".fwd"):
                    extra.append(replace(o, name=o.name + ".recompute"))
            else:
                extra.append(Op(o.name + ".recompute", o.category, o.flops / 3, o.bytes / 3, None,
                                max(1, o.count // 3), o.kind, o.elems / 3))
        layer += extra
    ops = [_times(o, L * n_micro) for o in layer]
    Vh = V // tp * h
    if first:  # token + position lookup and add; backward: the dense [V/tp, h] gradient is zeroed,
        # scattered into and added to the tied head's gradient every micro-batch
        ops.append(Op("embedding", "elementwise", 0.0, n_micro * 3 * 3 * Tha, count=n_micro * 6, kind="add",
                      elems=n_micro * (3 * T * h + Vh)))
        ops.append(Op("embedding_grad_zero", "elementwise", 0.0, 0.0, count=n_micro, kind="copy", elems=n_micro * Vh))
    if last:
        ops.append(Op("final_layernorm", "elementwise", 0.0, n_micro * 3 * 2 * Tha, count=n_micro * 3,
                      kind="layernorm", elems=n_micro * T * h))
        ops += [_times(o, n_micro) for o in _gemm("lm_head", T, h, V // tp, ab)]
        # the trainer's fp32 cross-entropy, forward + backward: timed as one unit by --calibrate on a
        # CPU (kind loss / loss_tp), else the bytes its kernels move (loss_traffic)
        per_logit, cast, kernels = loss_traffic(T, V // tp, precision, tp)
        logits = n_micro * T * V / tp
        ops.append(Op("cross_entropy", "loss", 0.0, logits * per_logit, count=n_micro * kernels,
                      kind="loss_tp" if tp > 1 else "loss", elems=logits, cast_bytes=logits * cast, queued=True))
    return ops


def _times(o: Op, k: int) -> Op:
    return replace(o, flops=o.flops * k, bytes=o.bytes * k, count=o.count * k, elems=o.elems * k,
                   cast_bytes=o.cast_bytes * k)


def local_params(cfg: ModelConfig, tp: int = 1, layers: int | None = None, first: bool = True,
                 last: bool = True, vocab: int | None = None) -> int:
    """Parameters one rank updates (the planner's per-rank count)."""
    from mtnlg.plan.memory import layer_params_local
    V = vocab or cfg.padded_vocab(tp)
    L = cfg.n_layers if layers is None else layers
    n = L * layer_params_local(cfg, tp)
    if first or last:
        n += V * cfg.hidden // tp
    if first:
        n += cfg.seq_len * cfg.hidden
    if last:
        n += 2 * cfg.hidden
    return n


def op_seconds(op: Op, r: Rates, precision: str = "bf16") -> float:
    ab = 4 if precision == "fp32" else 2
    if op.category == "gemm":
        m, k, n = op.shape
        per = gemm_seconds(m, k, n, r, ab)
        return per * op.flops / (2.0 * m * k * n)
    if op.category == "attention":
        return op.flops / (r.attn_tflops * 1e12) + op.count * r.op_overhead_us * 1e-6
    kind = op.kind if op.kind in r.kind_ns else op.kind.removesuffix("_eager")  # profiles before the region
    if kind in r.kind_ns:  # timed as the step calls it, dispatch included
        return op.elems * r.kind_ns[kind] * 1e-9
    stream = (op.bytes - op.cast_bytes) / (r.mem_gbps * 1e9) + op.cast_bytes / ((r.cast_gbps or r.mem_gbps) * 1e9)
    return stream + (0.0 if op.queued else op.count * r.op_overhead_us * 1e-6)


def all_reduce_seconds(nbytes: float, n: int, gbps: float, latency_us: float) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (gbps * 1e9) + 2 * (n - 1) * latency_us * 1e-6


def local_param_tensors(cfg: ModelConfig, layers: int | None = None) -> int:
    """Parameter tensors one rank steps: 12 per block (two LayerNorms and four Linears, weight
    and bias each), the tied embedding, the position table and the final LayerNorm's two."""
    return 12 * (cfg.n_layers if layers is None else layers) + 4


def state_ops(cfg: ModelConfig, n_micro: int, *, tp: int = 1, dp: int = 1, zero: int = 0,
              precision: str = "bf16") -> list[Op]:
    """What a step does besides the model's forward and backward, as the trainer runs it:
    * bf16 with one process or tensor parallelism: ``MasterWeights`` turns each micro-batch's
      bf16 gradients into the fp32 master gradients (a new fp32 tensor on the step's first
      micro-batch, an add on the others);
    * bf16 with data parallelism (``replicate``/FSDP, fp32 parameters, bf16 compute): every
      micro-batch's forward casts the parameters to bf16, and the step's reduction casts the
      bf16 gradients to fp32 once;
    * the optimizer: gradient clipping, AdamW, copy back to bf16 (tensors x per-tensor cost +
      parameters x per-parameter cost, the DTensor path without foreach when parallel);
    * tensor parallelism: the plan's fixed cost per block and per micro-batch (DTensor dispatch
      and redistribution, autograd nodes, the collectives' latency), measured by --calibrate on
      the tensor-parallel GPT at a negligible size (``tp_layer``, ``tp_base``); data parallelism
      likewise (``dp_layer``, ``dp_base``: replicate's hooks, per-block all-reduce latency)."""
    n = local_params(cfg, tp)
    ops: list[Op] = []
    low = precision == "bf16"
    tensors = local_param_tensors(cfg)
    plain = tp == 1 and dp == 1  # plain tensors: fused AdamW, foreach clipping and copies
    if low and dp == 1:
        # bytes per parameter: the first micro-batch's ``p.grad.float()`` reads 2 and writes 4 (a
        # kernel per tensor); a later one's fp32 += bf16 reads 4 + 2 and writes 4 (``_foreach_add_``
        # over two dtypes takes torch's per-tensor path: a kernel per tensor, as DTensors do).  Both
        # are dtype-converting kernels, and queue behind the backward's kernels.
        ops.append(Op("master_grad_first", "optimizer", bytes=6.0 * n, count=tensors, kind="grad_to_fp32", elems=n,
                      cast_bytes=6.0 * n, queued=True))
        if n_micro > 1:
            acc = 10.0 * n * (n_micro - 1)
            ops.append(Op("master_grad_accumulate", "optimizer", bytes=acc, count=tensors * (n_micro - 1),
                          kind="grad_accumulate", elems=n * (n_micro - 1), cast_bytes=acc, queued=True))
    if low and dp > 1:
        ops.append(Op("param_cast_bf16", "elementwise", bytes=6.0 * n * n_micro, count=n_micro, kind="cast",
                      elems=n * n_micro))
        ops.append(Op("grad_cast_fp32", "elementwise", bytes=6.0 * n, count=1, kind="cast", elems=n,
                      cast_bytes=6.0 * n))
    path = "optim" if plain else "optim_replicate" if dp > 1 and tp == 1 else "optim_dtensor"
    ops.append(Op("optimizer_tensors", "optimizer", count=0 if plain else 8 * tensors, kind=path + "_tensor",
                  elems=tensors))
    # plain tensors: foreach norm and mul, fused AdamW, foreach copy back, each a few multi-tensor
    # launches that queue behind the last backward; DTensors: ~8 kernels per tensor (above)
    ops.append(Op("optimizer_params", "optimizer", bytes=optimizer_bytes_per_param(precision, tp, dp) * n,
                  count=multi_tensor_launches(n) * (4 if plain else 0), kind=path + "_param", elems=n,
                  queued=plain))
    if tp > 1:
        ops.append(Op("tp_blocks_fixed", "framework", count=0, kind="tp_layer", elems=n_micro * cfg.n_layers))
        ops.append(Op("tp_embed_head_loss_fixed", "framework", count=0, kind="tp_base", elems=n_micro))
    if dp > 1 and tp == 1:
        ops.append(Op("dp_blocks_fixed", "framework", count=0, kind="dp_layer", elems=n_micro * cfg.n_layers))
        ops.append(Op("dp_root_fixed", "framework", count=0, kind="dp_base", elems=n_micro))
    return ops


def predict_step(cfg: ModelConfig, profile: DeviceProfile, *, micro_batch: int, global_batch: int,
                 tp: int = 1, dp: int = 1, precision: str = "bf16", recompute: str = "none",
                 ranks_per_device: int | None = None, sequence_parallel: bool = False, zero: int = 0) -> dict:
    """Seconds of one training step on one rank (tp x dp, no pipeline), by category."""
    if global_batch % (micro_batch * dp):
        raise UserError(f"global batch {global_batch} is not a multiple of micro_batch {micro_batch} x dp {dp}")
    n_micro = global_batch // (micro_batch * dp)
    r = profile.rates_for(ranks_per_device if ranks_per_device is not None else tp * dp)
    out = {c: 0.0 for c in CATEGORIES}
    ops = step_ops(cfg, micro_batch, n_micro, tp=tp, precision=precision, recompute=recompute)
    for op in ops:
        out[op.category] += op_seconds(op, r, precision)
    n_params = local_params(cfg, tp)
    extra = state_ops(cfg, n_micro, tp=tp, dp=dp, zero=zero, precision=precision)
    measured = "optim_param" in r.kind_ns  # a CPU profile: the step's kinds were timed as the trainer runs them
    for op in extra:
        if measured:
            out[op.category] += op_seconds(op, r, precision) if op.kind in r.kind_ns else 0.0
        elif op.name == "optimizer_params" and r.optim_ns_per_param > 0:
            # a GPU profile from --calibrate timed this very path (clipping, AdamW, copy back) per parameter
            out[op.category] += op.elems * r.optim_ns_per_param * 1e-9
        elif op.category != "framework":  # bytes over bandwidth (GPU datasheets)
            out[op.category] += op_seconds(op, r, precision)
    ab = 4 if precision == "fp32" else 2
    act = micro_batch * cfg.seq_len * cfg.hidden * ab
    if tp > 1:  # 2 all-reduces forward + 2 backward per layer, 1 at the embedding, 1 at the head
        n_coll = n_micro * (4 * cfg.n_layers + 2)
        # where the plan's fixed cost per block was measured, it holds the collectives' latency
        lat = 0.0 if "tp_layer" in r.kind_ns else profile.link_latency_us
        out["communication"] += n_coll * all_reduce_seconds(act, tp, profile.link_gbps, lat)
    if dp > 1:  # one gradient all-reduce per step, in the gradients' dtype (fp32 master grads for bf16)
        lat = 0.0 if "dp_layer" in r.kind_ns else profile.link_latency_us
        out["communication"] += all_reduce_seconds(4 * n_params, dp, profile.link_gbps, lat)
    total = sum(out.values())
    flops = sum(o.flops for o in ops)
    return {"seconds": total, "breakdown_s": out, "flops": flops, "microbatches": n_micro,
            "tokens": global_batch * cfg.seq_len, "params_local": n_params}


def stage_compute_seconds(cfg: ModelConfig, profile: DeviceProfile, *, micro_batch: int, tp: int, layers: int,
                          first: bool, last: bool, vocab: int, precision: str, recompute: str) -> dict:
    """One micro-batch's forward + backward on one rank of a pipeline stage, by category
    (the planner's per-slot compute; communication is the planner's)."""
    r = profile.rates_for(1)
    ops = step_ops(cfg, micro_batch, 1, tp=tp, layers=layers, first=first, last=last, vocab=vocab,
                   precision=precision, recompute=recompute)
    out = {c: 0.0 for c in CATEGORIES}
    for op in ops:
        out[op.category] += op_seconds(op, r, precision)
    return {"seconds": sum(out.values()), "breakdown_s": out, "flops": sum(o.flops for o in ops)}
