"""Model tests run small networks on tiny inputs, where an intra-op thread pool costs more than it saves."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
