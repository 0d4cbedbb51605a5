"""A 3D layout (tensor × pipeline × data parallel) and how it splits the model.

Rank placement follows ``mtnlg.parallel.mesh``: tp is the innermost mesh
dimension (consecutive ranks, inside a node), then pp, then dp.  Pipeline
stage ``i`` holds a contiguous run of blocks; when ``pp`` does not divide the
number of layers the first ``n_layers % pp`` stages hold one block more.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from mtnlg.config import ModelConfig
from mtnlg.errors import UserError
from mtnlg.parallel.stages import SCHEDULE_NAMES, stage_block_ids, stage_layers  # noqa: F401  (re-exported)

SCHEDULES = SCHEDULE_NAMES  # gpipe, 1f1b, interleaved, zb, zbv
RECOMPUTE = ("none", "selective", "full")
ATTENTION = ("flash", "materialized")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1      # model chunks per stage (interleaved 1F1B only)
    zero: int = 0                # ZeRO stage for data-parallel sharding: 0, 1, 2, 3
    sequence_parallel: bool = False
    recompute: str = "full"      # none | selective | full
    zero_reduce: str = "micro_batch"  # ZeRO 2/3 in a pipeline: reduce-scatter per micro_batch, or once per step
    attention: str = "flash"     # flash: SDPA's fused kernel (mtnlg's), keeps no score matrix; materialized: softmax(QK^T) kept

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def as_dict(self) -> dict:
        return asdict(self)


def check_layout(cfg: ModelConfig, layout: Layout, global_batch: int) -> None:
    """Raise UserError naming what is wrong with ``layout`` for this model and batch."""
    L = layout
    for name in ("tp", "pp", "dp", "micro_batch", "virtual_stages"):
        if getattr(L, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(L, name)}")
    if cfg.n_heads % L.tp or cfg.ffn % L.tp:
        raise UserError(f"tp={L.tp} must divide n_heads={cfg.n_heads} and the MLP width {cfg.ffn}")
    if L.schedule not in SCHEDULES:
        raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, got {L.schedule!r}")
    if L.schedule not in ("interleaved", "zb") and L.virtual_stages != 1:
        raise UserError("virtual_stages > 1 needs schedule='interleaved' or 'zb' (zbv always uses 2)")
    chunks = 2 if L.schedule == "zbv" else L.virtual_stages
    if L.pp * chunks > cfg.n_layers:
        raise UserError(f"pp={L.pp} x {chunks} chunk(s) per stage exceeds n_layers={cfg.n_layers}")
    if L.recompute not in RECOMPUTE:
        raise UserError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {L.recompute!r}")
    if L.attention not in ATTENTION:
        raise UserError(f"attention must be one of {', '.join(ATTENTION)}, got {L.attention!r}")
    if L.zero not in (0, 1, 2, 3):
        raise UserError(f"ZeRO stage must be 0, 1, 2 or 3, got {L.zero}")
    if global_batch % (L.dp * L.micro_batch):
        raise UserError(f"global batch {global_batch} is not a multiple of dp={L.dp} x micro-batch={L.micro_batch}")


def stage_kinds(pp: int) -> list[tuple[str, int]]:
    """The distinct stages worth evaluating: (name, index)."""
    if pp == 1:
        return [("only", 0)]
    kinds = [("first", 0)]
    if pp > 2:
        kinds.append(("middle", 1))
    kinds.append(("last", pp - 1))
    return kinds


def rank_coords(rank: int, layout: Layout) -> dict:
    """(dp, pp, tp) coordinates of a global rank; tp innermost."""
    if not 0 <= rank < layout.world_size:
        raise UserError(f"rank {rank} outside the world of {layout.world_size} GPUs")
    tp_rank = rank % layout.tp
    pp_rank = (rank // layout.tp) % layout.pp
    dp_rank = rank // (layout.tp * layout.pp)
    return {"dp": dp_rank, "pp": pp_rank, "tp": tp_rank}
