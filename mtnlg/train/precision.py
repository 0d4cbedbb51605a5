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

    The optimizer is built over ``self.params`` (the fp32 copies).  After
    backward, ``grads_to_master()`` moves gradients across; after the
    optimizer step, ``master_to_model()`` rounds the updated weights back.
    """

    def __init__(self, model_params: list[torch.nn.Parameter]):
        self.model_params = model_params
        self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in model_params]

    def grads_to_master(self) -> None:
        for p, m in zip(self.model_params, self.params):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in zip(self.model_params, self.params):
            p.copy_(m)
