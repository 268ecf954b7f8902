"""Volumes and signals: exact incremental occlusion for 3-D and 1-D CNNs.

MONAI's 3-D classifiers, hand-written 3-D and 1-D nets, random 3-D and 1-D
DAGs (hypothesis), geometry against ground truth in 3-D, executed conv MACs
against the theory, and clear errors for inputs of the wrong shape.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import assert_random_dag_exact, random_cnns
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import krypton_fx
from krypton_fx import geometry as geo
from krypton_fx.geometry import AxisSpec


def _randomise_batch_norm(model: nn.Module, kaiming: bool = False) -> nn.Module:
    """Non-trivial BatchNorm statistics; with ``kaiming``, convs re-initialised at unit gain
    (MONAI's EfficientNet initialises so small that its random-init output barely moves)."""
    for m in model.modules():
        if kaiming and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _exact(model, image, atol=1e-4, **kw):
    size = tuple(image.shape[1:])
    ex = krypton_fx.compile(model, image_size=size, channels=image.shape[0], output="logit", **kw)
    got = ex(image)
    kw.pop("tau", None)
    want = krypton_fx.naive_occlusion(model, image, output="logit", spatial_dims=len(size), **kw)
    assert got.heatmap.shape == want.heatmap.shape == ex.grid
    assert got.label == want.label
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=atol, rtol=1e-4)
    return ex, got, want


# --- MONAI's 3-D classifiers -----------------------------------------------------------------

monai_nets = pytest.importorskip("monai.networks.nets")

MONAI_3D = {
    "DenseNet121": lambda c: monai_nets.DenseNet121(spatial_dims=3, in_channels=c, out_channels=3),
    "resnet18": lambda c: monai_nets.resnet18(spatial_dims=3, n_input_channels=c, num_classes=3),
    "resnet50": lambda c: monai_nets.resnet50(spatial_dims=3, n_input_channels=c, num_classes=3),
    "SEResNet50": lambda c: monai_nets.SEResNet50(spatial_dims=3, in_channels=c, num_classes=3),
    "EfficientNetBN-b0": lambda c: monai_nets.EfficientNetBN("efficientnet-b0", spatial_dims=3,
                                                             in_channels=c, num_classes=3, pretrained=False),
}


@pytest.mark.parametrize("name", list(MONAI_3D))
def test_monai_3d_classifiers_are_exact(name):
    torch.manual_seed(0)
    model = _randomise_batch_norm(MONAI_3D[name](2), kaiming=name.startswith("EfficientNet"))
    # non-cubic volume, patch and stride; strides that do not divide the size
    image = torch.randn(2, 32, 36, 33) * 2
    _, got, want = _exact(model, image, patch=(9, 12, 7), stride=(13, 11, 14), color=[20.0, -15.0])
    span = float(want.heatmap.max() - want.heatmap.min())
    assert span > 1e-3  # far above the tolerance: a wrong incremental graph would show


def test_constant_padding_is_local_not_global():
    """MONAI's EfficientNet pads its stem explicitly: the pad must not make the net global."""
    torch.manual_seed(0)
    model = _randomise_batch_norm(MONAI_3D["EfficientNetBN-b0"](1))
    ex = krypton_fx.compile(model, patch=8, stride=8, image_size=(32, 32, 32), channels=1)
    kinds = {n.name: info for n, info in ex.infos()}
    pads = [info for name, info in kinds.items() if "pad" in name and info.local is not None]
    assert pads and all(info.state == "patched" and info.local.op == "pad" for info in pads)


# --- hand-written nets ---------------------------------------------------------------------


class Volume(nn.Module):
    """Every 3-D op: constant pads (module and F.pad), strided and dilated non-cubic convs,
    eval BatchNorm, ceil-mode max pool, avg pool without padded counts, a residual add."""

    def __init__(self, channels: int = 2):
        super().__init__()
        self.pad = nn.ConstantPad3d((1, 0, 2, 1, 0, 1), 0.3)
        self.c1 = nn.Conv3d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.pool = nn.MaxPool3d(2, ceil_mode=True)
        self.c2 = nn.Conv3d(4, 6, (3, 1, 3), stride=(1, 2, 1), padding=(1, 0, 2), dilation=(1, 1, 2))
        self.avg = nn.AvgPool3d(3, 1, 1, count_include_pad=False)
        self.c3 = nn.Conv3d(4, 6, 1, stride=(1, 2, 1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.c1(self.pad(x)))))
        y = self.avg(self.c2(x)) + self.c3(x)
        y = F.pad(y, (1, 1, 0, 0, 2, 0))
        return self.fc(F.adaptive_avg_pool3d(y, 1).flatten(1))


