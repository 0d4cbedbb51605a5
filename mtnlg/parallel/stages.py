"""Which transformer blocks each pipeline stage holds (pure arithmetic, no torch).

One source of truth for the stage split: ``mtnlg.parallel.pipeline`` cuts
the model with it and ``mtnlg.plan`` costs the stages with it.

Layers are split as evenly as possible with the remainder on the *first*
stages: the last stage also runs the output layer and the loss, so it never
takes an extra block.  With ``virtual_stages = v`` (interleaved schedules)
the model is cut into ``pp * v`` stages and rank r holds stages
``r, r + pp, ...`` (Megatron's round-robin placement); the ZBV schedule
places its two chunks in a V instead (rank r holds stages r and 2pp-1-r).
"""
from __future__ import annotations


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
