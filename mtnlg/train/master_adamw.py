"""AdamW on the fp32 master weights straight from the bf16 gradients: one compiled loop per weight.

After the backward, the plain ``bf16`` step (``mtnlg.train.precision.MasterWeights`` and
fused ``torch.optim.AdamW``) passes over every weight's elements four times: it casts the
bf16 gradient into an fp32 master gradient (6 bytes an element), takes its norm (4), runs
the fused AdamW kernel (28) and rounds the updated master weight back into the bf16 weight
(6).  Here, for the large weights, two compiled regions (``mtnlg.model.regions``) do it in
two passes: the squared norm of the bf16 gradient (2 bytes), then one loop that reads the
gradient, the master weight and both moments and writes the master weight, the moments and
the bf16 weight (28).  Small tensors (biases, LayerNorm gains: 1 % of the 14M model's
elements in 50 of its 76 tensors) keep the plain path, where one call does them all.

The update is the fused AdamW kernel's formula in fp32:
``w -= lr wd w;  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2;
w -= step_size m / (sqrt(v) / sqrt(bc2) + eps)`` with ``step_size = lr / bc1`` and the
bias corrections ``bc = 1 - b^step`` computed in double; the clipping coefficient
multiplies the fp32 gradient first, as ``clip_grads_with_norm_`` does.  Results can differ
from the ATen kernel in the last bit (the compiler's order and contractions); tested against
an fp64 reference in ``tests/train/test_step_paths.py``.  The optimizer's state (``step``,
``exp_avg``, ``exp_avg_sq`` of each parameter) is ``torch.optim.AdamW``'s own, so
checkpoints are the same either way and a run may resume with this path on or off.

The trainer uses it for bf16 training on CPU in one process with plain tensors and fused
AdamW, when compiled regions are on and the model has at least ``regions.MIN_ELEMS``
elements in weights of ``MIN_NUMEL`` or more (no compile for small models and tests).
``set_enabled(False)`` turns it off for the process (``benchmarks/ab_steps.py``).
"""
from __future__ import annotations

import math

import torch

from mtnlg.model import regions

MIN_NUMEL = 1 << 16  # weights this large take the region: 26 of the 14M model's 76 tensors, 99 % of its elements
_state = {"enabled": True}


def set_enabled(on: bool) -> None:
    """Use the compiled master-weight AdamW where it applies (default) or the plain path."""
    _state["enabled"] = bool(on)


def _sumsq(g):
    gf = g.float()
    return (gf * gf).sum()


def _adamw(g, w, m, v, p, s):
    # s (fp32): lr * weight_decay, 1 - beta1, beta2, 1 - beta2, step_size, sqrt(bias_correction2), eps, clip
    gf = g.float() * s[7]
    w.mul_(1 - s[0])
    m.lerp_(gf, s[1])
    v.copy_(v * s[2] + s[3] * gf * gf)
    w.sub_(s[4] * m / (v.sqrt() / s[5] + s[6]))
    p.copy_(w)


_SUMSQ = regions.Region(_sumsq, "master_adamw_sumsq")
_ADAMW = regions.Region(_adamw, "master_adamw")


def usable() -> bool:
    return _state["enabled"] and _SUMSQ.usable() and _ADAMW.usable()


