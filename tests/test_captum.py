"""krypton_fx.captum.Occlusion against the real captum.attr.Occlusion.

CNN image batches must take the incremental path and give Captum's result
(cut-off border windows included); everything else runs the plain path,
which must give Captum's result for every argument form.
"""

import inspect
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

captum_attr = pytest.importorskip("captum.attr")

from strategies import randomize_batchnorm  # noqa: E402

from krypton_fx.captum import Occlusion, OcclusionArgumentError  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)


def reference(forward_func, inputs, **kwargs):
    return captum_attr.Occlusion(forward_func).attribute(inputs, **kwargs)


def assert_matches(result, expected):
    if isinstance(expected, tuple):
        assert isinstance(result, tuple) and len(result) == len(expected)
        for r, e in zip(result, expected):
            assert r.dtype == e.dtype and r.shape == e.shape
            torch.testing.assert_close(r, e, **TOL)
    else:
        assert isinstance(result, torch.Tensor)
        assert result.dtype == expected.dtype and result.shape == expected.shape
        torch.testing.assert_close(result, expected, **TOL)



@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()


@pytest.fixture(scope="module")
def squeezenet():
    torch.manual_seed(1)
    return torchvision.models.squeezenet1_1(num_classes=10).eval()


def vgg_like() -> nn.Module:
    torch.manual_seed(2)
    return randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(16, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    )).eval()


def images(n, size, seed=0, channels=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, *size, generator=gen)


# --- incremental path ---------------------------------------------------------------------------


RESNET_CASES = {
    # 48 - 16 = 32 is not a multiple of 10: Captum adds a cut-off last row and column.
    "list-target": dict(sliding_window_shapes=(3, 16, 16), strides=(3, 10, 10), target=[1, 7],
                        perturbations_per_eval=16),
    "tensor-target-scalar-baseline-int-stride": dict(
        sliding_window_shapes=(3, 16, 16), strides=10, target=torch.tensor([2, 9]), baselines=0.5,
        perturbations_per_eval=32),
    # One colour per example (one compiled explainer each), a one-element target tensor, windows
    # and strides as tuples of tuples; rows cut (32 % 12 != 0), columns not (36 % 9 == 0).
    "per-example-baseline-rect": dict(
        sliding_window_shapes=((3, 16, 12),), strides=((3, 12, 9),), target=torch.tensor(6),
        baselines=torch.tensor([[1.0, -1.0, 0.5], [-0.3, 0.2, 0.1]]).view(2, 3, 1, 1),
        perturbations_per_eval=8),
}


@pytest.mark.parametrize("case", list(RESNET_CASES))
def test_resnet18_incremental_matches_captum(resnet18, case):
    kwargs = RESNET_CASES[case]
    x = images(2, (48, 48))
    occ = Occlusion(resnet18)
    result = occ.attribute(x, **kwargs)
    assert occ.last_path == "incremental", occ.last_fallback_reason
    assert_matches(result, reference(resnet18, x, **kwargs))
    if case == "list-target":
        # Captum: ceil(32 / 10) + 1 = 5 windows per axis; the compiled grid holds 32 // 10 + 1 = 4,
        # the other 9 (cut off at the border) run as plain forwards.
        assert occ.last_stats["positions"] == 25
        assert occ.last_stats["incremental_positions"] == 2 * 16
        assert occ.last_stats["plain_forwards"] == 2 * 9


def test_squeezenet_incremental_matches_captum(squeezenet):
    x = images(2, (64, 64), seed=1)
    kwargs = dict(sliding_window_shapes=(3, 16, 16), strides=(3, 10, 10), target=[3, 8],
                  baselines=torch.zeros(1, 3, 64, 64), perturbations_per_eval=32)
    occ = Occlusion(squeezenet)
    result = occ.attribute(x, **kwargs)
    assert occ.last_path == "incremental", occ.last_fallback_reason
    assert_matches(result, reference(squeezenet, x, **kwargs))


def test_vgg_like_tuple_input_incremental_matches_captum():
    model = vgg_like()
    x = images(2, (30, 26), seed=2)
    kwargs = dict(sliding_window_shapes=(3, 7, 5), strides=(1, 3, 4), target=(2,), baselines=-1.0,
                  perturbations_per_eval=64)
    occ = Occlusion(model)
    result = occ.attribute((x,), **kwargs)
    assert occ.last_path == "incremental", occ.last_fallback_reason
    assert_matches(result, reference(model, (x,), **kwargs))


