"""Tensor-parallel serving: rank 0 schedules and broadcasts each step, both
ranks run their half of the heads and vocabulary; greedy tokens and beams
equal the unsharded model's."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from dist_utils import run_distributed  # noqa: E402


def _worker(rank, world, prompts, max_new):
    from torch.distributed.device_mesh import init_device_mesh

    from mtnlg.infer.generate import beam_search_all, generate
    from mtnlg.parallel import tensor as tp
    from mtnlg.serve.engine import Engine, EngineConfig
    from mtnlg.serve.runner import BeamJob, ModelRunner
    from servehelpers import Collector, tiny_model

    cfg, model = tiny_model(seed=3)
    want = None
    if rank == 0:  # the single-process reference, before sharding
        want = [generate(model, torch.tensor([p]), m, greedy=True)[0, len(p):].tolist() for p, m in zip(prompts, max_new)]
        want_beam = beam_search_all(model, torch.tensor([prompts[0]]), 4, 3)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    tp.apply_tensor_parallel(model, mesh)
    runner = ModelRunner(model, 3, cfg.seq_len, torch.device("cpu"), tp.gather_logits, mesh.get_group())
    if rank != 0:
        runner.serve_forever()
        return None
    engine = Engine(runner, cfg.seq_len, cfg.vocab_size, EngineConfig(max_batch=3, max_batch_tokens=12)).start()
    try:
        col = Collector()
        for i, (p, m) in enumerate(zip(prompts, max_new)):
            engine.submit(col.request(str(i), p, max_tokens=m, temperature=0.0))
        beam = engine.beam(BeamJob(prompts[0], 4, 3, None, 1.0)).result(timeout=60)
        got = col.wait()
    finally:
        engine.stop()  # broadcasts "stop" to rank 1
    return [got[str(i)][0] for i in range(len(prompts))], want, beam, want_beam


def test_tp2_serving_equals_single_process():
    prompts = [[5, 6, 7], list(range(10, 40)), [100], [200, 3, 9, 27, 81]]
    max_new = [7, 4, 9, 6]
    got, want, beam, want_beam = run_distributed(_worker, 2, (prompts, max_new))[0]
    assert got == want
    assert [s for s, _ in beam] == [s for s, _ in want_beam]
    assert max(abs(a - b) for (_, a), (_, b) in zip(beam, want_beam)) < 1e-5  # observed ~1e-7
