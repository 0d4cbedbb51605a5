"""`mtnlg finetune` end to end: run directory contract, bitwise resume,
token-weighted loss, bad input and chat generation."""
from __future__ import annotations

import json

import pytest
import torch

from ft_helpers import finetune, ft_overrides, qa_records, write_jsonl
from mtnlg.config import load_config
from mtnlg.errors import UserError
from mtnlg.train import checkpoint as ckpt
from trainhelpers import read_metrics


def curve(run_dir):
    return [(r["step"], r["loss"], r.get("val_loss"), r["lr"], r["grad_norm"], r["loss_tokens"])
            for r in read_metrics(run_dir)]


def test_resumed_finetune_is_bitwise_identical(tmp_path, base_run, qa_file):
    over = ft_overrides(**{"model.dropout": 0.1})  # dropout: the RNG state must be restored too
    assert finetune(tmp_path / "full", "--from", base_run, "--data", qa_file, overrides=over) == 0
    assert finetune(tmp_path / "split", "--from", base_run, "--data", qa_file, overrides=over, stop_after=3) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3]
    assert finetune(tmp_path / "split", overrides=[]) == 0  # the run directory alone resumes it
    assert curve(tmp_path / "full") == curve(tmp_path / "split")
    a = ckpt.load_model_state(tmp_path / "full/checkpoints/step_00000006")
    b = ckpt.load_model_state(tmp_path / "split/checkpoints/step_00000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the run directory: train's contract plus the chat template and the data report
    run_dir = tmp_path / "full"
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.toml", "tokenizer.json", "metrics.jsonl", "checkpoints", "chat_template.json",
            "finetune_data.json"} <= names
    cfg = load_config(run_dir / "config.toml")
    assert cfg.model.seq_len == load_config(base_run / "config.toml").model.seq_len and cfg.model.dropout == 0.1
    assert cfg.finetune.data == str(qa_file.resolve()) and cfg.data.blend == []
    report = json.loads((run_dir / "finetune_data.json").read_text())
    assert report["train"]["examples"] == 48 and report["train_examples"] + report["valid_examples"] == 48
    assert read_metrics(run_dir)[-1]["val_loss"] < read_metrics(run_dir)[2]["val_loss"]
    assert finetune(run_dir, overrides=[]) == 0  # finished: a no-op


def test_starts_from_the_init_weights_and_loss_is_token_weighted(tmp_path, base_run, qa_file):
    """Step 1's loss is the base model's mean over the loss tokens of the whole
    global batch, so it cannot depend on how the batch is cut into micro-batches."""
    runs = {}
    for mb in (8, 2):
        over = ft_overrides(**{"train.micro_batch": mb, "train.steps": 2, "train.eval_interval": 0,
                               "train.save_interval": 0})
        assert finetune(tmp_path / f"mb{mb}", "--from", base_run, "--data", qa_file, overrides=over) == 0
        runs[mb] = read_metrics(tmp_path / f"mb{mb}")
    for mb in (2,):
        for a, b in zip(runs[8], runs[mb]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["loss_tokens"] == a["loss_tokens"]
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # independent: the base model's masked loss on the same first 8 rows
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.finetune.run import build_datasets
    from mtnlg.infer.load import load_run
    cfg = load_config(tmp_path / "mb8/config.toml")
    _, base, _ = load_run(base_run)
    train_ds, _, _, _ = build_datasets(cfg, load_tokenizer(str(base_run / "tokenizer.json")),
                                       __import__("mtnlg.finetune.template").finetune.template.ChatTemplate())
    x, y = train_ds.batch(0, 8, torch.device("cpu"))
    with torch.no_grad():
        expect = torch.nn.functional.cross_entropy(base(**x).flatten(0, 1), y.flatten())  # mean over non-ignored
    assert runs[8][0]["loss"] == pytest.approx(expect.item(), rel=1e-5)


def test_padding_mode_trains_like_packing_on_the_first_step(tmp_path, base_run, qa_file):
    """Padded and packed rows hold the same examples; with a global batch of all
    rows the first loss (before any update) is the same number."""
    for mode in ("pack", "pad"):
        extra = ["--no-pack"] if mode == "pad" else []
        n_rows = 36 if mode == "pad" else None
        over = ft_overrides(**{"train.steps": 1, "train.eval_interval": 0, "finetune.valid_fraction": 0.25})
        if n_rows:
            over += ["train.global_batch=36", "train.micro_batch=12"]
        assert finetune(tmp_path / mode, "--from", base_run, "--data", qa_file, *extra, overrides=over) == 0
    rows = json.loads((tmp_path / "pack/finetune_data.json").read_text())["train_rows"]
    assert rows < 36
    over = ft_overrides(**{"train.steps": 1, "train.eval_interval": 0, "train.global_batch": rows,
                           "train.micro_batch": 1})
    assert finetune(tmp_path / "pack2", "--from", base_run, "--data", qa_file, overrides=over) == 0
    assert read_metrics(tmp_path / "pack2")[0]["loss"] == pytest.approx(read_metrics(tmp_path / "pad")[0]["loss"],
                                                                        rel=1e-5)


BAD_LINES = ['{"prompt": "only a prompt"}', '{"text": "pretraining style"}', "not json",
             '{"messages": [{"role": "robot", "content": "hi"}]}', '{"messages": [{"role": "user", "content": "hi"}]}',
             '{"prompt": 3, "response": "x"}']


def test_bad_lines_are_counted_or_refused_under_strict(tmp_path, base_run):
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(24), BAD_LINES)
    over = ft_overrides(**{"train.steps": 1, "train.eval_interval": 0})
    assert finetune(tmp_path / "ok", "--from", base_run, "--data", data, overrides=over) == 0
    report = json.loads((tmp_path / "ok/finetune_data.json").read_text())["train"]
    assert report["examples"] == 24 and report["skipped"] == {"bad_record": 5, "invalid_json": 1}
    with pytest.raises(UserError, match=r"d\.jsonl:25: 'response' is missing \(finetune.strict"):
        finetune(tmp_path / "strict", "--from", base_run, "--data", data, "--strict", overrides=over)
    assert not (tmp_path / "strict").exists()


