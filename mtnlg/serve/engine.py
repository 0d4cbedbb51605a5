"""Continuous batching: an iteration-level scheduler over per-sequence cache slots.

One engine thread loops over *steps*.  Each step it

1. drains the inbox: new requests join the waiting queue, aborts (client
   gone, stop string seen) retire their sequences, expired ones time out;
2. admits waiting requests into free cache slots (at most ``max_batch``
   sequences run at once);
3. spends a token budget (``max_batch_tokens``): one token for every
   sequence that is decoding, the rest on prompt chunks of sequences still
   in prefill (chunked prefill), so new prompts are mixed with decoding;
4. runs one forward over the step's tokens packed into one row
   (:class:`~mtnlg.serve.runner.ModelRunner`, :class:`~mtnlg.serve.cache.SlotKVCache`)
   and samples the next token of every sequence that reached the end of its input;
5. hands each request its new tokens through the request's ``sink``
   callback and retires finished sequences, freeing their slots at once.

Sampling per row reuses ``filter_logits`` from ``mtnlg.infer.generate`` with
the request's own ``torch.Generator``, so a greedy (or seeded) request gives
exactly the tokens that single-request ``generate`` gives.
"""
from __future__ import annotations

import collections
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtnlg.infer.generate import filter_logits
from mtnlg.serve.runner import BeamJob, ModelRunner, StepPlan


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``; the caller should answer 503."""


@dataclass
class EngineConfig:
    max_batch: int = 32           # sequences decoding at once (= KV-cache slots)
    max_batch_tokens: int = 512   # tokens per forward step (decode tokens + prefill chunks)
    max_queue: int = 256          # requests waiting for a slot before new ones are refused
    request_timeout_s: float = 600.0  # a request still unfinished after this is ended ("timeout")

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_batch must be >= 1, max_queue >= 0 and request_timeout_s > 0")
        if self.max_batch_tokens < self.max_batch:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_batch ({self.max_batch}): "
                             "every running sequence needs one token per step")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0      # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()   # tokens that end the sequence (finish_reason "stop")
    include_stop_token: bool = False  # Megatron returns the stop token, OpenAI does not
    logprobs: int | None = None      # per generated token: its logprob and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)


@dataclass
class Output:
    """What one step produced for one request (sent through its sink)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list | None = None  # [(logprob | None, [(id, logprob)...] | None)] per prompt token
    finish_reason: str | None = None     # stop | length | abort | timeout | error


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Output], None]
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class _Seq:
    req: Request
    slot: int
    generator: torch.Generator | None
    cursor: int = 0                      # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    prompt_lp: list = field(default_factory=list)
    first_token_at: float | None = None

    @property
    def decoding(self) -> bool:
        return self.cursor >= len(self.req.prompt)


