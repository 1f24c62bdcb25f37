"""Multi-task dense-prediction models: UberNet, ASTMT, MTI-Net, PAD-Net, and the shared-encoder and
single-task baselines.

Every model is a :class:`MultiTaskModel` (``tasks``, ``out_channels``, ``trunk``, ``heads``,
``expand``, ``engine_branches``), so a trainer, the engine and a user's own loop treat them alike.
``create(name, tasks, backbone=..., **options)`` builds one by name (``list_models()``;
``create("single_task", task, like=family)`` the single-task network of a family);
``summary(model, input_size)`` counts its parameters (shared / per task) and multiply-adds;
``load_release_checkpoint(ASTMT(**release_options(path)), path)`` loads the ASTMT release's weights.
"""

from .astmt import ASTMT, GradientDiscriminator
from .base import MultiTaskModel
from .baseline import MTLBaseline, SingleTask
from .mtinet import MTINet
from .padnet import PADNet
from .registry import create, list_models, register
from .release import load_release_checkpoint, release_options
from .single_task import HRNetSingleTask
from .summary import ModelSummary, summary
from .tasks import DEFAULT_OUT_CHANNELS, resolve_tasks
from .ubernet import UberNet, scale_key

__all__ = [
    "ASTMT",
    "DEFAULT_OUT_CHANNELS",
    "GradientDiscriminator",
    "HRNetSingleTask",
    "MTINet",
    "MTLBaseline",
    "ModelSummary",
    "MultiTaskModel",
    "PADNet",
    "SingleTask",
    "UberNet",
    "create",
    "list_models",
    "load_release_checkpoint",
    "register",
    "release_options",
    "resolve_tasks",
    "scale_key",
    "summary",
]
