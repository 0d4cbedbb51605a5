"""The real HTTP server on a free local port, driven by the official openai
client, httpx (streaming, disconnects, malformed requests) and lm-eval."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch

from mtnlg.infer.generate import beam_search_all, generate
from mtnlg.serve.engine import EngineConfig
from mtnlg.serve.server import BackgroundServer, attach_model, new_state
from servehelpers import tiny_model, tiny_tokenizer

NAME = "tiny-test"


class SlowModel(torch.nn.Module):
    """The tiny model plus a fixed pause per forward: makes 'still running'
    deterministic for the queue-full and timeout checks."""

    def __init__(self, inner, pause: float):
        super().__init__()
        self.inner, self.pause, self.cfg, self.vocab_size = inner, pause, inner.cfg, inner.vocab_size

    def forward(self, *args):
        time.sleep(self.pause)
        return self.inner(*args)


def _start(model, tok, cfg, **engine_cfg):
    config = EngineConfig(**engine_cfg)
    state = new_state(NAME, config)
    srv = BackgroundServer(state).start()
    assert httpx.get(srv.url + "/health").status_code == 503  # port open, model not loaded yet
    attach_model(state, model, tok, cfg.seq_len, torch.device("cpu"), config)
    return srv


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    cfg, model = tiny_model(vocab_size=tok.vocab_size)
    return cfg, model, tok


@pytest.fixture(scope="module")
def server(tiny):
    cfg, model, tok = tiny
    srv = _start(model, tok, cfg, max_batch=8, max_batch_tokens=64)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _greedy(model, tok, text: str, n: int) -> str:
    ids = tok.encode(text)
    out = generate(model, torch.tensor([ids]), n, greedy=True, eos_id=tok.eod_id)[0, len(ids):].tolist()
    return tok.decode(out[:out.index(tok.eod_id)] if tok.eod_id in out else out)


PROMPTS = ["The state of the Union is", "Our economy", "We must", "In the year"]


def test_health_models_and_openai_completions(server, client, tiny):
    cfg, model, tok = tiny
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for p, c in zip(PROMPTS, r.choices):
        assert c.text == _greedy(model, tok, p, 12)
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS)
    generated = 0
    for p in PROMPTS:  # tokens generated before the end-of-text token (which ends a choice uncounted)
        ids = tok.encode(p)
        out = generate(model, torch.tensor([ids]), 12, greedy=True, eos_id=tok.eod_id)[0, len(ids):].tolist()
        generated += out.index(tok.eod_id) if tok.eod_id in out else len(out)
    assert r.usage.completion_tokens == generated
    assert r.usage.total_tokens == r.usage.prompt_tokens + generated
    # token prompts, n > 1 with a seed: reproducible, and choices differ from each other
    ids = tok.encode(PROMPTS[0])
    a = client.completions.create(model=NAME, prompt=ids, max_tokens=10, n=3, seed=5, temperature=1.0)
    b = client.completions.create(model=NAME, prompt=ids, max_tokens=10, n=3, seed=5, temperature=1.0)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    with pytest.raises(Exception, match="does not exist"):
        client.completions.create(model="other", prompt="x", max_tokens=1)


def test_streaming_equals_non_streaming_and_ends_with_done(server, client):
    whole = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    parts, usage = [], None
    for chunk in client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        parts += [c.text for c in chunk.choices]
    assert "".join(parts) == whole.choices[0].text and len(parts) > 3
    assert usage.completion_tokens == whole.usage.completion_tokens
    # logprobs arrive with their tokens, echo first: together they equal the non-streamed ones
    kw = dict(model=NAME, prompt=PROMPTS[1], max_tokens=8, temperature=0, echo=True, logprobs=1)
    whole = client.completions.create(**kw).choices[0].logprobs
    tokens, lps = [], []
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            if c.logprobs:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
    assert tokens == whole.tokens and lps == whole.token_logprobs
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "We", "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_completions_stream_and_not(server, client, tiny):
    cfg, model, tok = tiny
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]
    prompt = server.state.chat.render(msgs)
    assert prompt == "You are terse.\n\nUser: Say hello\n\nAssistant:"
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=2)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _greedy(model, tok, prompt, 10)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 for e in r.choices[0].logprobs.content)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content


def test_echo_logprobs_and_stop_strings(server, client, tiny):
    cfg, model, tok = tiny
    text = "The Congress shall"
    r = client.completions.create(model=NAME, prompt=text, max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    ids = tok.encode(text)
    assert r.choices[0].text.startswith(text) and lp.token_logprobs[0] is None
    assert len(lp.tokens) == len(ids) + 3 and lp.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    want = [float(full[i - 1, ids[i]]) for i in range(1, len(ids))] + [float(full[-1].max())]
    assert lp.token_logprobs[1:len(ids) + 1] == pytest.approx(want, abs=1e-4)  # prompt, then the greedy token
    for i in range(len(ids), len(lp.tokens)):  # greedy: the chosen token is the most likely one
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()))
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    # scoring only: max_tokens=0 with echo
    s = client.completions.create(model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=0)
    assert s.choices[0].text == text and s.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1:len(tok.encode(text))], abs=1e-5)
    # a stop string cuts the text before it and finishes with "stop"
    free = client.completions.create(model=NAME, prompt="We", max_tokens=30, temperature=0).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 2]
    cut = client.completions.create(model=NAME, prompt="We", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="We", max_tokens=30, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def test_megatron_api(server, tiny):
    cfg, model, tok = tiny
    body = {"prompts": PROMPTS[:2], "tokens_to_generate": 8, "top_k": 1, "logprobs": True}
    r = httpx.put(server.url + "/api", json=body, timeout=60).json()
    assert set(r) == {"text", "segments", "logprobs"}
    for p, text, seg, lps in zip(PROMPTS, r["text"], r["segments"], r["logprobs"]):
        ids = tok.encode(p)
        out = generate(model, torch.tensor([ids]), 8, greedy=True, eos_id=tok.eod_id)[0].tolist()
        out = out[:out.index(tok.eod_id) + 1] if tok.eod_id in out[len(ids):] else out  # Megatron keeps the stop token
        assert text == tok.decode(out) and seg == [tok.decode([t]) for t in out]
        assert len(lps) == len(out) - 1
    beam = httpx.put(server.url + "/api", json={"prompts": [PROMPTS[0]], "tokens_to_generate": 6,
                                                "beam_width": 3}, timeout=60).json()
    want = beam_search_all(model, torch.tensor([tok.encode(PROMPTS[0])]), 6, 3, eos_id=tok.eod_id)
    assert beam["text"] == [tok.decode(s) for s, _ in want]
    assert beam["scores"] == pytest.approx([s for _, s in want])
    score = httpx.put(server.url + "/api", json={"prompts": [PROMPTS[0]], "tokens_to_generate": 0,
                                                 "logprobs": True}).json()  # scoring only
    ids = tok.encode(PROMPTS[0])
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert score["text"] == [PROMPTS[0]]
    assert score["logprobs"][0] == pytest.approx([float(lp[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)
    bad = httpx.put(server.url + "/api", json={"prompts": ["a"], "top_k": 5, "top_p": 0.5})
    assert bad.status_code == 400 and bad.json() == "cannot set both top-k and top-p samplings."


def test_client_disconnect_cancels_its_sequence(tiny):
    """A streaming client that reads two events and hangs up, and a
    non-streaming one that gives up after 0.3 s: both sequences are aborted
    long before their 90 tokens (90 steps x 10 ms here)."""
    cfg, model, tok = tiny
    srv = _start(SlowModel(model, 0.01), tok, cfg, max_batch=4, max_batch_tokens=16)
    engine = srv.state.engine
    body = {"prompt": "We", "max_tokens": 90, "temperature": 0, "ignore_eos": True}
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}) as r:
            it = r.iter_lines()
            next(it), next(it)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(engine.finished_log) < 2:
            time.sleep(0.02)
        assert [(reason, n < 60) for _, reason, n in engine.finished_log] == [("abort", True)] * 2
        assert not engine.running and httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()


def test_api_key(server):
    server.state.api_key = "s3cret"
    try:
        body = {"prompt": "We", "max_tokens": 2}
        assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
        assert httpx.post(server.url + "/v1/completions", json=body,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(server.url + "/v1/completions", json=body,
                          headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200  # probes stay open
    finally:
        server.state.api_key = None


def test_metrics_after_traffic(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("mtnlg_requests_running", "mtnlg_requests_waiting", "mtnlg_generation_tokens_total",
                 "mtnlg_time_to_first_token_seconds_bucket", "mtnlg_request_latency_seconds_count"):
        assert name in text
    gen = float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("mtnlg_generation_tokens_total")))
    assert gen > 50


def test_fuzz_malformed_requests_get_4xx_and_server_stays_healthy(server):
    from mtnlg.serve.fuzz import CASES, run_fuzz
    results = run_fuzz(server.url)
    assert len(results) == len(CASES)
    for r in results:
        assert r["ok"] and r["healthy"] and r["message"], r
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_full_queue_answers_503_at_once_and_timeouts_504(tiny):
    cfg, model, tok = tiny
    srv = _start(SlowModel(model, 0.02), tok, cfg, max_batch=1, max_batch_tokens=8, max_queue=1,
                 request_timeout_s=1.0)
    body = {"prompt": "We", "max_tokens": 90, "temperature": 0, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            async def one():
                t = time.monotonic()
                r = await c.post("/v1/completions", json=body)
                return r.status_code, time.monotonic() - t, r
            first = asyncio.create_task(one())
            while not srv.state.engine.running:  # the first request holds the only slot
                await asyncio.sleep(0.01)
            return await asyncio.gather(first, *[one() for _ in range(3)])
    try:
        results = asyncio.run(burst())
    finally:
        srv.stop()
    codes = sorted(code for code, _, _ in results)
    assert codes.count(503) == 2, codes  # one running, one waiting, two refused
    assert all(dt < 0.5 for code, dt, _ in results if code == 503)  # at once, not after waiting
    assert next(r for code, _, r in results if code == 503).headers["retry-after"] == "1"
    assert 504 in codes  # 90 steps x 20 ms > the 1 s request timeout


def test_lm_eval_local_completions_scores_through_the_server(server, tiny):
    """lm-eval's own `local-completions` model (remote tokenizer through
    /tokenizer_info and /tokenize, echo + logprobs) gets the log-likelihoods
    and greedy flags that the model computes directly."""
    pytest.importorskip("tenacity")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    cfg, model, tok = tiny
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=NAME, tokenizer_backend="remote",
                             max_length=cfg.seq_len, num_concurrent=1, max_retries=1)
    pairs = [("The state of the", " Union"), ("We must", " act now"), ("Congress", " shall")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        a = tok.encode(ctx)
        b = tok.encode(ctx + cont)[len(a):]
        with torch.no_grad():
            lp = model(torch.tensor([a + b]))[0].float().log_softmax(-1)
        rows = lp[len(a) - 1:len(a) - 1 + len(b)]
        assert score == pytest.approx(sum(float(rows[i, t]) for i, t in enumerate(b)), abs=1e-4)
        assert greedy == all(int(rows[i].argmax()) == t for i, t in enumerate(b))
    out = lm.generate_until([Instance("generate_until", {}, ("We must", {"until": ["\n"], "max_gen_toks": 8}), 0)])
    assert out == [_greedy(model, tok, "We must", 8).split("\n")[0]]
