"""Backend selection: automatic choice, overrides, fallback without the extension."""

import contextlib
import os
import sys
import warnings

import pytest
import torch

from mtlfast import _extension
from mtlfast.ops import (
    _dispatch,
    available_backends,
    current_backend,
    reference,
    skip_fusion,
    task_se,
    use_backend,
)
from mtlfast.ops.attention_distill import attention_distill


def small():
    return torch.randn(1, 2, 3, 4, 4), torch.randn(1, 2, 1, 3, 4, 4), torch.randn(1, 2, 1, 3, 4, 4)


def test_reference_always_available():
    assert "reference" in available_backends("cpu")
    assert "reference" in available_backends("cuda")


def test_extension_is_built_when_required():
    # `make test` and CI set this: a missing build must fail, not silently fall back.
    if os.environ.get("MTLFAST_REQUIRE_BACKENDS"):
        assert _extension.has_extension(), _extension.extension_error()
        assert available_backends("cpu")[0] == "cpu"
        assert _extension.cpu_isa() in ("avx512", "avx2", "default")


def test_use_backend_nests_and_restores():
    assert current_backend() is None
    with use_backend("reference"):
        assert current_backend() == "reference"
        with use_backend("cpu"):
            assert current_backend() == "cpu"
        assert current_backend() == "reference"
    assert current_backend() is None


def test_unknown_backend_names_choices():
    with (
        pytest.raises(ValueError, match="unknown backend 'fast'.*reference, cpu, triton, cuda"),
        use_backend("fast"),
    ):
        pass


def test_env_override(monkeypatch):
    monkeypatch.setenv("MTLFAST_BACKEND", "reference")
    assert current_backend() == "reference"
    monkeypatch.setenv("MTLFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="MTLFAST_BACKEND: unknown backend 'nope'"):
        attention_distill(*small())


def test_forced_backend_for_wrong_device_is_an_error():
    with (
        use_backend("cuda"),
        pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu tensors"),
    ):
        attention_distill(*small())


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_extension, "has_extension", lambda: False)
    monkeypatch.setattr(_extension, "extension_error", lambda: "ImportError: simulated")
    monkeypatch.setattr(_dispatch, "_warned_fallback", False)
    monkeypatch.setattr(_dispatch, "_automatic", {})  # the choice is made once per process
    assert available_backends("cpu")[0] == "reference"
    with pytest.warns(RuntimeWarning, match="simulated.*reference backend"):
        out = attention_distill(*small())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention_distill(*small())
    assert out.shape == (1, 2, 3, 4, 4)


def test_backward_runs_on_the_backend_of_its_forward(monkeypatch):
    # Autograd may run a backward on another thread (always for CUDA), outside the forward's
    # use_backend block; calling it after the block has closed shows the same thing on CPU.
    calls = []
    fn, dtypes = _dispatch._kernels[("attention_distill_backward", "reference")]
    monkeypatch.setitem(
        _dispatch._kernels,
        ("attention_distill_backward", "reference"),
        (lambda *a: calls.append(1) or fn(*a), dtypes),
    )
    f, m, v = (t.requires_grad_() for t in small())
    with use_backend("reference"):
        out = attention_distill(f, m, v)
    out.sum().backward()
    assert calls == [1]


class _Mode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _FunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_runs_directly_only_where_no_one_needs_the_op():
    x, p = torch.randn(3), torch.nn.Parameter(torch.randn(3))
    assert _dispatch.runs_directly(x, None)
    assert not _dispatch.runs_directly(x, p)  # autograd must record the op
    with torch.no_grad():
        assert _dispatch.runs_directly(x, p, None)
        with _Mode():
            assert not _dispatch.runs_directly(x)  # a dispatch mode must see the op
    with _FunctionMode():
        assert not _dispatch.runs_directly(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(_dispatch.runs_directly(t)) or t)(torch.randn(2, 3))
    assert seen == [False]  # a functorch wrapper is no plain tensor

    class Sub(torch.Tensor):
        pass

    assert not _dispatch.runs_directly(x.as_subclass(Sub))
    assert (
        not torch.compile(lambda t: t + _dispatch.runs_directly(t), fullgraph=True)(x).ne(x).any()
    )


