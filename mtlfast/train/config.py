"""Typed run configurations: YAML files loaded into dataclasses, validated, with ``a.b=c`` overrides.

A config file holds the sections of :class:`Config` (``model``, ``data``, ``loss``, ``optim``,
``schedule``, ``train``, ``eval``, ``balancing``, ``procedure``) plus ``seed`` and ``tasks``. Every key is checked against
the dataclasses: an unknown or misspelled key, a value of the wrong type or a missing required
value raises :class:`ConfigError` naming the key and the file. A config may start from another
with ``base: NAME`` (a shipped config or a path, resolved next to the file); its keys then
override the base's, section by section.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "BalancingConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ProcedureConfig",
    "ScheduleConfig",
    "TrainConfig",
    "config_to_dict",
    "find_config",
    "list_configs",
    "load_config",
    "parse_overrides",
]

#: the shipped configs (``mtlfast/configs``; ``configs/`` at the repository root links there)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config that cannot be used: the message names the key and the file."""


@dataclass
class ModelConfig:
    """Which network: ``mtlfast.models.create(name, tasks, backbone=backbone, dataset=..., **options)``.

    ``baseline_like``: the family of the single-task baselines that delta_m compares with
    (``models.create("single_task", task, like=...)``); None: the model's own name.
    """

    name: str = _MISSING  # type: ignore[assignment]
    backbone: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    baseline_like: str | None = None


@dataclass
class DataConfig:
    """The data: ``dataset`` "synthetic" (generated, the default), "pascal" or "nyud" (``root``).

    ``size`` is the training crop (and the synthetic render size), an int or [H, W]; ``labels`` (synthetic only)
    None, "random" or a list of task lists (UberNet's partially labelled sources).
    ``eval_samples``: validation images (synthetic) or None for the whole split.
    """

    dataset: Literal["synthetic", "pascal", "nyud"] = "synthetic"
    root: str | None = None
    size: int | list[int] = 64
    batch_size: int = 8
    eval_batch_size: int | None = None
    num_workers: int = 0
    train_samples: int = 4000
    eval_samples: int | None = 200
    labels: str | list[list[str]] | None = None
    label_prob: float = 0.5
    augment: bool = True
    train_split: str = "train"
    eval_split: str = "val"


@dataclass
class LossConfig:
    """Task losses: ``weights`` task -> w_t, or "pascal" / "nyud" (the releases' weights), or
    None (all 1); ``options`` task -> keyword arguments of ``mtlfast.losses.for_task``
    (e.g. ``depth: {gradient_weight: 1.0}``); ``deep_supervision`` the weight factor of the
    deep-supervision predictions relative to their task's (the MTI-Net and PAD-Net releases: 1,
    every scale's initial prediction weighted as the final one). ``auxiliary``: tasks trained
    only through the deep supervision of the model's front end, neither a final output trained
    nor evaluated (the MTI-Net release's auxiliary tasks, e.g. edges and normals on NYUD); they
    need a model with deep supervision, and data labelled for them."""

    weights: str | dict[str, float] | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    deep_supervision: float = 1.0
    auxiliary: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    """The optimiser. ``lr_multipliers``: parameter-name prefix -> learning-rate factor (the
    longest matching prefix wins, e.g. ``{heads: 10}``); ``no_weight_decay_on_norms`` leaves
    batch-norm weights and biases out of weight decay. ``fused``: torch's fused implementation
    of the optimiser (one pass over each tensor's value, gradient and state per step: the same
    update to float rounding; on 2 CPU cores SGD's step over a model's 20-29M parameters 1.7-4.6x
    faster, Adam's 2.7-6x, ``benchmarks/bench_optimizer.py``) when every parameter is a floating
    tensor on the CPU or a GPU; False: torch's loop over the tensors (its CPU default, the
    releases')."""

    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    no_weight_decay_on_norms: bool = False
    fused: bool = True


