"""Memory per GPU: parameters, gradients and optimizer state for a layout and
ZeRO stage, and activations per micro-batch (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models").

Parameter counts per rank assume the tensor-parallel plan of
``mtnlg.parallel.tensor``: QKV and MLP-up column-parallel (weight and bias
sharded), attention-out and MLP-down row-parallel (weight sharded, bias
replicated), LayerNorms and position embeddings replicated, token embedding
and output head vocabulary-parallel.  On a pipeline the last stage keeps its
own copy of the tied output embedding (as Megatron does), so with pp > 1 the
ranks together hold V·h more parameters than the model has.
"""
from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.model.flops import param_count

GB = 1e9

# bytes per parameter (weights, gradients, optimizer state) for each train.precision
STATE_BYTES = {
    # pure bf16 weights and grads; fp32 master copy + Adam m, v
    "bf16": (2, 2, 12),
    # fp32 weights and grads (autocast computes in 16 bits); Adam m, v
    "bf16-autocast": (4, 4, 8),
    "fp16": (4, 4, 8),
    "fp32": (4, 4, 8),
}


def layer_params_local(cfg: ModelConfig, tp: int) -> int:
    """Parameters of one transformer block on one tensor-parallel rank."""
    h, f = cfg.hidden, cfg.ffn
    return (4 * h                              # two LayerNorms (replicated)
            + (3 * h * h + 3 * h) // tp        # QKV, column-parallel
            + h * h // tp + h                  # attention out, row-parallel; bias replicated
            + (h * f + f) // tp                # MLP up, column-parallel
            + f * h // tp + h)                 # MLP down, row-parallel; bias replicated


def stage_params_local(cfg: ModelConfig, tp: int, pp: int, stage: int, vocab: int) -> int:
    """Exact parameter elements held by one rank of pipeline stage ``stage``."""
    from mtnlg.parallel.stages import stage_layers
    h = cfg.hidden
    n = stage_layers(cfg.n_layers, pp)[stage] * layer_params_local(cfg, tp)
    first, last = stage == 0, stage == pp - 1
    if first or last:
        n += vocab * h // tp                 # token embedding / (tied) output head
    if first:
        n += cfg.seq_len * h                 # position embedding
    if last:
        n += 2 * h                           # final LayerNorm
    return n


def total_params_all_ranks(cfg: ModelConfig, tp: int, pp: int, vocab: int) -> int:
    """Parameter elements summed over the tp×pp ranks of one model replica."""
    return tp * sum(stage_params_local(cfg, tp, pp, i, vocab) for i in range(pp))


def replicated_params(cfg: ModelConfig, tp: int, pp: int, vocab: int) -> int:
    """How many more elements the replica's ranks hold than ``param_count``:
    tensor-parallel replicas of LayerNorms, row-parallel biases and position
    embeddings, and the last stage's copy of the tied embedding."""
    return total_params_all_ranks(cfg, tp, pp, vocab) - param_count(cfg, vocab)


def model_state_bytes(n_params: int, dp: int, zero: int, precision: str, reduce_per_step: bool = False) -> dict:
    """Bytes of weights, gradients and optimizer state on one rank.
    ZeRO-1 shards the optimizer state over dp, ZeRO-2 also the gradients,
    ZeRO-3 also the weights (Rajbhandari et al. 2020).

    ``reduce_per_step`` (ZeRO 2/3 inside a pipeline with ``parallel.zero_reduce = "step"``):
    FSDP2 skips the reduce-scatter until the step's last micro-batch and accumulates every
    unsharded gradient in its reduce dtype, fp32 (``FSDPParam.to_accumulated_grad_if_needed``),
    so the rank holds 4 bytes per local parameter of gradients instead of a 1/dp shard."""
    w, g, o = STATE_BYTES[precision]
    grads = n_params * 4 if (reduce_per_step and zero >= 2 and dp > 1) else n_params * g / (dp if zero >= 2 else 1)
    return {
        "weights": n_params * w / (dp if zero >= 3 else 1),
        "gradients": grads,
        "optimizer": n_params * o / (dp if zero >= 1 else 1),
    }


def reduces_per_step(layout) -> bool:
    """Whether this layout's ZeRO 2/3 gradients wait unsharded for the step's end (see above):
    ``parallel.zero_reduce = "step"`` in a pipeline, and always under the zero-bubble schedules,
    where ``PipelineStage`` drives FSDP (``mtnlg/parallel/setup.py``)."""
    return (layout.zero >= 2 and layout.pp > 1 and layout.dp > 1
            and (layout.zero_reduce == "step" or layout.schedule in ("zb", "zbv")))


def fsdp_buffer_bytes(cfg: ModelConfig, tp: int, pp: int, dp: int, zero: int, stage: int, vocab: int,
                      compute_bytes: int) -> dict:
    """What FSDP2 (``parallel.zero`` >= 1 over dp > 1 ranks) holds beyond the sharded state at a
    step's peak, the end of backward, when every gradient exists (``mtnlg.parallel.data``):

    * reduce buffers: the unit reduced last has its unsharded gradient (compute dtype), the fp32
      reduce-scatter input it is copied into, and the fp32 shard coming out.  On the first stage
      (and without a pipeline) that unit is the vocabulary-sized embedding, elsewhere a block.
    * gathered weights (ZeRO-3): the block being differentiated and the one prefetched; without a
      pipeline the tied embedding lives in the root unit, which FSDP2 keeps gathered from the first
      forward to the end of backward.  ``parallel.zero_reduce = "step"`` changes nothing here: the
      pipeline stage turns off resharding after backward, but zero 3 still reshards each unit
      after its next forward, so no more than these stay gathered at the peak (measured,
      docs/scale.md).

    Measured against the 760M scale drill (README, "Scale drill"): resume layout dp4 x tp2, 2.27-2.28 GB
    per rank against 2.34 GB planned with these terms (+0.35 GB process runtime) and 1.99 GB without."""
    if zero < 1 or dp <= 1:
        return {}
    block, emb = layer_params_local(cfg, tp), vocab * cfg.hidden // tp
    last = emb if stage == 0 else block
    out = {"reduce_buffers": last * (compute_bytes + 4 + 4 / dp)}
    if zero >= 3:
        out["gathered_weights"] = (2 * block + (emb if pp == 1 else 0)) * compute_bytes
    return out


def activation_bytes_per_layer(cfg: ModelConfig, micro_batch: int, tp: int, sequence_parallel: bool,
                               recompute: str, act_bytes: int = 2, attention: str = "materialized",
                               dropout: bool = True) -> float:
    """Activations one transformer layer keeps for backward, per micro-batch
    (Korthikanti et al. 2022, Table 2; 16-bit activations, 1-byte dropout masks):

        no recompute, tp only:    s·b·h·(10 + 24/t + 5·a·s/(h·t))
        no recompute, tp + sp:    s·b·h·(34/t + 5·a·s/(h·t))
        selective (attention core recomputed): drop the 5·a·s/(h·t) term
        full recompute:           2·s·b·h (only the layer input), /t with sp

    ``attention="flash"``: a fused kernel (SDPA's flash / memory-efficient / cuDNN ones, which
    mtnlg trains with) keeps only its output and a log-sum-exp per row, never the a·s² scores,
    so no recompute costs what selective does.  ``dropout=False`` (model.dropout = 0): the two
    1-byte residual dropout masks are not kept either (34 -> 32).  Measured on an H100,
    gpt-1.3b at s = 2048, b = 4: 38.4 GB allocated against 69.4 GB with the score term.
    """
    s, b, h, a, t = cfg.seq_len, micro_batch, cfg.hidden, cfg.n_heads, tp
    sbh = s * b * h
    attn_scores = 5 * a * s / (h * t)
    masks = 0 if dropout else 2  # the two residual dropout masks, 1 byte each: in the 10 tp replicates
    if recompute == "full":
        out = 2 * sbh / (t if sequence_parallel else 1)
    else:
        per = ((34 - masks) / t) if sequence_parallel else (10 - masks + 24 / t)
        if recompute == "none" and attention == "materialized":
            per += attn_scores
        out = sbh * per
    return out * act_bytes / 2


def in_flight_microbatches(schedule: str, pp: int, stage: int, n_micro: int, virtual_stages: int = 1) -> float:
    """Micro-batches whose activations a stage holds at its peak.  1F1B: stage
    i holds pp - i; GPipe: all of them; interleaved 1F1B: the first stage
    holds pp·(1 + (pp-1)/(pp·v)) in units of its whole share of layers."""
    if schedule == "gpipe":
        return n_micro
    held = min(pp - stage, n_micro)
    if schedule == "interleaved" and virtual_stages > 1:
        held = min(n_micro, held * (1 + (pp - 1) / (pp * virtual_stages)))
    return held


def stage_activation_bytes(cfg: ModelConfig, layout, stage: int, n_layers_stage: int, n_micro: int,
                           vocab: int, act_bytes: int = 2) -> float:
    """Peak activation memory of one rank of ``stage``."""
    L = layout
    s, b, h, t = cfg.seq_len, L.micro_batch, cfg.hidden, L.tp
    sp = L.sequence_parallel and t > 1
    held = in_flight_microbatches(L.schedule, L.pp, stage, n_micro, L.virtual_stages)
    kw = dict(attention=L.attention, dropout=cfg.dropout > 0)
    per_layer = activation_bytes_per_layer(cfg, b, t, sp, L.recompute, act_bytes, **kw)
    total = held * n_layers_stage * per_layer
    if L.recompute == "full":
        # backward re-materialises one layer's activations at a time
        total += activation_bytes_per_layer(cfg, b, t, sp, "none", act_bytes, **kw)
    if stage == 0 and cfg.dropout > 0:
        total += held * s * b * h / (t if sp else 1)          # embedding dropout mask (1 byte)
    if stage == L.pp - 1:
        # logits (16-bit) and fp32 softmax of the vocabulary-parallel cross-entropy
        total += s * b * vocab / t * (act_bytes + 4)
    return total
