"""benchmarks/bench_optimizer.py: the three implementations of a model's optimiser step."""

import json

import torch

from benchmarks import bench_optimizer


def test_one_round_of_each_implementation(tmp_path):
    out = tmp_path / "o.json"
    bench_optimizer.main(
        ["--models", "mtl_baseline", "--optimizers", "sgd", "--rounds", "1", "--out", str(out)]
    )
    (r,) = json.loads(out.read_text())["results"]
    assert set(r["median_s"]) == {"loop", "foreach", "fused"} and r["fused_over_loop"] > 0


def test_implementations_are_what_they_say():
    model = torch.nn.Conv2d(3, 4, 3)
    assert bench_optimizer._optimizer(model, "adam", "fused").defaults["fused"]
    assert not bench_optimizer._optimizer(model, "adam", "loop").defaults.get("fused")
    assert bench_optimizer._optimizer(model, "sgd", "foreach").param_groups[0]["foreach"]