@dataclass
class ScheduleConfig:
    """The learning rate per step: a linear warm-up from ``warmup_factor * lr`` over
    ``warmup_steps``, then ``kind`` "poly" (``(1 - step / max_steps) ** power``, the releases'),
    "cosine" or "constant"."""

    kind: Literal["poly", "cosine", "constant"] = "poly"
    power: float = 0.9
    warmup_steps: int = 0
    warmup_factor: float = 0.1


@dataclass
class TrainConfig:
    """The loop. ``strategy``: the memory engine's "recompute" (default) or "naive" (plain
    autograd through the engine). ``threads``: torch's intra-op threads (None: see
    :func:`mtlfast.train.default_threads`). ``precision``: fp32, bf16 (autocast) or fp16
    (autocast with a gradient scaler, CUDA). ``nonfinite``: "skip" a step whose loss or
    gradients are not finite (at most ``max_consecutive_nonfinite`` in a row), or "raise".
    Several processes (torchrun, :mod:`mtlfast.train.distributed`): ``sync_bn`` turns batch
    norms, ASTMT's task batch norms included, into synchronised ones (statistics over the
    global batch); ``dist_backend`` "auto" (nccl on CUDA, gloo on CPU), "nccl" or "gloo";
    ``dist_timeout`` the seconds a collective waits for a missing rank before the job fails.
    ``segments``: the memory engine's trunk segments in recompute mode (None: the model's
    ``engine_segments``, 2 for MTI-Net and UberNet, else ``round(sqrt(L))``).
    ``memory_format``: the layout of the model's 4-d weights and of every batch's images, in
    training and evaluation: "contiguous" (NCHW), "channels_last" (NHWC) or "auto" (default):
    the first 8 steps of the process alternate between the two, after one untimed step in
    each, and the layout that is faster in the median of three rounds of one timed step each
    (channels-last by at least 3%) stays for the rest of the run (``mtlfast/train/_layout.py``;
    the choice and its times are printed and written to results.json). Which layout wins
    depends on the machine and the model (benchmarks/results/README.md: on a 2-core Zen 5 EPYC
    at 256x256, batch 4, channels-last for MTI-Net, 0.81-0.86x of NCHW's step in the trial, and
    UberNet, 0.90-0.94x, NCHW for ASTMT, 0.99-1.06x, and PAD-Net either way, 0.89-1.03x; on an
    AVX2 EPYC UberNet's channels-last step was 1.10x). The layouts
    train the same network to float rounding, so the trial's steps are training steps; a run
    with fewer than 20 steps to go, or ``deterministic``, stays contiguous without measuring,
    and a resumed run measures again (bitwise resumption needs a fixed layout). Several
    processes (torchrun) all take rank 0's choice. Checkpoints load in either layout.
    ``conv_algorithm``: "winograd" computes the model's 3x3 stride-1 'same' convolutions of at
    least 128 channels on maps of at least 16x16 (a dilated one over its phases, each at least
    16x16), and the distillation's, by Winograd's F(4x4, 3x3) on
    a CPU in fp32 (:func:`mtlfast.nn.use_winograd`): a quarter of the multiplications, results
    within about 1e-5 of the direct convolution's largest output; "direct" keeps every
    convolution ``F.conv2d``'s; "auto" (default) switches the same layers but lets each shape
    take Winograd only where a measurement on its first call found it faster on this CPU
    (:func:`mtlfast.ops.set_winograd_autotune`, process-wide): a run resumed in another process
    may choose otherwise at a shape, so bitwise resumption needs "winograd", "direct" or
    ``deterministic`` (under which "auto" is "winograd"). Off the CPU and in bf16/fp16 all three
    are the same.
    ``keep_freed_memory``: on the CPU, glibc's malloc keeps the memory tensors free for the next
    step instead of unmapping every block of 32 MiB or more and faulting it in again
    (:func:`mtlfast.train.keep_freed_memory`, process-wide): the process then holds its peak
    until it exits. False leaves malloc as it was."""

    max_steps: int = 1000
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 10
    keep_last: int = 2
    strategy: Literal["recompute", "naive"] = "recompute"
    segments: int | None = None
    grad_clip: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    threads: int | None = None
    deterministic: bool = False
    nonfinite: Literal["skip", "raise"] = "skip"
    max_consecutive_nonfinite: int = 5
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    sync_bn: bool = False
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    dist_timeout: float = 600.0
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    conv_algorithm: Literal["auto", "winograd", "direct"] = "auto"
    keep_freed_memory: bool = True


