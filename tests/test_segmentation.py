"""Dense outputs with a target (SegmentationTarget): exact against naive occlusion with the
same reduction, written independently here; every output and reduce, given and predicted
masks, per-channel colours; MONAI's and torchvision's segmentation nets; the tracer's way
through BasicUNet; errors."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch
import torchvision.models.segmentation as tv_seg
from hypothesis import given, settings
from monai.networks.nets import AttentionUnet, BasicUNet, DynUNet, UNet
from strategies import randomize_batchnorm, seg_encoder_decoders, seg_model
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead
from torchvision.models.segmentation.lraspp import LRASPP

import krypton_fx
from krypton_fx import SegmentationTarget

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@torch.no_grad()
def naive_target(model, image, patch, stride, color, category, mask, output, reduce, key=None):
    """Occlude every position, run the model, reduce ``category``'s values over the mask
    (None: predicted from the unoccluded output), in float64."""
    model.eval()
    spatial = image.shape[1:]
    patch = (patch,) * len(spatial) if isinstance(patch, int) else patch
    stride = (stride,) * len(spatial) if isinstance(stride, int) else stride

    def values(out):
        out = (out[key] if key is not None else out).double()
        if output == "prob":
            return torch.softmax(out, 1)[:, category]
        return torch.sigmoid(out[:, category]) if output == "sigmoid" else out[:, category]

    base_out = model(image[None])
    base_out = base_out[key] if key is not None else base_out
    if mask is None:
        mask = (torch.sigmoid(base_out[0, category]) > 0.5) if output == "sigmoid" else (
            base_out[0].argmax(0) == category)
    weights = mask.double()
    fill = torch.as_tensor(color, dtype=image.dtype).reshape(-1, *(1,) * len(spatial))
    grids = [range(0, n - p + 1, s) for n, p, s in zip(spatial, patch, stride)]
    cells = []
    for starts in itertools.product(*grids):
        x = image.clone()
        x[(slice(None), *(slice(a, a + p) for a, p in zip(starts, patch)))] = fill
        v = values(model(x[None]))[0]
        total = (v * weights).sum()
        cells.append(float(total / weights.sum() if reduce == "mean" else total))
    return torch.tensor(cells).view(*(len(g) for g in grids)), weights


def assert_exact(model, image, patch, stride, target, color=0.0, mask=None, **compile_kw):
    ex = krypton_fx.compile(model, patch=patch, stride=stride, color=color, image_size=tuple(image.shape[1:]),
                            target=target, cache=False, **compile_kw)
    res = ex(image, mask=mask)
    ref, weights = naive_target(model, image, patch, stride, color, target.category,
                                mask if mask is not None else target.mask, target.output, target.reduce, target.key)
    assert res.label == target.category
    assert res.mask is not None and torch.equal(res.mask.double(), weights.reshape(res.mask.shape))
    err = float((res.heatmap.double() - ref).abs().max())
    span = float(ref.max() - ref.min())
    scale = max(1.0, abs(float(ref.abs().max()))) if target.reduce == "sum" else 1.0
    assert err <= 1e-4 * scale, (err, span)
    assert err <= max(1e-3 * span, 2e-6 * scale), (err, span)
    return ex, res



def _fcn(dims=2, classes=3, in_ch=2):
    """A net without down- or upsampling: its output stays patched on this branch and main."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return randomize_batchnorm(nn.Sequential(conv(in_ch, 6, 3, padding=1), bn(6), nn.ReLU(),
                                             conv(6, 6, 3, padding=2, dilation=2), nn.ReLU(),
                                             conv(6, classes, 1)))


# --- every output and reduce, given and predicted masks, colours ---------------------------

