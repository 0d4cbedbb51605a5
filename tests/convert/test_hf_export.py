"""`mtnlg export` against the real `transformers`: the exported directory loads
with AutoModelForCausalLM/AutoTokenizer (no custom code) and computes our
model's logits and greedy tokens.

Observed on this machine (fp32, CPU): logits max |diff| 0.0 unpadded (the same
ops in the same order) and ~1e-6 for left-padded batches (masked attention
path); tolerance 1e-4 as the issue states.  The weights carry noise on every
parameter (hfhelpers.make_run), so a wrong transpose, QKV order, bias or
LayerNorm mapping moves logits by O(0.1) and fails."""
import json

import pytest
import torch
from hfhelpers import sotu_texts

transformers = pytest.importorskip("transformers")

TOL = 1e-4


@pytest.fixture(scope="module")
def hf(exported):
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    return model, tok


@pytest.fixture(scope="module")
def ours(noisy_run):
    from mtnlg.infer.load import load_run
    return load_run(noisy_run)


def test_directory_is_plain_gpt2(exported, noisy_run, hf):
    model, tok = hf
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"] and "auto_map" not in cfg
    assert cfg["activation_function"] == "gelu_pytorch_tanh"
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_inner"], cfg["n_positions"]) == (2, 64, 4, 160, 128)
    assert cfg["vocab_size"] == 512  # trimmed from the 600-row padded table
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    assert model.transformer.wte.weight.shape == (512, 64)
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id == 0
    for name in ("model.safetensors", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (exported / name).is_file()
    assert not list(exported.parent.glob(".*tmp*"))  # the staging directory is gone


def test_tokenizer_matches_ours_on_real_text(hf, ours):
    _, htok = hf
    tok = ours[2]
    texts = sotu_texts(8)
    for text in texts:
        assert htok(text)["input_ids"] == tok.encode(text)
        assert htok.decode(tok.encode(text)) == text



def test_vocab_and_merges_alone_give_the_same_tokenizer(exported, ours, tmp_path):
    """Tools that read GPT-2's vocab.json + merges.txt (no tokenizer.json) tokenize alike."""
    import shutil
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(exported / name, tmp_path / name)
    htok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in sotu_texts(4):
        assert htok(text)["input_ids"] == ours[2].encode(text)


def test_logits_match_transformers_on_real_text(hf, ours):
    model, htok = hf
    cfg, our_model, tok = ours
    ids = [tok.encode(t)[:cfg.model.seq_len] for t in sotu_texts(4)]
    n = min(len(i) for i in ids)
    x = torch.tensor([i[:n] for i in ids])
    with torch.no_grad():
        a = our_model(x)[..., :tok.vocab_size]
        b = model(x).logits
    diff = (a - b).abs().max().item()
    assert diff <= TOL, diff
    assert n >= 100


def test_left_padded_batch_matches_transformers(hf, ours):
    """Our padding path (GPT.forward(pad=...)) against HF's attention_mask + position_ids."""
    model, _ = hf
    cfg, our_model, tok = ours
    rows = [tok.encode(t)[:L] for t, L in zip(sotu_texts(3), (40, 25, 9))]
    width = max(len(r) for r in rows)
    pad = torch.tensor([width - len(r) for r in rows])
    x = torch.tensor([[tok.eod_id] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= pad[:, None]).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = our_model(x, pad=pad)[..., :tok.vocab_size]
        b = model(x, attention_mask=mask, position_ids=pos).logits
        alone = [our_model(torch.tensor([r]))[0, :, :tok.vocab_size] for r in rows]
    for i, r in enumerate(rows):
        real = slice(width - len(r), width)
        assert (a[i, real] - b[i, real]).abs().max().item() <= TOL
        assert (a[i, real] - alone[i]).abs().max().item() <= TOL  # padding changes nothing for real tokens


def test_greedy_64_tokens_identical(hf, noisy_run):
    """Greedy decoding of a left-padded batch (the API's path) gives, token for
    token, what HF generate gives for each prompt alone; the API's text is its decoding."""
    import mtnlg
    from mtnlg.infer.generate import generate
    model, htok = hf
    lm = mtnlg.from_pretrained(noisy_run)
    prompts = [t[:n] for t, n in zip(sotu_texts(3, start=215), (120, 40, 7))]
    rows = [lm.tokenizer.encode(p) for p in prompts]
    width = max(map(len, rows))
    x = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    pad = torch.tensor([width - len(r) for r in rows])
    ours = generate(lm.model, x, 64, greedy=True, pad=pad, gather_logits=lm._logits)[:, width:].tolist()
    texts = lm.generate(prompts, max_new_tokens=64)
    eos = htok.eos_token_id
    for prompt, mine, text in zip(prompts, ours, texts):
        enc = htok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=eos)
        theirs = out[0, enc["input_ids"].shape[1]:].tolist()  # stops after an eos
        assert mine[:len(theirs)] == theirs and (len(theirs) == 64 or theirs[-1] == eos)
        assert text == htok.decode(theirs[:theirs.index(eos)] if eos in theirs else theirs)


def test_bf16_export_and_sharding(noisy_run, tmp_path):
    from safetensors.torch import load_file

    from mtnlg.convert.hf import export_run
    s = export_run(noisy_run, tmp_path / "bf16", dtype="bf16", max_shard_size="100KB")
    assert len(s["files"]) > 1
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(s["files"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    fp32 = export_run(noisy_run, tmp_path / "fp32")
    ref = load_file(str(tmp_path / "fp32" / fp32["files"][0]))
    for k, v in model.state_dict().items():
        if k in ref:
            assert torch.equal(v, ref[k].to(torch.bfloat16)), k


def test_generate_and_eval_commands_take_a_hf_directory(exported, noisy_run, tmp_path, capsys):
    from mtnlg.cli import main
    args = ["--prompt", "The Congress", "--max-new-tokens", "12", "--greedy", "--json"]
    assert main(["generate", "--run", str(exported)] + args) == 0
    import mtnlg
    from_hf = json.loads(capsys.readouterr().out)["completion"]
    assert from_hf == mtnlg.from_pretrained(noisy_run).generate("The Congress", max_new_tokens=12)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(sotu_texts(2)))
    assert main(["eval", "--run", str(exported), "--text", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])