@dataclass
class EvalConfig:
    """Evaluation. ``select``: "delta_m" (needs ``baselines``) or "<task>/<metric>" (e.g.
    "semseg/mIoU"), the validation figure that picks ``best.pt``; "auto" is delta_m when
    baselines are known, else the mean over tasks of the change against the first evaluation.
    ``baselines``: single-task results, a JSON file (task -> {metric: value}) or a dict.
    ``bn_recalibration``: batches of training data on which batch-norm running statistics are
    re-estimated before each evaluation (precise-BN); None: 0 when the run is longer than
    ``bn_recalibration_until`` steps, else 20 batches.
    ``edge_thresholds``: thresholds of the edge evaluation (the toolbox's 99).
    ``before_training``: also evaluate the untrained model (the demo's "before" column)."""

    select: str = "auto"
    baselines: str | dict[str, dict[str, float]] | None = None
    bn_recalibration: int | None = None
    bn_recalibration_until: int = 20000
    edge_thresholds: int = 99
    max_batches: int | None = None
    before_training: bool = False


@dataclass
class BalancingConfig:
    """Loss balancing: ``mtlfast.balancing.create(name, tasks, **options)``. ``name``: "fixed"
    (the default: ``loss.weights`` as they are), "gradnorm", "uncertainty", "dwa", "mgda",
    "pcgrad" or "cagrad"; ``options`` the method's keyword arguments (e.g. ``{alpha: 1.5}``).
    The method's weights multiply ``loss.weights``; they are logged every step."""

    name: str = "fixed"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProcedureConfig:
    """How a step trains (:mod:`mtlfast.train.procedures`): ``name`` "standard" (the memory
    engine's summed loss over the tasks, one update), "astmt" (ASTMT's single-task passes with
    adversarial task gradients) or "ubernet_async" (UberNet's asynchronous per-task SGD);
    ``options``: keyword arguments of its class (:class:`~mtlfast.train.procedures.ASTMTProcedure`,
    :class:`~mtlfast.train.procedures.UberNetAsyncProcedure`)."""

    name: Literal["standard", "astmt", "ubernet_async"] = "standard"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    """A whole run. ``tasks`` and ``model.name`` are required; everything else has a default."""

    tasks: list[str] = _MISSING  # type: ignore[assignment]
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    procedure: ProcedureConfig = field(default_factory=ProcedureConfig)
    balancing: BalancingConfig = field(default_factory=BalancingConfig)


# --------------------------------------------------------------------------------------------
# loading


def list_configs() -> list[str]:
    """Names of the shipped configs (``mtlfast train NAME`` finds them)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(name_or_path: str | Path) -> Path:
    """The config file for a path or a shipped config's name; FileNotFoundError naming both."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"config {str(name_or_path)!r} is neither a file nor a shipped config "
        f"(shipped: {', '.join(list_configs())})"
    )


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set expects KEY=VALUE with a dotted key (e.g. train.max_steps=10), got {item!r}"
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: the value {value!r} is not valid YAML ({e})") from None
    return key.split("."), parsed


def _assign(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is a value, not a section"
            )
        else:
            child = node[part] = dict(child)  # never write into the caller's containers
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.max_steps=10", "tasks=[semseg, depth]"]`` -> nested dict; values are YAML."""
    out: dict[str, Any] = {}
    for item in items or []:
        _assign(out, *_parse_override(item))
    return out


