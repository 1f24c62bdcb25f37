"""A training process killed with SIGKILL, at random moments and in the middle of a checkpoint
save, resumes to the same final weights, bit for bit, as a run that was never interrupted."""

import random
import subprocess
import sys
import time

import pytest
import torch
import yaml

from mtlfast.train import Trainer
from mtlfast.train.config import config_to_dict

from .helpers import tiny_config

# runs the CLI with a pause inside every checkpoint save, between the temporary file and the replace
RUNNER = """
import sys, time
from mtlfast.train import checkpoint
from mtlfast.train.cli import main
delay = float(sys.argv[1])
checkpoint._before_replace = (lambda: time.sleep(delay)) if delay else None
sys.exit(main(sys.argv[2:]))
"""


def _start(args, delay=0.0):
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(delay), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError("the training process did not reach the expected point")


def _final_model(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, workers):
    config = tiny_config(
        f"data.num_workers={workers}",
        "train.max_steps=10",
        "train.checkpoint_every=2",
        "train.eval_every=5",
        "train.keep_last=3",
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    Trainer(config, tmp_path / "reference").fit()
    expected = _final_model(tmp_path / "reference")
    rng = random.Random(workers)

    # 1: killed while a checkpoint is being written (its temporary file exists, the replace has not run)
    run = tmp_path / "killed"
    proc = _start(["train", str(path), "--out", str(run)], delay=0.3)
    ckpts = run / "checkpoints"
    saving = lambda: ckpts.is_dir() and any(p.name.endswith(".tmp") for p in ckpts.iterdir())
    assert _wait_for(lambda: saving() and (ckpts / "step_00000002.pt").exists(), proc)
    proc.kill()
    proc.wait()
    # 2: resumed, then killed again at a random moment after its next checkpoint
    proc = _start(["train", "--resume", str(run)])
    assert _wait_for(lambda: (ckpts / "step_00000006.pt").exists(), proc)
    time.sleep(rng.uniform(0.0, 0.5))
    proc.kill()
    proc.wait()
    # 3: resumed to the end
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, "0", "train", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = _final_model(run)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert not [
        p for p in ckpts.iterdir() if p.name.endswith(".tmp")
    ]  # the killed save's file is cleared
    rows = (run / "log.csv").read_text().splitlines()[1:]
    steps = [int(r.split(",")[0]) for r in rows if ",train/loss," in r]
    assert steps == list(range(1, 11))
