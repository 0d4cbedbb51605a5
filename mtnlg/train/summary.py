"""What ``mtnlg train`` prints when it stops: where the run stands and how to go on."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from mtnlg.train.signals import EXIT_PREEMPTED


def resume_command(run_dir: Path, world_size: int) -> str:
    run = shlex.quote(str(run_dir))
    if world_size > 1:  # the same launcher and layout; --run-dir because torchrun owns --run
        nproc = os.environ.get("LOCAL_WORLD_SIZE", str(world_size))
        return f"torchrun --nproc-per-node {nproc} -m mtnlg train --run-dir {run}"
    return f"mtnlg train --run {run}"


def end_of_training(records: list[dict], step: int, total_steps: int, run_dir: Path, checkpoint: Path | None,
                    stop_reason: str, world_size: int, seconds: float) -> tuple[list[str], int]:
    """The summary lines and the exit code of the ``train`` command."""
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    facts = [f"step {step}/{total_steps}"]
    if losses:
        facts.append(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f}" if len(losses) > 1
                     else f"train loss {losses[-1]:.4f}")
    if vals:
        facts.append(f"val loss {vals[-1]:.4f}")
    facts.append(f"{seconds / 60:.1f} min")
    where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
    resume = resume_command(run_dir, world_size)
    if stop_reason:
        head = f"mtnlg train: stopped by {stop_reason} after step {step}"
        tail = (f"resume from step {step} with: {resume}  "
                f"(exit code {EXIT_PREEMPTED}: stopped early, checkpoint saved)")
        code = EXIT_PREEMPTED
    elif step >= total_steps:
        head = "mtnlg train: finished"
        tail = f"to train longer: {resume} --set train.steps={2 * total_steps}"
        code = 0
    else:
        head = f"mtnlg train: paused after step {step} (--stop-after)"
        tail = f"resume from step {step} with: {resume}"
        code = 0
    return [f"{head} | {' | '.join(facts)}", f"mtnlg train: {where}", f"mtnlg train: {tail}"], code
