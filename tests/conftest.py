"""Shared test setup: Triton runs interpreted on CPU tensors when there is no GPU."""

import os

import torch

# Must precede the first import of triton anywhere in the test session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _winograd_rule():
    """Every test starts under the Winograd op's fixed rule: a Trainer ("conv_algorithm: auto")
    turns the process-wide autotune on, which must not reach the next test."""
    from mtlfast.ops import set_winograd_autotune

    set_winograd_autotune(False)
    yield
    set_winograd_autotune(False)


# Test directories whose small networks on tiny inputs gain nothing from an intra-op thread pool:
# on a loaded 2-core machine each op's OpenMP fork/join took ~10 ms there, 100x the work itself.
# Other directories keep the default count, so that the kernels' parallel paths stay exercised.
ONE_THREAD_DIRS = {"engine", "models", "backbones"}


@pytest.fixture(autouse=True)
def _one_thread_for_small_networks(request):
    if request.node.path.parent.name not in ONE_THREAD_DIRS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def require_backend(backend: str, device: str = "cpu") -> None:
    """Skip unless ``backend`` runs on ``device``; fail instead when MTLFAST_REQUIRE_BACKENDS
    (comma-separated, set by CI and `make test` for the CPU, by benchmarks/gpu_check.sh for the
    GPU) names it, so a broken build cannot pass as skips. CUDA-device calls sit in tests marked
    ``gpu``, which a machine without a GPU skips before they get here."""
    from mtlfast.ops import available_backends

    if backend in available_backends(device):
        return
    required = {b.strip() for b in os.environ.get("MTLFAST_REQUIRE_BACKENDS", "").split(",")}
    if backend in required:
        pytest.fail(
            f"backend {backend!r} is required (MTLFAST_REQUIRE_BACKENDS) but unavailable on {device}"
        )
    pytest.skip(f"backend {backend!r} unavailable on {device}")
