"""ASTMT (Maninis, Radosavovic, Kokkinos, CVPR 2019): attentive single-tasking of multiple tasks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..backbones import Backbone, MobileNetV2, ResNet
from ._build import aspp_rates
from .base import MultiTaskModel
from .heads import DeepLabV3PlusDecoder, resize
from .tasks import resolve_tasks

__all__ = ["ASTMT", "GradientDiscriminator"]

_BACKBONES = {"se_resnet26": (ResNet, 26), "se_resnet50": (ResNet, 50), "se_resnet101": (ResNet, 101),
              "se_mobilenet_v2": (MobileNetV2, None)}


class _SingleTaskPass(nn.Module):
    """One task's whole pass through an ASTMT model (a branch of :meth:`ASTMT.engine_branches`)."""

    def __init__(self, model: ASTMT, task: int) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.task)


class GradientDiscriminator(nn.Module):
    """ASTMT's gradient discriminator (Sec. 4, appendix): 1x1 conv, ReLU, 1x1 conv to T logits per pixel.

    Its input is the gradient of one task's loss with respect to the shared features; with
    ``normalize`` each sample's gradient is first divided by its L2 norm ("we normalize the
    gradient of the losses of the tasks by their norm", appendix). Training it (cross-entropy
    against the source task, w_d = 0.1) and reversing its gradient into the network is the
    trainer's business. ``hidden`` is not given in the paper; 256 here.

    Shapes: grad (N, C, H, W) -> logits (N, T, H, W).
    """

    def __init__(self, in_channels: int, num_tasks: int, hidden: int = 256, normalize: bool = True,
                 eps: float = 1e-12) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"GradientDiscriminator: num_tasks must be >= 2, got {num_tasks}")
        self.normalize, self.eps = normalize, eps
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, num_tasks, 1))

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            norm = grad.flatten(1).norm(dim=1).clamp_min(self.eps)
            grad = grad / norm[:, None, None, None]
        return self.net(grad)


