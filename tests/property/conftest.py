"""Hypothesis profiles of the property suite.

``ci`` (the default): few, derandomized examples and no deadline, so the directory runs in a
bounded time on a loaded 2-core machine and gives the same verdict on every run. ``thorough``:
randomized, many more examples, for a search before a release
(``HYPOTHESIS_PROFILE=thorough pytest tests/property``).
"""

import os

from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
