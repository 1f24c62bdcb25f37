"""mtlfast.profiling.memory on known allocation patterns and known autograd graphs."""

import pytest
import torch

from mtlfast import profiling

MB = 2**20


def test_peak_of_freed_block():
    """10 MB allocated and freed, then 4 MB: the peak is the 10 MB, the 4 MB remain."""
    keep = torch.empty(3 * MB, dtype=torch.uint8)  # allocated before: not counted
    with profiling.memory("cpu") as m:
        a = torch.empty(10 * MB, dtype=torch.uint8)
        del a
        b = torch.empty(4 * MB, dtype=torch.uint8)
    assert (m.peak_extra_bytes, m.end_extra_bytes) == (10 * MB, 4 * MB)
    assert (m.start_bytes, m.peak_bytes, m.end_bytes) == (None, None, None)  # CPU: no totals
    del keep, b


def test_chain_of_ops():
    """Outputs of known sizes, each freed once used: at most two of them alive at a time."""
    n = 1 << 20
    x = torch.randn(n)
    with profiling.memory("cpu") as m:
        y = x + x  # 4n bytes
        z = y * y  # 8n alive
        del y
        w = torch.sin(z)  # 8n alive
        del z
        v = torch.cat([w, w])  # 4n + 8n alive
        del w
    assert m.peak_extra_bytes == 12 * n
    assert m.end_extra_bytes == v.nbytes == 8 * n


def test_backward_allocations_are_seen():
    """sum(x * w) forward then backward: the product (freed once summed: mul saves x and w,
    not its output), then the two grads (the sum's backward only expands its scalar gradient);
    scalars add a few bytes."""
    n = 1 << 18
    x, w = torch.randn(n, requires_grad=True), torch.randn(n, requires_grad=True)
    with profiling.memory("cpu") as m:
        loss = (x * w).sum()
        loss.backward()
    assert m.peak_extra_bytes == pytest.approx(2 * 4 * n, abs=64)
    assert m.end_extra_bytes == pytest.approx(2 * 4 * n, abs=64)  # x.grad, w.grad (and loss)


def test_frees_of_earlier_memory_are_ignored():
    """The CPU figures count only the block's own allocations."""
    with profiling.memory("cpu"):
        a = torch.empty(5 * MB, dtype=torch.uint8)  # seen by an earlier profiler session
    with profiling.memory("cpu") as m:
        del a
        b = torch.empty(2 * MB, dtype=torch.uint8)
    assert (m.peak_extra_bytes, m.end_extra_bytes) == (2 * MB, 2 * MB)
    del b


def test_saved_bytes_of_product():
    """x * w saves x and w for backward: their bytes exactly."""
    x, w = torch.randn(1000, requires_grad=True), torch.randn(1000, requires_grad=True)
    with profiling.memory("cpu") as m:
        x * w
    assert (m.saved_bytes, m.saved_tensors) == (8000, 2)


def test_saved_bytes_dedupe_shared_storage():
    """A tensor saved by two ops, or twice by one, counts once; a saved view counts its whole
    storage, which it keeps alive."""
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    with profiling.memory("cpu") as m:
        y = torch.relu(x)  # saves its output y
        y * w  # saves y again, and w
        x * x  # saves x twice
    assert (m.saved_bytes, m.saved_tensors) == (12000, 3)
    with profiling.memory("cpu") as m:
        x[:10] * w[:10]  # views of x and w
    assert (m.saved_bytes, m.saved_tensors) == (8000, 2)


def test_saved_bytes_and_gradients_unchanged():
    """The pack hook hands autograd the same values: grads match an unmeasured run."""
    x = torch.randn(7, 5, requires_grad=True)
    expected = torch.autograd.grad((x.sin() * x).sum(), x)[0]
    with profiling.memory("cpu") as m:
        got = torch.autograd.grad((x.sin() * x).sum(), x)[0]
    torch.testing.assert_close(got, expected)
    assert m.saved_bytes == x.nbytes * 2  # x (by sin and mul), sin(x) (by mul)


def test_saved_tensors_off():
    x = torch.randn(10, requires_grad=True)
    with profiling.memory("cpu", saved_tensors=False) as m:
        x * x
    assert m.saved_bytes is None and m.peak_extra_bytes == 40


def test_nested_blocks():
    with profiling.memory("cpu") as outer:
        a = torch.ones(10 * MB, dtype=torch.uint8)
        x = torch.randn(100, requires_grad=True)
        with profiling.memory("cpu") as inner:
            b = torch.ones(5 * MB, dtype=torch.uint8)
            del b
            x * x
        del a
        assert inner.peak_extra_bytes == 5 * MB  # filled in when the inner block ends
    assert outer.peak_extra_bytes == 15 * MB + 400  # a, x, b
    assert outer.end_extra_bytes == 400  # x
    assert inner.saved_bytes == outer.saved_bytes == 400


def test_figures_are_none_inside_block_and_set_after_error():
    with pytest.raises(ZeroDivisionError), profiling.memory("cpu") as m:
        assert m.peak_extra_bytes is None
        a = torch.empty(MB, dtype=torch.uint8)
        _ = 1 / 0
    assert m.peak_extra_bytes == MB
    del a
    with profiling.memory("cpu") as again:  # the profiler session was closed
        torch.empty(MB, dtype=torch.uint8)
    assert again.peak_extra_bytes == MB


def test_rss_is_reported_on_linux():
    with profiling.memory("cpu") as m:
        torch.ones(MB, dtype=torch.uint8)
    assert m.rss_peak_extra_bytes is None or m.rss_peak_extra_bytes >= 0


@pytest.mark.parametrize("device", ["meta", "banana", "mps:0"])
def test_unsupported_device(device):
    with pytest.raises(ValueError, match="device"):
        profiling.memory(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error without CUDA")
def test_cuda_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        profiling.memory("cuda")


def test_refuses_while_another_profiler_runs():
    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
        pytest.raises(RuntimeError, match="already running"),
        profiling.memory("cpu"),
    ):
        pass
    with profiling.memory("cpu") as m:  # and works once it is gone
        torch.empty(8)
    assert m.peak_extra_bytes == 32


def test_failed_entry_leaves_nothing_running():
    """Saved-tensors hooks disabled: entering fails, and the profiler it started is stopped."""
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        with pytest.raises(RuntimeError, match="no hooks here"), profiling.memory("cpu"):
            pass
        with profiling.memory("cpu", saved_tensors=False) as m:
            torch.empty(8)
    assert m.peak_extra_bytes == 32
    assert not torch._C._autograd._profiler_enabled()


def test_enter_once():
    measurement = profiling.memory("cpu")
    with measurement:
        pass
    with pytest.raises(RuntimeError, match="only once"), measurement:
        pass


@pytest.mark.gpu
def test_cuda_peaks():
    device = torch.device("cuda", torch.cuda.current_device())
    keep = torch.empty(3 * MB, dtype=torch.uint8, device=device)
    with profiling.memory("cuda") as m:
        a = torch.empty(10 * MB, dtype=torch.uint8, device=device)
        with profiling.memory(device) as inner:
            torch.empty(MB, dtype=torch.uint8, device=device)
        del a
        b = torch.empty(4 * MB, dtype=torch.uint8, device=device)
    assert m.start_bytes >= keep.nbytes
    assert m.peak_extra_bytes == 11 * MB and m.end_extra_bytes == 4 * MB
    assert m.peak_bytes == m.start_bytes + m.peak_extra_bytes
    assert inner.peak_extra_bytes == MB
    del b
