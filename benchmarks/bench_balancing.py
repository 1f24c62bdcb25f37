"""Peak memory and step time of each balancing method: mtlfast's engine against LibMTL's way and
TorchJD's ``mtl_backward``, on the engine benchmark's network, T in {2, 4, 8, 16}.

The network and batch are ``benchmarks/bench_engine.py``'s (``engine_models``: a ResNet-50 trunk
of 17 blocks at output stride 16, three-layer heads whose predictions are upsampled to the image,
the six synthetic-scene losses in turn), at the size given (default 128x128, the engine
benchmark's quick size: the full 256x256 at T = 16 takes too long on the 2 shared cores this
was written on), batch 4, float32, CPU. Implementations:

* ``engine``: ``multi_branch_step(strategy="recompute", segments=4, balancer=...)``: one branch at
  a time; GradNorm's gradients at its layer W (the last bottleneck's conv3, per filter channel)
  through the last segment's kept graph; MGDA, PCGrad, CAGrad combine the T gradients at the
  branching point (for them the last segment is recomputed too, its graph not kept next to
  those gradients);
* ``libmtl``: LibMTL's way on plain autograd (the whole graph alive): one backward of the
  weighted sum for the loss-weighting methods; T ``autograd.grad(..., retain_graph=True)`` to the
  representation, then one backward of the combination, for MGDA, PCGrad and CAGrad (LibMTL's
  ``rep_grad`` mode; ``balancer.backward``); for GradNorm, T ``autograd.grad`` to every shared
  parameter (LibMTL's GradNorm normalises over all of them), then one backward;
* ``torchjd``: ``torchjd.autojac.mtl_backward(losses, features)`` then ``jac_to_grad(trunk
  parameters, aggregator)`` with ``Sum`` (fixed weights), ``MGDA`` and ``PCGrad``, TorchJD's
  defaults. TorchJD's CAGrad needs cvxpy (not installed here) and it has no GradNorm: those are
  left out. torchjd is not a dependency of mtlfast: it is imported from ``--torchjd-path`` (or the
  environment) and left out, with a note in the JSON, when it cannot be imported.

Each (implementation, T) runs in a subprocess of its own (a failure or an out-of-memory kill
loses one group, not the run). In it, per method: one untimed step, one step under
``mtlfast.profiling.memory`` (``peak_extra_bytes``: the peak of the bytes allocated during the
step above those before it; every ``.grad`` already exists), then ``--rounds`` timed steps, the
methods taking turns so that load on the shared machine falls on them alike; ``step_s`` is the
fastest round. ``other_cpu_fraction`` is the share of the machine's CPU other work took.

    PYTHONPATH=/tmp/torchjd-pkgs OMP_NUM_THREADS=1 python benchmarks/bench_balancing.py

Targets (issue 17): the engine's peak at T = 16 at most 1.15x its peak at T = 2 for every
method; its step at T = 8 at most 1.3x the fixed-weight step for MGDA, PCGrad, CAGrad and
1.05x for GradNorm, uncertainty, DWA; a lower peak than both peers at T >= 4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

ROOT = Path(__file__).resolve().parent
METHODS = ("fixed", "gradnorm", "uncertainty", "dwa", "mgda", "pcgrad", "cagrad")
IMPLS = ("engine", "libmtl", "torchjd")
TORCHJD = {"fixed": "Sum", "mgda": "MGDA", "pcgrad": "PCGrad"}
SEGMENTS = 4  # round(sqrt(17)), the engine's default for this trunk
N = 4


def _network(tasks: int, size: tuple[int, int]):
    from benchmarks import engine_models

    torch.manual_seed(0)
    trunk = engine_models.resnet50_trunk(16).train()
    heads = engine_models.make_heads(tasks, size).train()
    images, targets = engine_models.batch(tasks, N, size)
    return trunk, heads, images, targets, engine_models.loss_fns(tasks)


def _libmtl_gradnorm(tasks):
    """GradNorm as LibMTL computes its norms: over every shared parameter's gradient."""
    from mtlfast.balancing import GradNorm

    class AllShared(GradNorm):
        def shared_layer(self, shared):
            self.layer_name = "(every shared parameter)"
            return [p for p in shared.parameters() if p.requires_grad]

        def observe(self, task, grads):
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).reshape(1)
            w = self.task_weights.detach()[self.tasks.index(task)].abs().double()
            self._norms[task] = norm / w

    return AllShared(tasks)


