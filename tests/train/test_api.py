"""The public names of mtlfast.train, pinned."""

import mtlfast.train


def test_public_names():
    assert sorted(mtlfast.train.__all__) == [
        "AsyncSGD",
        "CheckpointError",
        "Config",
        "ConfigError",
        "ConstantPredictor",
        "NonFiniteLossError",
        "Trainer",
        "build_model",
        "config_to_dict",
        "default_threads",
        "evaluate",
        "keep_freed_memory",
        "list_configs",
        "load_checkpoint",
        "load_config",
        "recalibrate_batch_norm",
        "save_checkpoint",
        "task_parameter_groups",
    ]
    for name in mtlfast.train.__all__:
        assert getattr(mtlfast.train, name).__doc__, name