@pytest.mark.parametrize("output", ["prob", "sigmoid", "logit"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("masked", [False, True])
def test_outputs_reductions_masks(output, reduce, masked):
    torch.manual_seed(0)
    model = _fcn(classes=1 if output == "sigmoid" else 3)
    image = torch.randn(2, 19, 23)
    category = 0 if output == "sigmoid" else 2
    mask = None
    if masked:  # float weights, some zero
        mask = torch.rand(19, 23) * (torch.rand(19, 23) > 0.4)
    else:  # make sure the predicted mask is not empty
        model[-1].bias.data[category] += 0.5
    ex, res = assert_exact(model, image, 5, 3, SegmentationTarget(category, mask=mask, output=output, reduce=reduce))
    out = next(n for n in ex.graph_module.graph.nodes if n.op == "output")
    assert out.meta["krypton_patch"].state == "patched"  # reduced over the output's patch


@pytest.mark.parametrize("dims,size,patch,stride", [(1, (37,), 5, 4), (3, (7, 9, 8), 3, 3)])
def test_other_dims_and_per_channel_colour(dims, size, patch, stride):
    torch.manual_seed(1)
    model = _fcn(dims)
    image = torch.randn(2, *size)
    assert_exact(model, image, patch, stride, SegmentationTarget(1, mask=torch.rand(size) > 0.5), color=[0.5, -1.0])


def test_call_mask_replaces_compiled_and_cache_by_identity():
    torch.manual_seed(2)
    model = _fcn()
    image = torch.randn(2, 16, 12)
    m1 = torch.rand(16, 12) > 0.5
    t1 = SegmentationTarget(1, mask=m1)
    a = krypton_fx.compile(model, patch=4, stride=4, image_size=(16, 12), target=t1)
    assert krypton_fx.compile(model, patch=4, stride=4, image_size=(16, 12), target=SegmentationTarget(1, mask=m1)) is a
    assert krypton_fx.compile(model, patch=4, stride=4, image_size=(16, 12),
                              target=SegmentationTarget(1, mask=m1.clone())) is not a
    m2 = torch.rand(16, 12)
    assert_exact(model, image, 4, 4, t1, mask=m2)
    krypton_fx.clear_cache()


# --- the segmentation zoo --------------------------------------------------------------

def _monai_nets(dims):
    yield "unet-instance-0", UNet(dims, 1, 3, (4, 8), (2,), num_res_units=0)
    for res in (0, 1, 2):
        unet = UNet(dims, 1, 3, (4, 8, 8), (2, 2), num_res_units=res, norm="batch")
        yield f"unet-batch-{res}", randomize_batchnorm(unet)
    yield "basic-batch", randomize_batchnorm(BasicUNet(dims, 1, 3, features=(4, 4, 4, 4, 8, 4), norm="batch"))
    yield "attention", randomize_batchnorm(AttentionUnet(dims, 1, 3, (4, 8), (2,)))
    yield "dyn-instance", DynUNet(dims, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                                  filters=[4, 8, 8])


@pytest.mark.parametrize("name", [n for n, _ in _monai_nets(2)])
def test_monai_2d(name):
    torch.manual_seed(3)
    model = dict(_monai_nets(2))[name]
    image = torch.randn(1, 16, 32)
    model.eval()
    mask = torch.zeros(16, 32, dtype=torch.bool)
    mask[3:12, 5:25] = True
    assert_exact(model, image, 6, (5, 6), SegmentationTarget(1, mask=mask, output="logit", reduce="sum"))


@pytest.mark.parametrize("name", ["unet-instance-0", "unet-batch-2", "basic-batch", "dyn-instance"])
def test_monai_3d(name):
    torch.manual_seed(4)
    model = dict(_monai_nets(3))[name]
    size = (16, 16, 24) if name == "basic-batch" else (8, 16, 12)  # (BasicUNet halves four times)
    patch = tuple(n // 2 for n in size[:2]) + (size[2] // 3,)
    assert_exact(model.eval(), torch.randn(1, *size), patch, patch, SegmentationTarget(2, mask=torch.rand(size)))


def _tiny_backbone(layers: dict) -> nn.Module:
    """torchvision's backbone wrapper over a small conv net: returns a dict of named layers."""
    body = nn.Sequential(collections.OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()),
        low=nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()),
        high=nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 2, 2))))
    return IntermediateLayerGetter(body, layers)


@pytest.mark.parametrize("name", ["fcn", "deeplab", "lraspp"])
def test_torchvision_heads(name):
    """torchvision's segmentation heads (FCN, DeepLabV3 with ASPP's global pooling, LRASPP with its
    global-pooling attention) on a small backbone; the models return {"out": ...}."""
    torch.manual_seed(5)
    if name == "fcn":
        model = FCN(_tiny_backbone({"high": "out", "low": "aux"}), FCNHead(16, 3), FCNHead(8, 3))
    elif name == "deeplab":
        model = DeepLabV3(_tiny_backbone({"high": "out"}), DeepLabHead(16, 3, atrous_rates=(2, 3, 4)))
    else:
        model = LRASPP(_tiny_backbone({"low": "low", "high": "high"}), 8, 16, 3, inter_channels=8)
    image = torch.randn(3, 24, 32)
    target = SegmentationTarget(1, mask=torch.rand(24, 32) > 0.3, key="out")
    assert_exact(randomize_batchnorm(model), image, 8, (8, 6), target)


