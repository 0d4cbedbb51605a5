"""``mtnlg generate``: sample text from a trained run."""
from __future__ import annotations

import argparse
import json

import torch

from mtnlg.errors import UserError

SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 0, "top_p": 0.95}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory made by `mtnlg train`")
    p.add_argument("--checkpoint", help="a specific checkpoints/step_* directory (default: the latest)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable; default: empty prompt)")
    p.add_argument("--chat", action="append", default=[], metavar="MESSAGE",
                   help="a user message, rendered with the run's chat template (chat_template.json, written by "
                        "`mtnlg finetune`); the reply ends at the template's end marker (repeatable)")
    p.add_argument("--system", help="system message put before each --chat message")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per sample")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"softmax temperature for sampling (default: {SAMPLING_DEFAULTS['temperature']})")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (default: 0 = all)")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"nucleus sampling: smallest set with this probability mass "
                        f"(default: {SAMPLING_DEFAULTS['top_p']})")
    p.add_argument("--beams", type=int, default=1,
                   help="beam search with this many beams (1: no beam search); deterministic, so it takes "
                        "no sampling options")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (slow; for checking)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object per sample")


def run(args: argparse.Namespace) -> int:
    from mtnlg.infer.generate import beam_search, generate
    from mtnlg.infer.load import load_run

    check_options(args)
    from mtnlg.parallel.mesh import pick_device
    device = pick_device(args.device, 0)
    cfg, model, tok = load_run(args.run, device, args.checkpoint)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prompts = [(p, tok.encode(p) or [tok.eod_id]) for p in args.prompt]
    if args.chat:
        from mtnlg.finetune.template import chat_prompt_ids
        prompts += [(m, chat_prompt_ids(args.run, tok, m, args.system)) for m in args.chat]
    for prompt, ids in prompts or [("", [tok.eod_id])]:
        x = torch.tensor([ids], device=device)
        for i in range(args.num_samples):
            if args.beams > 1:
                out, _ = beam_search(model, x, args.max_new_tokens, args.beams, eos_id=tok.eod_id)
            else:
                out = generate(model, x, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, eos_id=tok.eod_id, generator=gen,
                               use_cache=not args.no_cache)
            new = [t for t in out[0, len(ids):].tolist() if t != tok.eod_id]
            text = tok.decode(new)
            if args.json:
                print(json.dumps({"prompt": prompt, "sample": i, "completion": text}))
            else:
                print(f"--- {prompt!r} (sample {i + 1})\n{prompt}{text}\n", flush=True)
    return 0


def check_options(args: argparse.Namespace) -> None:
    """Refuse values that cannot work or would be ignored; fill in sampling defaults."""
    for name in ("max_new_tokens", "num_samples", "beams"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    given = [f"--{k.replace('_', '-')}" for k in SAMPLING_DEFAULTS if getattr(args, k) is not None]
    if args.beams > 1 and (given or args.greedy):
        raise UserError(f"--beams {args.beams} is deterministic beam search: {', '.join(given or ['--greedy'])} "
                        f"only apply to sampling; drop them, or use --beams 1 to sample")
    if args.beams > 1 and args.num_samples > 1:
        raise UserError(f"--beams gives one result per prompt; --num-samples {args.num_samples} would repeat it")
    if args.greedy and given:
        raise UserError(f"--greedy always takes the most likely token: {', '.join(given)} only apply to "
                        f"sampling; drop them or --greedy")
    for k, v in SAMPLING_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.temperature > 0 or args.temperature == float("inf"):
        raise UserError(f"--temperature must be a positive number, got {args.temperature} "
                        f"(use --greedy for deterministic decoding)")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = no limit), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
