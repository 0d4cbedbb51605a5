"""GPU checks: run where CUDA exists (`pytest -m gpu`), skipped elsewhere."""
import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.infer.generate import generate
from mtnlg.model.gpt import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_model_matches_cpu_and_caches():
    cfg = ModelConfig(n_layers=2, hidden=128, n_heads=4, seq_len=64, vocab_size=512, make_vocab_divisible_by=64)
    cpu = build_model(cfg, "cpu", seed=0).eval()
    gpu = build_model(cfg, "cuda", seed=0).eval()
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), atol=2e-3, rtol=2e-3)
    prompt = x[:, :8].cuda()
    assert torch.equal(generate(gpu, prompt, 20, greedy=True), generate(gpu, prompt, 20, greedy=True, use_cache=False))


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast", "fp16"])
def test_trainer_on_cuda_learns_and_resumes_bitwise(tmp_path, sotu_small, precision):
    """The real Trainer on CUDA: master weights / GradScaler / CUDA RNG state in checkpoints."""
    from trainhelpers import losses, read_metrics, tiny_overrides, train
    over = tiny_overrides(sotu_small, **{"train.device": "cuda", "train.precision": precision,
                                         "model.dropout": 0.1, "optim.lr": 3e-3})
    train(tmp_path / "full", over)
    train(tmp_path / "split", over, stop_after=3)
    train(tmp_path / "split", [], config=None)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    records = read_metrics(tmp_path / "full")
    assert records[-1]["loss"] < records[0]["loss"] and "max_memory_gb" in records[-1]
