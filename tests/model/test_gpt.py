import math

import pytest
import torch
import torch.nn.functional as F

from mtnlg.config import ModelConfig
from mtnlg.errors import UserError
from mtnlg.infer.generate import beam_search, filter_logits, generate
from mtnlg.model.flops import flops_per_iteration, flops_per_token, param_count
from mtnlg.model.gpt import KVCache, build_model

CFG = ModelConfig(n_layers=3, hidden=64, n_heads=4, seq_len=48, vocab_size=200, make_vocab_divisible_by=64)


def test_param_count_matches_module():
    model = build_model(CFG, "cpu", seed=0)
    assert sum(p.numel() for p in model.parameters()) == param_count(CFG)
    assert model.lm_head.weight is model.tok_emb.weight  # tied
    assert model.vocab_size == 256


def test_init_is_seeded_and_scaled():
    a, b = build_model(CFG, "cpu", seed=1), build_model(CFG, "cpu", seed=1)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    c = build_model(ModelConfig(n_layers=8, hidden=256, n_heads=4, seq_len=64, vocab_size=4096), "cpu", seed=0)
    std = c.cfg.init_std
    assert abs(c.blocks["0"].attn.qkv.weight.std().item() - std) < 0.05 * std
    assert abs(c.blocks["0"].mlp.proj.weight.std().item() - std / math.sqrt(16)) < 0.05 * std / 4
    assert torch.all(c.blocks["0"].ln_1.weight == 1) and torch.all(c.blocks["0"].attn.qkv.bias == 0)


def test_forward_is_causal():
    model = build_model(CFG, "cpu", seed=0).eval()
    x = torch.randint(0, 200, (2, 20))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        la, lb = model(x), model(y)
    assert la.shape == (2, 20, 256)
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_too_long_sequence_is_rejected():
    model = build_model(CFG, "cpu", seed=0)
    with pytest.raises(ValueError, match="exceeds the context length 48"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_kv_cache_logits_equal_full_forward():
    model = build_model(CFG, "cpu", seed=0).eval()
    x = torch.randint(0, 200, (2, 30))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(max_len=30)
        parts = [model(x[:, :12], cache, 0), model(x[:, 12:13], cache, 12), model(x[:, 13:30], cache, 13)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-5)


def test_cached_and_uncached_greedy_decoding_agree():
    model = build_model(CFG, "cpu", seed=3)
    prompt = torch.randint(0, 200, (3, 5))
    a = generate(model, prompt, 40, greedy=True, use_cache=True)
    b = generate(model, prompt, 40, greedy=True, use_cache=False)
    assert a.shape == (3, 45)
    assert torch.equal(a, b)


def test_left_padding_changes_nothing_for_real_tokens():
    """forward(pad=...) starts each row's positions at its first real token and hides
    the pads: real-token logits equal the row alone (full forward and KV-cached steps),
    and padded greedy decoding equals each prompt decoded alone."""
    model = build_model(CFG, "cpu", seed=4).eval()
    rows = [torch.randint(0, 200, (n,)) for n in (9, 4, 1)]
    pad = torch.tensor([9 - len(r) for r in rows])
    x = torch.stack([torch.cat([torch.full((9 - len(r),), 7), r]) for r in rows])
    with torch.no_grad():
        full = model(x, pad=pad)
        cache = KVCache(max_len=12)
        stepped = torch.cat([model(x[:, :5], cache, 0, pad=pad), model(x[:, 5:], cache, 5, pad=pad)], 1)
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            torch.testing.assert_close(full[i, pad[i]:], alone, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(stepped[i, pad[i]:], alone, atol=2e-5, rtol=1e-5)
    out = generate(model, x, 12, greedy=True, pad=pad)
    for i, r in enumerate(rows):
        assert torch.equal(out[i, 9:], generate(model, r[None], 12, greedy=True)[0, len(r):])


def test_sampling_is_seeded_and_respects_filters():
    model = build_model(CFG, "cpu", seed=3)
    prompt = torch.randint(0, 200, (1, 4))
    g = lambda: torch.Generator().manual_seed(7)
    a = generate(model, prompt, 10, temperature=1.0, top_k=5, generator=g())
    b = generate(model, prompt, 10, temperature=1.0, top_k=5, generator=g())
    assert torch.equal(a, b)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = filter_logits(logits, top_p=0.8)  # p = .64, .24, .09, ... -> the first two reach 0.8
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)[0, :1]).all()
    assert torch.isinf(filter_logits(logits, top_p=0.5)[0, 1:]).all()


