"""train.deterministic: strict deterministic kernels for the run (what a bitwise GPU resume
needs; tests/test_gpu.py runs that on CUDA), the process's own settings back afterwards."""
import torch

from trainhelpers import losses, tiny_overrides, train


def test_deterministic_run_resumes_bitwise_and_restores_the_process_settings(tmp_path, sotu_small):
    assert not torch.are_deterministic_algorithms_enabled()
    over = tiny_overrides(sotu_small, **{"train.precision": "bf16", "model.dropout": 0.1,
                                         "train.deterministic": "true"})
    seen = []
    real = torch.optim.AdamW.step

    def step(self, *a, **k):  # inside the run, strict mode is on
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled()))
        return real(self, *a, **k)
    torch.optim.AdamW.step = step
    try:
        train(tmp_path / "full", over)
        train(tmp_path / "split", over, stop_after=3)
        train(tmp_path / "split", [], config=None)
    finally:
        torch.optim.AdamW.step = real
    assert seen and set(seen) == {(True, False)}
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    assert not torch.are_deterministic_algorithms_enabled()  # the in-process caller's setting is back
