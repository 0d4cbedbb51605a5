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

    def accumulate_grads(self) -> None:
        """Add this micro-batch's low-precision gradients into the fp32 master
        gradients (summing many micro-batches in bf16 would lose precision)."""
        for p, m in zip(self.model_params, self.params):
            if p.grad is not None:
                m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in zip(self.model_params, self.params):
            p.copy_(m)
