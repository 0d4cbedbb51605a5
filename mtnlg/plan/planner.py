"""``plan_layout``: one layout's memory, FLOPs and time; ``search_layouts``:
every valid layout of a cluster, ranked by predicted time among those that fit."""
from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.errors import UserError
from mtnlg.model.flops import flops_per_iteration, param_count
from mtnlg.plan.cluster import DEFAULT_CALIBRATION, Calibration, Cluster
from mtnlg.parallel.stages import analytic_bubble, effective_schedule, stage_layers
from mtnlg.plan.layout import RECOMPUTE, Layout, check_layout, stage_kinds
from mtnlg.plan.memory import (GB, STATE_BYTES, fsdp_buffer_bytes, model_state_bytes, reduces_per_step,
                               stage_activation_bytes, stage_params_local)
from mtnlg.plan.timing import (data_parallel_time, layer_flops_split, optimizer_time, passes_per_layer,
                               stage_time, zero3_gather_per_microbatch)


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def plan_stage(cfg: ModelConfig, cluster: Cluster, layout: Layout, stage: int, n_micro: int, vocab: int,
               precision: str, calib: Calibration) -> dict:
    L = layout
    n_layers = stage_layers(cfg.n_layers, L.pp)[stage]
    params = stage_params_local(cfg, L.tp, L.pp, stage, vocab)
    state = STATE_BYTES[precision]
    mem = model_state_bytes(params, L.dp, L.zero, precision, reduces_per_step(L))
    mem.update(fsdp_buffer_bytes(cfg, L.tp, L.pp, L.dp, L.zero, stage, vocab, state[0]))
    mem["activations"] = stage_activation_bytes(cfg, L, stage, n_layers, n_micro, vocab, _act_bytes(precision))
    t = stage_time(cfg, cluster, calib, L, stage, n_layers, vocab, _act_bytes(precision))
    z3 = zero3_gather_per_microbatch(cluster, calib, L, params, state)
    t["total_s"] += max(0.0, z3 - t["compute_s"])
    return {"stage": stage, "layers": n_layers, "params": params,
            "memory_gb": {k: v / GB for k, v in mem.items()}, "memory_total_gb": sum(mem.values()) / GB,
            "time_per_microbatch_s": t, "state_bytes": mem["weights"] + mem["gradients"] + mem["optimizer"]}


