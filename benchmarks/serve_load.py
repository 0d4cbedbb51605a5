"""Load test of `mtnlg serve` on 127.0.0.1: throughput and latency at several
concurrencies, the speed-up of continuous batching over one request at a
time, and a fuzz run of malformed requests.

    python benchmarks/serve_load.py                      # tiny model, random weights (architecture of configs/tiny.toml)
    python benchmarks/serve_load.py --run runs/tiny      # a trained run
    python benchmarks/serve_load.py --quick              # fewer requests (a smoke test)

The server runs in a child process (so the load generator does not compete
with it for Python's GIL) and is started twice: with continuous batching
(--max-batch 64) and with --max-batch 1 (one sequence at a time, what
Megatron's server does).  Each request streams ``--max-tokens`` tokens
(``ignore_eos`` keeps lengths equal); tokens/s counts generated tokens over
the wall time of a level; TTFT is the time to the first streamed chunk.
Bounded: at most ``--max-requests`` requests and ``--max-seconds`` per level.
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _serve(port: int, run: str | None, max_batch: int, max_batch_tokens: int, threads: int, ready) -> None:
    import torch

    from mtnlg.serve.engine import EngineConfig
    from mtnlg.serve.server import BackgroundServer, attach_model, new_state
    torch.set_num_threads(threads)
    model, tok, max_len = _model(run)
    config = EngineConfig(max_batch=max_batch, max_batch_tokens=max_batch_tokens, max_queue=1024)
    state = new_state("bench", config)
    BackgroundServer(state, port, log_level="error").start()
    attach_model(state, model, tok, max_len, torch.device("cpu"), config)
    ready.set()
    while True:
        time.sleep(3600)


def _model(run: str | None):
    import torch
    if run:
        from mtnlg.infer.load import load_run
        cfg, model, tok = load_run(run, "cpu")
        return model, tok, cfg.model.seq_len
    from mtnlg.config import load_config
    from mtnlg.data.tokenizer import train_tokenizer
    from mtnlg.model.gpt import build_model
    tok = train_tokenizer(_texts(60), 2048)
    cfg = load_config(ROOT / "configs" / "tiny.toml").model
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    return build_model(cfg, "cpu", seed=0).eval(), tok, cfg.seq_len


def _texts(n: int) -> list[str]:
    with gzip.open(ROOT / "data" / "sotu" / "sotu.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


def _prompts(k: int = 64) -> list[str]:
    words = " ".join(_texts(5)).split()
    return [" ".join(words[i * 20:(i + 1) * 20]) for i in range(k)]  # ~20 words, ~25-35 tokens


async def _level(url: str, concurrency: int, n_requests: int, max_tokens: int, max_seconds: float) -> dict:
    import httpx
    prompts = _prompts()
    latencies, ttfts, tokens = [], [], 0
    deadline = time.monotonic() + max_seconds
    counter = itertools.count()

    async def worker(client):
        nonlocal tokens
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= n_requests:
                return
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.monotonic()
            first = None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"]:
                        first = time.monotonic()
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            latencies.append(time.monotonic() - t0)
            ttfts.append((first or time.monotonic()) - t0)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.monotonic()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.monotonic() - t0
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"concurrency": concurrency, "requests": len(latencies), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies), "p99_s": q(latencies, 0.99),
            "ttft_p50_s": statistics.median(ttfts)}


def _start(args, max_batch: int):
    from mtnlg.serve.server import free_port
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    port = free_port()
    proc = ctx.Process(target=_serve, args=(port, args.run, max_batch, args.max_batch_tokens, args.threads, ready),
                       daemon=True)
    proc.start()
    if not ready.wait(300):
        proc.kill()
        raise RuntimeError("server did not become ready")
    return proc, f"http://127.0.0.1:{port}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="trained run directory (default: random weights, configs/tiny.toml architecture)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client concurrencies")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--max-requests", type=int, default=192, help="requests per level at most")
    p.add_argument("--max-seconds", type=float, default=60.0, help="seconds per level at most")
    p.add_argument("--baseline-concurrency", type=int, default=16, help="concurrency of the one-at-a-time comparison")
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="server intra-op threads")
    p.add_argument("--repeat", type=int, default=2, help="runs per level; the fastest is reported (shared machines)")
    p.add_argument("--quick", action="store_true", help="a few requests per level, one run each (smoke test)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.repeat = 1
    n_for = (lambda c: 2 * c) if args.quick else (lambda c: min(args.max_requests, max(16, 3 * c)))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared); server threads={args.threads}; "
          f"model: {args.run or 'tiny (configs/tiny.toml, random weights, 2048-token BPE)'}; "
          f"{args.max_tokens} tokens per request", flush=True)
    out = {"levels": [], "baseline": None, "fuzz": None}
    bc = args.baseline_concurrency
    best = lambda runs: max(runs, key=lambda r: r["tokens_per_s"])  # noqa: E731 - least disturbed by other jobs
    batched_proc, url = _start(args, 64)
    single_proc, single_url = _start(args, 1)  # idle until its turn: both see the same machine conditions
    try:
        for c in levels:
            runs, base_runs = [], []
            for _ in range(args.repeat):
                runs.append(asyncio.run(_level(url, c, n_for(c), args.max_tokens, args.max_seconds)))
                if c == bc:
                    base_runs.append(asyncio.run(_level(single_url, bc, n_for(bc), args.max_tokens, args.max_seconds)))
            r = best(runs)
            out["levels"].append(r)
            print(f"  batched   c={c:3d}: {r['requests']:4d} requests {r['tokens_per_s']:8.1f} tok/s  "
                  f"p50 {r['p50_s']:.3f}s p99 {r['p99_s']:.3f}s ttft p50 {r['ttft_p50_s']:.3f}s "
                  f"(best of {[round(x['tokens_per_s']) for x in runs]})", flush=True)
            if base_runs:
                base = out["baseline"] = best(base_runs)
                print(f"  one-at-a-time c={bc}: {base['requests']} requests {base['tokens_per_s']:.1f} tok/s  "
                      f"p50 {base['p50_s']:.3f}s p99 {base['p99_s']:.3f}s "
                      f"(best of {[round(x['tokens_per_s']) for x in base_runs]})", flush=True)
        from mtnlg.serve.fuzz import run_fuzz
        fuzz = run_fuzz(url)
        out["fuzz"] = {"cases": len(fuzz), "4xx": sum(f["ok"] for f in fuzz),
                       "healthy_after_each": all(f["healthy"] for f in fuzz),
                       "failures": [f for f in fuzz if not (f["ok"] and f["healthy"])]}
    finally:
        batched_proc.kill()
        single_proc.kill()
    if out["baseline"] is None:
        raise SystemExit(f"--baseline-concurrency {bc} must be one of --concurrency {args.concurrency}")
    base = out["baseline"]
    batched = next(r for r in out["levels"] if r["concurrency"] == bc)
    print("\n| concurrency | requests | tokens/s | latency p50 (s) | latency p99 (s) | TTFT p50 (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in out["levels"]:
        print(f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.0f} | {r['p50_s']:.2f} | "
              f"{r['p99_s']:.2f} | {r['ttft_p50_s']:.2f} |")
    print(f"| {bc}, one at a time (--max-batch 1) | {base['requests']} | {base['tokens_per_s']:.0f} | "
          f"{base['p50_s']:.2f} | {base['p99_s']:.2f} | {base['ttft_p50_s']:.2f} |")
    out["speedup"] = batched["tokens_per_s"] / base["tokens_per_s"]
    print(f"\ncontinuous batching speed-up at concurrency {bc}: {out['speedup']:.1f}x tokens/s")
    f = out["fuzz"]
    print(f"fuzz: {f['4xx']}/{f['cases']} malformed requests answered 4xx; "
          f"server healthy after each: {f['healthy_after_each']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if f["4xx"] == f["cases"] and f["healthy_after_each"] else 1


if __name__ == "__main__":
    sys.exit(main())
