"""Bad input raises a clear error naming the task (and the sizes), before anything runs when it can."""

import pytest
import torch
from torch import nn

from mtlfast.engine import multi_branch_step

from .models import H, Head, JointHead, N, conv_trunk, loss_fns_for

STRATEGIES = ["naive", "recompute"]


class Constant(nn.Module):
    def forward(self, x):
        return torch.zeros(N, 1, H, H)


class ParameterOnly(nn.Module):
    """Trainable, but its prediction ignores the features it is given."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1, 1, H, H))

    def forward(self, x):
        return self.p.expand(N, 1, H, H) * 2


@pytest.fixture
def setup():
    trunk = conv_trunk(4)
    calls = []
    trunk[0].register_forward_hook(lambda *_: calls.append(1))
    heads = nn.ModuleDict({"seg": Head(3), "depth": Head(1)})
    targets = {"seg": torch.randint(0, 3, (N, H, H)), "depth": torch.randn(N, 1, H, H)}
    return trunk, heads, torch.randn(N, 3, H, H), targets, loss_fns_for(["seg", "depth"]), calls


def step(setup, **kwargs):
    trunk, heads, images, targets, loss_fns, _ = setup
    args = {
        "trunk": trunk,
        "heads": heads,
        "images": images,
        "targets": targets,
        "loss_fns": loss_fns,
    }
    args.update(kwargs)
    return multi_branch_step(
        args.pop("trunk"),
        args.pop("heads"),
        args.pop("images"),
        args.pop("targets"),
        args.pop("loss_fns"),
        **args,
    )


def raises_before_running(setup, exc, match, **kwargs):
    with pytest.raises(exc, match=match):
        step(setup, **kwargs)
    assert setup[5] == [], "the trunk ran before the error"
    assert all(p.grad is None for p in [*setup[0].parameters(), *setup[1].parameters()])


def test_unknown_strategy(setup):
    raises_before_running(setup, ValueError, "strategy must be one of", strategy="lazy")


@pytest.mark.parametrize("segments", [0, 5])
def test_segments_out_of_range(setup, segments):
    raises_before_running(setup, ValueError, r"segments must be in \[1, 4\]", segments=segments)


def test_segments_not_an_int(setup):
    raises_before_running(setup, TypeError, "segments must be an int", segments=2.0)


def test_empty_heads(setup):
    raises_before_running(setup, ValueError, "heads is empty", heads={})


def test_empty_or_bad_trunk(setup):
    raises_before_running(setup, ValueError, "trunk has no modules", trunk=nn.Sequential())
    raises_before_running(setup, TypeError, "trunk must be", trunk=nn.Conv2d(3, 4, 1))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_head_without_loss_function(setup, strategy):
    # a head whose name is not a task of loss_fns and that declares no tasks is taken for an
    # undeclared joint decoder: the error comes when it returns a single prediction
    heads = nn.ModuleDict({"edges": Head(1)})
    with pytest.raises(ValueError, match="no loss function for task 'edges'"):
        step(setup, heads=heads, strategy=strategy)


def test_declared_joint_task_without_loss_function(setup):
    heads = nn.ModuleDict({"mti": JointHead({"seg": 3, "edges": 1})})
    raises_before_running(setup, ValueError, "no loss function for task 'edges'", heads=heads)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_undeclared_joint_task_without_loss_function(setup, strategy):
    heads = nn.ModuleDict({"mti": JointHead({"seg": 3, "edges": 1}, declare=False)})
    with pytest.raises(ValueError, match="no loss function for task 'edges'"):
        step(setup, heads=heads, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_joint_head_returning_other_tasks_than_declared(setup, strategy):
    head = JointHead({"seg": 3, "depth": 1})
    head.tasks = ("seg",)
    with pytest.raises(ValueError, match="returned task 'depth', which is not in its tasks"):
        step(setup, heads=nn.ModuleDict({"mti": head}), strategy=strategy)
    head.tasks = ("seg", "depth", "normals")
    loss_fns = loss_fns_for(["seg", "depth", "normals"])
    targets = {**setup[3], "normals": torch.randn(N, 3, H, H)}
    with pytest.raises(ValueError, match=r"returned no prediction for task\(s\) \['normals'\]"):
        step(
            setup,
            heads=nn.ModuleDict({"mti": head}),
            loss_fns=loss_fns,
            targets=targets,
            strategy=strategy,
        )


def test_two_heads_claiming_one_task(setup):
    heads = nn.ModuleDict({"seg": Head(3), "mti": JointHead({"seg": 3, "depth": 1})})
    raises_before_running(setup, ValueError, "task 'seg' is predicted by two heads", heads=heads)


def test_missing_target(setup):
    raises_before_running(
        setup, ValueError, "no target for task 'depth'", targets={"seg": setup[3]["seg"]}
    )


def test_target_batch_size(setup):
    targets = {**setup[3], "depth": torch.randn(N + 1, 1, H, H)}
    raises_before_running(
        setup,
        ValueError,
        rf"targets\['depth'\] has batch size {N + 1}, but images have {N}",
        targets=targets,
    )


def test_labeled_batch_size(setup):
    labeled = {"seg": torch.ones(N - 2, dtype=torch.bool)}
    match = rf"labeled\['seg'\] has shape \({N - 2},\), but images have batch size {N}"
    raises_before_running(setup, ValueError, match, labeled=labeled)


@pytest.mark.parametrize(
    "flags",
    [torch.ones(N), [True] * N, torch.ones(N, dtype=torch.long)],
    ids=["float", "list", "long"],
)
def test_labeled_not_bool(setup, flags):
    raises_before_running(
        setup, TypeError, r"labeled\['depth'\] must be a bool tensor", labeled={"depth": flags}
    )


def test_weights_for_unknown_task(setup):
    raises_before_running(
        setup,
        ValueError,
        "weights has task 'edges', which no head predicts",
        weights={"seg": 1.0, "edges": 2.0},
    )
    raises_before_running(
        setup, TypeError, r"weights\['seg'\] must be a float", weights={"seg": True}
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("head", [Constant, ParameterOnly])
def test_prediction_not_depending_on_the_representation(setup, strategy, head):
    heads = nn.ModuleDict({"seg": Head(3), "depth": head()})
    match = "prediction of head 'depth' for task 'depth' does not depend on the trunk output"
    with pytest.raises(ValueError, match=match):
        step(setup, heads=heads, strategy=strategy)
    # found before that head's backward: its parameters have no gradient
    assert all(p.grad is None for p in heads["depth"].parameters())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_function_returning_a_map(setup, strategy):
    loss_fns = {**setup[4], "depth": lambda p, t: (p - t) ** 2}
    with pytest.raises(ValueError, match=r"loss_fns\['depth'\] must return a scalar tensor"):
        step(setup, loss_fns=loss_fns, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trunk_output_without_the_batch_dimension(setup, strategy):
    trunk = nn.Sequential(*conv_trunk(2), nn.Flatten(0, 1))
    with pytest.raises(ValueError, match="images' batch size"):
        step(setup, trunk=trunk, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prediction_batch_size(setup, strategy):
    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(0, keepdim=True)[:, :1]

    with pytest.raises(ValueError, match="prediction for task 'depth' of shape"):
        step(setup, heads=nn.ModuleDict({"depth": Pool()}), strategy=strategy)


def test_step_result_names_the_tasks_with_nonfinite_losses():
    import math

    from mtlfast.engine import multi_branch_step

    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    heads = {"a": torch.nn.Conv2d(4, 1, 1), "b": torch.nn.Conv2d(4, 1, 1)}
    x = torch.randn(2, 3, 5, 5)
    targets = {"a": torch.randn(2, 1, 5, 5), "b": torch.randn(2, 1, 5, 5)}
    fns = {
        "a": lambda p, t: ((p - t) ** 2).mean(),
        "b": lambda p, t: ((p - t) ** 2).mean() * math.nan,
    }
    for strategy in ("naive", "recompute"):
        result = multi_branch_step(trunk, heads, x, targets, fns, strategy=strategy)
        assert result.nonfinite == ["b"]
    fns["b"] = fns["a"]
    assert multi_branch_step(trunk, heads, x, targets, fns).nonfinite == []


# ---- issue 16: unknown labeled keys ------------------------------------------------------


def test_unknown_labeled_key(setup):
    # 'segm' used to be ignored silently: 'seg' then trained on every sample.
    flags = torch.zeros(N, dtype=torch.bool)
    raises_before_running(
        setup,
        ValueError,
        r"labeled has task 'segm', which no head predicts",
        labeled={"segm": flags},
    )
    raises_before_running(
        setup, ValueError, r"labeled has task 'edges'", labeled={"seg": flags, "edges": flags}
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unknown_labeled_key_with_an_undeclared_joint_head(setup, strategy):
    trunk, _, images, targets, loss_fns, calls = setup
    heads = nn.ModuleDict({"joint": JointHead({"seg": 3, "depth": 1}, declare=False)})
    flags = torch.ones(N, dtype=torch.bool)
    # not even a key of loss_fns: found before anything runs
    raises_before_running(
        (trunk, heads, images, targets, loss_fns, calls),
        ValueError,
        r"labeled has task 'segm'",
        labeled={"segm": flags},
    )
    # a loss function but no head predicting it: found once the undeclared head ran, before
    # the trunk's backward
    loss_fns = {**loss_fns, "edges": loss_fns["depth"]}
    with pytest.raises(ValueError, match=r"labeled has task 'edges', which no head predicts"):
        step(
            (trunk, heads, images, targets, loss_fns, calls),
            labeled={"edges": flags},
            strategy=strategy,
        )
    assert all(p.grad is None for p in trunk.parameters())


def test_known_labeled_keys_pass(setup):
    flags = torch.ones(N, dtype=torch.bool)
    result = step(setup, labeled={"seg": flags, "depth": flags})
    assert result.ran == ["seg", "depth"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_raising_midway_leaves_earlier_heads_grads_as_documented(setup, strategy):
    # Documented in multi_branch_step's Raises: recompute writes earlier heads' .grad, naive nothing.
    trunk, heads, _, _, loss_fns, _ = setup

    def broken(pred, target):
        raise RuntimeError("broken loss")

    with pytest.raises(RuntimeError, match="broken loss"):
        step(setup, loss_fns={**loss_fns, "depth": broken}, strategy=strategy)
    seg_grads = [p.grad for p in heads["seg"].parameters()]
    assert all(g is None for g in seg_grads) == (strategy == "naive")
    assert all(p.grad is None for p in [*trunk.parameters(), *heads["depth"].parameters()])
