"""The Python API: `mtnlg.from_pretrained(path)` on a run directory and on a
Hugging Face GPT-2 directory, `generate` (HF argument names, batched with left
padding) and `score`, checked against `transformers` and lm-eval's rolling
windows; and the README example, executed as written."""
import contextlib
import io
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "convert"))
from hfhelpers import make_run, sotu_texts  # noqa: E402

import mtnlg  # noqa: E402
from mtnlg.errors import UserError  # noqa: E402

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(sotu_small, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("apirun") / "run", sotu_small + ".tokenizer.json", seq_len=64)


@pytest.fixture(scope="module")
def lm(run):
    return mtnlg.from_pretrained(run)


@pytest.fixture(scope="module")
def hf(run, tmp_path_factory):
    from mtnlg.convert.hf import export_run
    out = tmp_path_factory.mktemp("apihf") / "hf"
    export_run(run, out)
    return out, transformers.AutoModelForCausalLM.from_pretrained(out).eval()


def hf_loglik(model, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    return sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))


def test_score_matches_transformers(lm, hf):
    _, model = hf
    texts = [t[:90] for t in sotu_texts(3)]
    contexts = ["The President said:", "In conclusion,", "Congress"]
    eod = lm.tokenizer.eod_id
    enc = lm.tokenizer.encode
    got = lm.score(texts)
    want = [hf_loglik(model, [eod], enc(t)) for t in texts]
    assert got == pytest.approx(want, abs=1e-3) and max(abs(a - b) for a, b in zip(got, want)) < 1e-3
    got = lm.score(texts, contexts)
    want = [hf_loglik(model, [eod] + enc(c), enc(t)) for c, t in zip(contexts, texts)]
    assert got == pytest.approx(want, abs=1e-3)
    assert isinstance(lm.score("Hello"), float)


def test_long_text_scores_in_lm_eval_rolling_windows(lm, hf):
    from lm_eval.utils import get_rolling_token_windows
    _, model = hf
    text = " ".join(sotu_texts(3))
    ids = lm.tokenizer.encode(text)
    assert len(ids) > 2 * lm.context_length
    windows = list(get_rolling_token_windows(ids, lm.tokenizer.eod_id, lm.context_length, 1))
    assert len(windows) >= 3
    want = sum(_window(model, inputs, targets) for inputs, targets in windows)
    assert lm.score(text) == pytest.approx(want, abs=5e-3)


def _window(model, inputs, targets):
    """An lm-eval window: the last len(targets) positions of `inputs` predict `targets`."""
    with torch.no_grad():
        logp = model(torch.tensor([inputs])).logits[0].double().log_softmax(-1)
    n = len(targets)
    return sum(logp[len(inputs) - n + i, t].item() for i, t in enumerate(targets))


def test_generate_shapes_sampling_beams_and_stop(lm):
    assert "gelu_tanh" in repr(lm) and f"{lm.model.cfg.n_layers} layers" in repr(lm)
    one = lm.generate("The state of the Union", max_new_tokens=8)
    assert isinstance(one, str)
    many = lm.generate(["A", "We must act now"], max_new_tokens=8)
    assert isinstance(many, list) and len(many) == 2
    # batched (left-padded) equals one at a time
    assert many == [lm.generate("A", max_new_tokens=8), lm.generate("We must act now", max_new_tokens=8)]
    s1 = lm.generate(["A", "B"], max_new_tokens=8, do_sample=True, seed=7, num_return_sequences=3, top_p=0.9)
    s2 = lm.generate(["A", "B"], max_new_tokens=8, do_sample=True, seed=7, num_return_sequences=3, top_p=0.9)
    assert s1 == s2 and len(s1) == 2 and all(len(g) == 3 for g in s1)
    assert len(set(s1[0])) > 1  # different samples
    beams = lm.generate("The", max_new_tokens=6, num_beams=4, num_return_sequences=3)
    assert len(beams) == 3 and len(set(beams)) == 3
    from mtnlg.infer.generate import beam_search
    x = torch.tensor([lm.tokenizer.encode("The")])
    best, _ = beam_search(lm.model, x, 6, 4, eos_id=lm.tokenizer.eod_id, gather_logits=lm._logits)
    assert beams[0] == lm.tokenizer.decode([t for t in best[0, x.shape[1]:].tolist() if t != lm.tokenizer.eod_id])
    full = lm.generate("The", max_new_tokens=12, do_sample=True, seed=3)
    stop = full[3:5]
    cut = lm.generate("The", max_new_tokens=12, do_sample=True, seed=3, stop=[stop])
    assert cut == full[:full.index(stop)]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"num_beams": 2, "do_sample": True}, "beam search with sampling"),
    ({"num_return_sequences": 2}, "greedy decoding gives one sequence"),
    ({"do_sample": True, "temperature": 0.0}, "temperature > 0"),
    ({"max_new_tokens": 100}, "exceeds the model's context of 64 tokens"),
])
def test_generate_rejects_bad_arguments(lm, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        lm.generate("The", **{"max_new_tokens": 4, **kwargs})


def test_from_pretrained_on_hf_directory_equals_run(lm, hf):
    path, _ = hf
    lm2 = mtnlg.from_pretrained(path)
    prompts = ["The economy", "Fellow citizens, the state of our Union"]
    assert lm2.generate(prompts, max_new_tokens=16) == lm.generate(prompts, max_new_tokens=16)
    assert lm2.score(prompts) == pytest.approx(lm.score(prompts), abs=1e-4)
    with pytest.raises(UserError, match="neither a run directory"):
        mtnlg.from_pretrained(path.parent)


def test_readme_example_runs(run):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "mtnlg.from_pretrained" in b)
    assert '"runs/tiny"' in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace('"runs/tiny"', repr(str(run))), "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("LanguageModel(") and len(lines) >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_api_on_cuda_matches_cpu(run, lm):
    """The padded attention path on CUDA kernels (fp32; bf16 within its precision)."""
    gpu = mtnlg.from_pretrained(run, device="cuda")
    prompts = ["The economy", "Fellow citizens, the state of our Union", "We"]
    assert gpu.score(prompts) == pytest.approx(lm.score(prompts), abs=1e-3)
    assert gpu.generate(prompts, max_new_tokens=16) == lm.generate(prompts, max_new_tokens=16)
    bf16 = mtnlg.from_pretrained(run, device="cuda", dtype="bf16")
    assert bf16.score(prompts) == pytest.approx(lm.score(prompts), rel=0.05)
    assert len(bf16.generate(prompts, max_new_tokens=16, do_sample=True, seed=0)) == 3
