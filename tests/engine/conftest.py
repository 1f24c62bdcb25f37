"""Engine tests run on tiny tensors, where an intra-op thread pool costs far more than it saves."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # On a loaded 2-core machine each op's OpenMP fork/join took ~10 ms here, 100x the work
    # itself; restore the count so other test directories still exercise their parallel paths.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
