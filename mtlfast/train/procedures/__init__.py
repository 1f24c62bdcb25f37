"""The papers' training procedures, selected by a config's ``procedure`` section.

- ``standard``: the memory engine's summed loss over the tasks, one update per batch;
- ``astmt``: :class:`ASTMTProcedure`, single-task passes with adversarial task gradients
  (ASTMT Sec. 4 and appendix);
- ``ubernet_async``: :class:`UberNetAsyncProcedure`, asynchronous per-task SGD (UberNet Table 3)
  through :class:`mtlfast.train.AsyncSGD`.
"""

from .astmt import ASTMTProcedure
from .base import Procedure
from .build import PROCEDURES, build_procedure
from .reversal import ganin_weight, reverse_gradient
from .ubernet import UberNetAsyncProcedure
from .used_weights import UsedWeightsOnly

__all__ = [
    "PROCEDURES",
    "ASTMTProcedure",
    "Procedure",
    "UberNetAsyncProcedure",
    "UsedWeightsOnly",
    "build_procedure",
    "ganin_weight",
    "reverse_gradient",
]