class ECG(nn.Module):
    """A small 1-D ResNet over 12 leads (the shape of ECG classifiers)."""

    def __init__(self, leads: int = 12, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv1d(leads, 16, 15, stride=2, padding=7, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.pool = nn.MaxPool1d(3, 2, 1)
        self.a1 = nn.Conv1d(16, 16, 7, padding=3)
        self.a2 = nn.Conv1d(16, 16, 7, padding=3)
        self.b1 = nn.Conv1d(16, 32, 7, stride=2, padding=3)
        self.b2 = nn.Conv1d(32, 32, 7, padding=3)
        self.down = nn.Conv1d(16, 32, 1, stride=2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.stem(x))))
        x = F.relu(x + self.a2(F.relu(self.a1(x))))
        x = F.relu(self.down(x) + self.b2(F.relu(self.b1(x))))
        return self.fc(F.adaptive_avg_pool1d(x, 1).flatten(1))


def test_hand_written_volume_net_is_exact():
    torch.manual_seed(1)
    _exact(_randomise_batch_norm(Volume()), torch.randn(2, 12, 14, 10), patch=(4, 3, 5), stride=(3, 4, 2),
           color=[0.5, -0.5])


@pytest.mark.parametrize("patch,stride", [(50, 25), ((40,), (30,)), (7, 3)])
def test_ecg_signal_is_exact(patch, stride):
    torch.manual_seed(2)
    model = _randomise_batch_norm(ECG())
    _exact(model, torch.randn(12, 600), patch=patch, stride=stride)


def test_int_patch_and_stride_mean_every_axis():
    ex = krypton_fx.compile(Volume(), patch=4, stride=3, image_size=(12, 14, 10), channels=2)
    assert ex.patch == (4, 4, 4) and ex.stride == (3, 3, 3) and ex.grid == (3, 4, 3)


def test_approximate_modes_in_3d():
    torch.manual_seed(3)
    model = _randomise_batch_norm(Volume())
    image = torch.randn(2, 16, 16, 16)
    exact = krypton_fx.compile(model, patch=4, stride=2, image_size=(16, 16, 16), channels=2)
    res = exact(image, drill_down=krypton_fx.DrillDown(r=1.0, stage1_stride=4))
    torch.testing.assert_close(res.heatmap, exact(image).heatmap, atol=1e-6, rtol=0)
    coarse = exact(image, drill_down=krypton_fx.DrillDown(r=0.2, stage1_stride=4))
    assert coarse.heatmap.shape == exact.grid and coarse.stats["positions_run"] < exact.positions
    approx = krypton_fx.compile(model, patch=4, stride=2, image_size=(16, 16, 16), channels=2, tau=0.5)
    assert approx(image).heatmap.shape == exact.grid


# --- random DAGs -------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], max_examples=15)
@given(net=random_cnns(max_blocks=4, dims=3), data=st.data(), seed=st.integers(0, 2**16))
def test_random_3d_dags_equal_naive(net, data, seed):
    assert_random_dag_exact(*net, data, seed, dims=3)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], max_examples=20)
@given(net=random_cnns(max_blocks=5, dims=1), data=st.data(), seed=st.integers(0, 2**16))
def test_random_1d_dags_equal_naive(net, data, seed):
    assert_random_dag_exact(*net, data, seed, dims=1)


# --- geometry against ground truth, 3-D ------------------------------------------------------------


@settings(max_examples=30)
@given(k=st.tuples(*[st.integers(1, 4)] * 3), s=st.tuples(*[st.integers(1, 3)] * 3),
       p=st.tuples(*[st.integers(0, 1)] * 3), data=st.data())