def test_choose_routes_each_call_by_who_must_see_the_op():
    x, p = torch.randn(3), torch.nn.Parameter(torch.randn(3))
    route = lambda *t: _dispatch.choose("kernel", "function", "op", *t)
    assert route(x, None) == "kernel"
    assert route(x, p) == "function"  # plain eager autograd
    with torch.no_grad():
        assert route(x, p) == "kernel"
    with _FunctionMode():
        assert route(x, p) == "op"
    with _Mode():
        assert route(x) == "op"
    seen = []
    torch.func.grad(lambda t: seen.append(route(t)) or t.sum())(torch.randn(3))
    assert seen == ["op"]  # functorch transforms see the torch.library op
    assert torch.compile(lambda t: t + (route(t) == "op"), fullgraph=True)(x).ne(x).all()


def test_plain_eager_skips_the_custom_op_and_gives_its_results(monkeypatch):
    module = sys.modules[
        "mtlfast.ops.attention_distill"
    ]  # the package exports the function by that name
    calls = []
    op, backward_op = module._attention_distill, module._attention_distill_backward
    monkeypatch.setattr(module, "_attention_distill", lambda *a: calls.append("forward") or op(*a))
    monkeypatch.setattr(
        module,
        "_attention_distill_backward",
        lambda *a: calls.append("backward") or backward_op(*a),
    )
    f, m, v = small()
    with torch.no_grad():
        direct = attention_distill(f, m, v)
    assert calls == []
    function = attention_distill(f, m.requires_grad_(), v)  # autograd records the Function
    function.sum().backward()
    assert calls == []
    grad_function, m.grad = m.grad, None
    with _FunctionMode():  # a mode must see the op: the custom op with its registered autograd
        through_op = attention_distill(f, m, v)
        through_op.sum().backward()
    assert calls == ["forward"]  # its backward, grad mode off, calls the kernel directly
    for out in (function, through_op):
        torch.testing.assert_close(out.detach(), direct, rtol=0, atol=0)
    torch.testing.assert_close(grad_function, m.grad, rtol=0, atol=0)
    expected = torch.autograd.grad(reference.attention_distill(f, m, v).sum(), m)[0]
    torch.testing.assert_close(m.grad, expected)


def _task_se_case():
    x, r = torch.randn(4, 6, 3, 5), torch.randn(4, 6, 3, 5)
    task = torch.tensor([1, 0, 1, 1])
    params = [torch.randn(2, 3, 6), torch.randn(2, 3), torch.randn(2, 6, 3), torch.randn(2, 6)]
    leaves = [x, r, *params]
    return leaves, lambda x, r, *p: task_se(x, task, *p, residual=r, relu=True)


def _skip_fusion_case():
    scores = [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 7, 3), torch.randn(2, 3, 2, 2)]
    weight = torch.randn(3, 3)
    leaves = [scores[0], scores[2], weight]  # scores[1] needs no gradient, bias is None
    return leaves, lambda s0, s2, w: skip_fusion([s0, scores[1], s2], w, None, (6, 9))


@pytest.mark.parametrize("case", (_task_se_case, _skip_fusion_case), ids=("task_se", "skip_fusion"))
def test_function_and_custom_op_give_the_same_results(case):
    leaves, fn = case()
    leaves = [t.requires_grad_() for t in leaves]
    grad_out = None
    results = []
    for mode in (contextlib.nullcontext, _FunctionMode):  # the autograd.Function, then the op
        with mode():
            out = fn(*leaves)
            grad_out = torch.randn_like(out) if grad_out is None else grad_out
            results.append((out.detach(), torch.autograd.grad(out, leaves, grad_out)))
    (out_f, grads_f), (out_op, grads_op) = results
    torch.testing.assert_close(out_f, out_op, rtol=0, atol=0)
    for g_f, g_op in zip(grads_f, grads_op):
        torch.testing.assert_close(g_f, g_op, rtol=0, atol=0)