class ASTMT(MultiTaskModel):
    """DeepLab-v3+ over an SE backbone, modulated per task (ASTMT Sec. 3, Fig. 3; appendix C).

    Encoder: SE-ResNet-26/50/101 (output stride 16, SE with reduction 16 in every bottleneck)
    or SE-MobileNetV2. Decoder: ASPP (rates 6/12/18 and image pooling, 256 channels), the
    low-level features (stride 4) reduced to 48 channels, two 3x3 conv-BN-ReLU with an SE block
    after each; for MobileNet every 3x3 convolution is depthwise separable with ReLU6 (appendix
    C). One 1x1 classifier per task (``heads``), sized per task; predictions are upsampled to
    the input. The network runs one task per sample: the mechanisms below select the task's
    parameters.

    Options (ASTMT's ablations, Table 3):
        se_encoder: task-specific SE in every encoder block (:class:`mtlfast.nn.TaskSE`);
        se_decoder: task-specific SE in the decoder; with neither, the SE blocks are shared;
        adapters: a task-specific 1x1 convolution in parallel with each bottleneck's 3x3
            convolution, starting at zero (Eq. 2, :class:`mtlfast.nn.ResidualAdapter`; ResNets only);
        task_bn: task-specific batch norm (:class:`mtlfast.nn.TaskBatchNorm2d`). None (default):
            "when employing disentangled computation graphs": in the encoder when se_encoder or
            adapters, in the decoder when any of the three is on.

    ``forward(x, task)``: ``task`` an int (or a task name) -> that task's prediction
    (N, C_t, H, W); an (N,) int64 tensor (one task per sample) -> dict task -> the predictions of
    the samples of that task, in batch order; None -> :meth:`forward_all`. ``forward_all(x)``
    stacks the batch T times with task ids 0..T-1 and runs one pass (the fused ops take a task
    per sample): it equals T single-task calls exactly in eval mode, and in training mode
    wherever batch norm is task-specific (a shared batch norm would see all T copies).

    Deviations from the paper and its release (github.com/facebookresearch/astmt): no deep
    supervision and no dropout in the ASPP; SE-MobileNetV2 places SE at the end of each inverted
    residual (the release's SE-MobileNet layout is not described in the paper); the
    discriminator's hidden width (256) is our choice. The reported dataset-specific tricks
    (loss weights, learning-rate schedules) belong to the trainer.

    Args:
        tasks, dataset, out_channels: as for the other models.
        backbone: "se_resnet26" (the paper's ablation backbone; "se_resnet101" for its final
            results), "se_resnet50", "se_mobilenet_v2", or a ResNet/MobileNetV2 instance built
            with matching ``num_tasks`` and options.
        output_stride: 16 (DeepLab-v3+ training); head_channels: 256; width: backbone width
            multiplier (1.0 is the paper's; smaller only for tests).

    Under :func:`mtlfast.engine.multi_branch_step`, ``multi_branch_step(*model.engine_branches(),
    ...)`` runs ASTMT's T single-task passes one after another, each on the samples labelled for
    its task and freed before the next: the modulated encoder has no task-independent trunk, so
    the "trunk" is the identity and each branch is a whole single-task pass.

    Shapes: x (N, 3, H, W); task int or (N,); outputs (N, C_t, H, W).
    """

    def __init__(self, tasks: Sequence[str], backbone: str | Backbone = "se_resnet26", *, dataset: str = "pascal",
                 out_channels: Mapping[str, int] | None = None, se_encoder: bool = True, se_decoder: bool = True,
                 adapters: bool = False, task_bn: bool | None = None, output_stride: int = 16,
                 head_channels: int = 256, width: float = 1.0) -> None:
        super().__init__()
        self.out_channels = resolve_tasks(tasks, dataset, out_channels)
        self.tasks = list(self.out_channels)
        t = len(self.tasks)
        self.se_encoder, self.se_decoder, self.adapters = se_encoder, se_decoder, adapters
        bn_encoder = (se_encoder or adapters) if task_bn is None else task_bn
        bn_decoder = (se_encoder or se_decoder or adapters) if task_bn is None else task_bn
        if isinstance(backbone, Backbone):
            self.backbone = backbone
        else:
            if backbone not in _BACKBONES:
                raise ValueError(f"astmt backbone must be one of {sorted(_BACKBONES)} or an instance, got {backbone!r}")
            cls, depth = _BACKBONES[backbone]
            opts = {"output_stride": output_stride, "width": width, "se": True, "num_tasks": t,
                    "task_se": se_encoder, "task_bn": bn_encoder}
            if cls is ResNet:
                self.backbone = ResNet(depth, adapters=adapters, **opts)
            else:
                if adapters:
                    raise ValueError("residual adapters sit on a bottleneck's 3x3 convolution: ResNet backbones only")
                self.backbone = MobileNetV2(**opts)
        c = self.backbone.channels
        self.decoder = DeepLabV3PlusDecoder(
            c[0], c[-1], head_channels, rates=aspp_rates(self.backbone.strides[-1]),
            separable=isinstance(self.backbone, MobileNetV2), se=True, num_tasks=t, task_se=se_decoder,
            task_bn=bn_decoder)
        self.heads = nn.ModuleDict({name: nn.Conv2d(head_channels, n, 1) for name, n in self.out_channels.items()})

    @property
    def trunk(self) -> nn.Sequential:
        """The identity, as an nn.Sequential: the trunk of :meth:`engine_branches`.

        ASTMT modulates its encoder per task (task SE, task batch norm, adapters) from the first
        block on, so its encoder computes something else for each task: the only representation
        common to all tasks is the image itself, and each branch is a whole single-task pass. (A
        model is built this way whatever its options, so that one trainer path serves them all.)
        """
        return nn.Sequential(nn.Identity())

    def engine_branches(self) -> tuple[nn.Sequential, dict[str, nn.Module]]:
        """(trunk, heads) for :func:`mtlfast.engine.multi_branch_step`: the identity as the trunk and
        one branch per task, each the whole single-task pass ``self(x, task)``.

        Shapes: each branch (K, 3, H, W) -> (K, C_t, H, W) for the K samples labelled for its task.
        """
        return self.trunk, {name: _SingleTaskPass(self, i) for i, name in enumerate(self.tasks)}

    def _task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                raise ValueError(f"ASTMT: unknown task {task!r}; tasks are {self.tasks}")
            return self.tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self.tasks):
            raise ValueError(f"ASTMT: task must be in [0, {len(self.tasks)}) or a task name, got {task!r}")
        return task

    def _features(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        features = self.backbone(x, task)
        return self.decoder(features[0], features[-1], task)

    def forward(self, x: torch.Tensor, task: int | str | torch.Tensor | None = None):
        if task is None:
            return self.forward_all(x)
        if isinstance(task, torch.Tensor):
            decoded = self._features(x, task)
            out = {}
            for i, name in enumerate(self.tasks):
                rows = (task == i).nonzero().flatten()
                if rows.numel():
                    out[name] = resize(self.heads[name](decoded[rows]), x.shape[-2:])
            return out
        i = self._task_index(task)
        name = self.tasks[i]
        return resize(self.heads[name](self._features(x, i)), x.shape[-2:])

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every task's prediction from one task-batched pass. Shapes: (N, 3, H, W) -> {task: (N, C_t, H, W)}."""
        n, t = x.shape[0], len(self.tasks)
        task = torch.arange(t, device=x.device).repeat_interleave(n)
        decoded = self._features(x.repeat(t, 1, 1, 1), task)
        return {name: resize(self.heads[name](decoded[i * n:(i + 1) * n]), x.shape[-2:])
                for i, name in enumerate(self.tasks)}

    def summary_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What :func:`summary` counts: all tasks, i.e. T single-task passes."""
        return self.forward_all(x)

    def discriminator(self, num_tasks: int | None = None, hidden: int = 256) -> GradientDiscriminator:
        """A gradient discriminator on the encoder output's gradients ((N, channels[-1], h, w) -> (N, T, h, w))."""
        return GradientDiscriminator(self.backbone.channels[-1], num_tasks or len(self.tasks), hidden)
