"""The ``mtlfast`` command: ``train``, ``eval``, ``report`` and ``configs``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


class _UsageError(Exception):
    """A command that cannot run as given: printed as one line, exit status 2."""


_EPILOG = """examples:
  mtlfast configs
  mtlfast train synthetic --out runs/demo
  mtlfast train configs/mtinet_pascal.yaml --set data.root=/data/PASCAL_MT --set train.max_steps=40000
  mtlfast train --resume runs/demo
  mtlfast eval runs/demo                  # best.pt of the run, on its validation split
  mtlfast eval runs/demo/checkpoints/last.pt --split train
  mtlfast report runs/demo
  mtlfast report runs/mtinet runs/padnet --plot compare.png   # runs side by side
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtlfast",
        description="Train and evaluate multi-task dense-prediction networks.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", help="train from a config (a file or a shipped config's name), or resume a run"
    )
    t.add_argument("config", nargs="?", help="config file or name (see `mtlfast configs`)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.max_steps=100 (repeatable; values are YAML)",
    )
    t.add_argument("--out", help="run directory (default runs/<config>-<date>-<time>)")
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest valid checkpoint",
    )
    e = sub.add_parser("eval", help="evaluate a run's best checkpoint, or a checkpoint file")
    e.add_argument("target", help="a run directory or a checkpoint file")
    e.add_argument(
        "--split",
        choices=["val", "train"],
        default="val",
        help="which split to evaluate (default val)",
    )
    e.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="best",
        help="with a run directory: which checkpoint (default best)",
    )
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--out", help="also write the results to this JSON file")
    r = sub.add_parser(
        "report",
        help="print the per-task table of a finished run, or compare several runs side by side",
    )
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument(
        "--which",
        choices=["best", "final"],
        default="best",
        help="with several runs (or --plot): each run's best evaluation (default) or its final one",
    )
    r.add_argument(
        "--plot", metavar="FILE", help="also draw the runs' metrics, a panel per task (PNG)"
    )
    sub.add_parser("configs", help="list the shipped configs")
    return p


def _train(args) -> int:
    from . import distributed

    if not distributed.launched_distributed():
        return _train_here(args)
    # torchrun: join the process group with the run's backend and timeout, train, leave it
    from .config import load_config

    if args.resume and (Path(args.resume) / "config.yaml").is_file() and not args.config:
        config = load_config(Path(args.resume) / "config.yaml", args.overrides or None)
    elif args.config and not args.resume:
        config = load_config(args.config, args.overrides)
    else:
        return _train_here(args)  # its usage error, on every rank
    tc = config.train
    distributed.init_distributed(tc.dist_timeout, tc.dist_backend, tc.device)
    try:
        return _train_here(args)
    finally:
        distributed.shutdown()


def _train_here(args) -> int:
    from .config import load_config
    from .report import results_table
    from .trainer import Trainer

    if args.resume:
        if args.config:
            raise _UsageError("give either CONFIG or --resume RUN_DIR, not both")
        trainer = Trainer.resume(args.resume, args.overrides or None)
    else:
        if not args.config:
            raise _UsageError("a CONFIG (file or shipped name) or --resume RUN_DIR is required")
        config = load_config(args.config, args.overrides)
        out = args.out or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = _same_on_every_rank(out)  # the default's time stamp is rank 0's
        if (Path(out) / "checkpoints").is_dir() and any((Path(out) / "checkpoints").iterdir()):
            raise _UsageError(f"{out} already holds a run; use --resume {out} or another --out")
        trainer = Trainer(config, out)
    trainer.runtime.print(f"run directory: {trainer.run_dir}")
    results = trainer.fit()
    trainer.runtime.print(results_table(results, trainer.baselines))
    return 0


def _same_on_every_rank(value):
    """Rank 0's ``value`` on every rank of a distributed run; ``value`` on one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


def _eval(args) -> int:
    from .checkpoint import load_checkpoint
    from .config import load_config
    from .trainer import Trainer

    target = Path(args.target)
    if target.is_dir():
        path = target / "checkpoints" / f"{args.checkpoint}.pt"
        if not path.is_file():
            raise _UsageError(f"{path} does not exist")
    else:
        path = target
    state = load_checkpoint(path)
    if "config" not in state:
        raise _UsageError(
            f"{path} holds no config; evaluate it from Python with mtlfast.train.evaluate"
        )
    overrides = list(args.overrides) + ["train.progress=true"]
    config = load_config(state["config"], overrides)
    trainer = Trainer(config)
    trainer.model.load_state_dict(state["model"])
    if args.split == "train":
        trainer.eval_set = trainer.train_set
    results = trainer.evaluate(recalibrate=False)
    results["checkpoint"] = str(path)
    results["step"] = state.get("step")
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        from ._runtime import atomic_write_bytes

        atomic_write_bytes(args.out, text + "\n")
    return 0


def _read_results(run: Path) -> dict:
    try:
        return json.loads((run / "results.json").read_text())
    except FileNotFoundError:
        raise _UsageError(f"{run} has no results.json (is the run finished?)") from None
    except json.JSONDecodeError as e:
        raise _UsageError(f"{run / 'results.json'} is not valid JSON: {e}") from None


def _run_details(run: Path) -> dict[str, str]:
    """Model, backbone and balancing of a run, read from its saved config (not validated)."""
    import yaml

    try:
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    model = config.get("model") or {}
    return {
        "model": str(model.get("name", "-")),
        "backbone": str(model.get("backbone") or "default"),
        "balancing": str((config.get("balancing") or {}).get("name", "fixed")),
    }


def _report(args) -> int:
    from .evaluate import load_baselines
    from .report import comparison_table, draw_comparison, results_table

    runs = [Path(d) for d in args.run_dirs]
    seen: dict[Path, str] = {}
    for run, name in zip(runs, args.run_dirs):
        if run.resolve() in seen:
            raise _UsageError(f"run directory {name} is given twice ({seen[run.resolve()]})")
        seen[run.resolve()] = name
    results = {name: _read_results(run) for run, name in zip(runs, args.run_dirs)}
    if len(runs) == 1:
        baselines = None
        config = runs[0] / "config.yaml"
        if config.is_file():
            from .config import load_config

            baselines = load_baselines(load_config(config).eval.baselines)
        print(results_table(results[args.run_dirs[0]], baselines))
    else:
        details = {name: _run_details(run) for run, name in zip(runs, args.run_dirs)}
        print(comparison_table(results, args.which, details))
    if args.plot:
        print(f"plot: {draw_comparison(results, args.plot, args.which)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "configs":
        from .config import CONFIG_DIR, list_configs

        for name in list_configs():
            first = ""
            for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
                if line.startswith("#"):
                    first = line.lstrip("# ").strip()
                    break
            print(f"{name:<24} {first}")
        return 0
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return {"train": _train, "eval": _eval, "report": _report}[args.command](args)
    except (_UsageError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"mtlfast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
