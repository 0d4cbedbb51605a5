"""``mtnlg plan`` options, JSON and errors."""
import argparse
import json

import pytest

from mtnlg.errors import UserError
from mtnlg.plan import add_arguments, run


def _run(capsys, *argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(list(argv))) == 0
    return capsys.readouterr().out


def test_json_single_layout(capsys):
    out = json.loads(_run(capsys, "--config", "configs/mtnlg-530b.toml", "--gpus", "2240", "--tp", "8",
                          "--pp", "35", "--global-batch", "1920", "--gpu", "a100-80gb", "--json"))
    for key in ("params", "iteration_time_s", "tflops_per_gpu", "memory_per_gpu_gb", "fits"):
        assert key in out
    assert out["fits"] is True and out["layout"]["dp"] == 8


def test_search_table_and_json(capsys):
    text = _run(capsys, "--config", "configs/tiny.toml", "--gpus", "4", "--top", "3")
    assert "fastest first" in text and text.count("\n") >= 5
    out = json.loads(_run(capsys, "--config", "configs/tiny.toml", "--gpus", "4", "--json", "--set",
                          "train.global_batch=32"))
    times = [p["iteration_time_s"] for p in out["layouts"]]
    assert times == sorted(times) and all(p["fits"] for p in out["layouts"])


def test_dry_run_text(capsys):
    text = _run(capsys, "--config", "configs/tiny.toml", "--gpus", "4", "--tp", "2", "--pp", "2",
                "--dry-run", "--rank", "3")
    assert "match" in text and "MISMATCH" not in text


def test_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    _run(capsys, "--config", "configs/tiny.toml", "--gpus", "8", "--plot", str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv", [["--gpus", "12", "--tp", "8", "--pp", "1"],
                                  ["--gpus", "4", "--nodes", "1"],
                                  ["--gpus", "4", "--tp", "3", "--pp", "1"]])
def test_errors_for_people(capsys, argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(UserError):
        run(p.parse_args(["--config", "configs/tiny.toml", *argv]))
