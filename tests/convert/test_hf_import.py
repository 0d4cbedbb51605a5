"""`mtnlg import`: a GPT-2 built and saved by `transformers` itself becomes a
run directory that computes its logits, exports back to the same bytes, and
continues pretraining from exactly its weights."""
import json
import shutil

import numpy as np
import pytest
import torch
from hfhelpers import hf_gpt2, sotu_texts

transformers = pytest.importorskip("transformers")

from mtnlg.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(exported, tmp_path_factory):
    d = tmp_path_factory.mktemp("hfsrc") / "gpt2"
    model = hf_gpt2(d, exported)
    return d, model


def test_import_logits_and_bitwise_round_trip(hf_dir, tmp_path, capsys):
    src, model = hf_dir
    assert main(["import", "--hf", str(src), "--out", str(tmp_path / "run")]) == 0
    assert "mtnlg import:" in capsys.readouterr().out
    from mtnlg.infer.load import load_run
    cfg, ours, tok = load_run(tmp_path / "run")
    assert (cfg.model.ffn, cfg.model.seq_len, cfg.model.n_heads, ours.vocab_size) == (200, 96, 3, 512)
    x = torch.tensor([tok.encode(t)[:96] for t in sotu_texts(2)])
    with torch.no_grad():
        diff = (ours(x) - model(x).logits).abs().max().item()
    assert diff <= 1e-4, diff  # HF uses gelu_new (a Python tanh GELU), we F.gelu(tanh): ~1e-6 observed
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    a, b = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "back"))
    for key in ("n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size", "layer_norm_epsilon"):
        assert a[key] == b[key], key


def test_import_with_megatron_vocab_padding(hf_dir, tmp_path, capsys):
    """--set model.make_vocab_divisible_by (x parallel.tp) pads the table with mean-embedding
    rows: real-token logits unchanged, padding mass bounded by rows/V, export trims back to the bytes."""
    from mtnlg.infer.load import load_run
    src, model = hf_dir
    assert main(["import", "--hf", str(src), "--out", str(tmp_path / "run"),
                 "--set", "model.make_vocab_divisible_by=100"]) == 0  # 3 heads: tp=2 is not a layout here
    assert "(table padded to 600 rows)" in capsys.readouterr().out
    _, ours, tok = load_run(tmp_path / "run")
    emb = ours.tok_emb.weight
    assert emb.shape[0] == 600 and torch.equal(emb[512:], emb[:512].mean(0, keepdim=True).expand(88, -1))
    x = torch.tensor([tok.encode(sotu_texts(1)[0])[:90]])
    with torch.no_grad():
        logits = ours(x)
        assert (logits[..., :512] - model(x).logits).abs().max().item() <= 1e-4
        pad_mass = logits.softmax(-1)[..., 512:].sum(-1).max().item()
    assert 0 < pad_mass <= 88 / 512
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_bare_gpt2model_directory_loads(hf_dir, tmp_path):
    """A GPT2Model (no LM head, keys without `transformer.`) loads with the tied head."""
    import mtnlg
    src, model = hf_dir
    model.transformer.save_pretrained(tmp_path / "bare")
    shutil.copyfile(src / "tokenizer.json", tmp_path / "bare" / "tokenizer.json")
    lm = mtnlg.from_pretrained(tmp_path / "bare")
    x = torch.tensor([lm.tokenizer.encode(sotu_texts(1)[0])[:50]])
    with torch.no_grad():
        assert (lm.model(x) - model(x).logits).abs().max().item() <= 1e-4


def test_sharded_and_pickled_weights_load(hf_dir, tmp_path):
    """Weights as a sharded safetensors index, or as pytorch_model.bin, load alike."""
    import mtnlg
    from mtnlg.convert.hf_files import write_safetensors
    src, model = hf_dir
    x = torch.tensor([mtnlg.from_pretrained(src).tokenizer.encode(sotu_texts(1)[0])[:60]])
    with torch.no_grad():
        ref = model(x).logits
    state = model.state_dict()
    for kind in ("sharded", "bin"):
        d = tmp_path / kind
        shutil.copytree(src, d)
        (d / "model.safetensors").unlink()
        if kind == "bin":
            torch.save(state, d / "pytorch_model.bin")
        else:
            keys = [k for k in state if k != "lm_head.weight"]
            assert len(write_safetensors(d, ((k, state[k]) for k in keys), 20_000)["files"]) > 3
        lm = mtnlg.from_pretrained(d)
        with torch.no_grad():
            assert (lm.model(x) - ref).abs().max().item() <= 1e-4, kind


def test_imported_run_continues_pretraining_from_the_hf_weights(hf_dir, sotu_small, tmp_path):
    """The first training step's loss is HF's loss on the same batch: training starts from its weights."""
    from trainhelpers import read_metrics, train

    from mtnlg.config import load_config
    from mtnlg.train.run import build_data
    src, model = hf_dir
    sets = {"data.blend": f'[[1.0, "{sotu_small}"]]', "data.split": "[0.9, 0.05, 0.05]", "train.steps": 2,
            "train.global_batch": 4, "train.micro_batch": 2, "train.precision": "fp32", "train.eval_interval": 0,
            "train.save_interval": 2, "logging.progress_bar": "never", "logging.log_interval": 1,
            "logging.peak_tflops": 1.0, "model.dropout": 0.0, "optim.warmup_steps": 1}
    argv = ["import", "--hf", str(src), "--out", str(tmp_path / "run")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    assert train(tmp_path / "run", [], config=None) == 0
    first = read_metrics(tmp_path / "run")[0]
    assert first["step"] == 1
    train_ds = build_data(load_config(tmp_path / "run" / "config.toml"))[0]
    rows = torch.from_numpy(np.stack([train_ds[i] for i in range(4)]).astype(np.int64))
    with torch.no_grad():
        logits = model(rows[:, :-1]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()
    assert first["loss"] == pytest.approx(hf_loss, abs=1e-4)
    assert main(["generate", "--run", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "5",
                 "--greedy"]) == 0


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "holds a 'llama' model (LlamaForCausalLM)"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
])
def test_other_architectures_are_refused(hf_dir, tmp_path, capsys, change, message):
    src, _ = hf_dir
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **change}))
    assert main(["import", "--hf", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("mtnlg import: error:") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_bad_inputs_leave_nothing_behind(hf_dir, noisy_run, tmp_path, capsys):
    src, _ = hf_dir
    notok = tmp_path / "notok"
    shutil.copytree(src, notok)
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        (notok / f).unlink()
    assert main(["import", "--hf", str(notok), "--out", str(tmp_path / "a")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    untied = tmp_path / "untied"
    model = hf_gpt2(untied, src, tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert main(["import", "--hf", str(untied), "--out", str(tmp_path / "a")]) == 2
    assert "untied output embedding" in capsys.readouterr().err
    assert main(["import", "--hf", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", "--run", str(noisy_run), "--out", str(tmp_path / "full")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert main(["export", "--run", str(noisy_run), "--step", "3", "--out", str(tmp_path / "b")]) == 2
    assert "no checkpoint for step 3 (available: [7])" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
