"""The continuous-batching engine against single-request ``generate``."""
from __future__ import annotations

import time

import pytest
import torch

from mtnlg.infer.generate import generate
from mtnlg.serve.engine import QueueFull
from servehelpers import Collector, make_engine, tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def _prompts(n: int, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_batched_greedy_equals_single_request_generate(tiny):
    """12 prompts of 1..39 tokens through 5 slots with a 24-token budget:
    admission and retirement mid-flight, prompts split into prefill chunks
    mixed with other rows' decode steps, rows at different positions in one
    padded forward.  Every token must equal what ``generate`` gives alone."""
    cfg, model = tiny
    prompts = _prompts(12, cfg.vocab_size)
    max_new = [5 + 3 * i for i in range(12)]
    engine = make_engine(model, cfg, max_batch=5, max_batch_tokens=24)
    try:
        col = Collector()
        for i, (p, m) in enumerate(zip(prompts, max_new)):
            engine.submit(col.request(str(i), p, max_tokens=m, temperature=0.0))
        got = col.wait()
        assert engine.steps > max(max_new)  # it really interleaved (not one request at a time)
    finally:
        engine.stop()
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        want = generate(model, torch.tensor([p]), m, greedy=True)[0, len(p):].tolist()
        tokens, reason, _ = got[str(i)]
        assert tokens == want, f"request {i}: {tokens} != {want}"
        assert reason == "length"


def test_seeded_sampling_equals_generate_and_stop_token(tiny):
    cfg, model = tiny
    p = [3, 14, 15, 92, 65]
    want = generate(model, torch.tensor([p]), 20, temperature=0.9, top_k=50, top_p=0.9,
                    generator=torch.Generator().manual_seed(7))[0, len(p):].tolist()
    stop = want[6]
    first_stop = want.index(stop)
    engine = make_engine(model, cfg, max_batch=4, max_batch_tokens=16)
    try:
        col = Collector()
        engine.submit(col.request("a", p, max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=7))
        engine.submit(col.request("b", p, max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=7,
                                  stop_ids=(stop,)))
        engine.submit(col.request("c", p, max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=7,
                                  stop_ids=(stop,), include_stop_token=True))
        got = col.wait()
    finally:
        engine.stop()
    assert got["a"][0] == want
    assert got["b"][0] == want[:first_stop] and got["b"][1] == "stop"
    assert got["c"][0] == want[:first_stop + 1] and got["c"][1] == "stop"


def test_logprobs_match_a_full_forward(tiny):
    """Prompt logprobs (echo) and generated-token logprobs equal the
    log-softmax of one plain forward over prompt + generation."""
    cfg, model = tiny
    p = _prompts(1, cfg.vocab_size, seed=3)[0] + [1, 2, 3]
    engine = make_engine(model, cfg, max_batch=2, max_batch_tokens=8)  # prompt in several chunks
    try:
        col = Collector()
        engine.submit(col.request("x", p, max_tokens=4, temperature=0.0, logprobs=2, prompt_logprobs=1))
        tokens, reason, outs = col.wait()["x"]
    finally:
        engine.stop()
    seq = p + tokens
    with torch.no_grad():
        lp = model(torch.tensor([seq]))[0].float().log_softmax(-1)
    want = [float(lp[i - 1, seq[i]]) for i in range(1, len(seq))]
    prompt_lp = next(o.prompt_logprobs for o in outs if o.prompt_logprobs is not None)
    assert prompt_lp[0] == (None, None) and len(prompt_lp) == len(p)
    got = [x for x, _ in prompt_lp[1:]] + [x for o in outs for x in o.logprobs]
    assert got == pytest.approx(want, abs=1e-4)
    tops = [t for o in outs for t in o.top_logprobs]
    assert all(len(t) == 2 and t[0][0] == tok for t, tok in zip(tops, tokens))  # greedy = top-1


def test_abort_and_full_queue(tiny):
    cfg, model = tiny
    engine = make_engine(model, cfg, max_batch=1, max_batch_tokens=8, max_queue=2)
    try:
        col = Collector()
        engine.submit(col.request("long", [1, 2, 3], max_tokens=90, temperature=0.0, delay=0.01))
        time.sleep(0.05)
        engine.submit(col.request("w1", [1], max_tokens=2, temperature=0.0))
        engine.submit(col.request("w2", [1], max_tokens=2, temperature=0.0))
        t = time.monotonic()
        with pytest.raises(QueueFull):
            engine.submit(col.request("w3", [1], max_tokens=2, temperature=0.0))
        assert time.monotonic() - t < 0.1  # refused at once, not after waiting
        col.done.pop("w3"), col.outputs.pop("w3")
        engine.abort("long")
        engine.abort("w2")
        got = col.wait()
    finally:
        engine.stop()
    assert got["long"][1] == "abort" and len(got["long"][0]) < 90
    assert got["w2"][1] == "abort" and got["w1"][1] == "length"
    with pytest.raises(ValueError, match="maximum context length"):
        engine.check(90, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_greedy_equals_generate_on_cuda():
    """The same check on a GPU (fp32): CUDA kernels pick different
    reduction orders for different batch shapes, so this is where batched
    decoding would first drift from single-request decoding."""
    from mtnlg.serve.engine import Engine, EngineConfig
    from mtnlg.serve.runner import ModelRunner
    cfg, model = tiny_model()
    model = model.cuda()
    prompts = _prompts(10, cfg.vocab_size, seed=5)
    runner = ModelRunner(model, 4, cfg.seq_len, torch.device("cuda"))
    engine = Engine(runner, cfg.seq_len, cfg.vocab_size, EngineConfig(max_batch=4, max_batch_tokens=32)).start()
    try:
        col = Collector()
        for i, p in enumerate(prompts):
            engine.submit(col.request(str(i), p, max_tokens=20, temperature=0.0))
        got = col.wait()
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        want = generate(model, torch.tensor([p], device="cuda"), 20, greedy=True)[0, len(p):].tolist()
        assert got[str(i)][0] == want, i
