"""The scorer against hand-computed log-likelihoods, lm-eval's tokenization
rules, left truncation, and batching (padding must not change a score)."""
import math

import pytest
import torch

from fake_lms import TableLM, UniformLM
from mtnlg.evaluate.scoring import (GPTAdapter, ScoreStats, encode_pair, rolling_pairs, score_text_pairs,
                                    score_tokens)

PROBS = {"a": [0.5, 0.25, 0.25], "b": [0.1, 0.2, 0.7], "c": [0.6, 0.3, 0.1]}


def test_hand_computed_log_likelihoods_on_a_three_token_vocabulary():
    lm = TableLM(PROBS)
    [(ll, greedy)] = score_text_pairs(lm, [("c", "ab")])
    assert ll == pytest.approx(math.log(0.6) + math.log(0.25), abs=1e-6)  # P(a|c) P(b|a)
    assert not greedy  # after 'a' the argmax is 'a', not 'b'
    [(ll, greedy)] = score_text_pairs(lm, [("b", "ca")])
    assert ll == pytest.approx(math.log(0.7) + math.log(0.6), abs=1e-6) and greedy  # both argmax
    # an empty context starts from the end-of-text token ('c' here)
    [(ll, _)] = score_text_pairs(lm, [("", "a")])
    assert ll == pytest.approx(math.log(0.6), abs=1e-6)


def test_left_truncation_is_counted_and_keeps_the_last_tokens():
    lm = TableLM(PROBS, max_length=3)
    stats = ScoreStats()
    [(ll, _)] = score_text_pairs(lm, [("abcab", "cb")], stats=stats)  # 7 tokens > 3 + 1
    assert stats.truncated == 1 and stats.continuation_cut == 0
    assert ll == pytest.approx(math.log(0.7) + math.log(0.3), abs=1e-6)  # P(c|b) P(b|c): bigram unaffected
    [(ll, _)] = score_text_pairs(lm, [("a", "bcab")], stats=stats)  # continuation of 4 > 3: last 3 scored
    assert stats.truncated == 2 and stats.continuation_cut == 1
    assert ll == pytest.approx(math.log(0.7) + math.log(0.6) + math.log(0.25), abs=1e-6)


def test_trailing_context_spaces_move_to_the_continuation():
    lm = UniformLM()
    assert encode_pair(lm, "Answer: ", "yes") == (list(b"Answer:"), list(b" yes"))
    assert encode_pair(lm, "", "x") == ([256], [ord("x")])
    [(ll, _)] = score_text_pairs(lm, [("Answer:", " yes")])
    assert ll == pytest.approx(-4 * math.log(257), rel=1e-6)


def test_rolling_windows_predict_every_token_once_with_maximal_context():
    lm = TableLM(PROBS, max_length=4)
    text = "abcabcaab"
    pairs = rolling_pairs(lm, text)
    predicted = [t for _, cont in pairs for t in cont]
    assert predicted == lm.encode(text)
    assert all(len(c) + len(x) <= 5 for c, x in pairs)
    total = sum(ll for ll, _ in score_tokens(lm, pairs))
    full = [2] + lm.encode(text)
    expect = sum(math.log(PROBS["abc"[p]][n]) for p, n in zip(full, full[1:]))
    assert total == pytest.approx(expect, abs=1e-5)


class _CharTok:
    eod_id = 0

    def encode(self, text):
        return [1 + (ord(ch) % 60) for ch in text]


def test_gpt_scores_do_not_depend_on_batching_and_match_a_direct_forward():
    from mtnlg.config import ModelConfig
    from mtnlg.model.gpt import build_model
    cfg = ModelConfig(n_layers=2, hidden=32, n_heads=4, seq_len=24, vocab_size=64, make_vocab_divisible_by=64)
    model = build_model(cfg, seed=3).eval()
    lm = GPTAdapter(model, _CharTok(), torch.device("cpu"))
    pairs = [("The cat", " sat"), ("A much longer context here", " and more"), ("x", " y"),
             ("way too long a context for twenty-four tokens", " end")]
    one = score_text_pairs(lm, pairs, batch_size=1)
    four = score_text_pairs(lm, pairs, batch_size=4)
    for (a, ga), (b, gb) in zip(one, four):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    # direct: log-softmax of one forward over the unpadded sequence
    ctx, cont = lm.encode("The cat"), lm.encode(" sat")
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(seq[:, :-1]).log_softmax(-1)[0]
    direct = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    assert one[0][0] == pytest.approx(direct, abs=1e-5)