def test_dict_output_needs_a_key():
    model = tv_seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    ex = krypton_fx.compile(model, patch=16, stride=16, image_size=(32, 32), target=SegmentationTarget(1),
                            cache=False)
    with pytest.raises(ValueError, match=r"key='out'"):
        ex(torch.randn(3, 32, 32))


# --- MONAI's BasicUNet traces (its UpCat does not, as written) ------------------------------

def test_basic_unet_traces_and_the_check_catches_a_dropped_skip(monkeypatch):
    from krypton_fx import tracing
    model = randomize_batchnorm(BasicUNet(2, 1, 2, features=(4, 4, 4, 4, 8, 4), norm="batch"))
    x = torch.randn(1, 1, 16, 16)
    gm = tracing.trace(model)
    assert torch.equal(gm(x), model(x))
    assert sum(1 for n in gm.graph.nodes if n.target is torch.cat) == 4  # every skip concat is there
    # Without the rule, fx drops the concat (torch.jit.isinstance(proxy, Tensor) is False): the
    # traced graph cannot reproduce the model, and compiling says so instead of a wrong map.
    monkeypatch.setattr(tracing, "_TRACEABLE", {})
    with pytest.raises(ValueError, match="cannot run|does not reproduce"):
        krypton_fx.compile(model, patch=4, stride=4, image_size=(16, 16), target=SegmentationTarget(1),
                           cache=False)(x[0])


def test_basic_unet_odd_size_is_exact():
    torch.manual_seed(6)
    model = randomize_batchnorm(BasicUNet(2, 1, 2, features=(4, 4, 4, 4, 8, 4), norm="batch"))
    assert_exact(model, torch.randn(1, 35, 19), 7, 6, SegmentationTarget(1, mask=torch.ones(35, 19)))


# --- errors ------------------------------------------------------------------------------------

def test_errors():
    model = _fcn(classes=3)
    image = torch.randn(2, 12, 12)
    compile_ = lambda t: krypton_fx.compile(model, patch=4, stride=4, image_size=(12, 12), target=t,  # noqa: E731
                                            cache=False)
    with pytest.raises(ValueError, match="out of range"):
        compile_(SegmentationTarget(3))(image)
    with pytest.raises(ValueError, match="shape"):
        compile_(SegmentationTarget(1, mask=torch.ones(12, 11, dtype=torch.bool)))(image)
    with pytest.raises(ValueError, match="empty"):
        compile_(SegmentationTarget(1, mask=torch.zeros(12, 12)))(image)
    with pytest.raises(TypeError, match="bool or float"):
        SegmentationTarget(1, mask=torch.ones(12, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="output must be"):
        SegmentationTarget(1, output="softmax")
    with pytest.raises(ValueError, match="reduce must be"):
        SegmentationTarget(1, reduce="max")
    with pytest.raises(ValueError, match="category"):
        SegmentationTarget(-1)
    with pytest.raises(ValueError, match="category 1"):
        compile_(SegmentationTarget(1, mask=torch.ones(12, 12)))(image, label=2)
    with pytest.raises(ValueError, match="give the output in the target"):
        krypton_fx.compile(model, image_size=(12, 12), patch=4, target=SegmentationTarget(1), output="logit")
    with pytest.raises(ValueError, match="SegmentationTarget"):  # a dense model without a target
        krypton_fx.compile(model, patch=4, stride=4, image_size=(12, 12), cache=False)(image)
    classifier = nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="dense output"):
        krypton_fx.compile(classifier, patch=4, stride=4, image_size=(12, 12), target=SegmentationTarget(1),
                           cache=False)(image)
    with pytest.raises(ValueError, match="mask= is for"):
        krypton_fx.compile(classifier, patch=4, stride=4, image_size=(12, 12), cache=False)(image, mask=torch.ones(1))


# --- random encoder-decoder DAGs ---------------------------------------------------------------

