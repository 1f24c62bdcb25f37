"""evaluate() against meters run by hand; precise-BN; the constant predictor."""

import torch
from torch import nn

from mtlfast.data import SyntheticScenes, collate
from mtlfast.metrics import DepthMeter, NormalsMeter, SaliencyMeter, SegmentationMeter
from mtlfast.train import ConstantPredictor, evaluate, recalibrate_batch_norm


class _Fixed(nn.Module):
    """Returns stored predictions batch by batch (what a network would have said)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.i = outputs, 0
        self.bias = nn.Parameter(torch.zeros(()))
        self.out_channels = {"semseg": 5}

    def forward(self, x):
        out = self.outputs[self.i]
        self.i += 1
        return out


def _batches(n=3, size=24, labels=None):
    ds = SyntheticScenes(n * 4, size, seed=5, labels=labels)
    return [collate([ds[4 * b + i] for i in range(4)]) for b in range(n)]


def test_matches_meters_by_hand():
    batches = _batches(labels="random")
    g = torch.Generator().manual_seed(0)
    outputs = [
        {
            "semseg": torch.randn(4, 5, 24, 24, generator=g),
            "saliency": torch.randn(4, 1, 24, 24, generator=g),
            "normals": torch.randn(4, 3, 24, 24, generator=g),
            "depth": torch.rand(4, 1, 24, 24, generator=g) * 8,
        }
        for _ in batches
    ]
    tasks = ["semseg", "saliency", "normals", "depth"]
    got = evaluate(_Fixed(outputs), batches, tasks, dataset="synthetic")
    meters = {
        "semseg": SegmentationMeter(5),
        "saliency": SaliencyMeter(),
        "normals": NormalsMeter(),
        "depth": DepthMeter(),
    }
    for out, batch in zip(outputs, batches):
        for t in tasks:
            rows = batch["labeled"][t]
            if rows.any():
                pred = torch.sigmoid(out[t]) if t == "saliency" else out[t]
                meters[t].update(pred[rows], batch[t][rows])
    for t in tasks:
        expected = meters[t].compute()
        for k, v in expected.items():
            assert got["tasks"][t][k] == (
                v if not isinstance(v, list) else [float(x) for x in v]
            ), (t, k)
    assert got["images"] == 12 and got["delta_m"] is None


def test_delta_m_against_baselines_and_mode_restored(tmp_path):
    batches = _batches(1)
    model = ConstantPredictor.fit(batches, ["semseg", "depth"], {"semseg": 5})
    model.train()
    base = evaluate(model, batches, ["semseg", "depth"], dataset="synthetic")["tasks"]
    (tmp_path / "b.json").write_text(__import__("json").dumps(base))
    again = evaluate(
        model, batches, ["semseg", "depth"], dataset="synthetic", baselines=tmp_path / "b.json"
    )
    assert again["delta_m"] == 0.0 and model.training


def test_constant_predictor_predicts_the_statistics():
    batches = _batches(2)
    model = ConstantPredictor.fit(batches, ["semseg", "normals", "depth", "edge"], {"semseg": 5})
    out = model(torch.zeros(2, 3, 7, 5))
    semseg = torch.cat([b["semseg"].flatten() for b in batches])
    assert out["semseg"].shape == (2, 5, 7, 5)
    assert int(out["semseg"][0, :, 0, 0].argmax()) == int(
        torch.bincount(semseg[semseg != 255]).argmax()
    )
    depth = torch.cat([b["depth"].flatten() for b in batches])
    torch.testing.assert_close(out["depth"][0, 0, 0, 0], depth[depth > 0].mean())
    torch.testing.assert_close(out["normals"][0, :, 0, 0].norm(), torch.tensor(1.0))
    assert float(torch.sigmoid(out["edge"]).min()) > 0.99


def test_recalibration_gives_the_plain_average_of_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.01))
    batches = [{"image": torch.randn(3, 3, 5, 5) * (i + 1)} for i in range(4)]
    model.eval()
    assert recalibrate_batch_norm(model, batches, 3) == 3
    assert not model.training and model[1].momentum == 0.01
    with torch.no_grad():
        feats = [model[0](b["image"]) for b in batches[:3]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert recalibrate_batch_norm(nn.Linear(2, 2), batches, 3) == 0
