"""Decontamination (MT-NLG rules) with planted evaluation text: exact cut
positions, short pieces dropped, over-split documents dropped, counts in the
preprocess report, and the evaluation text absent from the written dataset."""
import json

import pytest

from mtnlg.data.decontaminate import DecontamConfig, Decontaminator, build, decontaminate_documents
from mtnlg.errors import UserError

EVAL = "The quick brown fox jumps over the lazy dog while thirteen words are being counted here today"


def filler(n_words: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n_words))


def make(texts=(EVAL,)) -> Decontaminator:
    d = Decontaminator(DecontamConfig())
    d.add_texts("eval", texts)
    return d


def test_match_is_cut_with_200_chars_each_side():
    left, right = filler(150, "a"), filler(150, "b")
    doc = f"{left} {EVAL[4:40].upper()}{EVAL[40:]}, {right}"  # case and punctuation do not hide a match
    start = doc.index("QUICK")
    end = doc.index("today") + len("today")
    d = make()
    assert d.pieces(doc) == [doc[:start - 200], doc[end + 200:]]
    r = d.report()
    # 16 shared words = 4 overlapping 13-word windows, merged into one cut
    assert r["documents_contaminated"] == 1 and r["pieces_out"] == 2 and r["matches_by_source"]["eval"] == 4
    assert r["chars_removed"] == (end - start) + 400


def test_twelve_shared_words_are_not_a_match():
    doc = filler(100, "a") + " " + " ".join(EVAL.split()[:12]) + " " + filler(100, "b")
    assert make().pieces(doc) == [doc]


def test_short_pieces_and_over_split_documents_are_dropped():
    d = make()
    left = filler(70, "a")
    assert 200 < len(left) + 1 < 400  # what is left of it after the 200-char margin is < 200 chars
    doc = left + " " + EVAL + " " + filler(150, "b")
    assert d.pieces(doc) == [doc[doc.index("today") + 5 + 200:]]
    assert d.counts["pieces_dropped_short"] == 1
    spaced = (" " + filler(200, "x") + " ").join([EVAL] * 11)  # 11 matches, 12 pieces (> 10)
    spaced = filler(200, "s") + " " + spaced + " " + filler(200, "e")
    assert d.pieces(spaced) == []
    assert d.counts["documents_dropped_too_many_pieces"] == 1
    nine = filler(200, "s") + " " + (" " + filler(200, "x") + " ").join([EVAL] * 9) + " " + filler(200, "e")
    assert len(d.pieces(nine)) == 10  # exactly 10 pieces are kept


def test_pieces_become_documents_and_bad_specs_fail():
    from mtnlg.data.readers import Document
    docs = [Document(filler(300, "c"), "f", 1), Document(filler(150, "a") + " " + EVAL + " " + filler(150, "b"), "f", 2)]
    out = list(decontaminate_documents(docs, make()))
    assert len(out) == 3 and out[0] is docs[0] and all(EVAL not in o.text for o in out) and out[2].line == 2
    with pytest.raises(UserError, match="neither a file nor a known task"):
        build("lambda")


def test_preprocess_decontaminates_against_a_task_and_reports(tmp_path):
    from mtnlg.data.preprocess import main as run_preprocess
    from mtnlg.data.indexed import IndexedDataset
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.evaluate.tasks import load_docs
    passage = "".join(load_docs("lambada")[0].pair(0))
    clean = [filler(400, f"c{k}x") for k in range(3)]
    dirty = filler(200, "a") + "\n" + passage + "\n" + filler(200, "b")
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in clean + [dirty]) + "\n")
    out = str(tmp_path / "out")
    assert run_preprocess(["--input", str(src), "--output", out, "--train-tokenizer", "--vocab-size", "300",
                           "--dedup", "none", "--no-filters", "--quiet", "--workers", "1",
                           "--decontaminate", "lambada"]) == 0
    r = json.loads(open(out + ".report.json").read())["decontamination"]
    assert r["documents_checked"] == 4 and r["documents_contaminated"] == 1 and r["pieces_out"] == 5
    assert r["matches_by_source"]["lambada"] > 0 and r["sources"] == ["lambada"]
    tok = load_tokenizer(out + ".tokenizer.json")
    ds = IndexedDataset(out)
    texts = [tok.decode(ds[i]) for i in range(len(ds))]
    assert len(texts) == 5 and not any("guardian angel" in t for t in texts)
    assert any(t.startswith("a0 a1") for t in texts) and any("b198 b199" in t for t in texts)
