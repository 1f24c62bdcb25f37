"""``train.memory_format: auto``: the trainer times its own first steps in both layouts and keeps
the faster one.

Whether channels-last (NHWC) pays depends on the CPU or GPU, the network and what mtlfast's ops
do in each layout: on a 2-core Zen 5 EPYC MTI-Net's step was 0.73x of NCHW's and UberNet's
0.88-0.92x, ASTMT's level and PAD-Net's near it (best steps 0.95-0.99x in session 18's trials,
0.85-1.04x from one comparison to the next); on an AVX2 EPYC UberNet's was 1.10x. No rule of
thumb covers that, so, like ``cudnn.benchmark`` for a convolution and ``train.conv_algorithm:
auto`` for a Winograd shape, the run measures: its own training steps, which give the same results in either
layout (to float rounding), so the trial costs no extra steps, only those of it that run in
the slower layout.
"""

from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["LayoutTrial", "to_memory_format"]

CONTIGUOUS, CHANNELS_LAST = torch.contiguous_format, torch.channels_last
NAMES = {CONTIGUOUS: "contiguous", CHANNELS_LAST: "channels_last"}

# Timed steps per layout. Whole steps on a shared 2-core host move by 10-20% from one to the
# next, and the host's speed drifts over a trial (UberNet's steps 6.2 -> 4.9 s over three
# rounds): each round's two adjacent steps are compared, and the median of the three ratios
# decides. The best step of each layout (session 18's rule) flipped UberNet's choice in two of
# five runs on a 2-core Zen 5 EPYC where the median of the rounds' ratios kept channels-last in
# all five (0.90-0.94x; its in-process comparison: 0.89x).
ROUNDS = 3
# Channels-last is kept only when the median of the rounds' ratios (channels-last / contiguous)
# is under this: in a near tie NCHW stays, the layout every op and the releases were written for.
MARGIN = 0.97
# A run with fewer steps to go than this is not worth the trial (tests, smoke runs): contiguous.
MIN_STEPS = 20

_now = time.perf_counter  # the trial's clock (tests replace it)


def to_memory_format(
    model: nn.Module,
    memory_format: torch.memory_format,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """The model's 4-d parameters and buffers in ``memory_format``, in place (the same Parameter
    objects), their ``.grad`` and the optimiser's per-parameter state (momentum, Adam's moments)
    with them. Not ``model.to(memory_format=...)``, which takes 5-d tensors too and refuses
    channels-last for them (ASTMT's stacked per-task adapter kernels)."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.dim() != 4:
                continue
            if not t.is_contiguous(memory_format=memory_format):
                t.data = t.data.contiguous(memory_format=memory_format)
            g = t.grad
            if g is not None and not g.is_contiguous(memory_format=memory_format):
                t.grad = g.contiguous(memory_format=memory_format)
            if optimizer is None or t not in optimizer.state:
                continue
            # a momentum buffer in the other layout would make every update a strided copy
            state = optimizer.state[t]
            for k, v in state.items():
                if (
                    isinstance(v, torch.Tensor)
                    and v.shape == t.shape
                    and not v.is_contiguous(memory_format=memory_format)
                ):
                    state[k] = v.contiguous(memory_format=memory_format)


class LayoutTrial:
    """The layouts of a process's first training steps and, from their times, the run's layout.

    Schedule (``ROUNDS`` = 3): one untimed step in each layout (each layout's first step builds
    oneDNN's primitives for it and runs Winograd's autotune on its shapes), then rounds of one
    step in each, the order alternating (channels-last first, then contiguous first, ...) so
    that a drift of the machine's speed falls on both. Channels-last is chosen when the median
    over the rounds of its step's time over the contiguous step's of the same round is under
    ``MARGIN`` (0.97).

    Args:
        device: where the steps run (CUDA steps are synchronised before each reading).
        rounds: timed steps per layout.

    Attributes:
        choice: the chosen layout, None while the trial runs.
        times: layout name -> the seconds of its timed steps.
    """

    def __init__(self, device: torch.device, rounds: int = ROUNDS) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.device = device
        self.schedule = [CONTIGUOUS, CHANNELS_LAST]
        for r in range(rounds):
            pair = [CHANNELS_LAST, CONTIGUOUS]
            self.schedule += pair if r % 2 == 0 else pair[::-1]
        self.times: dict[str, list[float]] = {NAMES[CONTIGUOUS]: [], NAMES[CHANNELS_LAST]: []}
        self.choice: torch.memory_format | None = None
        self._done = 0
        self._tick = 0.0

    def next_format(self) -> torch.memory_format:
        """The layout the next step runs in."""
        return self.choice if self.choice is not None else self.schedule[self._done]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        """Before the step: the clock starts (after the device's queued work)."""
        self._sync()
        self._tick = _now()

    def stop(self) -> bool:
        """After the step; True when this step ended the trial (``choice`` is set)."""
        self._sync()
        seconds = _now() - self._tick
        fmt = self.schedule[self._done]
        if self._done >= 2:  # the first of each layout is untimed
            self.times[NAMES[fmt]].append(seconds)
        self._done += 1
        if self._done < len(self.schedule):
            return False
        self.choice = CHANNELS_LAST if self.ratio() < MARGIN else CONTIGUOUS
        return True

    def ratio(self) -> float:
        """The median over the timed rounds of channels-last's step time over contiguous's in the
        same round (the two steps of a round run one after the other)."""
        ratios = sorted(
            cl / nchw
            for cl, nchw in zip(self.times[NAMES[CHANNELS_LAST]], self.times[NAMES[CONTIGUOUS]])
        )
        mid = len(ratios) // 2
        return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2

    def decide(self, choice: torch.memory_format) -> None:
        """Ends the trial with ``choice`` (e.g. rank 0's, so that every rank trains alike)."""
        self.choice = choice

    def summary(self) -> str:
        """One line: the choice and the times it rests on."""
        rounds = min(len(v) for v in self.times.values())
        if rounds == 0:
            return f"memory_format auto: {NAMES[self.choice]}"
        best = {k: min(v) for k, v in self.times.items()}
        return (
            f"memory_format auto: {NAMES[self.choice]} (channels-last / contiguous, median of "
            f"{rounds} rounds: {self.ratio():.2f}x; best steps: channels-last "
            f"{best['channels_last']:.3g} s, contiguous {best['contiguous']:.3g} s)"
        )