def test_explainer_is_compiled_once_per_geometry():
    model = vgg_like()
    occ = Occlusion(model)
    x = images(2, (24, 24))
    occ.attribute(x, (3, 8, 8), strides=(3, 4, 4), target=1)
    assert occ.last_stats["compiles"] == 1
    occ.attribute(images(2, (24, 24), seed=5), (3, 8, 8), strides=(3, 4, 4), target=[0, 2])
    assert occ.last_stats["compiles"] == 0
    occ.attribute(x, (3, 8, 8), strides=(3, 3, 3), target=1)
    assert occ.last_stats["compiles"] == 1


# --- Captum's interface, progress bar and perturbations_per_eval --------------------------------


def test_interface_matches_captum():
    model = vgg_like()
    ours, theirs = Occlusion(model), captum_attr.Occlusion(model)
    def parameters(method):  # annotations aside
        return [(p.name, p.default, p.kind) for p in inspect.signature(method).parameters.values()]

    assert parameters(Occlusion.attribute) == parameters(captum_attr.Occlusion.attribute)
    assert parameters(Occlusion.__init__) == parameters(captum_attr.Occlusion.__init__)
    assert list(inspect.signature(Occlusion.attribute_future).parameters) == ["self"]
    assert ours.forward_func is model
    assert ours.get_name() == theirs.get_name() == Occlusion.get_name() == "Occlusion"
    assert ours.has_convergence_delta() is theirs.has_convergence_delta() is False
    assert ours.multiplies_by_inputs is theirs.multiplies_by_inputs is True
    assert ours.use_weights is theirs.use_weights is True
    public = lambda obj: {k for k in dir(obj) if not k.startswith("_")}  # noqa: E731
    assert public(theirs) <= public(ours)
    assert not hasattr(ours, "compute_convergence_delta") and not hasattr(theirs, "compute_convergence_delta")
    for occ in (ours, theirs):
        with pytest.raises(NotImplementedError, match="^attribute_future is not implemented for Occlusion$"):
            occ.attribute_future()
        with pytest.raises(TypeError):
            occ.attribute_future(images(1, (8, 8)))


def test_attribute_wrapped_and_get_name_in_a_subclass():
    """Captum's subclasses reach the undecorated method through ``attribute.__wrapped__``."""

    class BlackOutOcclusion(Occlusion):
        def attribute(self, inputs, sliding_window_shapes, **kwargs):
            return super().attribute.__wrapped__(self, inputs, sliding_window_shapes, baselines=-1.0, **kwargs)

    model = vgg_like()
    x = images(1, (16, 16))
    assert Occlusion.attribute.__wrapped__.__name__ == Occlusion.attribute.__name__ == "attribute"
    kwargs = dict(strides=(3, 4, 4), target=3)
    assert_matches(BlackOutOcclusion(model).attribute(x, (3, 8, 8), **kwargs),
                   reference(model, x, sliding_window_shapes=(3, 8, 8), baselines=-1.0, **kwargs))
    assert BlackOutOcclusion.get_name() == "Black Out Occlusion"


def int_model(a, b):  # Captum's BasicModel3: integer in, integer out
    return torch.relu(a - 1 - torch.relu(b - 1)) - torch.relu(a - 1 - torch.relu(b - 1) - 1)


@pytest.mark.parametrize("case", ["float64", "int", "bool", "requires-grad", "tuple-of-one-image"])
def test_result_type_dtype_and_device_match_captum(case):
    kwargs = dict(sliding_window_shapes=(2,), target=1)
    forward = mlp()
    x = torch.randn(2, 10)
    if case == "float64":
        forward, x = forward.double(), x.double()
    elif case == "int":
        forward, x = int_model, (torch.tensor([[-10], [3]]), torch.tensor([[-5], [1]]))
        kwargs = dict(sliding_window_shapes=((1,), (1,)))
    elif case == "bool":
        forward, x = (lambda t: mlp()(t.float())), torch.rand(2, 10) > 0.5
    elif case == "requires-grad":
        x.requires_grad_(True)
    elif case == "tuple-of-one-image":
        forward, x = vgg_like(), (images(1, (12, 12)),)
        kwargs = dict(sliding_window_shapes=(3, 4, 4), strides=(3, 4, 4), target=0)
    before = [t.clone() for t in (x if isinstance(x, tuple) else (x,))]
    result = Occlusion(forward).attribute(x, **kwargs)
    expected = reference(forward, x, **kwargs)
    assert_matches(result, expected)  # tuple for tuple inputs, tensor otherwise; float32; same shape
    for r, e, inp, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (result, expected, x)), before):
        assert r.device == e.device == inp.device
        assert r.requires_grad is e.requires_grad is False
        assert r.is_contiguous()
        assert torch.equal(inp, b)  # inputs untouched


