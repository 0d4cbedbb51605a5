"""The ``mtnlg`` command: a thin dispatch table over subcommands.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Errors meant for people (``UserError``) print as one line; ``--debug`` shows
the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mtnlg.errors import UserError

COMMANDS = {
    "preprocess": ("mtnlg.data.preprocess", "clean, deduplicate and tokenize raw text into indexed datasets"),
    "train": ("mtnlg.train.run", "train a model (resumes an existing run directory)"),
    "finetune": ("mtnlg.finetune.run", "fine-tune a trained model on prompt/response or chat JSONL (loss on replies only)"),
    "generate": ("mtnlg.infer.generate_cmd", "sample text from a trained run"),
    "eval": ("mtnlg.evaluate.perplexity", "loss and perplexity of a trained run on its data splits or a text file"),
    "checkpoint": ("mtnlg.train.checkpoint_cmd", "verify checkpoints, or convert old single-file ones to sharded DCP"),
    "plan": ("mtnlg.plan", "predict memory, FLOPs and time of a layout; search the best 3D layout"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from mtnlg.config import describe_options

    parser = argparse.ArgumentParser(
        prog="mtnlg", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="mtnlg: train, evaluate and serve Megatron-Turing NLG style GPT models.",
        epilog="config keys (for --set KEY=VALUE and TOML files):\n" + describe_options())
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if wanted is None or name == wanted:  # import only the module we run (or all, for --help)
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return importlib.import_module(args.module).run(args) or 0
    except UserError as e:
        if args.debug:
            raise
        print(f"mtnlg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"mtnlg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
