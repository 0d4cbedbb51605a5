"""Precision policies.

* ``fp32``: everything in float32.
* ``bf16-autocast``: float32 weights and optimizer, matmuls in bfloat16.
* ``bf16``: bfloat16 weights, activations and gradients; the optimizer steps
  a float32 master copy of the weights (so small updates are not lost to
  bf16 rounding) and writes the result back.
* ``fp16``: float16 autocast with dynamic loss scaling (GradScaler): the loss
  is multiplied by a scale that halves on overflow and doubles after a run of
  clean steps; steps with inf/nan gradients are skipped.
"""
from __future__ import annotations

import contextlib

import torch


def autocast(precision: str, device: torch.device):
    if precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def param_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


class MasterWeights:
    """Float32 master copies of low-precision parameters.

    The optimizer is built over ``self.params`` (the fp32 copies).  After each
    micro-batch's backward, ``accumulate_grads()`` adds its gradients into the
    fp32 master gradients (so accumulation and the data-parallel all-reduce
    happen in fp32, like Megatron's ``main_grad``); after the optimizer step,
    ``master_to_model()`` rounds the updated weights back.
    """

    def __init__(self, model_params: list[torch.nn.Parameter]):
        self.model_params = model_params
        self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in model_params]
        self.plain = all(type(p.data) is torch.Tensor for p in model_params)  # not DTensor shards

    def accumulate_grads(self) -> None:
        """Add this micro-batch's low-precision gradients into the fp32 master
        gradients (summing many micro-batches in bf16 would lose precision).
        The first micro-batch of a step casts into fresh master gradients
        (no zero fill); later ones add with one foreach kernel."""
        fresh, add_to, add_from = [], [], []
        for p, m in zip(self.model_params, self.params):
            if p.grad is None:
                continue
            if m.grad is None:
                fresh.append((p, m))
            else:
                add_to.append(m.grad)
                add_from.append(p.grad)
        for p, m in fresh:
            m.grad = p.grad.float()
        if add_to and self.plain:
            torch._foreach_add_(add_to, add_from)
        else:
            for g, q in zip(add_to, add_from):
                g.add_(q)
        for p in self.model_params:
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Round the updated fp32 weights into the model's (one foreach kernel
        for plain tensors; DTensors copy one by one)."""
        if self.plain:
            torch._foreach_copy_(self.model_params, self.params)
        else:
            for p, m in zip(self.model_params, self.params):
                p.copy_(m)
