"""The dry run: build the real parallelized model for one rank on the meta
device, under a fake process group, and count what that rank holds.

The same code paths as the trainer: ``build_model(..., "meta")``, then
``mtnlg.parallel.tensor.apply_tensor_parallel`` on the tp slice of the
``ParallelDims`` mesh, then the pipeline stage split.  Until
``mtnlg.parallel.pipeline`` exists the split is emulated the way that module
will build stages: blocks of other stages deleted, the embeddings dropped on
non-first stages and the final norm and head on non-last ones (the last stage
keeps the tied output embedding as its own parameter).  Nothing is allocated:
meta tensors have shapes only, so the 530B preset takes about a second.
"""
from __future__ import annotations

import contextlib

import torch.distributed as dist

from mtnlg.config import ModelConfig
from mtnlg.errors import UserError
from mtnlg.plan.layout import Layout, rank_coords


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int):
    """A process group whose collectives do nothing (torch's ``fake`` backend)."""
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise UserError(f"the dry run needs torch's fake process group ({e})") from None
    if dist.is_initialized():
        raise UserError("the dry run needs a process without torch.distributed initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_numel(p) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def dry_run(cfg: ModelConfig, layout: Layout, rank: int = 0) -> dict:
    """Build ``rank``'s part of the model on the meta device; return its
    coordinates, exact local parameter count and parameter names."""
    from mtnlg.model.gpt import build_model
    from mtnlg.parallel.mesh import ParallelDims
    from mtnlg.parallel.pipeline import split_stage
    from mtnlg.parallel.tensor import apply_tensor_parallel

    coords = rank_coords(rank, layout)
    vocab = cfg.padded_vocab(layout.tp)
    with fake_process_group(rank, layout.world_size):
        dims = ParallelDims(dp=layout.dp, pp=layout.pp, tp=layout.tp, world_size=layout.world_size)
        if dims.coords(rank) != coords:
            raise UserError(f"rank placement disagrees with mtnlg.parallel.mesh: {dims.coords(rank)} vs {coords}")
        mesh = dims.build_mesh("cpu")
        model = build_model(cfg, "meta", vocab_size=vocab)
        apply_tensor_parallel(model, mesh["tp"], layout.sequence_parallel and layout.tp > 1)
        split_stage(model, coords["pp"], layout.pp)  # the trainer's own stage split
        params = list(model.parameters())  # unique: a tied weight is listed once
        n = sum(local_numel(p) for p in params)
        blocks = sorted(int(k) for k in model.blocks.keys())
    return {"rank": rank, "coords": coords, "params": n, "n_tensors": len(params),
            "blocks": [blocks[0], blocks[-1]] if blocks else [], "padded_vocab": vocab}
