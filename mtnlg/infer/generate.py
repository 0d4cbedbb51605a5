"""Autoregressive decoding with a KV cache: greedy, temperature, top-k,
top-p (nucleus) sampling and beam search.

The prompt is run once (prefill) to fill the cache; each new token then costs
one forward of a single position.  ``use_cache=False`` recomputes the whole
prefix every step, which the tests use to prove the cache changes nothing.
"""
from __future__ import annotations

from typing import Callable

import torch

from mtnlg.errors import UserError
from mtnlg.model.gpt import KVCache


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scale by temperature, keep the top-k tokens, then the smallest set whose
    probability reaches top_p; everything else becomes -inf."""
    if top_k < 0 or not 0 < top_p <= 1 or not temperature > 0:
        raise UserError(f"need temperature > 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    logits = logits.float() / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep tokens until the mass before them reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _check_length(model, prompt_len: int, max_new_tokens: int) -> None:
    limit = model.cfg.seq_len
    if prompt_len + max_new_tokens > limit:
        raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                        f"model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens")


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, greedy: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             gather_logits: Callable = lambda x: x, pad: torch.Tensor | None = None,
             stop_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Return (B, T + new) token ids; rows that emit ``eos_id`` are padded with it.

    ``pad`` (B,) gives each row's count of left-padding tokens (prompts of
    different lengths in one batch); ``stop_fn(tokens) -> (B,) bool`` marks rows
    that are done (e.g. a stop string appeared); they are then padded with
    ``eos_id`` like finished rows."""
    B, T = prompt.shape
    _check_length(model, T - (int(pad.min()) if pad is not None else 0), max_new_tokens)
    model.eval()
    cache = KVCache(max_len=T + max_new_tokens) if use_cache else None
    tokens = prompt
    finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    kw = {} if pad is None else {"pad": pad}
    logits = gather_logits(model(prompt, cache, 0, **kw))[:, -1]
    for i in range(max_new_tokens):
        if greedy:
            nxt = logits.float().argmax(-1)
        else:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if stop_fn is not None:
            finished |= stop_fn(tokens)
        if i == max_new_tokens - 1 or bool(finished.all()):
            break
        if use_cache:
            logits = gather_logits(model(nxt[:, None], cache, tokens.shape[1] - 1, **kw))[:, -1]
        else:
            logits = gather_logits(model(tokens, **kw))[:, -1]
    return tokens


def beam_search(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, num_beams: int = 4,
                eos_id: int | None = None, length_penalty: float = 1.0,
                gather_logits: Callable = lambda x: x) -> tuple[torch.Tensor, float]:
    """Beam search for one prompt (1, T).  Returns the best sequence and its
    length-normalised log-probability (score / length**length_penalty)."""
    best, score = beam_candidates(model, prompt, max_new_tokens, num_beams, eos_id, length_penalty, gather_logits)[0]
    return best[None], score


@torch.no_grad()
def beam_candidates(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, num_beams: int = 4,
                    eos_id: int | None = None, length_penalty: float = 1.0,
                    gather_logits: Callable = lambda x: x) -> list[tuple[torch.Tensor, float]]:
    """Every finished hypothesis of a beam search for one prompt (1, T) as
    (sequence (T + n,), length-normalised score), best first."""
    if prompt.shape[0] != 1:
        raise UserError("beam search takes one prompt at a time")
    T = prompt.shape[1]
    _check_length(model, T, max_new_tokens)
    model.eval()
    cache = KVCache(max_len=T + max_new_tokens)
    logp = gather_logits(model(prompt, cache, 0))[:, -1].float().log_softmax(-1)  # (1, V)
    scores, first = logp[0].topk(num_beams)
    beams = torch.cat([prompt.repeat(num_beams, 1), first[:, None]], dim=1)
    cache.reorder(torch.zeros(num_beams, dtype=torch.long, device=prompt.device))
    done: list[tuple[float, torch.Tensor]] = []
    for step in range(1, max_new_tokens + 1):
        alive = torch.ones(len(beams), dtype=torch.bool, device=beams.device)
        if eos_id is not None:
            for b in range(len(beams)):
                if beams[b, -1].item() == eos_id:
                    done.append((scores[b].item() / (step ** length_penalty), beams[b]))
                    alive[b] = False
        if step == max_new_tokens or not alive.any():
            break
        logp = gather_logits(model(beams[:, -1:], cache, beams.shape[1] - 1))[:, -1].float().log_softmax(-1)
        total = (scores[:, None] + logp).masked_fill(~alive[:, None], float("-inf"))
        V = total.shape[-1]
        scores, flat = total.view(-1).topk(num_beams)
        origin, token = flat // V, flat % V
        beams = torch.cat([beams[origin], token[:, None]], dim=1)
        cache.reorder(origin)
    n = beams.shape[1] - T
    for b in range(len(beams)):
        if eos_id is None or beams[b, -1].item() != eos_id:
            done.append((scores[b].item() / (n ** length_penalty), beams[b]))
    done.sort(key=lambda x: -x[0])
    return [(seq, score) for score, seq in done]


def beam_search_all(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, num_beams: int = 4,
                    eos_id: int | None = None, length_penalty: float = 1.0,
                    gather_logits: Callable = lambda x: x) -> list[tuple[list[int], float]]:
    """The ``num_beams`` best finished hypotheses of a beam search for one prompt
    (1, T) as (prompt + generation token list, length-normalised score), best first."""
    found = beam_candidates(model, prompt, max_new_tokens, num_beams, eos_id, length_penalty, gather_logits)
    return [(seq.tolist(), score) for seq, score in found[:num_beams]]