class MasterAdamW:
    """The clipping and optimizer step of a bf16 trainer over ``master`` (``MasterWeights``) and
    its fused ``torch.optim.AdamW`` ``optimizer``; weights of ``min_numel`` elements or more
    take the compiled regions, the rest the optimizer's own step."""

    def __init__(self, master, optimizer: torch.optim.Optimizer, min_numel: int = MIN_NUMEL):
        self.master, self.optimizer = master, optimizer
        group_of = {id(q): g for g in optimizer.param_groups for q in g["params"]}
        pairs = list(zip(master.model_params, master.params))
        self.big = [(p, m, group_of[id(m)]) for p, m in pairs if p.numel() >= min_numel]
        self.big_ids = {id(p) for p, _, _ in self.big}
        self.small = [(p, m) for p, m in pairs if id(p) not in self.big_ids]
        self._coef = torch.ones((), dtype=torch.float32)

    @staticmethod
    def applies(master, optimizer, world_size: int, device: torch.device, scaler) -> bool:
        """Whether a trainer with this setup can use it (regions aside: see ``active``)."""
        if master is None or not master.plain or scaler is not None or world_size != 1 or device.type != "cpu":
            return False
        groups = optimizer.param_groups
        if not isinstance(optimizer, torch.optim.AdamW) or not all(
                g.get("fused") and not g.get("amsgrad") and not g.get("maximize") for g in groups):
            return False
        big = sum(p.numel() for p in master.model_params if p.numel() >= MIN_NUMEL)
        return all(p.dtype == torch.bfloat16 for p in master.model_params) and big >= regions.MIN_ELEMS

    def active(self) -> bool:
        return usable()

    def _grad(self, p, m):
        """The step's gradient of weight ``p``: its fp32 master gradient when micro-batches
        were accumulated into one, else the bf16 gradient the backward left on ``p``."""
        return m.grad if m.grad is not None else p.grad

    @torch.no_grad()
    def clip(self, max_norm: float) -> torch.Tensor:
        """The gradients' global L2 norm (fp32); a coefficient ``max_norm / (norm + 1e-6)``
        below 1 scales the small tensors' gradients now and the large ones' in ``step``."""
        parts = [_SUMSQ(g.view(-1)) for g in (self._grad(p, m) for p, m, _ in self.big) if g is not None]
        small = [m.grad for _, m in self.small if m.grad is not None]
        if small:
            parts.append(torch.nn.utils.get_total_norm(small, 2.0) ** 2)
        total = torch.stack(parts).sum().sqrt() if parts else torch.zeros(())
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        self._coef = coef.float()
        if small and float(coef) < 1.0:
            torch._foreach_mul_(small, coef)
        return total

    @torch.no_grad()
    def step(self) -> None:
        """AdamW for every parameter with a gradient, the bf16 weights rounded from the
        updated masters; the gradients are released.  ``clip`` first."""
        scalars: dict[int, torch.Tensor] = {}
        for p, m, group in self.big:
            g = self._grad(p, m)
            if g is None:
                continue
            state = self.optimizer.state[m]
            if not state:  # torch.optim.AdamW's own state layout (fused: fp32 step tensors)
                state["step"] = torch.zeros((), dtype=torch.float32, device=m.device)
                state["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            state["step"] += 1
            step = float(state["step"])
            key = (id(group), step)
            if key not in scalars:
                lr, (b1, b2) = float(group["lr"]), group["betas"]
                bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
                s = torch.tensor([lr * group["weight_decay"], 1 - b1, b2, 1 - b2, lr / bc1, math.sqrt(bc2),
                                  group["eps"], 0.0], dtype=torch.float32)
                s[7] = self._coef
                scalars[key] = s
            _ADAMW(g.view(-1), m.detach().view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                   p.detach().view(-1), scalars[key])  # flat: one kernel for every weight
            m.grad = None
            p.grad = None
        self.optimizer.step()  # the small tensors (the large ones have no master gradient now)
        self.optimizer.zero_grad(set_to_none=True)
        small = [(p, m) for p, m in self.small]
        if small:
            torch._foreach_copy_([p for p, _ in small], [m for _, m in small])


def warm_up(grad_dtype: torch.dtype = torch.bfloat16) -> None:
    """Compile both regions now for gradients of ``grad_dtype`` (bf16: one micro-batch per
    step; fp32: accumulated), before the trainer's steps; one kernel serves every size."""
    if not usable():
        return
    g = torch.zeros(64, dtype=grad_dtype)
    w, m, v = (torch.zeros(64) for _ in range(3))
    _SUMSQ(g)
    _ADAMW(g, w, m, v, torch.zeros(64, dtype=torch.bfloat16), torch.ones(8))


def build(master, optimizer, world_size: int, device: torch.device, scaler, one_micro: bool) -> MasterAdamW | None:
    """The trainer's ``MasterAdamW`` where it applies and compiled regions are on (compiled
    now, for bf16 gradients if steps have ``one_micro``-batch, else fp32), else None."""
    if not (regions.enabled() and MasterAdamW.applies(master, optimizer, world_size, device, scaler)):
        return None
    warm_up(torch.bfloat16 if one_micro else torch.float32)
    return MasterAdamW(master, optimizer)
