"""Which transformer blocks each pipeline stage holds (pure arithmetic, no torch).

One source of truth for the stage split: ``mtnlg.parallel.pipeline`` cuts
the model with it and ``mtnlg.plan`` costs the stages with it.

The schedule arithmetic (chunks per rank, the fallback for micro-batch
counts a schedule refuses, the analytic bubble) lives here too, shared by
``mtnlg.parallel.schedules`` and the planner; see that module's doc.

Layers are split as evenly as possible with the remainder on the *first*
stages: the last stage also runs the output layer and the loss, so it never
takes an extra block.  With ``virtual_stages = v`` (interleaved schedules)
the model is cut into ``pp * v`` stages and rank r holds stages
``r, r + pp, ...`` (Megatron's round-robin placement); the ZBV schedule
places its two chunks in a V instead (rank r holds stages r and 2pp-1-r).
"""
from __future__ import annotations

from mtnlg.errors import UserError

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb", "zbv")


def stage_layers(n_layers: int, n_stages: int) -> list[int]:
    """Blocks on each pipeline stage (first stages take the remainder)."""
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if i < extra else 0) for i in range(n_stages)]


def stage_block_ids(n_layers: int, n_stages: int, stage: int) -> list[int]:
    """The contiguous run of block indices of ``stage``."""
    counts = stage_layers(n_layers, n_stages)
    start = sum(counts[:stage])
    return list(range(start, start + counts[stage]))


def rank_stages(pp_rank: int, pp: int, virtual_stages: int = 1, style: str = "loop") -> list[int]:
    """Global stage indices held by pipeline rank ``pp_rank``, chunk by chunk:
    round-robin (``loop``: r, r+pp, ...) or a V (``v``: r, 2pp-1-r; two chunks)."""
    if style == "v":
        if virtual_stages != 2:
            raise ValueError("a V placement holds exactly two stages per rank")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual_stages)]


def chunks_per_rank(schedule: str, virtual_stages: int = 1) -> int:
    if schedule not in SCHEDULE_NAMES:
        raise UserError(f"parallel.pp_schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {schedule!r}")
    if schedule == "zbv":
        return 2
    return virtual_stages if schedule in ("interleaved", "zb") else 1


def placement(schedule: str) -> str:
    return "v" if schedule == "zbv" else "loop"


def effective_schedule(schedule: str, n_micro: int, pp: int, n_chunks: int) -> str:
    """The schedule that actually runs ``n_micro`` micro-batches (see the module doc)."""
    if schedule == "1f1b" and n_micro < pp:
        return "gpipe"
    if schedule in ("interleaved", "zb") and n_micro % max(1, n_micro // pp):
        return "loopedbfs"
    return schedule


def analytic_bubble(schedule: str, n_micro: int, pp: int, n_chunks: int = 1) -> float:
    p, m, v = pp, n_micro, n_chunks
    if p == 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "zbv" and m >= 2 * p - 1:
        return 0.0
    if schedule in ("zb", "zbv"):
        return (p - 1) / (3 * v * m + p - 1)
    return (p - 1) / (v * m + p - 1)  # interleaved, looped BFS
