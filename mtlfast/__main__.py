"""``python -m mtlfast`` runs the ``mtlfast`` command."""

import sys

from .train.cli import main

sys.exit(main())