def test_one_value_per_example_inputs_with_empty_windows():
    """Captum's 0-d test: inputs of shape (N,), window (); a single such tensor works here too,
    where Captum raises IndexError (it reads sliding_window_shapes[0])."""
    forward = lambda a, b: 2 * a + torch.relu(b)  # noqa: E731
    x = (torch.tensor([-10.0, 3.0]), torch.tensor([-5.0, 1.0]))
    assert_matches(Occlusion(forward).attribute(x, ((), ())), reference(forward, x, sliding_window_shapes=((), ())))
    torch.testing.assert_close(Occlusion(lambda a: 2 * a).attribute(x[0], ()), 2 * x[0])


@pytest.mark.parametrize("ppe", [1, 2, 3])
def test_progress_bar_as_captum_where_its_total_is_right(capsys, ppe):
    """Captum's own test: one element per window, every ppe reaches 100%, same bar as Captum's."""
    model = nn.Linear(3, 2)
    x = torch.tensor([[20.0, 50.0, 30.0]])
    bars = []
    for occlusion in (captum_attr.Occlusion, Occlusion):
        occlusion(model).attribute(x, (1,), target=0, perturbations_per_eval=ppe, show_progress=True)
        err = capsys.readouterr().err
        final = err.rstrip().split("\r")[-1]
        bars.append(final.split("[")[0])  # without the elapsed time and rate
        assert "Occlusion attribution: 100%" in final, repr(err)
    assert bars[0] == bars[1]


