"""Configs: every kind of error names the key and the file; overrides; shipped configs load."""

import pytest

from mtlfast.train import ConfigError, list_configs, load_config
from mtlfast.train.config import Config, config_to_dict, find_config, parse_overrides


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults(tmp_path):
    config = load_config(_write(tmp_path, "tasks: [semseg]\nmodel: {name: mtinet}\n"))
    assert isinstance(config, Config)
    assert config.tasks == ["semseg"] and config.model.name == "mtinet"
    assert config.train.strategy == "recompute" and config.data.dataset == "synthetic"


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "tasks: [semseg]\nmodel: {name: x}\ntrain: {max_step: 3}\n",
            "train.max_step (did you mean train.max_steps?)",
        ),
        ("tasks: [semseg]\nmodel: {name: x}\nbogus: 1\n", "unknown key bogus"),
        (
            "tasks: [semseg]\nmodel: {name: x}\ntrain: {max_steps: ten}\n",
            "train.max_steps must be int",
        ),
        (
            "tasks: [semseg]\nmodel: {name: x}\ntrain: {max_steps: 1.5}\n",
            "train.max_steps must be int",
        ),
        (
            "tasks: [semseg]\nmodel: {name: x}\ntrain: {precision: fp8}\n",
            "train.precision must be 'fp32'",
        ),
        (
            "tasks: [semseg]\nmodel: {name: x}\ndata: {batch_size: true}\n",
            "data.batch_size must be int",
        ),
        ("tasks: [semseg]\nmodel: {}\n", "model.name is required and missing"),
        ("model: {name: x}\n", "tasks is required and missing"),
        (
            "tasks: [semseg]\nmodel: {name: x}\ntrain: {max_steps: 0}\n",
            "train.max_steps must be at least 1",
        ),
        ("tasks: [semseg]\nmodel: {name: x}\ntrain: 3\n", "train must be a mapping"),
        (
            "tasks: [semseg, semseg]\nmodel: {name: x}\n",
            "tasks must be a non-empty list of distinct",
        ),
        (
            "tasks: [semseg]\nmodel: {name: x}\nloss: {weights: cityscapes}\n",
            "loss.weights must be",
        ),
        ("- just\n- a list\n", "must be a mapping of sections"),
        ("tasks: [semseg\n", "not valid YAML"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_overrides_are_yaml_and_nested(tmp_path):
    path = _write(tmp_path, "tasks: [semseg]\nmodel: {name: mtinet}\n")
    config = load_config(
        path,
        [
            "train.max_steps=7",
            "tasks=[semseg, depth]",
            "optim.lr=1e-2",
            "model.options.width=0.5",
            "eval.baselines=null",
        ],
    )
    assert config.train.max_steps == 7 and config.tasks == ["semseg", "depth"]
    assert config.optim.lr == 0.01 and config.model.options == {"width": 0.5}
    with pytest.raises(ConfigError, match=r"with --set overrides.: train.max_steps must be int"):
        load_config(path, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(ConfigError, match="unknown key train.nope"):
        load_config(path, ["train.nope=1"])


def test_base_configs_merge_and_cycles_fail(tmp_path):
    _write(
        tmp_path,
        "tasks: [semseg]\nmodel: {name: mtinet}\ntrain: {max_steps: 5, eval_every: 2}\n",
        "a.yaml",
    )
    child = _write(tmp_path, "base: a.yaml\ntrain: {max_steps: 9}\n", "b.yaml")
    config = load_config(child)
    assert (
        config.train.max_steps == 9
        and config.train.eval_every == 2
        and config.model.name == "mtinet"
    )
    _write(tmp_path, "base: d.yaml\n", "c.yaml")
    _write(tmp_path, "base: c.yaml\n", "d.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")


def test_shipped_configs_load_by_name_and_round_trip():
    names = list_configs()
    assert "synthetic" in names
    for name in names:
        config = load_config(name)
        assert load_config(config_to_dict(config)) == config, name
    assert find_config("synthetic").name == "synthetic.yaml"
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped config"):
        find_config("no_such_config")


@pytest.mark.parametrize("name", [n for n in list_configs()])
def test_shipped_configs_build_their_model(name):
    from mtlfast.train import build_model

    config = load_config(name)
    model = build_model(config)
    assert set(config.tasks) <= set(model.tasks)


def test_missing_dataset_names_the_path(tmp_path):
    from mtlfast.train.data import build_datasets

    with pytest.raises(ValueError, match="data.root: the 'pascal' dataset needs data.root"):
        build_datasets(load_config("mtinet_pascal"))
    missing = tmp_path / "PASCAL_MT"
    with pytest.raises(
        FileNotFoundError, match=f"data.root: {missing} does not exist; expected the PASCAL"
    ):
        build_datasets(load_config("mtinet_pascal", [f"data.root={missing}"]))
    with pytest.raises(FileNotFoundError, match="NYUD-v2"):
        build_datasets(load_config("mtinet_nyud", [f"data.root={missing}"]))


def test_dict_values_are_replaced_not_merged(tmp_path):
    path = _write(
        tmp_path,
        "tasks: [semseg, depth]\nmodel: {name: mtinet, options: {width: 2, x: 1}}\n"
        "loss: {weights: {semseg: 1, depth: 3}}\n",
        "a.yaml",
    )
    config = load_config(
        path, ["tasks=[semseg]", "loss.weights={semseg: 5}", "model.options.width=4"]
    )
    assert config.loss.weights == {"semseg": 5.0}
    assert config.model.options == {"width": 4, "x": 1}
    child = _write(tmp_path, "base: a.yaml\nloss: {weights: {depth: 1}}\n", "b.yaml")
    assert load_config(child).loss.weights == {"depth": 1.0}
    with pytest.raises(ConfigError, match="tasks is a value, not a section"):
        load_config(path, ["tasks.x=1"])
