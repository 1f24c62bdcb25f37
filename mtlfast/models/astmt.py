"""ASTMT (Maninis, Radosavovic, Kokkinos, CVPR 2019): attentive single-tasking of multiple tasks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..backbones import Backbone, MobileNetV2, ResNet
from ..backbones._blocks import TaskSequential, call, takes_task
from ..engine import current_strategy
from ..nn import rebuilt_norm
from ..ops import channel_norm
from ._build import aspp_rates
from ._checks import check_images
from ._common import recomputed
from .base import MultiTaskModel, _stacked_parameters
from .heads import DeepLabV3PlusDecoder, resize
from .tasks import resolve_tasks

__all__ = ["ASTMT", "GradientDiscriminator"]

_BACKBONES = {
    "se_resnet26": (ResNet, 26),
    "se_resnet50": (ResNet, 50),
    "se_resnet101": (ResNet, 101),
    "se_mobilenet_v2": (MobileNetV2, None),
}


def _blocks_of(stage: nn.Module) -> list[nn.Module]:
    """The checkpoint units of a backbone stage: its blocks when it is a sequence of residual
    blocks (each holding task-conditioned layers), else the stage whole (the stem)."""
    children = list(stage.children()) if isinstance(stage, TaskSequential) else []
    if len(children) > 1 and all(
        takes_task(c) and not isinstance(c, TaskSequential) for c in children
    ):
        return children
    return [stage]


def _default_recompute_stages(backbone: Backbone) -> int:
    """``ASTMT.recompute_stages=None``: for a ResNet, whose kept blocks rebuild their batch-norm
    outputs in backward, the stages down to its first feature (the stem and layer1); for another
    backbone the stages that end above its output stride (two of a MobileNetV2's four)."""
    if isinstance(backbone, ResNet):
        return backbone.feature_stages[0] + 1
    deepest = max(backbone.strides)
    return next(k for k, s in zip(backbone.feature_stages, backbone.strides) if s == deepest)


def _run_stage(
    stage: nn.Module,
    x: torch.Tensor,
    task: int | torch.Tensor | None,
    lean: bool,
    rebuild: bool = False,
) -> torch.Tensor:
    """``stage`` on ``x``; ``lean``: block by block, each through a checkpoint that keeps only its
    input (backward recomputes it, its batch norms not updating their running statistics again);
    else, with ``rebuild``, its ResNet blocks' batch-norm outputs rebuilt in backward
    (:func:`mtlfast.nn.rebuilt_norm.rebuild_norms`)."""
    if not lean:
        with rebuilt_norm.rebuild_norms(rebuild):
            return call(stage, x, task)
    for block in _blocks_of(stage):
        x = recomputed(call, block, block, x, task)
    return x


class _SharedStage(nn.Module):
    """One task-independent backbone stage as a trunk module of :meth:`ASTMT.engine_branches`.

    It carries ``((H, W), x, *features)``: the image size (the predictions are upsampled to
    it), the stage's output and the features kept so far (:meth:`ASTMT._keeps`); the first one
    takes the images. The engine checkpoints the trunk, so the stage runs plainly here.

    Shapes: (N, 3, H, W) or ((H, W), (N, C, h, w), features...) -> ((H, W), (N, C', h', w'), ...).
    """

    def __init__(self, stage: nn.Module, keep: bool) -> None:
        super().__init__()
        self.stage, self.keep = stage, keep

    def forward(self, carry: torch.Tensor | tuple) -> tuple:
        if isinstance(carry, torch.Tensor):
            check_images(carry, "ASTMT")
            size, x, features = tuple(carry.shape[-2:]), carry, ()
        else:
            size, x, *features = carry
        x = call(self.stage, x, None)
        return (size, x, *features, *((x,) if self.keep else ()))


class _SingleTaskPass(nn.Module):
    """One task's pass through an ASTMT model (a branch of :meth:`ASTMT.engine_branches`): the
    whole pass from the images, or the rest of it from the shared stages' carry
    (:class:`_SharedStage`)."""

    def __init__(self, model: ASTMT, task: int) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return self.model(x, self.task)
        size, *shared = x
        _, decoded = self.model.task_part(shared, self.task)
        return self.model.predict(decoded, self.task, size)


class GradientDiscriminator(nn.Module):
    """ASTMT's gradient discriminator (Sec. 4, appendix): 1x1 conv, ReLU, 1x1 conv to T logits per pixel.

    Its input is the gradient of one task's loss with respect to the shared features; with
    ``normalize`` each sample's gradient is first divided by its L2 norm ("we normalize the
    gradient of the losses of the tasks by their norm", appendix). Training it (cross-entropy
    against the source task, w_d = 0.1) and reversing its gradient into the network is
    :class:`mtlfast.train.procedures.ASTMTProcedure`'s. ``hidden`` is not given in the paper;
    256 here by default.

    The release's (``FullyConvDiscriminator``, depth 2, kernel 1) differs where the paper is
    silent: it reads the gradient at the decoder's output (the input of the task classifiers,
    ``head_channels`` wide), divides each pixel's gradient vector by its norm (+1e-10), is as
    wide as its input and has no bias in its first convolution (the options below give it).
    Its training weighs the losses ``0.99 * task + 0.01 * discriminator`` (``--dscr_w``; the
    paper's w_d is 0.1) and ramps the reversal by Ganin et al.'s schedule.

    ``per_pixel`` divides each pixel's gradient vector by its norm instead, and ``bias=False``
    drops the first convolution's bias; with ``hidden=None`` (as wide as the input) and the
    discriminator on the decoder's output (:meth:`ASTMT.discriminator` with ``at="decoder"``)
    these give the release's. :class:`mtlfast.train.procedures.ASTMTProcedure` trains it.

    Shapes: grad (N, C, H, W) -> logits (N, T, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        num_tasks: int,
        hidden: int | None = 256,
        normalize: bool = True,
        eps: float = 1e-12,
        *,
        per_pixel: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"GradientDiscriminator: num_tasks must be >= 2, got {num_tasks}")
        hidden = in_channels if hidden is None else hidden
        self.normalize, self.eps, self.per_pixel = normalize, eps, per_pixel
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=bias),
            nn.ReLU(),
            nn.Conv2d(hidden, num_tasks, 1),
        )

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            if self.per_pixel:  # each pixel's gradient vector (the release's)
                norm = channel_norm(grad).clamp_min(self.eps)
            else:  # each sample's whole gradient
                norm = grad.flatten(1).norm(dim=1).clamp_min(self.eps)[:, None, None, None]
            grad = grad / norm
        return self.net(grad)


class ASTMT(MultiTaskModel):
    """DeepLab-v3+ over an SE backbone, modulated per task (ASTMT Sec. 3, Fig. 3; appendix C).

    By default the authors' released network (github.com/facebookresearch/astmt,
    ``deeplab_se_resnet_multitask.py``, its PASCAL configuration less the adapters, which
    ``adapters=True`` adds) wherever the paper does not say otherwise;
    :func:`mtlfast.models.load_release_checkpoint` loads its checkpoints.

    Encoder: SE-ResNet-26/50/101 (output stride 16, SE with reduction 16 in every bottleneck)
    or SE-MobileNetV2. Decoder: ASPP (rates 6/12/18 and image pooling, ``head_channels``), the
    low-level features (stride 4) reduced to ``low_channels``, two 3x3 conv-BN-ReLU; an SE block
    follows the ReLU of every decoder block (the ASPP's five branches and projection: reduction
    16; the low-level reduction: 4; the two 3x3 blocks: 16). For MobileNet every 3x3 decoder
    convolution is depthwise separable with ReLU6 (appendix C). One 1x1 classifier per task
    (``heads``), sized per task; predictions are upsampled to the input. The network runs one
    task per sample: the mechanisms below select the task's parameters.

    Options (ASTMT's ablations, Table 3):
        se_encoder: task-specific SE in every encoder block (:class:`mtlfast.nn.TaskSE`), else shared;
        se_decoder: task-specific SE in the decoder, else shared (``decoder_se`` False: none);
        adapters: a task-specific 1x1 convolution in parallel with each bottleneck's 3x3
            convolution, starting at zero (Eq. 2, :class:`mtlfast.nn.ResidualAdapter`; ResNets only);
        decoder_adapters: the same beside every decoder convolution but the image pooling's
            (the release's ``--adapt``: 0.56M parameters per task at ``head_channels`` 64);
            None (default): as ``adapters``;
        task_bn: task-specific batch norm (:class:`mtlfast.nn.TaskBatchNorm2d`): a bool, or
            (encoder, decoder). None (default): "when employing disentangled computation graphs":
            in the encoder when se_encoder or adapters, in the decoder when any modulation is on.
            The stem's batch norm stays shared (as in the release): no modulation precedes it.

    ``forward(x, task)``: ``task`` an int (or a task name) -> that task's prediction
    (N, C_t, H, W); an (N,) int64 tensor (one task per sample) -> dict task -> the predictions of
    the samples of that task, in batch order; None -> :meth:`forward_all`. ``forward_all(x)``
    runs the shared stages (the stem) once, stacks their output T times with task ids 0..T-1
    and runs the rest as one pass (the fused ops take a task per sample): it equals T
    single-task calls exactly in eval mode, and in training mode wherever batch norm after the
    shared stages is task-specific (a shared batch norm would see all T copies).

    Where the paper is silent, the release is followed: the SE-ResNet bottlenecks stride on
    their first 1x1 convolution (Caffe's layout; the release's ImageNet SE-ResNets and
    torchvision stride on the 3x3), every block of a dilated stage has its dilation (layer4's
    first block too: 2 at output stride 16), the stem's batch norm is shared, the decoder is 64
    wide with a 12-channel low-level reduction (48 x head_channels / 256; DeepLab-v3+'s own 256
    and 48 are ``head_channels=256``), SE after every decoder block and adapters in the decoder.

    Where mtlfast follows the paper and the release differs (DESIGN: "what the releases get
    wrong is not copied"; :func:`~mtlfast.models.release_options` gives the options that
    reproduce a release checkpoint):
        - without ``se_decoder`` the decoder keeps shared SE blocks (Fig. 3: "SE modules are
          present in all bottleneck blocks of the encoder and the decoder"; Table 3 "uses the
          same SE block for all tasks"); the release's ``--sedec False`` has no decoder SE
          (``decoder_se=False``);
        - task batch norm follows the modulation (Sec. 3.2); the release ties the encoder's to
          ``--trNorm`` (on by default, so even its unmodulated encoder is per task, which the
          paper's decoder-only variant, "identical for all tasks in the encoder", is not) and
          the decoder's to ``--sedec``.

    Other deviations: no deep supervision and no dropout in the ASPP (the release has neither);
    SE hidden width ``max(C // reduction, 1)`` (:class:`mtlfast.nn.TaskSE`), where the
    release's ``C // reduction`` is 0 for narrower layers (only test widths reach them);
    SE-MobileNetV2 places SE (reduction 16) at the end of each inverted residual and its
    decoder is the ResNet one made separable (the release's SE-MobileNet network, with
    reduction-4 SE and grouped 1x1 convolutions, is not reproduced); :meth:`discriminator`
    defaults to the encoder's output (``at="decoder", hidden=None, per_pixel=True,
    bias=False`` give the release's, which :class:`mtlfast.train.procedures.ASTMTProcedure`
    trains). The paper's headline method (Tables 3e, 4: SE modulation with adversarial
    training) has no adapters, hence ``adapters=False``; the release's PASCAL configuration and
    checkpoint add them (``adapters=True``: 31.27M parameters for its five tasks on
    SE-ResNet-26, as in the release without its 4.4k-parameter discriminator). The reported
    dataset-specific tricks (loss weights, learning-rate schedules) belong to the trainer.

    Args:
        tasks, dataset, out_channels: as for the other models.
        backbone: "se_resnet26" (the paper's ablation backbone; "se_resnet101" for its final
            results), "se_resnet50", "se_mobilenet_v2", or a ResNet/MobileNetV2 instance built
            with matching ``num_tasks`` and options.
        output_stride: 16 (DeepLab-v3+ training); head_channels: 64 (the release's ``--dec_w``);
        low_channels: the low-level reduction's width; None: ``48 * head_channels // 256``
            (at least 1); width: backbone width multiplier (1.0 is the paper's; smaller only
            for tests).
        recompute_stages: under the recompute strategy, how many of the backbone's first
            stages (the stem counts as one: five for the SE-ResNets) are recomputed block by
            block in backward; None: for a ResNet the stem and layer1 (2 of 5), for a
            MobileNetV2 those that end above the output stride (2 of 4).
        rebuild_norms: whether the ResNet blocks of the other stages and the decoder's
            blocks rebuild their batch-norm outputs in backward rather than keep them, under
            the recompute strategy or inside a caller's :func:`mtlfast.nn.rebuild_norms`
            (False: never). Neither is a network option: the outputs and gradients are the
            same (to float rounding) for every value, only time and memory differ (below).

    Under :func:`mtlfast.engine.multi_branch_step`, ``multi_branch_step(*model.engine_branches(),
    ...)`` runs the shared stages (:attr:`trunk`: the stem of a modulated encoder) once, then
    ASTMT's T single-task passes from their output one after another, each on the samples
    labelled for its task and freed before the next, and the stem's backward once from the
    passes' summed gradients (where the release's T passes run the stem T times, its batch norm
    updating its running statistics T times per batch; here once). This is the trainer's default
    step: its peak is one task pass plus every parameter's gradient, never T passes
    (``strategy="naive"``, plain autograd, keeps all T graphs until its one backward). Under
    ``strategy="recompute"`` (:func:`mtlfast.engine.current_strategy`; also inside
    :class:`mtlfast.train.procedures.ASTMTProcedure` run by the trainer) each pass keeps less:
    every block of the first ``recompute_stages`` backbone stages (the stem included) runs
    through a checkpoint that keeps its input only and is recomputed in backward (the engine
    recomputes the stem likewise), batch norms (task ones included) updating their running
    statistics once; the blocks of the other stages keep their convolutions' outputs but not
    their batch norms' (``rebuild_norms``: the ReLU outputs and the task SE's input, a third of
    what such a block saved, rebuilt from the batch norm's input and statistics in one
    elementwise pass when the backward reads them). By default an SE-ResNet recomputes the
    stem and layer1, the stages at the decoder's low-level stride of 4, where its maps are
    largest for the least convolution work; a MobileNetV2 (whose blocks keep their batch-norm
    outputs) the two of its four stages above the output stride. The decoder is never
    recomputed: it is the first part the backward reaches, so its activations are alive at
    that moment whether kept or recomputed, and recomputing it cost time (about 10% of the
    step) for no lower peak; its blocks rebuild their batch-norm outputs as the kept stages'
    do. At 256x256, batch 4, five tasks, the release's network with adapters, 2 threads,
    against the release's per-task passes (476 MiB; a 2-core EPYC, one process, the sides
    alternating; ``benchmarks/astmt_kept_stages.py``, ``benchmarks/results/README.md``): the
    default keeps 355 MiB (0.75x) at 0.91-0.99x the release's step in five runs, 0.95-0.98x
    the step of the default before the rebuilt batch norms (``recompute_stages=3,
    rebuild_norms=False``, 369 MiB); rebuilding costs a block 1-2% of its forward and backward
    (``recompute_stages=2, rebuild_norms=False``: 425 MiB, 0.89x). ``recompute_stages=3``
    323 MiB (0.68x) at about the old default's time; ``recompute_stages=5`` (all)
    275 MiB (0.58x) at 1.1x the release's step; ``recompute_stages=0`` 537 MiB (1.13x)
    without rebuilt batch norms, its step 0.82x the release's on a Xeon (naive, all T graphs
    at once: 1.9 GiB). Of the all-stages peak (285 MiB without rebuilt batch norms) 119 MiB
    are the gradients of all 31.27M parameters and 72 MiB the blocks' kept inputs; the rest is
    a pass's decoder and loss at the start of its backward. What the peak was before (oneDNN's
    buffers for dilated weight gradients, up to 81 MiB, and cross-entropy's three maps) is
    gone: the ASPP's rates 12 and 18 skip the taps that read padding
    (:func:`mtlfast.ops.atrous_conv2d`), the other dilated convolutions back-propagate over
    their phases undilated, the loss keeps one map, and task SE keeps its output for the ReLU's
    mask, not the residual (a projection shortcut's batch-norm output, kept by nothing else:
    8 MiB in layer4, 4 in layer3). At 512x512 input (the release's training crops) layer4's
    dilated 3x3 convolutions, on 32x32 maps, run by Winograd over their 2 x 2 phases under
    :func:`mtlfast.nn.use_winograd` (the trainer's default): the release's network with adapters
    then trains in 0.94x (0.91-1.05x) the step time with them direct, the default network in
    0.94x (0.92-0.96x) (batch 4, 2 threads, a 2-core Zen 4 EPYC, 5 alternating rounds); at 256x256
    their 8x8 phases run by F(2x2, 3x3) in training where the trainer's autotune measures it
    faster (on that EPYC 0.66x oneDNN's time forward and backward; the release's network's step
    0.94x (0.93-0.97x, 9 alternating rounds), its peak 355 MiB either way, 283 against 277 MiB
    with every stage recomputed); inference keeps aten's there (its peak 88 MiB, 111 with them).

    Shapes: x (N, 3, H, W); task int or (N,); outputs (N, C_t, H, W).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        backbone: str | Backbone = "se_resnet26",
        *,
        dataset: str = "pascal",
        out_channels: Mapping[str, int] | None = None,
        se_encoder: bool = True,
        se_decoder: bool = True,
        decoder_se: bool = True,
        adapters: bool = False,
        decoder_adapters: bool | None = None,
        task_bn: bool | tuple[bool, bool] | None = None,
        output_stride: int = 16,
        head_channels: int = 64,
        low_channels: int | None = None,
        width: float = 1.0,
        recompute_stages: int | None = None,
        rebuild_norms: bool = True,
    ) -> None:
        super().__init__()
        self.out_channels = resolve_tasks(tasks, dataset, out_channels)
        self.tasks = list(self.out_channels)
        t = len(self.tasks)
        if se_decoder and not decoder_se:
            raise ValueError(
                "ASTMT: se_decoder=True needs decoder_se=True (task-specific SE blocks in the decoder)"
            )
        decoder_adapters = adapters if decoder_adapters is None else decoder_adapters
        self.se_encoder, self.se_decoder, self.adapters = se_encoder, se_decoder, adapters
        if task_bn is None:
            bn_encoder, bn_decoder = (
                se_encoder or adapters,
                se_encoder or se_decoder or adapters or decoder_adapters,
            )
        elif isinstance(task_bn, bool):
            bn_encoder = bn_decoder = task_bn
        else:
            bn_encoder, bn_decoder = (bool(b) for b in task_bn)
        if low_channels is None:
            low_channels = max(48 * head_channels // 256, 1)
        if isinstance(backbone, Backbone):
            self.backbone = backbone
        else:
            if backbone not in _BACKBONES:
                raise ValueError(
                    f"astmt backbone must be one of {sorted(_BACKBONES)} or an instance, got {backbone!r}"
                )
            cls, depth = _BACKBONES[backbone]
            opts = {
                "output_stride": output_stride,
                "width": width,
                "se": True,
                "num_tasks": t,
                "task_se": se_encoder,
                "task_bn": bn_encoder,
            }
            if cls is ResNet:
                self.backbone = ResNet(
                    depth,
                    adapters=adapters,
                    stem_task_bn=False,
                    stride_in_1x1=True,
                    dilate_first_block=True,
                    **opts,
                )
            else:
                if adapters:
                    raise ValueError(
                        "residual adapters sit on a bottleneck's 3x3 convolution: ResNet backbones only"
                    )
                self.backbone = MobileNetV2(**opts)
        c = self.backbone.channels
        separable = isinstance(self.backbone, MobileNetV2)
        if separable and decoder_adapters:
            raise ValueError(
                "decoder adapters sit beside plain convolutions: not with the separable MobileNet decoder"
            )
        self.decoder = DeepLabV3PlusDecoder(
            c[0],
            c[-1],
            head_channels,
            low_channels,
            rates=aspp_rates(self.backbone.strides[-1]),
            separable=separable,
            se=decoder_se,
            num_tasks=t,
            task_se=se_decoder,
            task_bn=bn_decoder,
            adapters=decoder_adapters,
        )
        self.heads = nn.ModuleDict(
            {name: nn.Conv2d(head_channels, n, 1) for name, n in self.out_channels.items()}
        )
        n_stages = len(self.backbone.stages())
        if recompute_stages is None:
            recompute_stages = _default_recompute_stages(self.backbone)
        if (
            isinstance(recompute_stages, bool)
            or not isinstance(recompute_stages, int)
            or not 0 <= recompute_stages <= n_stages
        ):
            raise ValueError(
                f"ASTMT: recompute_stages must be None or an int in [0, {n_stages}] (the "
                f"backbone's {n_stages} stages), got {recompute_stages!r}"
            )
        self.recompute_stages = recompute_stages
        if not isinstance(rebuild_norms, bool):
            raise TypeError(f"ASTMT: rebuild_norms must be a bool, got {rebuild_norms!r}")
        self.rebuild_norms = rebuild_norms

    @property
    def trunk(self) -> nn.Sequential:
        """The trunk of :meth:`engine_branches`: the :attr:`shared_stages`, one module each.

        ASTMT modulates its encoder per task (task SE, task batch norm, adapters) from the first
        block on, so what every task computes alike is the stem (the whole encoder without
        modulation); each branch is the rest of a single-task pass. Without a shared stage (a
        modulated MobileNet) the trunk is the identity and each branch the whole pass.
        """
        stages = self.backbone.stages()[: self.shared_stages]
        if not stages:
            return nn.Sequential(nn.Identity())
        return nn.Sequential(*(_SharedStage(s, self._keeps(k)) for k, s in enumerate(stages)))

    def engine_branches(self) -> tuple[nn.Sequential, dict[str, nn.Module]]:
        """(trunk, heads) for :func:`mtlfast.engine.multi_branch_step`: the shared stages
        (:attr:`trunk`) and one branch per task, the rest of its single-task pass
        (``task_part`` and ``predict``), equal to ``self(x, task)``.

        The stem then runs once per step instead of once per task: under the recompute strategy
        a forward, its recomputation and one backward from the summed gradients of the T passes.
        Its shared batch norm updates its running statistics once per step (the release's T
        per-task passes update them T times, each on the same images).

        Shapes: the trunk (N, 3, H, W) -> ((H, W), (N, C, h, w), features...); each branch
        -> (K, C_t, H, W) for the K samples labelled for its task.
        """
        return self.trunk, {name: _SingleTaskPass(self, i) for i, name in enumerate(self.tasks)}

    def _task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                raise ValueError(f"ASTMT: unknown task {task!r}; tasks are {self.tasks}")
            return self.tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self.tasks):
            raise ValueError(
                f"ASTMT: task must be in [0, {len(self.tasks)}) or a task name, got {task!r}"
            )
        return task

    def _lean(self, stage: int) -> bool:
        """Whether backbone stage ``stage``'s blocks are recomputed in backward: one of the first
        :attr:`recompute_stages`, under the memory engine's recompute strategy
        (:func:`mtlfast.engine.current_strategy`) with autograd on, in training or eval mode
        (frozen batch norm)."""
        return stage < self.recompute_stages and self._recomputes()

    @staticmethod
    def _recomputes() -> bool:
        """Whether this pass keeps less for backward: under the recompute strategy with autograd
        on."""
        return torch.is_grad_enabled() and current_strategy() == "recompute"

    def _rebuilds(self) -> bool:
        """Whether the stages not recomputed rebuild their batch-norm outputs in backward
        (:func:`_run_stage`): with :attr:`rebuild_norms`, under the recompute strategy or a
        caller's :func:`mtlfast.nn.rebuild_norms`; never without."""
        return self.rebuild_norms and (self._recomputes() or rebuilt_norm.rebuilding_norms())

    def _encode(
        self, x: torch.Tensor, features: list[torch.Tensor], task: int | torch.Tensor, start: int
    ) -> list[torch.Tensor]:
        """The backbone's stages from ``start`` on ``x`` (``features``: those of the earlier
        stages), then its neck; under the recompute strategy the first :attr:`recompute_stages`
        block by block through checkpoints (:func:`_run_stage`)."""
        stages = self.backbone.stages()
        for k in range(start, len(stages)):
            x = _run_stage(stages[k], x, task, self._lean(k), self._rebuilds())
            if self._keeps(k):
                features.append(x)
        return self.backbone.neck(features)

    def _keeps(self, stage: int) -> bool:
        """Whether stage ``stage``'s output is kept as a feature: the decoder reads the first
        and the last only, so with the identity neck (ResNet, MobileNetV2) the ones between are
        dropped (ResNet's layer2 and layer3 outputs, 12 MiB that the release frees too, stayed
        alive through layer4: the inference peak, at 256x256 batch 4)."""
        stages = self.backbone.feature_stages
        if stage not in stages:
            return False
        if type(self.backbone).neck is not Backbone.neck:  # a neck may read every feature
            return True
        return stage in (stages[0], stages[-1])

    def _decode(self, features: list[torch.Tensor], task: int | torch.Tensor) -> torch.Tensor:
        """The decoder on the backbone's features (never recomputed: see the class docstring;
        its blocks' batch-norm outputs rebuilt as the kept stages' are)."""
        with rebuilt_norm.rebuild_norms(self._rebuilds()):
            return self.decoder(features[0], features[-1], task)

    def _features(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        return self._decode(self._encode(x, [], task, 0), task)

    def forward(self, x: torch.Tensor, task: int | str | torch.Tensor | None = None):
        check_images(x, type(self).__name__)
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
        """Every task's prediction from one task-batched pass: the shared stages
        (:attr:`shared_stages`) once, the rest on their output stacked T times.

        Without autograd (inference) the T task passes run one after the other on the shared
        stages' output instead: the stacked pass holds T passes' activations at once (2.95x the
        release's inference peak at 256x256 batch 4), one pass at a time holds what the release's
        T single-task forwards hold.

        Shapes: (N, 3, H, W) -> {task: (N, C_t, H, W)}."""
        check_images(x, type(self).__name__)
        n, t = x.shape[0], len(self.tasks)
        if not torch.is_grad_enabled():
            shared = self.shared_part(x)
            return {
                name: self.predict(self.task_part(shared, i)[1], i, x.shape[-2:])
                for i, name in enumerate(self.tasks)
            }
        task = torch.arange(t, device=x.device).repeat_interleave(n)
        shared = [s.repeat(t, *(1,) * (s.dim() - 1)) for s in self.shared_part(x)]
        _, decoded = self.task_part(shared, task)
        return {
            name: resize(self.heads[name](decoded[i * n : (i + 1) * n]), x.shape[-2:])
            for i, name in enumerate(self.tasks)
        }

    def summary_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What :func:`summary` counts: all tasks, i.e. T single-task passes."""
        return self.forward_all(x)

    def discriminator(
        self,
        num_tasks: int | None = None,
        hidden: int | None = 256,
        *,
        at: str = "encoder",
        per_pixel: bool = False,
        bias: bool = True,
    ) -> GradientDiscriminator:
        """A gradient discriminator on the gradients at the encoder's output ((N, channels[-1],
        h, w) -> (N, T, h, w)) or, ``at="decoder"``, at the decoder's output, the input of the
        task classifiers ((N, head_channels, h, w), the release's); other arguments as
        :class:`GradientDiscriminator`."""
        if at not in ("encoder", "decoder"):
            raise ValueError(f"discriminator: at must be 'encoder' or 'decoder', got {at!r}")
        channels = (
            self.backbone.channels[-1]
            if at == "encoder"
            else next(iter(self.heads.values())).in_channels
        )
        return GradientDiscriminator(
            channels, num_tasks or len(self.tasks), hidden, per_pixel=per_pixel, bias=bias
        )

    # ---- per-task execution (ASTMT's training procedure, mtlfast.train.procedures) ----------

    @property
    def shared_stages(self) -> int:
        """How many of the backbone's first stages hold no task-specific layer: the part every
        single-task pass computes alike (the stem with a modulated encoder; the whole encoder
        without encoder modulation, task batch norm or adapters)."""
        t, n = len(self.tasks), 0
        for stage in self.backbone.stages():
            if any(_stacked_parameters(m, t) for m in stage.modules()):
                break
            n += 1
        return n

    def shared_part(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The shared stages on ``x``: [their output, the backbone features among them...].

        Shapes: x (N, 3, H, W) -> [(N, C, h, w), features (N, channels[k], h_k, w_k)...].
        """
        check_images(x, type(self).__name__)
        stages = self.backbone.stages()
        features = []
        for i in range(self.shared_stages):  # recomputed in backward as the task part's stages
            x = _run_stage(stages[i], x, None, self._lean(i), self._rebuilds())
            if self._keeps(i):
                features.append(x)
        return [x, *features]

    def task_part(
        self, shared: Sequence[torch.Tensor], task: int | str | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of task ``task``'s pass from :meth:`shared_part`'s outputs (any rows of
        them): (encoder output, decoder output), the decoder's being the task classifier's input.
        :meth:`predict` finishes the pass; together they equal ``self(x, task)``. ``task`` may
        be a (K,) int64 tensor, one task per row (the task-batched passes of :meth:`forward_all`).

        Shapes: shared as shared_part's, K rows -> ((K, channels[-1], h, w), (K, head_channels, h4, w4)).
        """
        i = task if isinstance(task, torch.Tensor) else self._task_index(task)
        features = self._encode(shared[0], list(shared[1:]), i, self.shared_stages)
        return features[-1], self._decode(features, i)

    def predict(self, decoded: torch.Tensor, task: int | str, size: Sequence[int]) -> torch.Tensor:
        """Task ``task``'s classifier on the decoder's output, upsampled to ``size``.

        Shapes: (K, head_channels, h, w) -> (K, C_t, size[0], size[1]).
        """
        return resize(self.heads[self.tasks[self._task_index(task)]](decoded), size)