def _merge(base: dict, over: dict, cls: type | None = None) -> dict:
    """``over`` on top of ``base``: sections (dataclass fields) merge key by key, every other
    value, dicts such as ``loss.weights`` included, is replaced whole."""
    cls = Config if cls is None else cls
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for k, v in over.items():
        tp = hints.get(k)
        section = tp is not None and dataclasses.is_dataclass(tp)
        if section and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, tp)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a mapping of sections, got {type(data).__name__}"
        )
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a config name or path, got {base!r}")
    base_path = path.parent / base if (path.parent / base).is_file() else find_config(base)
    base_path = base_path.resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"{path}: base {base!r} makes a cycle")
    return _merge(_read_yaml(base_path, (*seen, path.resolve())), data)


def load_config(source: str | Path | dict, overrides: list[str] | dict | None = None) -> Config:
    """A validated :class:`Config` from a YAML file, a shipped config's name or a dict, then
    ``overrides`` (``["a.b=c", ...]`` or a nested dict) on top."""
    if isinstance(source, dict):
        data, where = dict(source), "<dict>"
    else:
        path = find_config(source)
        data, where = _read_yaml(path), str(path)
    if overrides:
        if isinstance(overrides, dict):
            data = _merge(data, overrides)
        else:
            # a dotted key sets one value, also inside a dict-valued field (model.options.width=2)
            for item in overrides:
                _assign(data, *_parse_override(item))
        where = f"{where} (with --set overrides)"
    config = _build(Config, data, "", where)
    _check_values(config, where)
    baselines = config.eval.baselines
    if (
        isinstance(baselines, str)
        and not isinstance(source, dict)
        and not Path(baselines).is_absolute()
    ):
        # a results file shipped beside the config (e.g. synthetic_single_task.json)
        beside = find_config(source).parent / baselines
        if beside.is_file():
            config.eval.baselines = str(beside.resolve())
    return config


