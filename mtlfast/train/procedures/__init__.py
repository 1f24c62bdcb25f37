"""The papers' training procedures.

- :class:`ASTMTProcedure`: single-task passes with adversarial task gradients (ASTMT Sec. 4
  and appendix).
"""

from .astmt import ASTMTProcedure
from .base import Procedure
from .reversal import ganin_weight, reverse_gradient
from .used_weights import UsedWeightsOnly

__all__ = [
    "ASTMTProcedure",
    "Procedure",
    "UsedWeightsOnly",
    "ganin_weight",
    "reverse_gradient",
]