@settings(max_examples=6)
@given(case=seg_encoder_decoders())
def test_random_encoder_decoders_exact(case):
    model = seg_model(case)
    image = torch.randn(case.in_channels, *case.size, generator=torch.Generator().manual_seed(case.seed))
    mask = torch.rand(case.size, generator=torch.Generator().manual_seed(case.seed)) > 0.5
    if case.mask == "predicted":
        out = model(image[None])
        predicted = (torch.sigmoid(out[0, case.category]) > 0.5) if case.output == "sigmoid" else (
            out[0].argmax(0) == case.category)
        mask = None if predicted.any() else mask
    if mask is not None and not mask.any():
        mask[(0,) * case.dims] = True
    assert_exact(model, image, case.patch, case.stride,
                 SegmentationTarget(case.category, output=case.output, reduce=case.reduce), color=case.color,
                 mask=mask)


# --- everywhere the classifier path is -----------------------------------------------------------

def test_drill_down_tau_explain_many_and_report_take_the_target():
    torch.manual_seed(7)
    model = _fcn()
    images = torch.randn(3, 2, 16, 20)
    target = SegmentationTarget(1, mask=torch.rand(16, 20))
    ex = krypton_fx.compile(model, patch=4, stride=2, image_size=(16, 20), target=target, cache=False)
    exact = ex(images[0])
    full = ex(images[0], drill_down=krypton_fx.DrillDown(r=1.0, stage1_stride=4))
    assert torch.equal(full.heatmap, exact.heatmap) and full.label == 1 and full.base_prob == exact.base_prob
    coarse = ex(images[0], drill_down=krypton_fx.DrillDown(r=0.25, stage1_stride=4))
    assert coarse.stats["positions_run"] < ex.positions
    many = list(krypton_fx.explain_many(ex, images))
    for res, image in zip(many, images):
        assert torch.equal(res.heatmap, ex(image).heatmap)
    approx = krypton_fx.compile(model, patch=4, stride=2, image_size=(16, 20), target=target, tau=0.5,
                                cache=False)(images[0])
    assert approx.heatmap.shape == exact.heatmap.shape and approx.base_prob == pytest.approx(exact.base_prob)
    report = ex.report()
    assert "reduced over the output's patch" in report and "savings stop at: nowhere" in report


def test_executed_conv_macs_are_the_theory_and_basicunet_decoder_state():
    """The conv multiply-adds the incremental graph executes (counted by torch's FLOP counter on
    a centre batch) are within 5% of theoretical_speedup's; BasicUNet's decoder is patched where
    the registry makes transposed convs local (the decoder ops), else dense with the reason."""
    from torch.utils.flop_counter import FlopCounterMode

    from krypton_fx.registry import Kind, lookup

    torch.manual_seed(8)
    model = randomize_batchnorm(BasicUNet(2, 1, 2, features=(4, 4, 4, 4, 8, 4), norm="batch"))
    size, patch = (256, 192), 8  # (at 64^2 the bottleneck's box is the whole map: all after it dense)
    target = SegmentationTarget(1, mask=torch.ones(size))
    ex = krypton_fx.compile(model, patch=patch, stride=4, image_size=size, target=target, cache=False)
    image = torch.randn(1, *size)
    output, stored = ex.prepare(image)
    resolved = ex.resolve(output)
    centre = torch.tensor([(ex.grid[0] // 2) * ex.grid[1] + ex.grid[1] // 2])  # at (124, 92): theory's centre
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ex.program.module(centre, *stored, *resolved.inputs)
    executed = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(op)) / 2
    with FlopCounterMode(display=False) as full_counter, torch.no_grad():
        model(image[None])
    full = sum(v for op, v in full_counter.get_flop_counts()["Global"].items() if "convolution" in str(op)) / 2
    theory = krypton_fx.theoretical_speedup(model, size, patch, target=target)
    assert full / executed == pytest.approx(theory, rel=0.05)
    up = next(n for n, _ in ex.infos() if n.op == "call_module" and "upcat_1.upsample" in n.target)
    modules = dict(ex.graph_module.named_modules())
    decoder = [info for n, info in ex.infos() if n.op == "call_module" and n.target.startswith("upcat_1")]
    local = lookup(up, modules)[0].kind is Kind.LOCAL  # (with the decoder ops; before them: global)
    assert all(info.state == ("patched" if local else "dense") for info in decoder)


def test_triton_gathers_with_a_target():
    """The reduction's gather of the target's maps on the Triton kernels (the interpreter here)."""
    torch.manual_seed(9)
    model = _fcn()
    assert_exact(model, torch.randn(2, 12, 14), 4, 4, SegmentationTarget(2, mask=torch.rand(12, 14)),
                 backend="triton")