def _step(impl: str, method: str, net, torchjd_mods):
    """One training step (forward, backward, the balancer's update) as a call."""
    from mtlfast import balancing
    from mtlfast.engine import multi_branch_step

    trunk, heads, images, targets, loss_fns = net
    names = list(heads.keys())
    if impl == "engine":
        balancer = balancing.create(method, names)

        def step():
            multi_branch_step(
                trunk, heads, images, targets, loss_fns, segments=SEGMENTS, balancer=balancer
            )

        return step
    if impl == "libmtl":
        balancer = (
            _libmtl_gradnorm(names) if method == "gradnorm" else balancing.create(method, names)
        )

        def step():
            features = trunk(images)
            losses = {t: loss_fns[t](heads[t](features), targets[t]) for t in names}
            balancer.backward(losses, features, shared=trunk)

        return step
    mtl_backward, jac_to_grad, aggregation = torchjd_mods
    aggregator = getattr(aggregation, TORCHJD[method])()
    shared = [p for p in trunk.parameters() if p.requires_grad]

    def step():
        features = trunk(images)
        losses = [loss_fns[t](heads[t](features), targets[t]) for t in names]
        mtl_backward(losses, features=features)
        jac_to_grad(shared, aggregator)

    return step


def run_group(
    impl: str, tasks: int, methods: list[str], size: tuple[int, int], rounds: int
) -> list[dict]:
    """Every method of one (implementation, T), in this process (see the module docstring)."""
    from benchmarks import harness
    from mtlfast import profiling

    torchjd_mods = None
    if impl == "torchjd":
        from torchjd import aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward

        torchjd_mods = (mtl_backward, jac_to_grad, aggregation)
        methods = [m for m in methods if m in TORCHJD]
    net = _network(tasks, size)
    steps, out = {}, {}
    for method in methods:
        steps[method] = _step(impl, method, net, torchjd_mods)
        steps[method]()  # oneDNN's primitives, every .grad
        with profiling.memory("cpu") as stats:
            steps[method]()
        out[method] = {
            "impl": impl,
            "method": method,
            "T": tasks,
            "size": list(size),
            "n": N,
            "peak_extra_bytes": stats.peak_extra_bytes,
            "times": [],
        }
    start = harness.CpuTimes.now()
    for _ in range(rounds):
        for method in methods:
            t0 = time.perf_counter()
            steps[method]()
            out[method]["times"].append(time.perf_counter() - t0)
    other = start.other_fraction_since()
    for r in out.values():
        r["step_s"] = min(r["times"])
        r["other_cpu_fraction"] = other
    return list(out.values())


