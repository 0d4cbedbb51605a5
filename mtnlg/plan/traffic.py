"""Bytes the trainer's memory-bound steps move on a GPU, counted from their code: the fp32
cross-entropy (``mtnlg.train.loss``) and the optimizer path (``MasterWeights``, clipping,
AdamW, copy back).  ``cost.step_ops`` / ``cost.state_ops`` price them by these bytes over a
profile's bandwidth where the profile has no measured rate for them (every GPU profile).
Loads no torch (a plan for a GPU cluster does not)."""
from __future__ import annotations

# mtnlg.train.loss.DEFAULT_CHUNK_ELEMS, the fp32 elements of one slice of logit rows on a GPU
# (not imported: loss.py imports torch, which a plan for a GPU cluster does not load; tested equal)
LOSS_SLICE_ELEMS = 1 << 22
# CUDA's row softmax / log-softmax for rows too long for its shared-memory kernel (over 48 KB: a
# vocabulary row in fp32) is cunn_SoftMaxForward, one block per row, three passes over the row:
# max, sum of exp, then read again to write the output
SOFTMAX_PASSES = 3


def loss_traffic(tokens: int, vocab_local: int, precision: str = "bf16", tp: int = 1,
                 slice_elems: int = LOSS_SLICE_ELEMS) -> tuple[float, float, int]:
    """(bytes moved per logit element, those of them moved by dtype-converting kernels, kernels
    launched) of one micro-batch's cross-entropy, forward + backward, as
    ``mtnlg.train.loss.cross_entropy_fp32`` runs it on a GPU (fp32 = 4 B, bf16 = 2 B; a softmax
    reads its input SOFTMAX_PASSES times and writes once):

    * bf16 plain logits (one process, data parallel): slices of LOSS_SLICE_ELEMS // V rows;
      forward per slice: cast to fp32 (2 + 4), log-softmax (3·4 + 4), NLL and the running sum
      (a few bytes per row); backward per slice: cast again (2 + 4), softmax (3·4 + 4), the -1 at
      each target (per row), the in-place scale (4 + 4), the cast into the bf16 gradient (4 + 2):
      22 + 36 = 58 bytes; kernels: cast, log_softmax, nll_loss, add forward; cast, softmax, ne,
      mul, clamp, full, scatter_add, mul_, copy_ backward = 13 per slice, + 8 per micro-batch
      (the total's zeros, the denominator's ne/sum/clamp/cast, the mean, the backward's seed and
      the gradient's scale).  The
      two bf16 -> fp32 casts (12 bytes) run torch's unrolled dtype-converting copy; the cast
      back to bf16 has a vectorised kernel of its own.  The loop makes no host sync: its
      launches queue behind the model's forward (measured on an H200, benchmarks/memory_bound_ops.py:
      1296 kernels a micro-batch of gpt-1.3b against 1295 here; the softmax kernels' re-reads hit
      the L2 cache, a 16 MB slice, but the 83-row grid leaves a third of the SMs idle: 14 us a
      kernel against 16 us for their bytes at the streaming rate).
    * fp32 logits (train.precision=fp32): F.cross_entropy through autograd: log-softmax forward
      (3·4 + 4), NLL backward's zero-filled gradient (4), log-softmax backward (a pass for the
      row sum of the gradient, then gradient + output read and input gradient written: 4·4): 36.
    * DTensor logits (tp > 1, vocabulary-parallel, torch.distributed.tensor.parallel.loss): cast
      (2 + 4); amax (4), x - max (4 + 4), exp (4 + 4) and its sum (4), - logsumexp (4 + 4)
      forward; zeros (4), exp (4 + 4), + (4 + 4 + 4), x grad_output (4 + 4), the cast's
      backward (4 + 2): 38 + 38 = 76 bytes; about 16 kernels per micro-batch.
    """
    softmax = SOFTMAX_PASSES * 4 + 4
    if tp > 1:
        return 76.0, 6.0, 16
    if precision == "fp32":
        return softmax + 4 + 4 * 4, 0.0, 8
    rows = max(1, slice_elems // vocab_local)
    slices = -(-tokens // rows)
    return (6 + softmax) + (6 + softmax + 8 + 6), 12.0, 13 * slices + 8


def optimizer_bytes_per_param(precision: str = "bf16", tp: int = 1, dp: int = 1) -> float:
    """Bytes per parameter of the trainer's step after the gradients are in (fp32 = 4 B):

    * clipping (``torch.nn.utils.clip_grad_norm_``): ``_foreach_norm`` reads the gradient (4),
      ``_foreach_mul_`` by the clamped coefficient (applied even when it is 1) reads and writes it
      (4 + 4): 12;
    * AdamW, fused (plain tensors, ``adamw_implementation``): one pass reading parameter,
      gradient and both moments and writing parameter and moments: 4·4 + 3·4 = 28; per
      parameter tensor (DTensors: ``foreach=False``): decay ``mul_`` (4 + 4), ``lerp_`` of the
      first moment (4 + 4 + 4), ``mul_`` + ``addcmul_`` of the second (4 + 4, 4 + 4 + 4),
      ``sqrt``, ``/``, ``add_`` of the denominator (3 x (4 + 4)), ``addcdiv_`` (3·4 + 4): 80;
    * the bf16 copy of the master weights (``master_to_model``): read 4, write 2: 6; data
      parallelism keeps fp32 parameters (no master copy)."""
    clip, adam = 12.0, 28.0 if tp == 1 and dp == 1 else 80.0
    copy = 6.0 if precision == "bf16" and dp == 1 else 0.0
    return clip + adam + copy


def multi_tensor_launches(n_params: int) -> int:
    """Kernel launches of one foreach/fused op over ``n_params`` elements: torch's
    multi_tensor_apply walks them in chunks of 65536 elements, at most 320 blocks per launch."""
    return max(1, -(-n_params // (65536 * 320)))
