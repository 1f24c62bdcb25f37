"""The mtlfast command: train a few steps, resume, eval, report, configs."""

import json
import subprocess
import sys

import pytest
import yaml

from mtlfast.train.cli import main
from mtlfast.train.config import config_to_dict

from .helpers import tiny_config


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(tiny_config("train.max_steps=4"))))
    return path


def test_train_resume_eval_report(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(run), "--set", "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "semseg" in out and "constant" in out
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=4"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    capsys.readouterr()
    assert main(["eval", str(run), "--out", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["tasks"] == json.loads((tmp_path / "e.json").read_text())["tasks"]
    best = json.loads((run / "results.json").read_text())["best"]["results"]["tasks"]
    assert (
        evaluated["tasks"] == best
    )  # best.pt holds the recalibrated statistics it was scored with
    assert main(["report", str(run)]) == 0
    assert "depth" in capsys.readouterr().out
    # an existing run is not overwritten
    assert main(["train", str(config_file), "--out", str(run)]) != 0


def test_errors_are_one_line(tmp_path, config_file, capsys):
    assert (
        main(
            ["train", str(config_file), "--set", "train.max_stepz=3", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "train.max_stepz" in capsys.readouterr().err
    assert main(["train", "no_such_config"]) == 2
    assert main(["eval", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_configs_and_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "mtlfast", "configs"], capture_output=True, text=True, check=True
    )
    assert "synthetic" in done.stdout
