"""MultiModalDistillation against the MTI-Net release's per-pair loop: peak memory and time.

The release (models/layers.py ``SABlock``, models/padnet.py ``MultiTaskDistillationModule``, used
by PAD-Net and at every scale of MTI-Net) runs one module per ordered pair (target k, source l),
``sigmoid(conv3x3(F_l)) * conv3x3(F_l)``, all pairs first (a dict of dicts), then stacks the T-1
results of each target and sums them onto F_k. ``release_models.ReleaseDistillation`` is that loop,
written here in plain PyTorch with the same weights as the mtlfast layer it is compared with.

Figures, at PAD-Net's size by default (a 128x128 image: T=5 tasks of C=256 channels at 32x32,
N=1, one thread; ``--size 64 64`` is a 256x256 image):

* memory: ``mtlfast.profiling.memory("cpu")`` around one inference forward (``torch.no_grad``)
  and around one training step (forward, then ``torch.autograd.backward`` of the T outputs with
  fixed random output gradients, into the features' and weights' ``.grad``): the peak of the
  bytes allocated above those at the start (``peak_extra``) and the bytes autograd saved
  (``saved``). The weights' gradients (2 T (T-1) C^2 9 floats, 90 MiB at PAD-Net's size) are
  part of the training peak of both;
* time: the median of ``--repeats`` rounds, the two layers alternating within each round, in
  the same process, after one untimed round each; memory is measured in other runs than time.

``--model padnet`` or ``--model mtinet`` measures the whole network instead (PASCAL's five tasks,
HRNet-18, a ``--image`` image, N=1, training mode with deep supervision; the training step is
forward, the sum of the outputs' mean squares, backward): mtlfast's model against the same model,
same weights, whose distillation layer(s) are the release's loop.

Run: ``python -m benchmarks.distillation_vs_release [--tasks 5] [--channels 256] [--size 32 32]``
or ``python -m benchmarks.distillation_vs_release --model padnet [--image 128 128]``.
``--layer path/to/file.py:Class`` compares another implementation with the same constructor and
parameters (e.g. an older mtlfast layer) instead of the installed one.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import statistics
import time

import torch
from torch import nn

import mtlfast
from mtlfast.nn import MultiModalDistillation

from .release_models import ReleaseDistillation


def _layer_class(spec: str | None):
    if spec is None:
        return MultiModalDistillation
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("_other_distillation", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def _step(layer, feats, grads):
    out = layer(feats)
    torch.autograd.backward(out, grads)


def _reset(layer, feats):
    layer.zero_grad(set_to_none=True)
    for f in feats if isinstance(feats, list) else [feats]:
        f.grad = None


def _infer(layer, inputs):
    """A forward under no_grad; a whole model in eval mode (no deep supervision), then back."""
    training = layer.training
    with torch.no_grad():
        layer.eval()(inputs)
    layer.train(training)


def measure_memory(layer, feats, grads, step=None) -> dict[str, float]:
    step = step or _step
    mib = 2.0**20
    _infer(layer, feats)  # warm-up: one-time allocations stay out of the figures
    gc.collect()
    with mtlfast.profiling.memory("cpu") as m:
        _infer(layer, feats)
    inference = m.peak_extra_bytes / mib
    step(layer, feats, grads)
    _reset(layer, feats)
    gc.collect()
    with mtlfast.profiling.memory("cpu") as m:
        step(layer, feats, grads)
    _reset(layer, feats)
    return {
        "inference_peak": inference,
        "training_peak": m.peak_extra_bytes / mib,
        "saved": m.saved_bytes / mib,
    }


def measure_time(
    layers: dict[str, nn.Module], feats, grads, repeats: int, step=None
) -> dict[str, dict[str, float]]:
    step = step or _step
    times = {name: {"inference": [], "training": []} for name in layers}

    def timed(fn, *args):
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    for layer in layers.values():  # untimed round
        _infer(layer, feats)
        step(layer, feats, grads)
        _reset(layer, feats)
    for _ in range(repeats):
        for name, layer in layers.items():
            times[name]["inference"].append(timed(_infer, layer, feats))
            times[name]["training"].append(timed(step, layer, feats, grads))
            _reset(layer, feats)
    return {
        n: {mode: statistics.median(v) * 1e3 for mode, v in modes.items()}
        for n, modes in times.items()
    }


def _report(layers, inputs, grads, repeats, skip_time, step=None):
    for name, layer in layers.items():
        m = measure_memory(layer, inputs, grads, step)
        print(
            f"{name:8s} memory: inference peak {m['inference_peak']:7.1f} MiB, "
            f"training peak {m['training_peak']:7.1f} MiB, saved for backward {m['saved']:6.1f} MiB"
        )
    if skip_time:
        return
    timing = measure_time(layers, inputs, grads, repeats, step)
    for name, tm in timing.items():
        print(
            f"{name:8s} time (median of {repeats}): inference {tm['inference']:8.1f} ms, "
            f"forward+backward {tm['training']:8.1f} ms"
        )
    r, o = timing["release"], timing["mtlfast"]
    print(
        f"release / mtlfast: inference {r['inference'] / o['inference']:.2f}x, "
        f"forward+backward {r['training'] / o['training']:.2f}x"
    )


def _model_step(model, image, _grads):
    out = model(image)
    sum(y.square().mean() for y in out.values()).backward()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("layer", "padnet", "mtinet"), default="layer")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    parser.add_argument("--image", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--layer", default=None, help="path/to/file.py:Class instead of mtlfast's layer"
    )
    parser.add_argument("--skip-time", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cls = _layer_class(args.layer)
    header = (
        f"{args.threads} thread(s), torch {torch.__version__}; "
        f"layer {args.layer or 'mtlfast.nn.MultiModalDistillation'}"
    )
    if args.model != "layer":
        from mtlfast.models import MTINet, PADNet

        ours = (PADNet if args.model == "padnet" else MTINet)(dataset="pascal")
        if cls is not MultiModalDistillation:
            _replace_distillation(ours, lambda d: _copy_weights(cls(d.num_tasks, d.channels), d))
        release = copy.deepcopy(ours)
        _replace_distillation(release, ReleaseDistillation)
        image = torch.randn(args.batch, 3, *args.image)
        with torch.no_grad():
            a, b = ours.eval()(image), release.eval()(image)
        ours.train(), release.train()
        err = max((a[k] - b[k]).abs().max().item() for k in a)
        print(
            f"{args.model} on a {args.batch}x3x{args.image[0]}x{args.image[1]} image, {header}; "
            f"max |mtlfast - release| = {err:.2e}"
        )
        _report(
            {"mtlfast": ours, "release": release},
            image,
            None,
            args.repeats,
            args.skip_time,
            _model_step,
        )
        return
    t, c, (h, w) = args.tasks, args.channels, args.size
    ours = cls(t, c)
    layers = {"mtlfast": ours, "release": ReleaseDistillation(ours)}
    feats = [torch.randn(args.batch, c, h, w, requires_grad=True) for _ in range(t)]
    grads = [torch.randn(args.batch, c, h, w) for _ in range(t)]
    with torch.no_grad():
        a, b = layers["mtlfast"](feats), layers["release"](feats)
    err = max((x - y).abs().max().item() for x, y in zip(a, b))
    print(f"T={t} C={c} {h}x{w} N={args.batch}, {header}; max |mtlfast - release| = {err:.2e}")
    print(
        f"one map (N, C, H, W): {args.batch * c * h * w * 4 / 2**20:.2f} MiB; "
        f"weights: {sum(p.numel() for p in ours.parameters()) * 4 / 2**20:.1f} MiB"
    )
    _report(layers, feats, grads, args.repeats, args.skip_time)


def _copy_weights(layer, source):
    layer.load_state_dict(source.state_dict())
    return layer


def _replace_distillation(model, make):
    """Every MultiModalDistillation of ``model`` replaced by ``make(it)``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MultiModalDistillation):
                setattr(module, name, make(child))


if __name__ == "__main__":
    main()
