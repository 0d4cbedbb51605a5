import gzip
import json

import pytest
import zstandard
from datahelpers import preprocess_args, write_jsonl

from mtnlg.data.preprocess import run
from mtnlg.data.readers import expand_inputs, read_documents, shard_files
from mtnlg.errors import UserError

GOOD = "The members of the assembly have agreed that the budget will be balanced with care. " * 8


def collect(files, key="text"):
    problems = []
    docs = list(read_documents(files, key, problems.append))
    return docs, problems


def test_compressed_and_plain_inputs_are_streamed(tmp_path):
    records = [json.dumps({"text": f"{GOOD} number {i}"}) for i in range(3)]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("\n".join(records).encode()))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(records).encode()))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text(GOOD)
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    files = expand_inputs([str(tmp_path)])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.jsonl.gz", "b.jsonl.zst", "c.txt"]
    docs, problems = collect(files)
    assert problems == [] and len(docs) == 7
    assert docs[4].line == 2 and docs[6].text == GOOD


def test_custom_text_key(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": GOOD}])
    docs, problems = collect([path], key="body")
    assert len(docs) == 1 and not problems


@pytest.mark.parametrize("line, kind", [
    (b'{"text": "unterminated', "invalid_json"),
    (b'{"title": "no text here"}', "missing_key"),
    (b'["a", "list"]', "missing_key"),
    (b'{"text": 42}', "not_text"),
    (b'{"text": "caf\xe9 latin-1 bytes"}', "invalid_utf8"),
    (b'{"text": "   \\n  "}', "empty"),
])
def test_each_bad_record_is_reported_with_file_and_line(tmp_path, line, kind):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": GOOD}).encode()
    path.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
    docs, problems = collect([str(path)])
    assert len(docs) == 2  # the good records around the bad one survive
    assert [(p.kind, p.line) for p in problems] == [(kind, 2)]
    assert str(problems[0]).startswith(f"{path}:2: {kind}")


def test_truncated_gzip_is_reported_not_raised(tmp_path):
    data = gzip.compress((json.dumps({"text": GOOD}) + "\n").encode() * 200)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    docs, problems = collect([str(path)])
    assert [p.kind for p in problems] == ["unreadable"]


def test_missing_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        expand_inputs([str(tmp_path / "nope.jsonl")])


def test_bad_input_is_counted_in_report_and_strict_fails(tmp_path, tokenizer_path, capsys):
    lines = [json.dumps({"text": GOOD + f" {i}."}) for i in range(4)]
    lines[1] = "{not json"
    lines[2] = json.dumps({"other": 1})
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n' + b'{"text": ""}\n')
    out = str(tmp_path / "out")
    args = preprocess_args("--input", str(path), "--output", out, "--tokenizer", tokenizer_path, "--dedup", "none",
                          "--no-filters")
    args.quiet = False
    assert run(args) == 0
    report = json.load(open(out + ".report.json"))
    assert report["malformed_by_kind"] == {"invalid_json": 1, "missing_key": 1, "invalid_utf8": 1, "empty": 1}
    assert report["malformed"] == 4 and report["documents_in"] == 6 and report["documents_out"] == 2
    err = capsys.readouterr().err
    assert f"{path}:2: invalid_json" in err and f"{path}:5: invalid_utf8" in err
    strict = preprocess_args("--input", str(path), "--output", str(tmp_path / "s"), "--tokenizer",
                             tokenizer_path, "--strict")
    with pytest.raises(UserError, match=r"mixed.jsonl:2: invalid_json"):
        run(strict)
    assert not (tmp_path / "s.idx").exists() and not list(tmp_path.glob("s.*tmp*"))


def test_shards_partition_the_files(tmp_path):
    files = []
    for i in range(7):
        (tmp_path / f"f{i}.txt").write_text("x" * (100 * (i + 1)))
        files.append(str(tmp_path / f"f{i}.txt"))
    parts = [shard_files(files, s, 3) for s in range(3)]
    assert sorted(sum(parts, [])) == sorted(files) and all(parts)
    assert parts == [shard_files(files, s, 3) for s in range(3)]
