"""The MLP's bias add and GeLU as one compiled region for bf16 on CPU (Megatron's bias-GeLU fusion).

Unfused, a bf16 CPU step spends on the MLP's first linear and its activation
(14M benchmark shapes, 8 x 256 x 1536, per layer, in the step):

* ``addmm`` first copies the broadcast bias into its output, a pass over the
  output that inside a step goes to DRAM (~1.2 ms);
* PyTorch's tanh GeLU evaluates ``tanh`` through Sleef at ~3x the cost of the
  ``exp`` in a sigmoid (forward 4.6 ms, backward 4.9 ms);
* the bias gradient is one more pass over the gradient (``sum`` over rows).

Here the first linear runs without its bias and one compiled region
(``mtnlg.model.regions``) takes the bf16 GEMM output ``x`` and the bias:

* forward: the pre-activation ``y = x + b`` and the GeLU in fp32, rounded once
  to bf16; the tanh form through its exact identity
  ``0.5 (1 + tanh(u)) = sigmoid(2u)``, ``u = sqrt(2/pi) (y + 0.044715 y^3)``;
* the forward also writes the GeLU's derivative at ``y``, rounded once to
  fp16, and keeps only that for the backward (the bytes of the GEMM output
  kept before); the derivative lies in (-0.17, 1.13), where fp16 has three
  more mantissa bits than bf16, so the backward's input gradient is as
  accurate as the unfused path's (a bf16 derivative would be 1.3x worse:
  ``tests/model/test_bias_gelu.py``);
* backward: one compiled multiply of the upstream gradient by the kept
  derivative, rounded once, with no ``exp`` and no re-read of the bias; the
  bias gradient is its sum over rows, as in ``addmm``'s backward.

Before session 7 the backward kept the GEMM output and recomputed the
pre-activation and its sigmoid: in the step that region read its input back
from DRAM and took ~2.8 ms a layer at 14M, against ~0.7 ms for the multiply
and ~0.4 ms more for the forward's second output.
``python benchmarks/ab_steps.py --switch switches:gelu_keeps_derivative``:
14M 1.014x, tiny 1.024x (README "Performance").

Isolated fc + activation forward and backward at those shapes (the region
before session 7): 16.6-17.0 ms against 19.5-19.9 ms unfused, the GEMMs alone 12.2-12.5 ms (a one-off
script); the whole 14M step: README "Performance".

Two numerical differences from the unfused path: where the bias meets the
GEMM (``addmm`` adds it to the fp32 accumulator before rounding, here it is
added to the bf16-rounded product: one more rounding of the pre-activation,
at most half a bf16 ulp of ``x``), and the derivative's fp16 rounding.  The errors against an
fp64 reference are checked to be at the unfused path's level in
``tests/model/test_bias_gelu.py``.

``linear_gelu`` uses the region in training (gradients enabled) for bf16 on
CPU with plain tensors and at least ``regions.MIN_ELEMS`` activation elements;
inference (no first-request compile in a server), a tensor-parallel or
otherwise hooked linear, CUDA, fp32 and small calls keep the unfused path.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtnlg.model import regions

# Inductor's C++ backend notes a kernel that reads bf16 and writes fp16 (the forward region); it
# computes such a kernel in fp32, as it does every other
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")

_K2 = 2.0 * math.sqrt(2.0 / math.pi)  # 2u = y (K2 + K2 A y^2)
_A = 0.044715
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# the GeLU's derivative kept for the backward: in (-0.17, 1.13), where fp16 has 3 more bits than bf16
DERIVATIVE_DTYPE = torch.float16


def _fwd_tanh(x, b):
    """GeLU(x + b) rounded once to ``x.dtype``, and its derivative there rounded once to fp16."""
    y = x.float() + b.float()
    s = torch.sigmoid(y * (_K2 + _K2 * _A * y * y))
    d = s + y * (_K2 + 3 * _K2 * _A * y * y) * s * (1 - s)  # gelu'(y) = s + y s (1 - s) d(2u)/dy
    return (y * s).to(x.dtype), d.to(DERIVATIVE_DTYPE)


def _fwd_erf(x, b):
    y = x.float() + b.float()
    cdf = 0.5 * (1 + torch.erf(y * _INV_SQRT_2))
    d = cdf + y * torch.exp(-0.5 * y * y) * _INV_SQRT_2PI  # Phi(y) + y phi(y)
    return (y * cdf).to(x.dtype), d.to(DERIVATIVE_DTYPE)


def _bwd(g, d):
    """The input gradient: the upstream gradient times the kept derivative, rounded once."""
    return (g.float() * d.float()).to(g.dtype)


_BWD = regions.Region(_bwd, "bias_gelu_bwd")  # one backward for both forms: it only multiplies
_REGIONS = {"tanh": (regions.Region(_fwd_tanh, "bias_gelu_tanh"), _BWD),
            "none": (regions.Region(_fwd_erf, "bias_gelu_erf"), _BWD)}


def uses_fused_bias_gelu(x: torch.Tensor, fc: nn.Module, approximate: str = "tanh") -> bool:
    """Whether ``linear_gelu`` runs the fused region for input ``x`` into linear ``fc``."""
    if not (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and type(x) is torch.Tensor and isinstance(fc, nn.Linear) and fc.bias is not None):
        return False
    w, b = fc.weight, fc.bias
    return (w.dtype == torch.bfloat16 and type(w.data) is torch.Tensor and type(b.data) is torch.Tensor
            and not fc._forward_hooks and not fc._forward_pre_hooks
            and x.numel() // max(1, x.shape[-1]) * w.shape[0] >= regions.MIN_ELEMS
            and all(r.usable() for r in _REGIONS[approximate]))


def linear_gelu(x: torch.Tensor, fc: nn.Linear, approximate: str) -> torch.Tensor:
    """``F.gelu(fc(x), approximate)``, with the fused region where ``uses_fused_bias_gelu``."""
    if not uses_fused_bias_gelu(x, fc, approximate):
        return F.gelu(fc(x), approximate=approximate)
    return bias_gelu(F.linear(x, fc.weight), fc.bias, approximate)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(x + bias)`` over the last dimension in fp32, rounded once to ``x.dtype``."""
    if approximate not in _REGIONS:
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return _BiasGelu.apply(x, bias, approximate)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        x2 = x.contiguous().view(-1, x.shape[-1])
        # detached: a Parameter argument would get a compiled graph of its own per bias size
        out, d = _REGIONS[approximate][0](x2.detach(), bias.detach())
        ctx.save_for_backward(d)
        ctx.approximate, ctx.in_shape = approximate, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        gx = _REGIONS[ctx.approximate][1](grad.contiguous().view(d.shape).detach(), d)
        # the bias gradient from the rounded input gradient, as addmm's backward takes it: an eager
        # sum (0.2-0.5 ms at the 14M shapes) beats Inductor's column reduction inside the region (+2.5 ms)
        return gx.view(ctx.in_shape), (gx.sum(0) if ctx.needs_input_grad[1] else None), None


def warm_up(approximate: str, activation_elems: int) -> None:
    """Compile this activation's two regions now, on small tensors (one kernel serves every
    shape), if the model's MLP activation of ``activation_elems`` elements will use them; then
    hand the compiler's freed memory back to the OS before the trainer's steps start."""
    fwd, bwd = _REGIONS[approximate]
    if activation_elems < regions.MIN_ELEMS or not (fwd.usable() and bwd.usable()):
        return
    # as _BiasGelu calls them: gradients off, plain tensors that require none (grad mode and the
    # arguments' types and flags are part of a compiled graph's guards; warmed up with gradients
    # on, both compiled again at the first training step)
    x = torch.zeros(16, 64, dtype=torch.bfloat16)
    b = torch.zeros(64, dtype=torch.bfloat16)
    with torch.no_grad():
        _, d = fwd(x, b)
        bwd(torch.zeros_like(x), d)
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