class Engine:
    """Scheduler + engine thread.  ``submit``/``abort``/``beam`` are safe to
    call from any thread (the HTTP event loop)."""

    def __init__(self, runner: ModelRunner, max_len: int, vocab_size: int, config: EngineConfig | None = None,
                 metrics=None):
        self.runner, self.max_len, self.vocab_size = runner, max_len, vocab_size
        self.config = config or EngineConfig()
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet admitted to a slot
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[_Seq] = []
        self._free = list(range(self.config.max_batch))[::-1]
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.finished_log: collections.deque = collections.deque(maxlen=256)  # (id, reason, n_generated)
        self.steps = 0

    # ---- public, thread-safe
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="mtnlg-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise ValueError if a request cannot fit the model's context."""
        if prompt_len < 1:
            raise ValueError("the prompt must hold at least one token")
        if prompt_len + max_tokens > self.max_len:
            raise ValueError(f"this model's maximum context length is {self.max_len} tokens, but {prompt_len + max_tokens} "
                             f"were requested ({prompt_len} in the prompt, {max_tokens} to generate); "
                             "shorten the prompt or lower max_tokens")

    def submit(self, req: Request) -> None:
        self.check(len(req.prompt), req.params.max_tokens)
        if not self.alive:
            raise QueueFull("the engine is not running")
        with self._lock:
            if self._queued >= self.config.max_queue:
                raise QueueFull(f"server busy: {self._queued} requests are already waiting (max_queue)")
            self._queued += 1
        self._inbox.put(("add", req))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def beam(self, job: BeamJob) -> Future:
        """Run a beam search between steps; the future holds [(tokens, score)]."""
        fut: Future = Future()
        self._inbox.put(("beam", (job, fut)))
        self._wake.set()
        return fut

    # ---- engine thread
    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drain()
                plan, rows = self._schedule()
                if plan is None:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                logits = self.runner.forward(plan)
                self._process(rows, logits)
                self.steps += 1
        except BaseException as err:  # noqa: BLE001 - reported through /health and every open request
            self.error = err
            for seq in list(self.running):
                self._finish(seq, "error")
            while self.waiting:
                self._finish_waiting(self.waiting.popleft(), "error")
            raise
        finally:
            self.runner.shutdown()

    def _drain(self) -> None:
        now = time.monotonic()
        aborted: set[str] = set()
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self.waiting.append(item)
            elif kind == "abort":
                aborted.add(item)
            elif kind == "beam":
                job, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(self.runner.beam(job))
                    except Exception as err:  # noqa: BLE001 - handed to the waiting request
                        fut.set_exception(err)
        timeout = self.config.request_timeout_s
        for seq in list(self.running):
            if seq.req.id in aborted:
                self._finish(seq, "abort")
            elif now - seq.req.arrival > timeout:
                self._finish(seq, "timeout")
        keep = collections.deque()
        for req in self.waiting:
            if req.id in aborted:
                self._finish_waiting(req, "abort")
            elif now - req.arrival > timeout:
                self._finish_waiting(req, "timeout")
            else:
                keep.append(req)
        self.waiting = keep
        while self.waiting and self._free:
            req = self.waiting.popleft()
            with self._lock:
                self._queued -= 1
            gen = None
            if req.params.temperature > 0 and req.params.top_k != 1:
                seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
                gen = torch.Generator(device=self.runner.device).manual_seed(seed)
            self.running.append(_Seq(req, self._free.pop(), gen))
        if self.metrics:
            self.metrics.set_queue(len(self.running), len(self.waiting) + self._inbox.qsize())

    def _schedule(self) -> tuple[StepPlan | None, list]:
        budget = self.config.max_batch_tokens
        rows: list[tuple[_Seq, list[int], int]] = []  # (seq, input tokens, first position)
        for seq in self.running:
            if seq.decoding:
                rows.append((seq, [seq.generated[-1]], len(seq.req.prompt) + len(seq.generated) - 1))
                budget -= 1
        for seq in self.running:
            if not seq.decoding and budget > 0:
                chunk = seq.req.prompt[seq.cursor:seq.cursor + budget]
                rows.append((seq, chunk, seq.cursor))
                budget -= len(chunk)
        if not rows:
            return None, rows
        rows.sort(key=lambda r: r[0].slot)  # consecutive slots let the cache use views (see SlotKVCache.plan)
        tokens = [t for _, toks, _ in rows for t in toks]
        positions = [start + i for _, toks, start in rows for i in range(len(toks))]
        plan = StepPlan(torch.tensor(tokens), torch.tensor(positions), torch.tensor([len(r[1]) for r in rows]),
                        torch.tensor([r[0].slot for r in rows]))
        return plan, rows

    def _process(self, rows: list, logits: torch.Tensor) -> None:
        logits = logits[..., :self.vocab_size]  # padded vocabulary entries are never produced
        now = time.monotonic()
        n_tokens = n_prompt = offset = 0
        for seq, toks, start in rows:
            p = seq.req.params
            n = len(toks)
            mine, offset = logits[offset:offset + n], offset + n  # this sequence's packed tokens
            out = Output()
            if not seq.decoding:  # a prefill chunk
                n_prompt += n
                if p.prompt_logprobs is not None:
                    self._prompt_logprobs(seq, mine, start, n)
                seq.cursor += n
                if not seq.decoding:
                    continue
                if seq.req.prompt and p.prompt_logprobs is not None:
                    out.prompt_logprobs = [(None, None)] + seq.prompt_lp
                if p.max_tokens == 0:  # scoring only
                    self._emit(seq, out)
                    self._finish(seq, "length")
                    continue
            row = mine[n - 1]
            tok = self._sample(row, p, seq.generator)
            n_tokens += 1
            stop = tok in p.stop_ids
            if not stop or p.include_stop_token:
                seq.generated.append(tok)
                out.token_ids.append(tok)
                if p.logprobs is not None:
                    lp = row.float().log_softmax(-1)
                    out.logprobs.append(float(lp[tok]))
                    out.top_logprobs.append(_top(lp, p.logprobs))
            if seq.first_token_at is None:
                seq.first_token_at = now
                if self.metrics:
                    self.metrics.first_token(now - seq.req.arrival)
            self._emit(seq, out)
            if stop:
                self._finish(seq, "stop")
            elif len(seq.generated) >= p.max_tokens or len(seq.req.prompt) + len(seq.generated) >= self.max_len:
                self._finish(seq, "length")
        if self.metrics:
            self.metrics.step(n_tokens, n_prompt)

    def _prompt_logprobs(self, seq: _Seq, logits: torch.Tensor, start: int, n: int) -> None:
        """Log-probabilities of prompt tokens start+1 .. start+n (those inside the prompt)."""
        prompt, k = seq.req.prompt, seq.req.params.prompt_logprobs
        lp = logits.float().log_softmax(-1)
        for i in range(n):
            j = start + i + 1
            if j >= len(prompt):
                break
            seq.prompt_lp.append((float(lp[i, prompt[j]]), _top(lp[i], k)))

    @staticmethod
    def _sample(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
        if gen is None:  # greedy: temperature 0 or top_k 1
            return int(row.float().argmax(-1))
        probs = filter_logits(row[None], p.temperature, p.top_k, p.top_p).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=gen))

    def _emit(self, seq: _Seq, out: Output) -> None:
        try:
            seq.req.sink(out)
        except Exception:  # noqa: BLE001 - a broken sink (closed loop) must not stop the engine
            pass

    def _finish(self, seq: _Seq, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._free.append(seq.slot)
        self._emit(seq, Output(finish_reason=reason))
        self.finished_log.append((seq.req.id, reason, len(seq.generated)))
        if self.metrics:
            self.metrics.request_done(reason, time.monotonic() - seq.req.arrival)

    def _finish_waiting(self, req: Request, reason: str) -> None:
        with self._lock:
            self._queued -= 1
        try:
            req.sink(Output(finish_reason=reason))
        except Exception:  # noqa: BLE001
            pass
        self.finished_log.append((req.id, reason, 0))
        if self.metrics:
            self.metrics.request_done(reason, time.monotonic() - req.arrival)


def _top(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    vals, ids = lp.topk(k)
    return list(zip(ids.tolist(), vals.tolist()))
