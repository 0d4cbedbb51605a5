"""Megatron-LM's text-generation API: ``PUT /api``.

Request fields and their checks follow Megatron's ``MegatronGenerate``;
errors answer 400 with a JSON string, as Megatron's Flask server does.  The
answer holds, per prompt, ``text`` (prompt + generation, the stop token
included as Megatron includes it), ``segments`` (the text of every token) and
``logprobs`` (log-probability of every token after the first, or null when
not requested).  With ``beam_width`` it returns the whole beam: ``text``,
``segments`` and ``scores`` (length-normalised log-probabilities), best first.

Unlike Megatron's server, which serves one request at a time behind a lock,
the prompts of every caller share the continuous-batching engine.
"""
from __future__ import annotations

import asyncio
import json

from fastapi.responses import JSONResponse
from starlette.requests import Request as HTTPRequest

from mtnlg.serve.app import ApiError, ClientGone, ServerState, Submission
from mtnlg.serve.engine import SamplingParams
from mtnlg.serve.protocol import parse_megatron
from mtnlg.serve.runner import BeamJob


def register(app, state: ServerState) -> None:
    @app.put("/api")
    async def megatron(request: HTTPRequest):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse("request body is not valid JSON", 400)
        try:
            req = parse_megatron(body)
        except ValueError as err:
            return JSONResponse(str(err), 400)
        engine = state.ready()
        tok = state.tokenizer
        prompts = await state.encode(req.prompts)
        if req.add_BOS:
            prompts = [[tok.eod_id] + p for p in prompts]
        stop = tok.eod_id if req.stop_token is None else req.stop_token
        for p in prompts:
            try:
                engine.check(len(p), req.tokens_to_generate)
            except ValueError as err:
                return JSONResponse(str(err), 400)
        if req.beam_width is not None:
            job = BeamJob(prompts[0], req.tokens_to_generate, req.beam_width, stop, float(req.length_penalty))
            try:
                beams = await asyncio.wrap_future(engine.beam(job))
            except Exception as err:  # noqa: BLE001 - reported to the client
                raise ApiError(500, f"beam search failed: {err}", "server_error") from None
            return {"text": [tok.decode(seq) for seq, _ in beams],
                    "segments": [[tok.decode([t]) for t in seq] for seq, _ in beams],
                    "scores": [score for _, score in beams]}
        greedy = req.top_k == 1
        params = [SamplingParams(
            max_tokens=req.tokens_to_generate, temperature=0.0 if greedy else float(req.temperature),
            top_k=req.top_k, top_p=req.top_p if req.top_p > 0 else 1.0,
            seed=None if req.random_seed < 0 else req.random_seed,
            stop_ids=(stop,), include_stop_token=True,
            logprobs=0 if req.logprobs else None, prompt_logprobs=0 if req.logprobs else None) for _ in prompts]
        sub = Submission(state, prompts, params)
        generated = [[] for _ in prompts]
        lps = [[] for _ in prompts]
        prompt_lps = [[] for _ in prompts]
        reasons = [None] * len(prompts)
        try:
            async for i, out in sub.events(request):
                generated[i] += out.token_ids
                lps[i] += out.logprobs
                if out.prompt_logprobs is not None:
                    prompt_lps[i] = [lp for lp, _ in out.prompt_logprobs[1:]]
                if out.finish_reason:
                    reasons[i] = out.finish_reason
        except ClientGone:
            return None
        if "timeout" in reasons:
            raise ApiError(504, "the request exceeded the server's request timeout", "timeout")
        if "error" in reasons:
            raise ApiError(500, "the engine failed while generating", "server_error")
        seqs = [p + g for p, g in zip(prompts, generated)]
        return {"text": [tok.decode(s) for s in seqs],
                "segments": [[tok.decode([t]) for t in s] for s in seqs],
                "logprobs": [pl + lp for pl, lp in zip(prompt_lps, lps)] if req.logprobs else None}
