"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

Shapes follow the OpenAI API (and vLLM where OpenAI is silent): ``echo`` +
``logprobs`` return the prompt's token log-probabilities (first one null), so
lm-eval's ``local-completions`` can score through the server; ``stream``
sends ``data: {json}`` server-sent events and a final ``data: [DONE]``.
"""
from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import StreamingResponse
from starlette.requests import Request as HTTPRequest

from mtnlg.serve.app import ApiError, ClientGone, ServerState, Submission
from mtnlg.serve.engine import SamplingParams
from mtnlg.serve.protocol import ChatRequest, CompletionRequest
from mtnlg.serve.text import TextStream


def register(app, state: ServerState) -> None:
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "mtnlg", "max_model_len": state.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        return await _completions(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: HTTPRequest):
        return await _chat(state, body, request)


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       "not_found_error", "model")


def _params(state: ServerState, body, max_tokens: int, j: int, logprobs, prompt_logprobs) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
        seed=None if body.seed is None else (body.seed + j) % 2 ** 64,
        stop_ids=() if body.ignore_eos else (state.tokenizer.eod_id,),
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _raise_for(reason: str) -> None:
    if reason == "timeout":
        raise ApiError(504, "the request exceeded the server's request timeout", "timeout")
    if reason == "error":
        raise ApiError(500, "the engine failed while generating", "server_error")


# ---------------------------------------------------------------- completions
async def _completions(state: ServerState, body: CompletionRequest, request: HTTPRequest):
    engine = state.ready()
    _check_model(state, body.model)
    p = body.prompt
    if isinstance(p, str):
        prompts = await state.encode([p])
    elif all(isinstance(x, str) for x in p):
        prompts = await state.encode(p)
    elif all(isinstance(x, int) for x in p):
        prompts = [p]
    else:
        prompts = [list(x) for x in p]
    for ids in prompts:
        state.check_ids(ids)
    prompts = [ids or [state.tokenizer.eod_id] for ids in prompts]  # an empty prompt starts a document
    longest = max(len(x) for x in prompts)
    max_tokens = body.max_tokens if body.max_tokens is not None else state.max_len - longest
    for ids in prompts:
        try:
            engine.check(len(ids), max_tokens)
        except ValueError as err:
            raise ApiError(400, str(err), param="max_tokens") from None
    want_prompt_lp = body.echo and body.logprobs is not None
    flat, params = [], []
    for ids in prompts:
        for j in range(body.n):
            flat.append(ids)
            params.append(_params(state, body, max_tokens, j, body.logprobs, body.logprobs if want_prompt_lp else None))
    sub = Submission(state, flat, params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
    choices = [_Choice(state, flat[i], body.stops, body.echo) for i in range(len(flat))]
    usage = lambda: {"prompt_tokens": sum(map(len, prompts)),  # noqa: E731
                     "completion_tokens": sum(c.n_generated for c in choices),
                     "total_tokens": sum(map(len, prompts)) + sum(c.n_generated for c in choices)}
    if body.stream:
        def piece(i, out):
            text, lp, reason = choices[i].push(out, body.logprobs is not None)
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason} if text or lp or reason else None
        return _event_stream(sub, request, choices, piece, head, body, usage)
    if not await _collect(sub, request, choices):
        return None
    result = []
    for i, c in enumerate(choices):
        _raise_for(c.reason)
        text, lp = c.final(body.logprobs is not None)
        result.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.reason})
    return {**head, "choices": result, "usage": usage()}


class _Choice:
    """Accumulates one choice: tokens, log-probabilities, stop strings."""

    def __init__(self, state: ServerState, prompt: list[int], stops: list[str], echo: bool):
        self.tok, self.prompt, self.echo = state.tokenizer, prompt, echo
        self.text = TextStream(self.tok.decode, stops)
        self.tokens: list[int] = []
        self.lps: list[float] = []
        self.tops: list = []
        self.prompt_lp: list | None = None
        self.reason: str | None = None
        self.started = False
        self.lp_sent = 0

    @property
    def n_generated(self) -> int:
        return self.text.kept_tokens() if self.text.stopped else len(self.tokens)

    def stopped_early(self) -> bool:
        return self.text.stopped and self.reason is None

    def push(self, out, with_lp: bool):
        """Take one engine Output; return (new text, logprobs delta | None, finish_reason | None)."""
        if out.prompt_logprobs is not None:
            self.prompt_lp = out.prompt_logprobs
        self.tokens += out.token_ids
        self.lps += out.logprobs
        self.tops += out.top_logprobs
        new = self.text.add(out.token_ids)
        reason = None
        if out.finish_reason and self.reason is None:
            # a stop string ends the sequence by aborting it: still finish_reason "stop"
            self.reason = reason = "stop" if self.text.stopped else out.finish_reason
            new += self.text.finish()
        first = not self.started
        self.started = True
        if first and self.echo:
            new = self.tok.decode(self.prompt) + new
        lp = None
        if with_lp:
            end = self.n_generated
            if end > self.lp_sent or (first and self.echo):
                lp = self._logprobs(self.lp_sent, end, include_prompt=first and self.echo)
            self.lp_sent = end
        return new, lp, reason

    def final(self, with_lp: bool):
        text = (self.tok.decode(self.prompt) if self.echo else "") + self.text.sent
        lp = self._logprobs(0, self.n_generated, include_prompt=self.echo) if with_lp else None
        return text, lp

    def _logprobs(self, start: int, end: int, include_prompt: bool) -> dict:
        dec = self.tok.decode
        tokens, lps, tops = [], [], []
        if include_prompt:
            for t, (lp, top) in zip(self.prompt, self.prompt_lp or [(None, None)] * len(self.prompt)):
                tokens.append(dec([t]))
                lps.append(lp)
                tops.append(None if lp is None else _top_dict(dec, top, t, lp))
        for k in range(start, end):
            t = self.tokens[k]
            tokens.append(dec([t]))
            lps.append(self.lps[k])
            tops.append(_top_dict(dec, self.tops[k], t, self.lps[k]))
        offsets, pos = [], 0
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(dec, top, chosen: int, chosen_lp: float) -> dict:
    """Top alternatives keyed by token text, the chosen token always included (as vLLM does)."""
    d: dict[str, float] = {}
    for t, lp in list(top or []) + [(chosen, chosen_lp)]:
        s = dec([t])
        d[s] = max(d.get(s, float("-inf")), lp)
    return d


# ---------------------------------------------------------------- chat
async def _chat(state: ServerState, body: ChatRequest, request: HTTPRequest):
    engine = state.ready()
    _check_model(state, body.model)
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    try:
        ids = state.chat.prompt_ids(state.tokenizer, messages, body.add_generation_prompt)
        if ids is None:
            ids = (await state.encode([state.chat.render(messages, body.add_generation_prompt)]))[0]
    except ValueError as err:
        raise ApiError(400, str(err), param="messages") from None
    ids = ids or [state.tokenizer.eod_id]
    max_tokens = body.max_completion_tokens or body.max_tokens or state.max_len - len(ids)
    try:
        engine.check(len(ids), max(max_tokens, 1))
    except ValueError as err:
        raise ApiError(400, str(err), param="max_tokens") from None
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = [_params(state, body, max_tokens, j, k, None) for j in range(body.n)]
    sub = Submission(state, [ids] * body.n, params)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    choices = [_Choice(state, ids, body.stops, False) for _ in range(body.n)]
    usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": sum(c.n_generated for c in choices),  # noqa: E731
                     "total_tokens": len(ids) + sum(c.n_generated for c in choices)}
    chunk = {**head, "object": "chat.completion.chunk"}
    if body.stream:
        def piece(i, out):
            c = choices[i]
            before = c.lp_sent
            text, _, reason = c.push(out, False)
            lp = _chat_logprobs(c, before) if body.logprobs else None
            if not (text or reason or lp):
                return None
            return {"index": i, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": reason}
        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(body.n)]
        return _event_stream(sub, request, choices, piece, chunk, body, usage, opening)
    if not await _collect(sub, request, choices):
        return None
    result = []
    for i, c in enumerate(choices):
        _raise_for(c.reason)
        result.append({"index": i, "message": {"role": "assistant", "content": c.text.sent},
                       "logprobs": _chat_logprobs(c, 0) if body.logprobs else None, "finish_reason": c.reason})
    return {**head, "object": "chat.completion", "choices": result, "usage": usage()}


def _chat_logprobs(c: _Choice, start: int) -> dict | None:
    """Chat-style logprobs of generated tokens start.. (those released so far)."""
    end = c.n_generated if c.text.stopped else len(c.tokens)
    c.lp_sent = end
    if end <= start:
        return None
    dec = c.tok.decode

    def entry(t, lp):
        s = dec([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    content = []
    for k in range(start, end):
        e = entry(c.tokens[k], c.lps[k])
        e["top_logprobs"] = [entry(t, lp) for t, lp in c.tops[k]]
        content.append(e)
    return {"content": content}


def _event_stream(sub, request, choices, piece, head: dict, body, usage, opening=()) -> StreamingResponse:
    """The server-sent events of a streaming request, shared by completions and chat:
    the ``opening`` choices, then one chunk per engine event that carries something
    (``piece(i, out)``: a choice, or None), aborting a sequence that hit a stop string,
    the usage chunk when ``stream_options.include_usage`` asks for it, and [DONE]."""
    async def stream():
        try:
            for choice in opening:
                yield _sse({**head, "choices": [choice]})
            async for i, out in sub.events(request):
                choice = piece(i, out)
                if choice is not None:
                    yield _sse({**head, "choices": [choice]})
                if choices[i].stopped_early():
                    sub.engine.abort(sub.ids[i])
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
    return StreamingResponse(stream(), media_type="text/event-stream")


async def _collect(sub, request, choices) -> bool:
    """Feed every engine event of a non-streaming request into its choice (aborting a
    sequence that hit a stop string); False when the client went away."""
    try:
        async for i, out in sub.events(request):
            choices[i].push(out, False)
            if choices[i].stopped_early():
                sub.engine.abort(sub.ids[i])
    except ClientGone:
        return False
    return True
