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


def test_bf16_training_step_on_cuda():
    cfg = ModelConfig(n_layers=2, hidden=128, n_heads=4, seq_len=64, vocab_size=512, make_vocab_divisible_by=64)
    model = build_model(cfg, "cuda", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (4, 65), device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