def test_3d_box_contains_every_changed_element(k, s, p, data):
    """Run a 3-D conv with and without a patch: every changed output lies in the computed box."""
    size = tuple(data.draw(st.integers(max(kk, 4), 11)) for kk in k)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(1, 2, *size, generator=gen)
    weight = torch.randn(3, 2, *k, generator=gen)
    base = F.conv3d(x, weight, None, s, p)
    patch = tuple(data.draw(st.integers(1, n)) for n in size)
    start = tuple(data.draw(st.integers(0, n - q)) for n, q in zip(size, patch))
    occluded = x.clone()
    region = tuple(slice(a, a + q) for a, q in zip(start, patch))
    occluded[(..., *region)] = torch.randn(1, 2, *patch, generator=gen) * 5
    changed = (F.conv3d(occluded, weight, None, s, p) != base).any(1)[0]
    inside = torch.zeros_like(changed)
    box = []
    for a in range(3):
        spec = AxisSpec(k[a], s[a], p[a], size[a], base.shape[2 + a])
        o, n = geo.local_box(torch.tensor([start[a]]), patch[a], spec)
        assert 0 <= int(o) and int(o) + n <= base.shape[2 + a]
        box.append(slice(int(o), int(o) + n))
    inside[tuple(box)] = True
    assert not (changed & ~inside).any()


# --- savings are real ---------------------------------------------------------------------------------

CONV = torch.ops.aten.convolution


def _conv_flops(fn, *args) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    return int(counter.get_flop_counts()["Global"].get(CONV, 0))


@pytest.mark.parametrize("model,size,patch", [
    (lambda: MONAI_3D["resnet18"](1), (48, 48, 48), 16),
    (lambda: ECG(), (2000,), 64),
])
def test_executed_conv_macs_match_theory(model, size, patch):
    model = model().eval()
    channels = 1 if len(size) == 3 else 12
    ex = krypton_fx.compile(model, patch=patch, stride=patch // 2, image_size=size, channels=channels,
                            batch_size=2)
    image = torch.randn(channels, *size)
    _, stored = ex.prepare(image)
    centre = torch.tensor([ex.positions // 2, ex.positions // 2 + 1])
    executed = _conv_flops(ex.program.module, centre, *stored) / 2
    full = _conv_flops(model, image[None])
    theory = krypton_fx.theoretical_speedup(model, size, patch, channels=channels)
    assert theory > 1.2
    assert full / executed == pytest.approx(theory, rel=0.05)


# --- bad input ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume_explainer():
    return krypton_fx.compile(Volume(), patch=4, stride=4, image_size=(12, 14, 10), channels=2)


@pytest.mark.parametrize("bad,error,match", [
    (torch.randn(2, 12, 14), ValueError, "3 spatial axes"),
    (torch.randn(2, 12, 14, 11), ValueError, r"compiled for \(2, 12, 14, 10\)"),
    (torch.randn(1, 1, 2, 12, 14, 10), ValueError, "3 spatial axes"),
])
def test_volume_of_the_wrong_rank_or_size(volume_explainer, bad, error, match):
    with pytest.raises(error, match=match):
        volume_explainer(bad)


@pytest.mark.parametrize("kwargs,match", [
    ({"patch": (4, 4)}, "patch has 2 values but the images have 3 spatial axes"),
    ({"stride": (1, 2, 3, 4)}, "stride has 4 values"),
    ({"patch": (4, 20, 4)}, "larger than the image"),
    ({"image_size": (4, 4, 4, 4)}, "give 1 .signals., 2 .images. or 3 .volumes."),
])
def test_patch_with_the_wrong_number_of_axes(kwargs, match):
    args = {"patch": 4, "image_size": (12, 14, 10), "channels": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        krypton_fx.compile(Volume(), **args)


# --- the Captum drop-in on volumes and signals -----------------------------------------------------


@pytest.mark.parametrize("net,shape,window,strides,target", [
    (Volume, (2, 2, 12, 14, 10), (2, 4, 3, 5), (2, 3, 3, 2), 1),  # border windows cut off too
    (ECG, (2, 12, 300), (12, 40), (12, 25), [1, 2]),
])
def test_captum_occlusion_on_volumes_and_signals(net, shape, window, strides, target):
    captum = pytest.importorskip("captum.attr")
    from krypton_fx.captum import Occlusion

    torch.manual_seed(4)
    model = _randomise_batch_norm(net())
    x = torch.randn(*shape)
    kw = dict(sliding_window_shapes=window, strides=strides, target=target, baselines=0.5)
    ours = Occlusion(model)
    got = ours.attribute(x, **kw)
    assert ours.last_path == "incremental", ours.last_fallback_reason
    want = captum.Occlusion(model).attribute(x, **kw)
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
