"""``mtnlg lm-eval ARGS...``: lm-evaluation-harness's own command line with
the ``mtnlg`` model class registered and the offline ``*_local`` task YAMLs
(mtnlg/evaluate/lm_eval_tasks.py) on its include path.  lm-eval 0.4 discovers
no plugins, so a bare ``lm_eval --model mtnlg`` cannot find the class; this is
that command with it registered:

    mtnlg lm-eval --model mtnlg --model_args run=runs/tiny --tasks lambada_openai_local,piqa_local --limit 100
    mtnlg lm-eval --model hf --model_args pretrained=path/to/hf --tasks hellaswag_local   # lm-eval's own scorer
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mtnlg.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mtnlg-task-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "mtnlg", "lm_eval_tasks"),
                   help="where the offline task YAMLs are written (default ~/.cache/mtnlg/lm_eval_tasks)")
    p.epilog = "every other argument goes to lm-eval (see `lm_eval run -h`)"


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise UserError("lm-eval is not installed; install it with `pip install 'mtnlg[eval]'`") from None
    import mtnlg.evaluate.lm_eval_adapter  # noqa: F401 - registers "mtnlg"
    from mtnlg.evaluate.lm_eval_tasks import write_task_yamls
    rest = [a for a in args.passthrough if a != "--"]
    if not any(a.startswith("--include_path") for a in rest):
        rest += ["--include_path", write_task_yamls(Path(args.mtnlg_task_dir))]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.argv = ["lm_eval"] + rest
    cli_evaluate()
    return 0