def test_eos_stops_rows():
    model = build_model(CFG, "cpu", seed=3)
    prompt = torch.randint(0, 200, (2, 4))
    first = generate(model, prompt, 1, greedy=True)[:, -1]
    out = generate(model, prompt, 10, greedy=True, eos_id=int(first[0]))
    assert out.shape[1] <= 14 and torch.all(out[0, 4:] == first[0])


def test_beam_search_with_one_beam_is_greedy_and_more_beams_score_no_worse():
    model = build_model(CFG, "cpu", seed=5)
    prompt = torch.randint(0, 200, (1, 6))
    greedy = generate(model, prompt, 8, greedy=True)
    one, _ = beam_search(model, prompt, 8, num_beams=1, length_penalty=0.0)
    assert torch.equal(one, greedy)

    def logprob(seq):
        with torch.no_grad():
            lp = model(seq[:, :-1]).float().log_softmax(-1)
        return lp[0, 5:].gather(-1, seq[0, 6:, None]).sum().item()
    four, score = beam_search(model, prompt, 8, num_beams=4, length_penalty=0.0)
    assert logprob(four) >= logprob(greedy) - 1e-4
    assert abs(logprob(four) - score) < 1e-3


def test_flops_formula_matches_paper_form():
    cfg = ModelConfig(n_layers=105, hidden=20480, n_heads=128, seq_len=2048, vocab_size=51200, make_vocab_divisible_by=1)
    B, s, l, h, V = 1920, 2048, 105, 20480, 51200
    paper = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert flops_per_iteration(cfg, B, recompute=True) == pytest.approx(paper, rel=1e-12)
    no_recompute = 72 * B * s * l * h * h * (1 + s / (6 * h)) + 6 * B * s * h * V
    assert flops_per_iteration(cfg, B) == pytest.approx(no_recompute, rel=1e-12)
    assert flops_per_token(cfg) * B * s == pytest.approx(no_recompute, rel=1e-12)


def test_loss_at_init_is_near_uniform():
    model = build_model(CFG, "cpu", seed=0)
    x = torch.randint(0, 200, (4, 32))
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    assert abs(loss.item() - math.log(256)) < 0.3


def test_activation_is_the_configured_gelu_form():
    """model.activation picks the MLP's GeLU: GPT-2's tanh form or the exact erf form,
    each against its formula written out here (independent of F.gelu's flag).  The two
    differ by up to ~5e-4 per element (e.g. 1.0: 0.841345 vs 0.841192), far above the
    1e-6 fp32 agreement, so a model that ignored the option fails."""
    import dataclasses
    x = torch.linspace(-6, 6, 2048).view(8, 256)
    erf = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert (erf - tanh).abs().max() > 1e-4
    for act, want in (("gelu_tanh", tanh), ("gelu", erf)):
        mlp = build_model(dataclasses.replace(CFG, activation=act), "cpu", seed=0).blocks["0"].mlp
        mlp.fc, mlp.proj = torch.nn.Identity(), torch.nn.Identity()  # the activation alone, on the grid
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), want, atol=1e-6, rtol=0)
    assert CFG.activation == "gelu_tanh"  # the default: GPT-2's (and every model before the option)
    a = build_model(CFG, "cpu", seed=0).eval()
    b = build_model(dataclasses.replace(CFG, activation="gelu"), "cpu", seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 200, (2, 16), generator=gen)
    with torch.no_grad():
        for p in a.parameters():  # off the init's zero biases: pre-activations of order 1
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        b.load_state_dict(a.state_dict())
        assert (a(tokens) - b(tokens)).abs().max() > 5e-4  # same weights, another function: 1.7e-3 observed
    with pytest.raises(UserError, match="model.activation must be one of gelu_tanh, gelu, got 'relu'"):
        build_model(dataclasses.replace(CFG, activation="relu"), "meta")
