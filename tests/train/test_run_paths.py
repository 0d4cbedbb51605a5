"""Run directories do not depend on the working directory: data paths are
recorded absolutely when the run is created; runs made before that keep
working from the directory they were made in and explain themselves elsewhere."""
import os
from pathlib import Path

import pytest

from trainhelpers import read_metrics, tiny_overrides, train
from mtnlg.cli import main as mtnlg_main
from mtnlg.config import load_config
from mtnlg.errors import UserError

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.toml")


@pytest.fixture
def project(tmp_path, sotu_small):
    """A project directory holding data/ (the fixture dataset) and a sibling 'elsewhere'."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(Path(sotu_small).parent, tmp_path / "proj" / "data")
    name = Path(sotu_small).name
    over = tiny_overrides(f"data/{name}", **{"train.steps": 4})
    return tmp_path, over


def test_run_made_with_relative_paths_works_from_elsewhere(project, monkeypatch, capsys):
    tmp, over = project
    monkeypatch.chdir(tmp / "proj")
    train("runs/r", over, stop_after=2, config=CONFIG)
    cfg = load_config(tmp / "proj/runs/r/config.toml")
    assert os.path.isabs(cfg.data.blend[0][1]) and os.path.isabs(cfg.data.tokenizer)
    monkeypatch.chdir(tmp / "elsewhere")
    assert train(tmp / "proj/runs/r", [], config=None) == 0  # resumes and finishes
    assert [r["step"] for r in read_metrics(tmp / "proj/runs/r")] == [1, 2, 3, 4]
    capsys.readouterr()
    assert mtnlg_main(["eval", "--run", str(tmp / "proj/runs/r"), "--json"]) == 0
    assert '"loss"' in capsys.readouterr().out
    # resuming with the (relative) --config again is accepted from the project directory
    monkeypatch.chdir(tmp / "proj")
    assert train("runs/r", over, config=CONFIG) == 0


def test_old_run_with_relative_paths(project, monkeypatch, capsys):
    tmp, over = project
    import mtnlg.train.run as run_mod
    monkeypatch.setattr(run_mod, "absolute_data_paths", lambda cfg: cfg)  # what older versions recorded
    monkeypatch.chdir(tmp / "proj")
    train("runs/old", over, stop_after=2, config=CONFIG)
    monkeypatch.undo()
    assert not os.path.isabs(load_config(tmp / "proj/runs/old/config.toml").data.blend[0][1])
    monkeypatch.chdir(tmp / "elsewhere")
    with pytest.raises(UserError, match="relative to the directory the run was created in"):
        train(tmp / "proj/runs/old", [], config=None)
    capsys.readouterr()
    assert mtnlg_main(["eval", "--run", str(tmp / "proj/runs/old")]) == 2
    assert "relative to the directory the run was created in" in capsys.readouterr().err
    monkeypatch.chdir(tmp / "proj")  # from its original directory it still resumes
    assert train("runs/old", [], config=None) == 0