def test_over_long_examples_are_truncated_and_counted_or_refused(tmp_path, base_run):
    long = {"prompt": "The State of the Union " * 40, "response": " is strong"}
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(12) + [long])
    over = ft_overrides(**{"train.steps": 1, "train.eval_interval": 0, "finetune.valid_fraction": 0.0})
    assert finetune(tmp_path / "ok", "--from", base_run, "--data", data, overrides=over) == 0
    assert json.loads((tmp_path / "ok/finetune_data.json").read_text())["train"]["truncated"] == 1
    with pytest.raises(UserError, match=r"d\.jsonl:13: example of \d+ tokens exceeds the context \(65 tokens"):
        finetune(tmp_path / "strict", "--from", base_run, "--data", data, "--strict", overrides=over)
    assert not (tmp_path / "strict").exists()


def test_empty_or_unusable_inputs_fail_in_one_line_before_writing(tmp_path, base_run, capsys):
    from mtnlg.cli import main
    empty = write_jsonl(tmp_path / "empty.jsonl", [], ["", "   "])
    junk = write_jsonl(tmp_path / "junk.jsonl", [], BAD_LINES[:2])
    good = write_jsonl(tmp_path / "good.jsonl", qa_records(8))
    cases = [
        (["--from", str(base_run), "--data", str(empty)], "holds no usable fine-tuning examples (0 non-blank lines)"),
        (["--from", str(base_run), "--data", str(junk)], "2 non-blank lines, all skipped: line 1: 'response' is missing"),
        (["--from", str(tmp_path), "--data", str(good)], "is not a run directory (no config.toml) nor a Hugging Face"),
        (["--from", str(base_run), "--data", str(tmp_path / "nope.jsonl")], "--data"),
        (["--data", str(good)], "pass --from RUN_OR_HF_DIR and --data FILE.jsonl"),
        (["--from", str(base_run), "--data", str(good), "--step", "7"], "has no checkpoint at step 7"),
        (["--from", str(base_run), "--data", str(good), "--set", "model.hidden=32"], "only model.dropout may be set"),
    ]
    for argv, message in cases:
        assert main(["finetune", "--run", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mtnlg finetune: error:") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()


def test_pipeline_needs_padding_and_resume_refuses_changed_data(tmp_path, base_run, qa_file):
    over = ft_overrides(**{"train.steps": 2, "train.eval_interval": 0})
    with pytest.raises(UserError, match="--no-pack"):
        finetune(tmp_path / "pp", "--from", base_run, "--data", qa_file, overrides=over + ["parallel.pp=2"])
    assert finetune(tmp_path / "r", "--from", base_run, "--data", qa_file, overrides=over, stop_after=1) == 0
    qa_file.write_text(qa_file.read_text() + json.dumps(qa_records(1, seed=9)[0]) + "\n")
    with pytest.raises(UserError, match="changed since this fine-tune started"):
        finetune(tmp_path / "r", overrides=[])
    with pytest.raises(UserError, match="pretraining run, not a fine-tune"):
        finetune(base_run, overrides=[])


def test_chat_generation_and_held_out_scores(tmp_path, base_run, qa_file, capsys, monkeypatch):
    from mtnlg.cli import main
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.finetune import evaluate
    from mtnlg.infer.load import load_run
    valid = write_jsonl(tmp_path / "valid.jsonl", qa_records(10, seed=4))
    over = ft_overrides(**{"train.steps": 2, "train.eval_interval": 0})
    assert finetune(tmp_path / "r", "--from", base_run, "--data", qa_file, "--valid", valid, overrides=over) == 0
    capsys.readouterr()
    assert main(["generate", "--run", str(tmp_path / "r"), "--chat", "Who served the Union?", "--greedy",
                 "--max-new-tokens", "5", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["prompt"] == "Who served the Union?" and isinstance(line["completion"], str)
    import mtnlg.api
    lm = mtnlg.api.from_pretrained(tmp_path / "r", device="cpu")
    conv = [{"role": "user", "content": "Who served the Union?"}]
    assert lm.chat(conv, max_new_tokens=5) == line["completion"]  # the API renders like `generate --chat`
    assert lm.chat([conv, conv], max_new_tokens=5) == [line["completion"]] * 2
    with pytest.raises(UserError, match="no chat template"):
        mtnlg.api.from_pretrained(base_run, device="cpu").chat(conv)
    assert main(["generate", "--run", str(base_run), "--chat", "hi"]) == 2
    assert "has no chat_template.json" in capsys.readouterr().err
    # the held-out response loss (padded, one example per row) is the trainer's packed val_loss
    _, model, tok = load_run(tmp_path / "r")
    records = [json.loads(x) for x in valid.read_text().splitlines()]
    loss, n = evaluate.response_loss(model, tok, records)
    assert loss == pytest.approx(read_metrics(tmp_path / "r")[-1]["val_loss"], rel=1e-5)
    assert n == json.loads((tmp_path / "r/finetune_data.json").read_text())["valid"]["loss_tokens"]
    # exact match: the reply is cut at the first newline and normalised (case, punctuation, articles)
    reply = tok.encode(" The  Senate.\nand more") + [tok.eod_id]
    monkeypatch.setattr("mtnlg.infer.generate.generate",
                        lambda m, x, n, **kw: torch.cat([x, torch.tensor([reply])], 1))
    recs = [{"prompt": "Q?", "response": " x", "answers": ["senate", "Upper house"]},
            {"prompt": "Q?", "response": " the senate!"},
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "House"}]}]
    em, preds = evaluate.exact_match(model, tok, recs)
    assert [p.correct for p in preds] == [True, True, False] and preds[0].prediction == "The  Senate."
    assert em == pytest.approx(2 / 3)


def test_init_from_a_hugging_face_directory_equals_init_from_the_run(tmp_path, base_run, qa_file):
    """Export the base run to a Hugging Face GPT-2 directory, fine-tune from that
    directory: the same weights, hence the same first steps as from the run."""
    hf = pytest.importorskip("mtnlg.convert.hf")
    hf.export_run(base_run, tmp_path / "hf")
    over = ft_overrides(**{"train.steps": 2, "train.eval_interval": 0})
    assert finetune(tmp_path / "from_run", "--from", base_run, "--data", qa_file, overrides=over) == 0
    assert finetune(tmp_path / "from_hf", "--from", tmp_path / "hf", "--data", qa_file, overrides=over) == 0
    a, b = read_metrics(tmp_path / "from_run"), read_metrics(tmp_path / "from_hf")
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["loss_tokens"] == x["loss_tokens"]
    assert load_config(tmp_path / "from_hf/config.toml").finetune.init == str((tmp_path / "hf").resolve())
    assert not (tmp_path / "from_hf/init").exists()  # read in place, not copied