@pytest.mark.parametrize("name", ["incremental", "plain"])
def test_progress_bar_counts_forwards_and_reaches_100_percent(capsys, name):
    model = vgg_like()
    x = images(2, (20, 20))
    # 20 - 6 = 14 is not a multiple of 4: 5 x 5 windows, 9 of them cut off at the border
    kwargs = dict(sliding_window_shapes=(3, 6, 6), strides=(3, 4, 4), target=[1, 0], perturbations_per_eval=4)
    forward = model if name == "incremental" else (lambda t: model(t))
    occ = Occlusion(forward)
    result = occ.attribute(x, **kwargs)
    assert capsys.readouterr().err == ""  # show_progress=False prints nothing
    shown = occ.attribute(x, **kwargs, show_progress=True)
    assert occ.last_path == name
    torch.testing.assert_close(result, shown)
    final = capsys.readouterr().err.rstrip().split("\r")[-1]
    forwards = -(-25 // 4) + 1  # Captum's forwards: ceil(windows / ppe), and the unoccluded one
    assert final.startswith("Occlusion attribution: 100%") and f" {forwards}/{forwards} [" in final, final


def record_batches(forward, sizes):
    def recorded(*args):
        sizes.append(args[0].shape[0])
        return forward(*args)
    return recorded


def test_perturbations_per_eval_batches_like_captum_on_the_plain_path():
    model = mlp()
    x = torch.randn(3, 10)
    kwargs = dict(sliding_window_shapes=(3,), strides=2, target=[0, 4, 2], perturbations_per_eval=4)
    ours, theirs = [], []
    assert_matches(Occlusion(record_batches(model, ours)).attribute(x, **kwargs),
                   reference(record_batches(model, theirs), x, **kwargs))
    assert ours == theirs == [3, 12, 3]  # the unoccluded batch, then ppe windows x 3 examples each


def test_incremental_batches_have_one_size_within_captum_bound(monkeypatch):
    """Every run_positions call of one call has the same batch size, at most ppe * examples,
    so a runner keyed on the batch size (a CUDA graph) is reused; the model's own forwards
    (unoccluded, cut-off border windows) hold at most ppe * examples images too."""
    from krypton_fx.explainer import Explainer

    calls = []
    run_positions = Explainer.run_positions

    def spy(self, positions, stored, label, batch_size=None, progress=False):
        calls.append((len(positions), batch_size))
        return run_positions(self, positions, stored, label, batch_size, progress)

    monkeypatch.setattr(Explainer, "run_positions", spy)
    model = vgg_like()
    forwards = []
    model.register_forward_hook(lambda m, args, out: forwards.append(args[0].shape[0]))
    x = images(2, (30, 30))
    # 30 - 8 = 22 is not a multiple of 3: 8 x 8 compiled positions and 17 cut-off windows per image.
    kwargs = dict(sliding_window_shapes=(3, 8, 8), strides=(3, 3, 3), target=[1, 2], perturbations_per_eval=11)
    occ = Occlusion(model)
    assert_matches(occ.attribute(x, **kwargs), reference(model, x, **kwargs))
    assert occ.last_path == "incremental", occ.last_fallback_reason
    batch = occ.last_stats["batch_size"]
    assert batch == 22  # 64 positions, at most 2 x 11 per batch: 3 batches of 22 (the last padded by 2)
    assert calls == [(batch, batch)] * (2 * 3)
    assert max(forwards) <= 2 * 11


def test_replacing_forward_func_recompiles():
    first, second = vgg_like(), nn.Sequential(vgg_like(), nn.Tanh()).eval()
    x = images(1, (16, 16))
    kwargs = dict(sliding_window_shapes=(3, 4, 4), strides=(3, 4, 4), target=2)
    occ = Occlusion(first)
    occ.attribute(x, **kwargs)
    occ.forward_func = second
    result = occ.attribute(x, **kwargs)
    assert occ.last_path == "incremental" and occ.last_stats["compiles"] == 1
    assert_matches(result, reference(second, x, **kwargs))


# --- plain path ---------------------------------------------------------------------------------


class TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(10, 4)

    def forward(self, x1, x2, scale, shift):
        return torch.tanh(self.a(x1) * scale + self.b(x2.flatten(1))) + shift


class DataDependent(nn.Module):
    """Does not trace: control flow on tensor values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return self.fc(y.mean((2, 3)))


def mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


@pytest.mark.parametrize("ppe", [1, 4])
def test_mlp_plain_matches_captum(ppe):
    model = mlp()
    x = torch.randn(3, 10)
    kwargs = dict(sliding_window_shapes=(3,), strides=2, baselines=torch.linspace(-1, 1, 10),
                  target=[0, 4, 2], perturbations_per_eval=ppe)
    occ = Occlusion(model)
    result = occ.attribute(x, **kwargs)
    assert occ.last_path == "plain"
    assert_matches(result, reference(model, x, **kwargs))


def test_tuple_inputs_with_additional_forward_args_match_captum():
    torch.manual_seed(4)
    model = TwoInputNet().eval()
    x1, x2 = torch.randn(2, 6), torch.randn(2, 2, 5)
    kwargs = dict(sliding_window_shapes=((2,), (1, 3)), strides=(1, (1, 2)),
                  baselines=(0.5, torch.randn(1, 2, 5)), target=torch.tensor([1, 3]),
                  additional_forward_args=(torch.tensor([[2.0], [-1.0]]), 0.25), perturbations_per_eval=3)
    occ = Occlusion(model)
    result = occ.attribute((x1, x2), **kwargs)
    assert occ.last_path == "plain"
    assert_matches(result, reference(model, (x1, x2), **kwargs))


@pytest.mark.parametrize("name", ["window-in-one-channel", "varying-baseline", "train-mode",
                                  "function", "untraceable", "whole-image-window"])
def test_image_cases_outside_the_fast_path_match_captum(name):
    model = DataDependent().eval() if name == "untraceable" else vgg_like()
    x = images(2, (20, 20))
    kwargs = dict(sliding_window_shapes=(3, 6, 6), strides=(3, 4, 4), target=[1, 0], perturbations_per_eval=5)
    forward = model
    if name == "window-in-one-channel":
        kwargs.update(sliding_window_shapes=(1, 6, 6), strides=(1, 4, 4))
    elif name == "varying-baseline":
        kwargs.update(baselines=torch.rand(1, 3, 20, 20))
    elif name == "whole-image-window":
        kwargs.update(sliding_window_shapes=(3, 20, 20))
    elif name == "train-mode":
        model.train()
    elif name == "function":
        def forward(batch):
            return model(batch)
    occ = Occlusion(forward)
    result = occ.attribute(x, **kwargs)
    assert occ.last_path == "plain"
    assert occ.last_fallback_reason
    assert_matches(result, reference(forward, x, **kwargs))


def test_scalar_per_example_output_without_target():
    model = nn.Sequential(mlp(), nn.Flatten(0))  # (N, 5) -> (N * 5,): one value per row element
    scalar_model = lambda x: mlp()(x).sum(1)  # noqa: E731
    x = torch.randn(2, 10)
    for forward in (scalar_model, model):
        kwargs = dict(sliding_window_shapes=(4,), strides=3, perturbations_per_eval=1)
        assert_matches(Occlusion(forward).attribute(x, **kwargs), reference(forward, x, **kwargs))


def test_aggregated_output_and_target_none_for_classes():
    model = mlp()
    x = torch.randn(3, 10)
    kwargs = dict(sliding_window_shapes=(2,), strides=2)
    total = lambda t: model(t).sum()  # noqa: E731
    result = Occlusion(total).attribute(x, **kwargs)
    assert result.shape == (1, 10)
    assert_matches(result, reference(total, x, **kwargs))
    # target None with (N, classes) output: one attribution row per output entry
    assert_matches(Occlusion(model).attribute(x, **kwargs), reference(model, x, **kwargs))


def test_aggregated_output_rejects_several_windows_per_call():
    model = mlp()
    total = lambda t: model(t).sum()  # noqa: E731
    x = torch.randn(2, 10)
    with pytest.raises(AssertionError):
        captum_attr.Occlusion(total).attribute(x, (2,), perturbations_per_eval=2)
    with pytest.raises(OcclusionArgumentError, match="perturbations_per_eval=1") as info:
        Occlusion(total).attribute(x, (2,), perturbations_per_eval=2)
    assert isinstance(info.value, AssertionError)


@settings(max_examples=15)
@given(dims=st.lists(st.integers(1, 6), min_size=1, max_size=3), data=st.data())
def test_random_shapes_windows_strides_match_captum(dims, data):
    windows = tuple(data.draw(st.integers(1, d)) for d in dims)
    strides = tuple(data.draw(st.integers(1, w)) if w < d else data.draw(st.integers(1, d + 2))
                    for w, d in zip(windows, dims))
    n = data.draw(st.integers(1, 3))
    ppe = data.draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(len(dims) * 7 + sum(dims))
    x = torch.randn(n, *dims, generator=gen)
    weight = torch.randn(int(torch.tensor(dims).prod()), 3, generator=gen)

    def forward(t):
        return torch.sin(t.flatten(1) @ weight)

    kwargs = dict(sliding_window_shapes=windows, strides=strides, target=1, baselines=0.3,
                  perturbations_per_eval=ppe)
    assert_matches(Occlusion(forward).attribute(x, **kwargs), reference(forward, x, **kwargs))


# --- argument errors ----------------------------------------------------------------------------


def two_inputs(a, b):
    return torch.stack([a.sum((1, 2, 3)), b.mean((1, 2, 3))], dim=1)


def returns_text(x):
    return "cat"


# case: (arguments over the default call, forward ("model" or a function), our error type, our
# message). Every one is an OcclusionArgumentError (a ValueError and an AssertionError) and an
# instance of what Captum raises for the same call.
BAD_ARGUMENTS = {
    "inputs-not-tensor": (dict(inputs=[[1.0, 2.0]]), "model", TypeError, "inputs must be"),
    "inputs-tuple-of-non-tensors": (dict(inputs=(images(2, (16, 16)), 3)), "model", TypeError, "inputs must be"),
    "window-list": (dict(sliding_window_shapes=[3, 4, 4]), "model", TypeError, r"pass tuple\("),
    "window-too-long": (dict(sliding_window_shapes=(3, 4)), "model", ValueError, "must have 3 entries"),
    "window-too-large": (dict(sliding_window_shapes=(3, 17, 4)), "model", ValueError, "larger than the input"),
    "window-zero": (dict(sliding_window_shapes=(3, 0, 4)), "model", ValueError, "at least 1"),
    "window-negative": (dict(sliding_window_shapes=(3, -1, 4)), "model", RuntimeError, "at least 1"),
    "windows-count": (dict(sliding_window_shapes=((3, 4, 4), (3, 4, 4))), "model", ValueError,
                      "one window shape per input"),
    "stride-beyond-window": (dict(strides=(3, 5, 2)), "model", ValueError, "larger than the window"),
    "stride-wrong-length": (dict(strides=(1, 2)), "model", ValueError, "3 entries"),
    "stride-list": (dict(strides=[3, 2, 2]), "model", TypeError, "tuple of ints"),
    "stride-float": (dict(strides=2.0), "model", TypeError, "tuple of ints"),
    "baselines-fewer": (dict(inputs=(images(2, (16, 16)), images(2, (16, 16), seed=1)), baselines=(0.0,),
                             sliding_window_shapes=((3, 8, 8), (3, 8, 8)), strides=(8, 8)),
                        two_inputs, IndexError, "one scalar or tensor per input"),
    "baseline-shape": (dict(baselines=torch.zeros(2, 3, 3, 1, 1)), "model", RuntimeError, "does not broadcast"),
    "baseline-shape-trailing": (dict(baselines=torch.zeros(3, 5)), "model", RuntimeError, "does not broadcast"),
    "baseline-type": (dict(baselines="grey"), "model", TypeError, "number or a torch.Tensor"),
    "target-list-length": (dict(target=[1, 2, 3]), "model", ValueError, "one target per example"),
    "target-list-out-of-range": (dict(target=[1, 12]), "model", RuntimeError, "out of range"),
    "target-int-out-of-range": (dict(target=12), "model", IndexError, "out of range"),
    "target-tuple-too-long": (dict(target=(1, 2)), "model", ValueError, "one index per dimension"),
    "target-float-tensor": (dict(target=torch.tensor([0.5, 1.0])), "model", RuntimeError, "integer class"),
    "target-tensor-2d": (dict(target=torch.tensor([[0, 1]])), "model", ValueError, "does not fit"),
    "target-tensor-length": (dict(target=torch.tensor([0, 1, 2])), "model", ValueError, "does not fit"),
    "target-type": (dict(target="cat"), "model", TypeError, "target must be"),
    "target-float": (dict(target=1.0), "model", TypeError, "target must be"),
    "target-list-of-str": (dict(target=["a", "b"]), "model", TypeError, "must hold ints"),
    "ppe-zero": (dict(perturbations_per_eval=0), "model", ValueError, "perturbations_per_eval"),
    "ppe-float": (dict(perturbations_per_eval=2.0), "model", TypeError, "perturbations_per_eval"),
    "ppe-none": (dict(perturbations_per_eval=None), "model", TypeError, "perturbations_per_eval"),
    "ppe-bool": (dict(perturbations_per_eval=True), "model", TypeError, "perturbations_per_eval"),
    "forward-returns-text": (dict(target=None), returns_text, TypeError, "must return a tensor"),
}


def bad_call(case):
    update, forward, _, _ = BAD_ARGUMENTS[case]
    forward = vgg_like() if forward == "model" else forward
    kwargs = dict(inputs=images(2, (16, 16)), sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), target=1)
    kwargs.update(update)
    return forward, kwargs


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_what_captum_raises_with_one_line_messages(case):
    forward, kwargs = bad_call(case)
    _, _, error, message = BAD_ARGUMENTS[case]
    with pytest.raises(Exception) as captum_info:
        captum_attr.Occlusion(forward).attribute(**kwargs)
    with pytest.raises(error, match=message) as info:
        Occlusion(forward).attribute(**kwargs)
    assert isinstance(info.value, OcclusionArgumentError)
    assert isinstance(info.value, (ValueError, AssertionError))
    assert isinstance(info.value, type(captum_info.value)), (type(captum_info.value), captum_info.value)
    assert "\n" not in str(info.value)


# Calls Captum accepts and answers with NaN (stride 0 divides by it) or by ignoring an argument:
# refused here.
REFUSED_THOUGH_CAPTUM_ACCEPTS = {
    "stride-zero": (dict(strides=0), "positive"),
    "stride-negative": (dict(strides=-1), "positive"),
    "baselines-more": (dict(baselines=(0.0, 1.0)), "one scalar or tensor per input"),
}


@pytest.mark.parametrize("case", list(REFUSED_THOUGH_CAPTUM_ACCEPTS))
def test_nonsense_captum_accepts_is_refused(case):
    model = vgg_like()
    update, message = REFUSED_THOUGH_CAPTUM_ACCEPTS[case]
    kwargs = dict(inputs=images(1, (12, 12)), sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), target=1)
    kwargs.update(update)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy: division by zero
        captum_attr.Occlusion(model).attribute(**kwargs)
    with pytest.raises(OcclusionArgumentError, match=message):
        Occlusion(model).attribute(**kwargs)


def test_forward_func_must_be_callable():
    with pytest.raises(TypeError, match="callable") as info:
        Occlusion("resnet")  # Captum accepts it and fails in attribute (TypeError)
    assert isinstance(info.value, OcclusionArgumentError)


def test_krypton_fx_does_not_import_captum():
    code = "import sys, krypton_fx, krypton_fx.captum; assert 'captum' not in sys.modules, 'captum imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