def config_to_dict(config: Config) -> dict:
    """The config as plain containers (for YAML and checkpoints)."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------
# validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check(value, option, key, where)
            except ConfigError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_check(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            k_tp, v_tp = typing.get_args(tp)
            return {
                _check(k, k_tp, key, where): _check(v, v_tp, f"{key}.{k}", where)
                for k, v in value.items()
            }
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        import difflib

        hints_txt = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hints_txt.append(
                f"{prefix}{k}" + (f" (did you mean {prefix}{close[0]}?)" if close else "")
            )
        raise ConfigError(
            f"{where}: unknown key {', '.join(hints_txt)}; {prefix.rstrip('.') or 'the config'} "
            f"has {', '.join(prefix + f for f in fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        tp = hints[name]
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
                raise ConfigError(f"{where}: {key} is required and missing")
            continue
        value = data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key + ".", where)
        else:
            kwargs[name] = _check(value, tp, key, where)
    return cls(**kwargs)


# (key, predicate, what it must be) for values whose type alone does not make them valid
_RULES = [
    ("seed", lambda c: c.seed >= 0, "a non-negative int"),
    (
        "tasks",
        lambda c: len(c.tasks) > 0 and len(set(c.tasks)) == len(c.tasks),
        "a non-empty list of distinct task names",
    ),
    (
        "data.size",
        lambda c: all(v >= 8 for v in _pair(c.data.size)) and len(_pair(c.data.size)) == 2,
        "an int or [H, W], each at least 8",
    ),
    ("data.batch_size", lambda c: c.data.batch_size >= 1, "at least 1"),
    (
        "data.eval_batch_size",
        lambda c: c.data.eval_batch_size is None or c.data.eval_batch_size >= 1,
        "at least 1",
    ),
    ("data.num_workers", lambda c: c.data.num_workers >= 0, "a non-negative int"),
    (
        "data.train_samples",
        lambda c: c.data.train_samples >= c.data.batch_size,
        "at least data.batch_size",
    ),
    (
        "data.eval_samples",
        lambda c: c.data.eval_samples is None or c.data.eval_samples >= 1,
        "at least 1",
    ),
    ("data.label_prob", lambda c: 0 < c.data.label_prob <= 1, "in (0, 1]"),
    ("optim.lr", lambda c: c.optim.lr > 0, "positive"),
    ("optim.momentum", lambda c: 0 <= c.optim.momentum < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda c: c.optim.weight_decay >= 0, "non-negative"),
    (
        "optim.betas",
        lambda c: len(c.optim.betas) == 2 and all(0 <= b < 1 for b in c.optim.betas),
        "two numbers in [0, 1)",
    ),
    (
        "optim.lr_multipliers",
        lambda c: all(v >= 0 for v in c.optim.lr_multipliers.values()),
        "non-negative factors",
    ),
    ("schedule.power", lambda c: c.schedule.power >= 0, "non-negative"),
    ("schedule.warmup_steps", lambda c: c.schedule.warmup_steps >= 0, "a non-negative int"),
    ("schedule.warmup_factor", lambda c: 0 <= c.schedule.warmup_factor <= 1, "in [0, 1]"),
    ("train.max_steps", lambda c: c.train.max_steps >= 1, "at least 1"),
    (
        "train.eval_every",
        lambda c: c.train.eval_every >= 0,
        "a non-negative int (0: only at the end)",
    ),
    (
        "train.checkpoint_every",
        lambda c: c.train.checkpoint_every >= 0,
        "a non-negative int (0: only at the end)",
    ),
    ("train.log_every", lambda c: c.train.log_every >= 1, "at least 1"),
    ("train.keep_last", lambda c: c.train.keep_last >= 1, "at least 1"),
    ("train.segments", lambda c: c.train.segments is None or c.train.segments >= 1, "at least 1"),
    ("train.grad_clip", lambda c: c.train.grad_clip is None or c.train.grad_clip > 0, "positive"),
    ("train.threads", lambda c: c.train.threads is None or c.train.threads >= 1, "at least 1"),
    ("train.dist_timeout", lambda c: c.train.dist_timeout > 0, "positive"),
    (
        "train.max_consecutive_nonfinite",
        lambda c: c.train.max_consecutive_nonfinite >= 1,
        "at least 1",
    ),
    ("loss.deep_supervision", lambda c: c.loss.deep_supervision >= 0, "non-negative"),
    (
        "loss.auxiliary",
        lambda c: (
            len(set(c.loss.auxiliary)) == len(c.loss.auxiliary)
            and not set(c.loss.auxiliary) & set(c.tasks)
        ),
        "distinct task names not in tasks",
    ),
    (
        "eval.bn_recalibration",
        lambda c: c.eval.bn_recalibration is None or c.eval.bn_recalibration >= 0,
        "a non-negative int",
    ),
    ("eval.edge_thresholds", lambda c: c.eval.edge_thresholds >= 1, "at least 1"),
    (
        "eval.max_batches",
        lambda c: c.eval.max_batches is None or c.eval.max_batches >= 1,
        "at least 1",
    ),
]


def _pair(size: int | list[int]) -> list[int]:
    return [size, size] if isinstance(size, int) else list(size)


def _check_values(config: Config, where: str) -> None:
    for key, ok, what in _RULES:
        if not ok(config):
            value = config
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"{where}: {key} must be {what}, got {value!r}")
    if isinstance(config.loss.weights, str) and config.loss.weights not in ("pascal", "nyud"):
        raise ConfigError(
            f"{where}: loss.weights must be 'pascal', 'nyud', a mapping task -> weight or null, "
            f"got {config.loss.weights!r}"
        )
    _check_balancing(config, where)
    if isinstance(config.data.labels, str) and config.data.labels != "random":
        raise ConfigError(
            f"{where}: data.labels must be null, 'random' or a list of task lists, "
            f"got {config.data.labels!r}"
        )


def _check_balancing(config: Config, where: str) -> None:
    from ..balancing import METHODS

    name = config.balancing.name
    if name not in METHODS:
        raise ConfigError(
            f"{where}: balancing.name must be one of {', '.join(METHODS)}, got {name!r}"
        )
