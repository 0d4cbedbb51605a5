"""Learning-rate schedule (linear warm-up, cosine decay) and Megatron-style
batch-size ramp-up.  Both are pure functions of progress, so a resumed run
recomputes them instead of restoring state."""
from __future__ import annotations

import math

from mtnlg.config import OptimConfig, TrainConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay = optim.decay_steps or max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def global_batch_at(consumed_samples: int, train: TrainConfig, unit: int = 1) -> int:
    """Global batch size after ``consumed_samples`` samples.

    With ``batch_rampup = [start, increment, samples]`` the batch grows from
    ``start`` by ``increment`` in equal slices of the first ``samples``
    samples until it reaches ``train.global_batch`` (MT-NLG: 32 -> 1920 in
    steps of 32 over 12B tokens).  A ramp-up size that is not a multiple of
    ``unit`` (micro_batch x dp) is rounded down to one, and never below
    ``unit`` (Megatron's ``decrease_batch_size_if_needed``): e.g. 32 at
    dp 12 runs as 24.  ``train.global_batch`` itself must be a multiple."""
    if not train.batch_rampup:
        return train.global_batch
    start, inc, ramp_samples = (int(x) for x in train.batch_rampup)
    n_increments = max(1, (train.global_batch - start) // inc)
    size = min(start + (consumed_samples * n_increments // ramp_samples) * inc, train.global_batch)
    return max(unit, size // unit * unit)


def rampup_sizes(train: TrainConfig) -> list[int]:
    """Every global batch size the ramp-up passes through (before rounding)."""
    if not train.batch_rampup:
        return [train.global_batch]
    start, inc, _ = (int(x) for x in train.batch_rampup)
    return sorted(set(range(start, train.global_batch, inc)) | {train.global_batch})
