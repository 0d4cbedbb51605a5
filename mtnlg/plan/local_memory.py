"""The CPU per-rank memory model of ``mtnlg plan --local``: the peak bytes one rank of a
tp x dp ``mtnlg train`` run on this machine holds, by part (states, activations, the loss,
the process's baseline and the heap's slack from a device profile).

Distinct from ``memory.py``, the analytic GPU model of Megatron-style layouts (ZeRO, pipeline,
sequence parallelism) the planner searches with; this one mirrors what the trainer and
``mtnlg.parallel.data`` keep on a CPU, and is checked against measured peak RSS
(``benchmarks/rank_memory.py``, ``benchmarks/plan_vs_measured.py``; docs/plan.md).
"""
from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.errors import UserError
from mtnlg.plan.cost import DeviceProfile, local_params, uses_compiled_regions


def predict_memory(cfg: ModelConfig, profile: DeviceProfile | None, *, micro_batch: int, tp: int = 1, dp: int = 1,
                   zero: int = 0, precision: str = "bf16", global_batch: int | None = None,
                   compiled_regions: bool = True) -> dict:
    """Peak bytes of one rank of a tp x dp run (no pipeline) on a CPU, by part.

    States per local parameter, as the trainer and ``mtnlg.parallel.data`` keep them:
    * bf16, one process or tensor parallel: bf16 weights and gradients, the fp32 master copy
      and its fp32 gradient, Adam's two fp32 moments (2 + 2 + 4 + 4 + 8 = 20 bytes; the
      gradients' 6 not all at the peak, see below);
    * bf16 with data parallelism (``replicate``/FSDP: fp32 parameters, bf16 compute from the
      mixed-precision policy): fp32 parameters, their bf16 compute copies held from forward to
      backward, bf16 gradients, fp32 gradients in the reduce dtype, Adam (4 + 2 + 2 + 4 + 8);
      ZeRO shards the fp32 parameters, gradients and moments as in ``plan.memory``;
    * fp32 / bf16-autocast: fp32 weights and gradients and Adam (4 + 4 + 8).
    AdamW is fused (plain tensors) or a per-parameter loop (DTensors): no whole-model temporary.
    Activations of one micro-batch (the trainer accumulates micro-batches one at a time): per
    layer 32·s·b·h bytes in 16-bit (Korthikanti et al.'s 34·s·b·h less the two dropout masks,
    which dropout 0 does not keep, and no score matrix: SDPA's flash kernel keeps only the
    log-sum-exp), doubled in fp32; in bf16 the CPU attention kernel's kept probabilities
    (``mtnlg.model.attention.probability_bytes``, about b·a·s²/2 bf16 per layer).  The logits,
    kept for the loss's backward, and what the loss adds at its peak: measured by ``--calibrate`` per logit element (``loss_bytes``,
    ``loss_tp_bytes`` for the vocabulary-parallel loss on DTensor logits), else its fp32
    log-softmax and gradient (8 bytes).  Plus the process's resident baseline (torch, mtnlg), what
    compiling the bias + GeLU region adds where the run uses it (``uses_compiled_regions``;
    Inductor's runtime, ``region_rss_gb``, measured by ``--calibrate``), and
    the heap's slack: glibc's heap, never trimmed under the trainer's settings, stays at its
    high-water mark, above the most bytes it holds at once by the holes the step's freed
    activations leave (``calibrate_heap``: measured per activation element, L·s·b·h, alike in
    every layout).

    Not every state is alive at once.  The step's peak is inside the loss of its last micro-batch
    (activations and logits all alive, the backward not started), and the gradients of that
    micro-batch do not exist yet (the optimizer's ``zero_grad(set_to_none=True)``;
    ``MasterWeights`` drops the bf16 gradients once added into the fp32 ones; replicate/FSDP
    casts a unit's bf16 gradients into its fp32 accumulator or reduction and frees them).  So
    ``gradients`` counts only what earlier micro-batches of the step left: none with one
    micro-batch per rank (``global_batch == micro_batch × dp``), else the fp32 accumulators
    (master gradients; FSDP2's ``unsharded_accumulated_grad`` under replicate and ZeRO-1, the
    reduce-scattered shards under ZeRO-2/3).  ``global_batch=None``: several micro-batches.  The
    end of the backward (every gradient alive, no activations) is the other candidate peak, the
    larger one for a model whose states outweigh its activations; ``peak`` says which one
    ``bytes`` is."""
    n = local_params(cfg, tp)
    ab = 4 if precision == "fp32" else 2
    shard_w = dp if zero >= 3 else 1
    shard_g = dp if zero >= 2 else 1
    shard_o = dp if zero >= 1 else 1
    if precision == "bf16" and dp > 1:
        weights, optimizer = n * 4 / shard_w + n * 2, n * 8 / shard_o
        all_grads = n * 2 + n * 4 / shard_g     # a unit's bf16 gradients and their fp32 reduction
    elif precision == "bf16":
        weights, optimizer = n * 2, n * (4 + 8) / shard_o
        all_grads = n * 2 + n * 4               # bf16 gradients cast into fresh fp32 master gradients
    else:
        weights, optimizer = n * 4 / shard_w, n * 8 / shard_o
        all_grads = n * 4 / shard_g
    if global_batch is not None and global_batch % (micro_batch * dp):
        raise UserError(f"global batch {global_batch} is not a multiple of micro_batch {micro_batch} x dp {dp}")
    several = global_batch is None or global_batch > micro_batch * dp
    # at the loss's peak: only the fp32 accumulators of the step's earlier micro-batches, if any
    parts = {"weights": weights, "gradients": n * 4 / shard_g if several else 0.0, "optimizer": optimizer}
    T, h = micro_batch * cfg.seq_len, cfg.hidden
    V = cfg.padded_vocab(tp)
    sbh = T * h
    parts["activations"] = cfg.n_layers * sbh * 16 * ab * _tp_act_factor(tp)
    if precision == "bf16":
        from mtnlg.model.attention import probability_bytes  # torch: only this CPU-local prediction needs it
        parts["attention_probs"] = cfg.n_layers * probability_bytes(micro_batch, cfg.n_heads // tp, cfg.seq_len)
    kinds = {}
    if profile is not None:
        kinds = profile.rates_for(tp * dp).kind_ns
    loss_key = "loss_tp_bytes" if tp > 1 else "loss_bytes"
    per_logit = kinds.get(loss_key, 4 + ab)
    parts["logits_and_loss"] = T * V / tp * (ab + per_logit)
    parts["baseline"] = (profile.baseline_rss_gb * 1e9) if profile else 0.0
    parts["heap_slack"] = (profile.heap_slack_bytes * cfg.n_layers * sbh) if profile else 0.0
    parts["compiled_regions"] = (profile.region_rss_gb * 1e9 if profile and uses_compiled_regions(
        cfg, micro_batch, tp, precision, compiled_regions) else 0.0)
    at_loss = sum(parts.values())
    keep = ("weights", "optimizer", "baseline", "heap_slack", "compiled_regions")  # after the backward: no activations
    at_end = sum(parts[k] for k in keep) + all_grads
    if at_end > at_loss:
        parts = {k: (all_grads if k == "gradients" else v if k in keep else 0.0) for k, v in parts.items()}
        return {"bytes": at_end, "parts": parts, "peak": "end of backward"}
    return {"bytes": at_loss, "parts": parts, "peak": "loss"}


def _tp_act_factor(tp: int) -> float:
    """Fraction of a layer's activations one tensor-parallel rank keeps (no sequence
    parallelism): Korthikanti's (10 + 24/t) / 34 with the dropout masks removed."""
    return (10 + 22 / tp) / 32
