"""Training, evaluation and comparison of multi-task networks: the ``Trainer``, typed configs,
checkpoints, ``evaluate`` and the ``mtlfast`` command.

```python
from mtlfast.train import Trainer, load_config

config = load_config("synthetic", ["train.max_steps=200"])   # a shipped config, or a YAML path
results = Trainer(config, "runs/demo").fit()                 # results.json, log.csv, plots/, checkpoints/
```
"""

from .async_sgd import AsyncSGD, task_parameter_groups
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, config_to_dict, list_configs, load_config
from .evaluate import ConstantPredictor, evaluate, recalibrate_batch_norm
from .malloc import keep_freed_memory
from .trainer import NonFiniteLossError, Trainer, build_model, default_threads

__all__ = [
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
