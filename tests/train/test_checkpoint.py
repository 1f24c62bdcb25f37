"""Checkpoints: atomic, plain data only, clear errors for truncated or malicious files."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from mtlfast.train import CheckpointError, load_checkpoint, save_checkpoint
from mtlfast.train import checkpoint as ckpt


def test_round_trip_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    state = {"model": {"w": torch.randn(3)}, "step": 4, "nested": {"a": [1, 2.5, None, "x"]}}
    save_checkpoint(state, path)
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 4 and raw["format"] == ckpt.FORMAT
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"model": {}, "step": 1}, path)

    def boom():
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(ckpt, "_before_replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {}, "step": 2}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_named(tmp_path, fraction):
    path = tmp_path / "c.pt"
    save_checkpoint({"model": {"w": torch.randn(1000)}, "step": 1}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mtlfast-exploit-ran",))


def test_code_in_a_pickle_is_refused_and_not_run(tmp_path):
    marker = "/tmp/mtlfast-exploit-ran"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    assert not os.path.exists(marker)
    path.write_bytes(pickle.dumps({"model": _Exploit()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not os.path.exists(marker)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="not a mtlfast checkpoint"):
        load_checkpoint(path)
    torch.save({"step": 1}, path)
    with pytest.raises(CheckpointError, match="no 'model'"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_latest_falls_back_past_a_corrupt_one(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint({"model": {}, "step": step}, tmp_path / f"step_{step:08d}.pt")
    (tmp_path / "step_00000006.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="step_00000006.pt"):
        path, state = ckpt.latest_checkpoint(tmp_path)
    assert state["step"] == 4 and path.name == "step_00000004.pt"
    assert ckpt.latest_checkpoint(tmp_path / "none") is None


def test_rng_states_round_trip_as_plain_data(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng()
    save_checkpoint({"model": {}, "rng": state}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    torch.testing.assert_close(torch.rand(1), expected[2])


def test_written_files_follow_the_umask(tmp_path):
    path = tmp_path / "c.pt"
    old = os.umask(0o022)
    try:
        save_checkpoint({"model": {}}, path)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