def plan_layout(cfg: ModelConfig, cluster: Cluster, layout: Layout, global_batch: int,
                precision: str = "bf16", calib: Calibration = DEFAULT_CALIBRATION) -> dict:
    """Predict one layout: parameters, memory per GPU, time per iteration and TFLOP/s per GPU."""
    L = layout
    if L.world_size != cluster.world_size:
        raise UserError(f"tp={L.tp} x pp={L.pp} x dp={L.dp} = {L.world_size} GPUs, but the cluster has "
                        f"{cluster.world_size}")
    if precision not in STATE_BYTES:
        raise UserError(f"precision must be one of {', '.join(STATE_BYTES)}, got {precision!r}")
    check_layout(cfg, L, global_batch)
    vocab = cfg.padded_vocab(L.tp)
    n_micro = global_batch // (L.dp * L.micro_batch)
    stages = [dict(plan_stage(cfg, cluster, L, i, n_micro, vocab, precision, calib), kind=k)
              for k, i in stage_kinds(L.pp)]
    slot = max(s["time_per_microbatch_s"]["total_s"] for s in stages)
    # idle slots of the schedule that runs n_micro micro-batches (fallbacks included): bubble b = slots/(m+slots)
    chunks = 2 if L.schedule == "zbv" else L.virtual_stages
    bubble = analytic_bubble(effective_schedule(L.schedule, n_micro, L.pp, chunks), n_micro, L.pp, chunks)
    bubble_slots = bubble * n_micro / (1 - bubble)
    pipeline_s = (n_micro + bubble_slots) * slot
    params_max = max(s["params"] for s in stages)
    dp_s = data_parallel_time(cluster, calib, L, params_max, STATE_BYTES[precision], n_micro)
    optim_s = optimizer_time(cluster, calib, max(s["state_bytes"] for s in stages))
    iteration_s = pipeline_s + dp_s + optim_s

    split = layer_flops_split(cfg, vocab)
    tokens = global_batch * cfg.seq_len
    executed = tokens * (cfg.n_layers * passes_per_layer(split, L.recompute) + split["logits_train"])
    model_flops = flops_per_iteration(cfg, global_batch, recompute=False, vocab=vocab)
    memory = max(s["memory_total_gb"] for s in stages)
    usable = cluster.gpu.memory_gb - calib.reserved_gb
    return {
        "layout": L.as_dict(), "gpus": cluster.world_size, "nodes": cluster.nodes, "gpu": cluster.gpu.name,
        "global_batch": global_batch, "precision": precision, "padded_vocab": vocab,
        "params": param_count(cfg, vocab), "microbatches_per_replica": n_micro,
        "flops_per_iteration": executed, "model_flops_per_iteration": model_flops,
        "iteration_time_s": iteration_s,
        "time_breakdown_s": {"pipeline": pipeline_s, "bubble": bubble_slots * slot,
                             "tensor_parallel_comm": (n_micro + bubble_slots) * max(
                                 s["time_per_microbatch_s"]["tp_comm_s"] for s in stages),
                             "pipeline_p2p": (n_micro + bubble_slots) * max(
                                 s["time_per_microbatch_s"]["p2p_s"] for s in stages),
                             "data_parallel_comm": dp_s, "optimizer": optim_s},
        "bubble_fraction": bubble_slots / n_micro,
        "tflops_per_gpu": executed / (cluster.world_size * iteration_s) / 1e12,
        "model_tflops_per_gpu": model_flops / (cluster.world_size * iteration_s) / 1e12,
        "mfu": model_flops / (cluster.world_size * iteration_s) / (cluster.gpu.peak_tflops * 1e12),
        "tokens_per_s": tokens / iteration_s,
        "memory_per_gpu_gb": memory, "usable_memory_gb": usable, "fits": memory <= usable,
        "stages": [{k: v for k, v in s.items() if k != "state_bytes"} for s in stages],
    }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: ModelConfig, cluster: Cluster, global_batch: int, *, tp: list[int] | None = None,
                      pp: list[int] | None = None, micro_batch: list[int] | None = None,
                      recompute: list[str] | None = None, zero: int = 0, sequence_parallel: bool = False,
                      schedule: str = "1f1b", virtual_stages: int = 1, zero_reduce: str = "micro_batch",
                      attention: str = "flash") -> list[Layout]:
    """Every layout of the cluster's GPUs that the model and batch allow."""
    N = cluster.world_size
    out = []
    for t in tp or [d for d in _divisors(N) if cfg.n_heads % d == 0 and cfg.ffn % d == 0]:
        for p in pp or [d for d in _divisors(N // t if N % t == 0 else 1) if d <= cfg.n_layers]:
            if N % (t * p):
                continue
            for b in micro_batch or [1, 2, 4, 8]:
                for r in recompute or list(RECOMPUTE):
                    v = virtual_stages if schedule in ("interleaved", "zb") else 1
                    L = Layout(t, p, N // (t * p), b, schedule, v, zero, sequence_parallel and t > 1, r, zero_reduce,
                               attention)
                    try:
                        check_layout(cfg, L, global_batch)
                    except UserError:
                        continue
                    out.append(L)
    return out


def search_layouts(cfg: ModelConfig, cluster: Cluster, global_batch: int, precision: str = "bf16",
                   calib: Calibration = DEFAULT_CALIBRATION, include_unfit: bool = False, **options) -> list[dict]:
    """Plans for every candidate layout, fitting ones first, fastest first."""
    plans = [plan_layout(cfg, cluster, L, global_batch, precision, calib)
             for L in candidate_layouts(cfg, cluster, global_batch, **options)]
    if not include_unfit:
        plans = [p for p in plans if p["fits"]]
    return sorted(plans, key=lambda p: (not p["fits"], p["iteration_time_s"]))
