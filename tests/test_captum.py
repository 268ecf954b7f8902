"""krypton_fx.captum.Occlusion against the real captum.attr.Occlusion.

CNN image batches must take the incremental path and give Captum's result
(cut-off border windows included); everything else runs the plain path,
which must give Captum's result for every argument form.
"""

import subprocess
import sys

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

captum_attr = pytest.importorskip("captum.attr")

from krypton_fx.captum import Occlusion  # noqa: E402

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


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics, so eval-mode BatchNorm is not an identity."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


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


def test_show_progress(capsys):
    model = vgg_like()
    x = images(1, (24, 24))
    quiet = Occlusion(model).attribute(x, (3, 8, 8), strides=(3, 5, 5), target=1)
    loud = Occlusion(model).attribute(x, (3, 8, 8), strides=(3, 5, 5), target=1, show_progress=True)
    torch.testing.assert_close(quiet, loud)
    assert "Occlusion" in capsys.readouterr().err


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
    with pytest.raises(ValueError, match="perturbations_per_eval=1"):
        Occlusion(lambda t: model(t).sum()).attribute(torch.randn(2, 10), (2,), perturbations_per_eval=2)


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


BAD_ARGUMENTS = {
    "inputs-not-tensor": (dict(inputs=[[1.0, 2.0]]), TypeError, "inputs must be"),
    "window-too-long": (dict(sliding_window_shapes=(3, 4)), ValueError, "must have 3 entries"),
    "window-too-large": (dict(sliding_window_shapes=(3, 17, 4)), ValueError, "larger than the input"),
    "window-zero": (dict(sliding_window_shapes=(3, 0, 4)), ValueError, "at least 1"),
    "stride-beyond-window": (dict(strides=(3, 5, 2)), ValueError, "larger than the window"),
    "stride-zero": (dict(strides=0), ValueError, "positive"),
    "stride-wrong-length": (dict(strides=(1, 2)), ValueError, "3 entries"),
    "baselines-count": (dict(baselines=(0.0, 1.0)), ValueError, "one scalar or tensor per input"),
    "baseline-shape": (dict(baselines=torch.zeros(2, 3, 3, 1, 1)), ValueError, "does not broadcast"),
    "baseline-type": (dict(baselines="grey"), TypeError, "number or a torch.Tensor"),
    "target-list-length": (dict(target=[1, 2, 3]), ValueError, "one target per example"),
    "target-out-of-range": (dict(target=[1, 12]), ValueError, "out of range"),
    "target-float-tensor": (dict(target=torch.tensor([0.5, 1.0])), TypeError, "integer class"),
    "target-type": (dict(target="cat"), TypeError, "target must be"),
    "ppe-zero": (dict(perturbations_per_eval=0), ValueError, "perturbations_per_eval"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_one_line_errors(case):
    model = vgg_like()
    kwargs = dict(inputs=images(2, (16, 16)), sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), target=1)
    update, error, message = BAD_ARGUMENTS[case]
    kwargs.update(update)
    with pytest.raises(error, match=message) as info:
        Occlusion(model).attribute(**kwargs)
    assert "\n" not in str(info.value)


def test_forward_func_must_be_callable():
    with pytest.raises(TypeError, match="callable"):
        Occlusion("resnet")


def test_krypton_fx_does_not_import_captum():
    code = "import sys, krypton_fx, krypton_fx.captum; assert 'captum' not in sys.modules, 'captum imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
