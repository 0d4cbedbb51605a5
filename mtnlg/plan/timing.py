"""Time per iteration: compute at a calibrated fraction of peak, tensor-,
pipeline- and data-parallel communication over the link each one crosses,
the pipeline bubble of the schedule, and the optimizer step.

    T = (m + bubble_slots) · t_slot + t_dp + t_optim
    t_slot = max over stages of (compute + tensor-parallel comm + p2p) for one micro-batch
    bubble_slots = pp - 1 (1F1B, GPipe) or (pp - 1)/v (interleaved, v chunks per stage)

Communication is not overlapped with compute, as in Megatron's 1F1B: the
tensor-parallel all-reduces sit between GEMMs, p2p sends block the steady
state, and the gradient all-reduce runs after the pipeline flush.  ZeRO-3's
per-micro-batch parameter gathers are assumed prefetched behind compute.
Collective costs are bandwidth terms of ring algorithms, with latency ignored
(at these sizes they are multi-megabyte messages).
"""
from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.model.flops import flops_per_token, layer_forward_flops_per_token
from mtnlg.plan.cluster import Calibration, Cluster


def all_reduce_s(nbytes: float, n: int, gbps: float) -> float:
    """Ring all-reduce: each rank sends and receives 2(n-1)/n of the data."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / (gbps * 1e9)


def all_gather_s(nbytes: float, n: int, gbps: float) -> float:
    """Ring all-gather or reduce-scatter of a ``nbytes`` tensor: (n-1)/n of it."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / (gbps * 1e9)


def link_gbps(cluster: Cluster, calib: Calibration, spans_nodes: bool) -> float:
    g = cluster.gpu
    return (g.ib_gbps if spans_nodes else g.nvlink_gbps) * calib.link_efficiency


def group_spans_nodes(stride: int, size: int, gpus_per_node: int) -> bool:
    """Whether some process group of ``size`` ranks ``stride`` apart crosses a node:
    the groups tile ``stride·size`` consecutive ranks, which stay inside nodes
    only when that block divides a node."""
    block = stride * size
    return size > 1 and (block > gpus_per_node or gpus_per_node % block != 0)


def layer_flops_split(cfg: ModelConfig, vocab: int) -> dict:
    """Per-token forward FLOPs of one layer, of its attention core (QK^T, AV:
    what selective recomputation redoes) and of the output layer's training
    (forward + backward), all from ``mtnlg.model.flops``."""
    s = cfg.seq_len
    layer = layer_forward_flops_per_token(cfg, s)
    # the attention core is the only term that grows with s: f(2s) - f(s) = 4·s·h
    attn_core = layer_forward_flops_per_token(cfg, 2 * s) - layer
    logits_train = flops_per_token(cfg, False, vocab, s) - 3 * cfg.n_layers * layer
    return {"layer": layer, "attn_core": attn_core, "logits_train": logits_train}


def passes_per_layer(split: dict, recompute: str) -> float:
    """Forward-equivalents of one layer per token: fwd + 2×fwd for backward (+ recompute)."""
    extra = {"none": 0.0, "selective": split["attn_core"], "full": split["layer"]}[recompute]
    return 3 * split["layer"] + extra


def stage_time(cfg: ModelConfig, cluster: Cluster, calib: Calibration, layout, stage: int,
               n_layers_stage: int, vocab: int, act_bytes: int) -> dict:
    """Seconds one micro-batch spends on one rank of ``stage`` (fwd + bwd)."""
    L = layout
    tokens = L.micro_batch * cfg.seq_len
    split = layer_flops_split(cfg, vocab)
    flops = tokens * n_layers_stage * passes_per_layer(split, L.recompute)
    if stage == L.pp - 1:
        flops += tokens * split["logits_train"]
    if calib.device is not None:  # per-operation cost model
        from mtnlg.plan.cost import stage_compute_seconds
        precision = "fp32" if act_bytes == 4 else "bf16"
        compute = stage_compute_seconds(cfg, calib.device, micro_batch=L.micro_batch, tp=L.tp,
                                        layers=n_layers_stage, first=stage == 0, last=stage == L.pp - 1,
                                        vocab=vocab, precision=precision, recompute=L.recompute)["seconds"]
    else:
        compute = flops / L.tp / (cluster.gpu.peak_tflops * 1e12 * calib.compute_efficiency)

    # tensor parallel: 2 all-reduces forward and 2 backward per layer (+2 when the forward
    # is recomputed); sequence parallelism swaps each for an all-gather + reduce-scatter
    # of the same volume.  The vocab-parallel embedding adds one forward all-reduce on the
    # first stage, the output layer one backward all-reduce on the last.
    act = tokens * cfg.hidden * act_bytes
    tp_bw = link_gbps(cluster, calib, group_spans_nodes(1, L.tp, cluster.gpus_per_node))
    n_coll = n_layers_stage * (6 if L.recompute == "full" else 4)
    n_coll += (stage == 0) + (stage == L.pp - 1)
    tp_comm = n_coll * all_reduce_s(act, L.tp, tp_bw)

    # pipeline p2p: activations out forward, their gradient out backward.  With tp > 1 each
    # rank sends 1/tp of the tensor and the receiver all-gathers it over NVLink (Megatron's
    # scatter-gather optimisation).  v model chunks per stage mean v times the sends.
    p2p = 0.0
    if L.pp > 1:
        pp_bw = link_gbps(cluster, calib, group_spans_nodes(L.tp, L.pp, cluster.gpus_per_node))
        one = act / L.tp / (pp_bw * 1e9) + all_gather_s(act, L.tp, tp_bw)
        p2p = 2 * one * L.virtual_stages
    return {"compute_s": compute, "tp_comm_s": tp_comm, "p2p_s": p2p,
            "total_s": compute + tp_comm + p2p, "flops": flops / L.tp}


def data_parallel_time(cluster: Cluster, calib: Calibration, layout, n_params_local: int,
                       state: tuple[int, int, int], n_micro: int) -> float:
    """Gradient synchronisation per iteration (not overlapped with the pipeline)."""
    L = layout
    if L.dp == 1:
        return 0.0
    w, g, _ = state
    bw = link_gbps(cluster, calib, group_spans_nodes(L.tp * L.pp, L.dp, cluster.gpus_per_node))
    if L.zero == 0:
        return all_reduce_s(n_params_local * g, L.dp, bw)
    if L.zero in (1, 2):  # reduce-scatter the gradients, all-gather the updated weights
        return all_gather_s(n_params_local * g, L.dp, bw) + all_gather_s(n_params_local * w, L.dp, bw)
    # ZeRO-3: gathers are prefetched per micro-batch (overlap assumed, see stage time);
    # the last gradient reduce-scatter is exposed
    return all_gather_s(n_params_local * g, L.dp, bw)


def zero3_gather_per_microbatch(cluster: Cluster, calib: Calibration, layout, n_params_local: int,
                                state: tuple[int, int, int]) -> float:
    """ZeRO-3 gathers weights for forward and backward and reduce-scatters gradients every micro-batch."""
    L = layout
    if L.zero < 3 or L.dp == 1:
        return 0.0
    w, g, _ = state
    bw = link_gbps(cluster, calib, group_spans_nodes(L.tp * L.pp, L.dp, cluster.gpus_per_node))
    return all_gather_s(n_params_local * (2 * w + g), L.dp, bw)


def optimizer_time(cluster: Cluster, calib: Calibration, state_bytes: float) -> float:
    """Adam is memory-bound: read and write every state byte once."""
    return 2 * state_bytes / (cluster.gpu.hbm_gbps * 1e9 * calib.hbm_efficiency)