def demo(config: str, methods: list[str], rounds: int, overrides: list[str] | None = None) -> dict:
    """The trainer's step on ``config`` for each method, same weights and batch, in turns."""
    from mtlfast.train import Trainer, load_config
    from mtlfast.train.data import train_loader
    from mtlfast.train.trainer import _busy_cores

    trainers = {}
    for m in methods:
        cfg = load_config(
            config,
            [*(overrides or []), f"balancing.name={m}", "train.threads=1", "train.progress=false"],
        )
        trainers[m] = Trainer(cfg)
    batch = next(iter(train_loader(cfg, trainers[methods[0]].train_set)))
    for t in trainers.values():
        t.train_step(batch)  # warm-up
    busy_before = _busy_cores()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m, t in trainers.items():
            t0 = time.perf_counter()
            t.train_step(batch)
            times[m].append(time.perf_counter() - t0)
    out = {
        "config": config,
        "overrides": overrides or [],
        "rounds": rounds,
        "busy_cores_other_work_before": busy_before,
        "busy_cores_other_work_after": _busy_cores(),
        "methods": {
            m: {
                "step_s_min": min(v),
                "step_s_median": sorted(v)[len(v) // 2],
                "times": v,
                "layer": getattr(trainers[m].balancer, "layer_name", None),
            }
            for m, v in times.items()
        },
    }
    base = out["methods"][methods[0]]
    for m in methods[1:]:
        r = out["methods"][m]
        r["min_over_" + methods[0]] = r["step_s_min"] / base["step_s_min"]
        r["median_over_" + methods[0]] = r["step_s_median"] / base["step_s_median"]
    return out


def _ratios(cases: list[dict]) -> dict:
    by = {(c["impl"], c["method"], c["T"]): c for c in cases if "peak_extra_bytes" in c}
    out: dict = {"peak_T16_over_T2": {}, "time_T8_over_fixed": {}, "peak_vs_peers": {}}
    for m in METHODS:
        a, b = by.get(("engine", m, 16)), by.get(("engine", m, 2))
        if a and b:
            out["peak_T16_over_T2"][m] = a["peak_extra_bytes"] / b["peak_extra_bytes"]
        a, f = by.get(("engine", m, 8)), by.get(("engine", "fixed", 8))
        if a and f:
            out["time_T8_over_fixed"][m] = a["step_s"] / f["step_s"]
        for t in (2, 4, 8, 16):
            e = by.get(("engine", m, t))
            if not e:
                continue
            for peer in ("libmtl", "torchjd"):
                p = by.get((peer, m, t))
                if p:
                    out["peak_vs_peers"].setdefault(m, {}).setdefault(str(t), {})[peer] = (
                        e["peak_extra_bytes"] / p["peak_extra_bytes"]
                    )
    limits = {
        m: (1.3 if m in ("mgda", "pcgrad", "cagrad") else 1.05) for m in METHODS if m != "fixed"
    }
    out["targets"] = {
        "peak_T16_le_1.15x_T2": {m: r <= 1.15 for m, r in out["peak_T16_over_T2"].items()},
        "time_T8_within_limit": {
            m: r <= limits[m] for m, r in out["time_T8_over_fixed"].items() if m in limits
        },
        "peak_below_both_peers_T_ge_4": {
            m: all(r < 1 for t, peers in by_t.items() if int(t) >= 4 for r in peers.values())
            for m, by_t in out["peak_vs_peers"].items()
        },
    }
    return out


def plot(results: dict, path: str) -> None:
    """Peak extra memory (MiB, log scale) and step time against T from a results JSON: a colour
    per method, a line style per implementation; PNG at ``path`` (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"engine": "-", "libmtl": "--", "torchjd": ":"}
    series: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for c in results["cases"]:
        if "failed" not in c:
            series.setdefault((c["impl"], c["method"]), []).append(
                (c["T"], c["peak_extra_bytes"] / 2**20, c["step_s"])
            )
    if not series:
        raise ValueError("the results hold no case to plot")
    fig, (mem, sec) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (impl, method), points in sorted(series.items()):
        points.sort()
        ts = [p[0] for p in points]
        kw = {
            "color": f"C{METHODS.index(method) % 10}" if method in METHODS else "k",
            "ls": styles.get(impl, "-."),
            "marker": "o",
            "ms": 3,
        }
        mem.plot(ts, [p[1] for p in points], **kw)
        sec.plot(ts, [p[2] for p in points], **kw)
    for ax, label in (
        (mem, "peak extra memory of a step (MiB)"),
        (sec, "step time (s, fastest round)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({t for pts in series.values() for t, _, _ in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("tasks T")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    from matplotlib.lines import Line2D

    methods = sorted({m for _, m in series}, key=lambda m: METHODS.index(m) if m in METHODS else 99)
    impls = [i for i in styles if any(i == j for j, _ in series)]
    handles = [
        Line2D([], [], color=f"C{METHODS.index(m) % 10}" if m in METHODS else "k", label=m)
        for m in methods
    ] + [Line2D([], [], color="k", ls=styles[i], label=i) for i in impls]
    sec.legend(handles=handles, fontsize=7, ncol=2, loc="upper left")
    setup = results.get("setup", {})
    fig.suptitle(
        f"balancing methods: engine (solid), LibMTL's way (dashed), TorchJD (dotted); "
        f"{setup.get('network', '')}, batch {setup.get('n', '?')} at {setup.get('size', '?')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--impls", nargs="+", default=list(IMPLS))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--out", default=str(ROOT / "results" / "cpu-epyc-2core" / "bench_balancing.json")
    )
    p.add_argument(
        "--torchjd-path",
        default="/tmp/torchjd-pkgs",
        help="a directory holding the torchjd package (pip install --no-deps --target)",
    )
    p.add_argument("--group", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    p.add_argument(
        "--plot",
        metavar="RESULTS",
        help="instead: plot a results JSON's peaks and step times against T to --out (a PNG)",
    )
    p.add_argument(
        "--demo",
        metavar="CONFIG",
        help="instead: the trainer's step on CONFIG, "
        "fixed against gradnorm (--methods), --rounds alternating rounds",
    )
    p.add_argument(
        "--demo-set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for --demo"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    size = (args.size, args.size)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), args.out)
        print(f"plot: {args.out}")
        return
    if args.demo:
        methods = args.methods if args.methods != list(METHODS) else ["fixed", "gradnorm"]
        result = demo(args.demo, methods, args.rounds, args.demo_set)
        print(json.dumps(result, indent=1))
        out = Path(args.out)
        results = json.loads(out.read_text()) if out.exists() else {"cases": [], "notes": []}
        results.setdefault("demo", {})[" ".join([args.demo, *args.demo_set])] = result
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        return
    if args.group:  # the subprocess: one group, JSON on stdout's last line
        cases = run_group(args.group[0], int(args.group[1]), args.methods, size, args.rounds)
        print(json.dumps(cases))
        return
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"cases": [], "notes": []}
    done = {(c["impl"], c["T"]) for c in results["cases"]}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(ROOT.parent), args.torchjd_path, env.get("PYTHONPATH")) if x
    )
    try:
        version = subprocess.run(
            [
                sys.executable,
                "-c",
                "import torchjd, importlib.metadata as m;print(m.version('torchjd'))",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except subprocess.CalledProcessError:
        version = None
        results["notes"].append("torchjd could not be imported: its cases are left out")
    results.update(
        setup={
            "network": "engine_models: ResNet-50 os16 trunk, 3-layer heads",
            "n": N,
            "size": list(size),
            "segments": SEGMENTS,
            "rounds": args.rounds,
            "dtype": "float32",
            "torchjd": version,
            "torchjd_aggregators": TORCHJD,
            "env": {
                k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
            },
        },
        machine={
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    )
    for tasks in args.tasks:
        for impl in args.impls:
            if (impl, tasks) in done or (impl == "torchjd" and version is None):
                continue
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--group",
                impl,
                str(tasks),
                "--size",
                str(args.size),
                "--rounds",
                str(args.rounds),
                "--methods",
                *args.methods,
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                note = (
                    f"{impl} T={tasks}: failed (exit {proc.returncode}"
                    f"{', killed: out of memory?' if proc.returncode < 0 else ''}): "
                    f"{proc.stderr.strip().splitlines()[-1:]}"
                )
                print(note, flush=True)
                results["notes"].append(note)
                results["cases"].append({"impl": impl, "T": tasks, "failed": note})
            else:
                cases = json.loads(proc.stdout.strip().splitlines()[-1])
                results["cases"].extend(cases)
                for c in cases:
                    print(
                        f"T={tasks:2d} {impl:8s} {c['method']:12s} peak "
                        f"{c['peak_extra_bytes'] / 2**20:8.1f} MiB  step {c['step_s']:.2f} s  "
                        f"(other CPU {c['other_cpu_fraction'] or 0:.0%})",
                        flush=True,
                    )
            print(f"  [{impl} T={tasks}: {time.perf_counter() - t0:.0f} s]", flush=True)
            results["ratios"] = _ratios(results["cases"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results.get("ratios", {}), indent=1))


if __name__ == "__main__":
    main()
