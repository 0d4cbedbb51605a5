"""``mtnlg serve``: Megatron's and OpenAI's HTTP APIs over a trained run.

    mtnlg serve --run runs/tiny --port 5000
    torchrun --nproc-per-node 2 -m mtnlg serve --run-dir runs/big --device cuda   # tensor parallel over 2 GPUs

Under torchrun every rank loads the model and shards it tensor-parallel over
all ranks; rank 0 serves HTTP and broadcasts each step's work.  The port
opens at once; /health answers 200 once the model is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

import torch

from mtnlg.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", "--run-dir", dest="run",
                     help="run directory made by `mtnlg train` (spell it --run-dir under torchrun, whose own "
                          "parser would take --run for its --run-path)")
    src.add_argument("--hf", help="a Hugging Face GPT-2 directory (config.json + weights + tokenizer)")
    p.add_argument("--checkpoint", help="a specific checkpoints/step_* directory of --run (default: the latest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=5000, help="TCP port")
    p.add_argument("--model-name", help="model id for /v1/models and the `model` field (default: directory name)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-batch-tokens", type=int, default=512,
                   help="tokens per forward step: one per decoding sequence, the rest for prompt chunks")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot; beyond it new requests get 503 at once")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is ended (504)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body accepted (413 beyond)")
    p.add_argument("--api-key", default=os.environ.get("MTNLG_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                        "(default: $MTNLG_API_KEY; none: open)")
    p.add_argument("--chat-template", help="Jinja chat template file (default: the model's, else a plain-text one)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES],
                   help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    p.add_argument("--log-level", default="info", help="uvicorn log level")


def _engine_config(args):
    from mtnlg.serve.engine import EngineConfig
    try:
        return EngineConfig(max_batch=args.max_batch, max_batch_tokens=args.max_batch_tokens,
                            max_queue=args.max_queue, request_timeout_s=args.request_timeout)
    except ValueError as err:
        raise UserError(str(err).replace("max_batch_tokens", "--max-batch-tokens").replace("max_batch", "--max-batch")
                        .replace("max_queue", "--max-queue").replace("request_timeout_s", "--request-timeout")) from None


def _load(args, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, max_len, model_dir) from --run or --hf."""
    if args.run:
        from mtnlg.infer.load import load_run
        cfg, model, tok = load_run(args.run, device, args.checkpoint, dtype)
        return model, tok, cfg.model.seq_len, args.run
    from mtnlg.serve.hfload import load_hf
    model, tok, max_len = load_hf(args.hf, device, dtype)
    return model, tok, max_len, args.hf


def run(args: argparse.Namespace) -> int:
    from mtnlg.parallel.mesh import init_distributed
    from mtnlg.serve.text import find_chat_template

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    config = _engine_config(args)
    path = args.run or args.hf
    if not Path(path).is_dir():
        raise UserError(f"{'--run' if args.run else '--hf'} {path!r} is not a directory")
    _preflight(args)
    template, template_from = find_chat_template(args.chat_template, path)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed(device=args.device)
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if rank != 0:
        model, _, max_len, group, gather = _load_sharded(args, device, dtype, world)
        from mtnlg.serve.runner import ModelRunner
        ModelRunner(model, config.max_batch, max_len, device, gather, group).serve_forever()
        return 0
    return _serve_rank0(args, config, device, dtype, world, template, template_from)


def _preflight(args) -> None:
    """The cheap checks of what loading needs, before the port opens, so a
    wrong path is one error line rather than a server that dies later."""
    if args.hf:
        if not (Path(args.hf) / "config.json").is_file():
            raise UserError(f"--hf {args.hf!r} has no config.json (expected a Hugging Face GPT-2 directory)")
        return
    from mtnlg.train.checkpoint import latest_checkpoint
    run = Path(args.run)
    if not (run / "config.toml").is_file():
        raise UserError(f"{run} is not a run directory (no config.toml); train one with `mtnlg train --run {run}`")
    if not (run / "tokenizer.json").is_file():
        raise UserError(f"{run / 'tokenizer.json'} is missing; copy the tokenizer the run was trained with there")
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise UserError(f"--checkpoint {args.checkpoint!r} is not a directory")
    if not args.checkpoint and latest_checkpoint(run / "checkpoints") is None:
        raise UserError(f"{run} has no checkpoint yet (checkpoints/latest is missing)")


def _load_sharded(args, device, dtype, world):
    model, tok, max_len, _ = _load(args, device, dtype)
    if world == 1:
        return model, tok, max_len, None, lambda x: x
    from mtnlg.parallel import tensor as tp
    from mtnlg.parallel.mesh import ParallelDims
    from mtnlg.config import ParallelConfig
    dims = ParallelDims.from_config(ParallelConfig(tp=world, pp=1, dp=1), model.cfg, world)
    mesh = dims.build_mesh(device.type)
    tp.apply_tensor_parallel(model, mesh["tp"])
    return model, tok, max_len, mesh["tp"].get_group(), tp.gather_logits


def _serve_rank0(args, config, device, dtype, world, template, template_from) -> int:
    import uvicorn

    from mtnlg.serve.app import create_app
    from mtnlg.serve.server import attach_model, new_state

    name = args.model_name or Path(args.run or args.hf).resolve().name
    state = new_state(name, config, int(args.max_body_mb * (1 << 20)))
    state.api_key = args.api_key or None
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=args.host, port=args.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=5))
    failure: list[str] = []

    def load():
        try:
            model, tok, max_len, group, gather = _load_sharded(args, device, dtype, world)
            attach_model(state, model, tok, max_len, device, config, template, gather, group)
            print(f"mtnlg serve: {name} ready on http://{args.host}:{args.port} (tp={world}, {device}, "
                  f"{str(dtype).replace('torch.', '')}, context {max_len}, max batch {config.max_batch}, "
                  f"chat template: {template_from})", flush=True)
        except UserError as err:
            failure.append(str(err))
            state.load_error = str(err)
            server.should_exit = True
        except BaseException as err:  # noqa: BLE001 - shown as one line; --debug is for the CLI path
            failure.append(f"{type(err).__name__}: {err}")
            state.load_error = failure[-1]
            server.should_exit = True

    loader = threading.Thread(target=load, name="mtnlg-load", daemon=True)
    loader.start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a normal stop
        print("mtnlg serve: stopped", flush=True)
    finally:
        loader.join(timeout=600)
        if state.engine is not None:
            state.engine.stop()  # also releases the other tensor-parallel ranks
    if failure:
        raise UserError(failure[0])
    if not server.started:
        print(f"mtnlg serve: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    return 0
