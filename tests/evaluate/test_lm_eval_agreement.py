"""Our scorer and prompt formats against lm-evaluation-harness on the same
model and examples: lm-eval's own HF backend (HFLM) scoring a small, randomly
initialised GPT-2 through lm-eval's task code, versus (1) our harness on the
same model (``mtnlg eval --hf``) and (2) lm-eval driving our registered
``mtnlg`` model class.  The model's 128-token context truncates the LAMBADA passages,
so left truncation is compared too."""
import os

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

TASKS = {"lambada": "lambada_openai_local", "piqa": "piqa_local", "winogrande": "winogrande_local"}
LIMIT = 6


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, sotu_small):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{sotu_small}.tokenizer.json", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=128, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    d = tmp_path_factory.mktemp("hf")
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def lm_eval_runs(hf_dir, tmp_path_factory):
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mtnlg.evaluate.lm_eval_adapter  # noqa: F401 - registers "mtnlg"
    from mtnlg.evaluate.lm_eval_tasks import write_task_yamls
    # only our task files (indexing lm-eval's thousands of built-in YAMLs takes ~40 s here), first rows only
    tm = TaskManager(include_path=write_task_yamls(tmp_path_factory.mktemp("tasks"), max_rows=LIMIT),
                     include_defaults=False)
    hflm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(hf_dir), tokenizer=AutoTokenizer.from_pretrained(hf_dir),
                batch_size=4, device="cpu")
    theirs = lm_eval.simple_evaluate(model=hflm, tasks=list(TASKS.values()), limit=LIMIT, task_manager=tm,
                                     log_samples=True, bootstrap_iters=0)
    ours_in_lm_eval = lm_eval.simple_evaluate(model="mtnlg", model_args=f"hf={hf_dir},device=cpu",
                                              tasks=list(TASKS.values()), limit=LIMIT, task_manager=tm,
                                              log_samples=True, bootstrap_iters=0)
    return theirs, ours_in_lm_eval


def _lls(result, task):
    """Per-example option log-likelihoods, in document order."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def test_our_harness_equals_lm_eval_hf_backend(hf_dir, lm_eval_runs):
    from mtnlg.evaluate.harness import evaluate
    from mtnlg.evaluate.models import load_hf_lm
    from mtnlg.evaluate.tasks import parse_tasks
    theirs, _ = lm_eval_runs
    ours = evaluate(load_hf_lm(hf_dir, torch.device("cpu")), parse_tasks(list(TASKS)), limit=LIMIT, keep_samples=True)
    assert ours["tasks"]["lambada"]["truncated"] > 0  # truncation is exercised
    for name, task in TASKS.items():
        mine = ours["tasks"][name]
        flat = [x for r in mine["per_example"] for x in r["ll"]]
        assert flat == pytest.approx([x for lls in _lls(theirs, task) for x in lls], abs=1e-4), name
        for metric, value in mine["metrics"].items():
            assert theirs["results"][task][f"{metric},none"] == pytest.approx(value, rel=1e-5), (name, metric)


def test_registered_mtnlg_model_class_equals_lm_eval_hf_backend(lm_eval_runs):
    theirs, ours = lm_eval_runs
    for task in TASKS.values():
        flat = [x for lls in _lls(ours, task) for x in lls]
        assert flat == pytest.approx([x for lls in _lls(theirs, task) for x in lls], abs=1e-4), task
        for key, value in theirs["results"][task].items():
            if key.endswith(",none") and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)


def test_adapter_rolling_and_generation_match_transformers(hf_dir):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtnlg.evaluate.lm_eval_adapter import MtnlgLM
    lm = MtnlgLM(hf=hf_dir, device="cpu", batch_size=2)
    model, tok = AutoModelForCausalLM.from_pretrained(hf_dir).eval(), AutoTokenizer.from_pretrained(hf_dir)
    text = "Fellow citizens of the Senate and of the House of Representatives: " * 6  # longer than 128 tokens
    ids = tok(text)["input_ids"]
    assert len(ids) > 128
    [rolling] = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    # direct: token 0 from end-of-text, then windows of 128 predicted tokens with the maximal context
    full, expect = [tok.eos_token_id] + ids, 0.0
    with torch.no_grad():
        for s in range(1, len(full), 128):
            e = min(s + 128, len(full))
            lo = max(0, e - 129)
            logp = model(torch.tensor([full[lo:e - 1]])).logits[0].log_softmax(-1)
            expect += sum(logp[t - 1 - lo, full[t]].item() for t in range(s, e))
    assert rolling == pytest.approx(expect, abs=1e-3)
    prompt = "The state of the Union"
    [gen] = lm.generate_until([SimpleNamespace(args=(prompt, {"until": ["\n\n"], "max_gen_toks": 8}))])
    p = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(p, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)[0, p.shape[1]:]
    ref_ids = ref.tolist()
    if tok.eos_token_id in ref_ids:
        ref_ids = ref_ids[:ref_ids.index(tok.eos_token_id)]
    assert gen == tok.decode(ref_ids).split("\n\n")[0]


_DP_SCRIPT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
import mtnlg.evaluate.lm_eval_adapter
hf_dir, task_dir, out = sys.argv[1:4]
res = lm_eval.simple_evaluate(model="mtnlg", model_args=f"hf={hf_dir},device=cpu", tasks=%r, limit=%d,
                              task_manager=TaskManager(include_path=task_dir, include_defaults=False), bootstrap_iters=0)
if res is not None:  # rank 0
    json.dump(res["results"], open(out, "w"))
"""


@pytest.mark.slow
def test_lm_eval_with_mtnlg_model_under_torchrun_dp2(hf_dir, lm_eval_runs, tmp_path):
    import json
    import subprocess
    import sys

    from mtnlg.evaluate.lm_eval_tasks import write_task_yamls
    script = tmp_path / "run.py"
    script.write_text(_DP_SCRIPT % (list(TASKS.values()), LIMIT))
    out = tmp_path / "dp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           hf_dir, write_task_yamls(tmp_path / "tasks", max_rows=LIMIT), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    dp2, (theirs, _) = json.loads(out.read_text()), lm_eval_runs
    for task in TASKS.values():
        for key, value in theirs["results"][task].items():
            if key.endswith(",none") and "stderr" not in key:
                assert dp2[task][key] == pytest.approx(value, rel=1e-5), (task, key)
