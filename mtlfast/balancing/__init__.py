"""Loss balancing and gradient methods for multi-task training.

One module per method, each an ``nn.Module`` whose state (weights, counters, its own optimiser)
is in its ``state_dict``:

========================  ===========  ====================================================
name (``create``)         class        what it does
========================  ===========  ====================================================
``fixed``                 Fixed        constant weights (the default)
``gradnorm``              GradNorm     Chen et al. 2018: weights that balance gradient norms
                                       at a shared layer to the tasks' training rates
``uncertainty``           Uncertainty  Kendall et al. 2018: learned homoscedastic variances
``dwa``                   DWA          Liu et al. 2019: weights from the losses' rates of fall
``mgda``                  MGDA         Sener & Koltun 2018 (MGDA-UB): min-norm combination
``pcgrad``                PCGrad       Yu et al. 2020: conflicting gradients projected
``cagrad``                CAGrad       Liu et al. 2021: conflict-averse gradient
========================  ===========  ====================================================

Use one in a plain loop (``balancer.backward(losses, features)``), in the memory engine
(``multi_branch_step(..., balancer=balancer)``: per-task gradients at the branching point, no
second trunk pass, memory flat in the number of tasks) or in the trainer (``balancing.name``
and ``balancing.options`` in the config).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._base import Balancer
from .cagrad import CAGrad
from .dwa import DWA
from .fixed import Fixed
from .gradnorm import GradNorm
from .mgda import MGDA
from .pcgrad import PCGrad
from .uncertainty import Uncertainty

__all__ = [
    "DWA",
    "METHODS",
    "MGDA",
    "Balancer",
    "CAGrad",
    "Fixed",
    "GradNorm",
    "PCGrad",
    "Uncertainty",
    "create",
]

#: name -> class, the names :func:`create` and the config's ``balancing.name`` take
METHODS: dict[str, type[Balancer]] = {
    "fixed": Fixed,
    "gradnorm": GradNorm,
    "uncertainty": Uncertainty,
    "dwa": DWA,
    "mgda": MGDA,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
}


def create(name: str, tasks: Sequence[str], **options: Any) -> Balancer:
    """The balancer ``name`` (a key of :data:`METHODS`) for ``tasks``, with its ``options``.

    Raises ValueError for an unknown name or option, naming the ones there are.
    """
    cls = METHODS.get(name)
    if cls is None:
        raise ValueError(f"unknown balancing method {name!r}; known: {', '.join(METHODS)}")
    try:
        return cls(tasks, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            import inspect

            known = [p for p in inspect.signature(cls).parameters if p != "tasks"]
            raise ValueError(f"{name}: {e}; its options: {', '.join(known) or 'none'}") from None
        raise
