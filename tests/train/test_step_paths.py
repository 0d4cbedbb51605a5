"""The trainer step's leaner paths against the plain ones they replace (session 6 of the step work)."""
from __future__ import annotations

import torch

from mtnlg.parallel import topology


def _grads(scale: float, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((40, 30), (30,), (7, 5, 3))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    params.append(torch.nn.Parameter(torch.zeros(4)))  # no gradient: skipped, as torch skips it
    return params


def test_clip_grad_norm_matches_torch_bitwise_with_and_without_clipping():
    for scale in (1e-3, 0.2, 5.0):  # norms ~0.04, ~8 and ~200 against max_norm 1 and 10
        for max_norm in (1.0, 10.0):
            ours, ref = _grads(scale), _grads(scale)
            n_ours = topology.clip_grad_norm(ours, max_norm)
            n_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm)
            assert torch.equal(n_ours, n_ref)
            for a, b in zip(ours, ref):
                assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
            clipped = float(n_ref) > max_norm
            assert clipped == (not torch.equal(ours[0].grad, _grads(scale)[0].grad))  # both cases ran


def test_clip_grad_norm_switch_falls_back_to_torch():
    topology.set_skip_unit_clip(False)
    try:
        ours, ref = _grads(1e-3), _grads(1e-3)
        assert torch.equal(topology.clip_grad_norm(ours, 1.0), torch.nn.utils.clip_grad_norm_(ref, 1.0))
    finally:
        topology.set_skip_unit_clip(True)
    assert topology.Topology().clip_grad_norm(_grads(1e-3), 1.0).item() < 1.0
