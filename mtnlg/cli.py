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
    "checkpoint": ("mtnlg.train.checkpoint_cmd", "verify checkpoints, or convert old single-file ones to sharded DCP"),
    "export": ("mtnlg.convert.export_cmd", "write a run's checkpoint as a Hugging Face GPT-2 directory"),
    "import": ("mtnlg.convert.import_cmd", "make a run directory from a Hugging Face GPT-2 directory"),
    "eval": ("mtnlg.evaluate.cli", "perplexity of a run on its data splits or a text file; zero-/few-shot task accuracy (--tasks)"),
    "lm-eval": ("mtnlg.evaluate.lm_eval_cmd", "lm-evaluation-harness with the mtnlg model and offline tasks registered"),
    "serve": ("mtnlg.serve.cli", "serve a model over HTTP: Megatron's PUT /api and OpenAI's /v1 API, continuous batching"),
    "plan": ("mtnlg.plan", "predict memory, FLOPs and time of a layout; search the best 3D layout"),
}

PASS_THROUGH = {"lm-eval"}  # commands that hand unknown arguments to another program


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless it has none worth showing or its help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        boring = action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings
        if boring or "default" in text.lower() or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


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
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)
        if wanted is None or name == wanted:  # import only the module we run (or all, for --help)
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in PASS_THROUGH:
        parser.parse_args(argv)  # reports the unrecognized arguments and exits
    args.passthrough = extra
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
