"""Loss masks and packing, checked against independent computations."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtnlg.config import ModelConfig
from mtnlg.data.tokenizer import load_tokenizer
from mtnlg.finetune.data import encode_record, load_examples
from mtnlg.finetune.pack import FinetuneDataset, build_rows, document_attention
from mtnlg.finetune.template import ChatTemplate
from mtnlg.model.gpt import build_model
from mtnlg.train.trainer import IGNORE_INDEX, cross_entropy_fp32
from ft_helpers import qa_records, write_jsonl

CFG = ModelConfig(n_layers=2, hidden=64, n_heads=4, seq_len=64, vocab_size=512, make_vocab_divisible_by=64)


@pytest.fixture(scope="module")
def tok(sotu_small):
    return load_tokenizer(sotu_small + ".tokenizer.json")


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=3).eval()


def test_targets_are_exactly_the_response_tokens_and_the_end(tok, tmp_path):
    """Independent of the mask code: the counted targets, in order, are the
    tokens of response + EOD of each example (from tokenizing them alone)."""
    records = [{"prompt": "The Congress shall have power", "response": " to lay and collect taxes"},
               {"prompt": "Question: who signs bills?", "response": " The President"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    examples, report = load_examples(str(path), tok, ChatTemplate(), CFG.seq_len + 1)
    ds = FinetuneDataset(build_rows(examples, CFG.seq_len + 1, tok.eod_id, pack=True), seed=0, shuffle=False)
    assert len(ds) == 1  # both fit into one row
    x, y = ds.batch(0, 1, torch.device("cpu"))
    counted = y[y != IGNORE_INDEX].tolist()
    expect = tok.encode(" to lay and collect taxes") + [tok.eod_id] + tok.encode(" The President") + [tok.eod_id]
    assert sorted(counted) == sorted(expect) and len(counted) == len(expect)
    assert report.loss_tokens == len(expect) == ds.loss_tokens(0, 1)
    # and each counted target is predicted from inside its own example, right after its prompt
    for r in records:
        p, resp = tok.encode(r["prompt"]), tok.encode(r["response"]) + [tok.eod_id]
        row = x["x"][0].tolist() + [int(ds.rows.tokens[0, -1])]
        start = next(i for i in range(len(row)) if row[i:i + len(p)] == p)
        assert y[0, start + len(p) - 1: start + len(p) + len(resp) - 1].tolist() == resp
        assert (y[0, start: start + len(p) - 1] == IGNORE_INDEX).all()


def test_changing_prompt_targets_leaves_the_loss_changing_response_targets_does_not(tok, model, tmp_path):
    """The plant: the same inputs scored against targets taken from a copy of
    the rows in which one prompt token (resp. one response token) was changed."""
    path = write_jsonl(tmp_path / "d.jsonl", qa_records(12))
    examples, _ = load_examples(str(path), tok, ChatTemplate(), CFG.seq_len + 1)
    rows = build_rows(examples, CFG.seq_len + 1, tok.eod_id, pack=True)
    ds = FinetuneDataset(rows, seed=0, shuffle=False)
    x, y = ds.batch(0, len(ds), torch.device("cpu"))
    with torch.no_grad():
        logits = model(x["x"], start=x["start"], mask=x["mask"]).flatten(0, 1)

    def loss_with_target_token_changed(r, t):
        other = copy.deepcopy(rows)
        other.tokens[r, t] = (other.tokens[r, t] + 7) % CFG.vocab_size
        _, y2 = FinetuneDataset(other, seed=0, shuffle=False).batch(0, len(ds), torch.device("cpu"))
        return cross_entropy_fp32(logits, y2.flatten(), denom=float((y2 != IGNORE_INDEX).sum()))

    base = cross_entropy_fp32(logits, y.flatten(), denom=float((y != IGNORE_INDEX).sum()))
    prompt_pos = [(r, t) for r, t in zip(*np.nonzero(~rows.train & (rows.doc >= 0))) if t > 0]
    reply_pos = [(r, t) for r, t in zip(*np.nonzero(rows.train)) if t > 0 and rows.doc[r, t] == rows.doc[r, t - 1]]
    assert len(prompt_pos) > 50 and len(reply_pos) > 20
    for r, t in prompt_pos[::9]:
        assert torch.equal(loss_with_target_token_changed(r, t), base)
    for r, t in reply_pos[::5]:
        assert not torch.equal(loss_with_target_token_changed(r, t), base)
    # and the gradient reaches no prompt position's logits
    logits.requires_grad_(True)
    cross_entropy_fp32(logits, y.flatten(), denom=1.0).backward()
    grad_rows = logits.grad.abs().sum(-1).view(y.shape)
    assert torch.equal(grad_rows != 0, y != IGNORE_INDEX)


def test_loss_is_the_mean_over_response_tokens_computed_independently(tok, model, tmp_path):
    """cross_entropy with the trainer's denominator == mean of -log p(response
    token) from each example run alone, with the prompt/response split taken
    from tokenizing the two fields separately."""
    records = qa_records(9)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    examples, _ = load_examples(str(path), tok, ChatTemplate(), CFG.seq_len + 1)
    ds = FinetuneDataset(build_rows(examples, CFG.seq_len + 1, tok.eod_id, pack=True), seed=0, shuffle=False)
    x, y = ds.batch(0, len(ds), torch.device("cpu"))
    with torch.no_grad():
        ours = cross_entropy_fp32(model(x["x"], start=x["start"], mask=x["mask"]).flatten(0, 1), y.flatten(), denom=ds.loss_tokens(0, len(ds)))
        nll = []
        for r in records:
            ids, mask = encode_record(*(("pair", (r["prompt"], r["response"])) if "prompt" in r
                                        else ("chat", r["messages"])), tok, ChatTemplate())
            logp = F.log_softmax(model(torch.tensor([ids[:-1]])).double(), -1)[0]
            nll += [-logp[i - 1, ids[i]].item() for i in range(1, len(ids)) if mask[i]]
    assert ours.item() == pytest.approx(float(np.mean(nll)), rel=1e-5)


def test_packed_example_logits_equal_the_example_alone(tok, model, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_records(20))
    examples, _ = load_examples(str(path), tok, ChatTemplate(), CFG.seq_len + 1)
    rows = build_rows(examples, CFG.seq_len + 1, tok.eod_id, pack=True)
    assert len(rows) < len(examples) / 1.5  # several examples per row
    x, _ = FinetuneDataset(rows, seed=0, shuffle=False).batch(0, len(rows), torch.device("cpu"))
    worst = 0.0
    with torch.no_grad():
        packed = model(x["x"], start=x["start"], mask=x["mask"])
        unmasked = model(x["x"])  # the same rows with plain causal attention
        for r in range(len(rows)):
            for d in sorted(set(rows.doc[r, :-1].tolist()) - {-1}):
                idx = np.nonzero(rows.doc[r, :-1] == d)[0]
                alone = model(torch.from_numpy(rows.tokens[r, idx].astype(np.int64))[None])[0]
                worst = max(worst, (packed[r, idx] - alone).abs().max().item())
                if d > 0:  # without the document mask later examples would see earlier ones
                    assert (unmasked[r, idx] - alone).abs().max().item() > 1e-2
    assert worst < 1e-5, worst  # observed ~3e-7 (fp32; different attention kernels)


def test_document_attention_positions_and_mask():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1, -1]])
    pos, mask = document_attention(doc)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False]
    assert mask[0, 0, 2].tolist() == [True, True, True, False, False, False, False]


def test_padding_mode_rows_and_best_fit_packing(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_records(30))
    examples, _ = load_examples(str(path), tok, ChatTemplate(), CFG.seq_len + 1)
    padded = build_rows(examples, CFG.seq_len + 1, tok.eod_id, pack=False)
    packed = build_rows(examples, CFG.seq_len + 1, tok.eod_id, pack=True)
    assert len(padded) == len(examples) and (padded.doc <= 0).all()
    # every example appears exactly once in the packing, whole
    assert (packed.doc >= 0).sum() == sum(len(e.ids) for e in examples)
    assert sorted(tuple(packed.tokens[r][packed.doc[r] == d]) for r in range(len(packed))
                  for d in set(packed.doc[r].tolist()) - {-1}) == sorted(tuple(e.ids) for e in examples)
    # padded rows go to the model as plain tokens (exact under causal attention), packed as kwargs
    x, y = FinetuneDataset(padded, 0, document_mask=False).batch(0, 4, torch.device("cpu"))
    assert isinstance(x, torch.Tensor) and x.shape == (4, CFG.seq_len)
    assert FinetuneDataset(padded, 0).loss_tokens(0, len(padded)) == FinetuneDataset(packed, 0).loss_tokens(
        0, len(packed))


def test_epochs_reshuffle_rows_deterministically(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_records(30))
    examples, _ = load_examples(str(path), tok, ChatTemplate(), CFG.seq_len + 1)
    ds = FinetuneDataset(build_rows(examples, CFG.seq_len + 1, tok.eod_id, pack=False), seed=5)
    n = len(ds)
    first, second = ds.indices(0, n), ds.indices(n, n)
    assert sorted(first) == sorted(second) == list(range(n)) and not np.array_equal(first, second)
    assert np.array_equal(FinetuneDataset(ds.rows, seed=5).indices(n, n), second)
