"""krypton_fx.captum.FeatureAblation against the real captum.attr.FeatureAblation.

Every result is compared with Captum's on the same call: torchvision models with
SLIC superpixels (per image, per channel, segments in two pieces, tensor
baselines, every target form), random masks of every broadcastable form, and
bad arguments (Captum's error where it has one, else one clear error). The seam
to the engine's segment ablation is checked with a reference engine that runs
the model on each ablated image, so the incremental plumbing (plan, per-example
masks and baselines, painting, progress) must give Captum's result too.
"""

import inspect
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from skimage.segmentation import slic
from strategies import ablation_cases, randomize_batchnorm
from torch import nn

captum_attr = pytest.importorskip("captum.attr")

from krypton_fx.captum import CaptumArgumentError, FeatureAblation  # noqa: E402
from krypton_fx.explainer import Explainer  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)
SIZE = 24


def reference(forward_func, inputs, **kwargs):
    return captum_attr.FeatureAblation(forward_func).attribute(inputs, **kwargs)


def assert_matches(result, expected):
    results, expecteds = (result, expected) if isinstance(expected, tuple) else ((result,), (expected,))
    assert isinstance(result, tuple) == isinstance(expected, tuple) and len(results) == len(expecteds)
    for r, e in zip(results, expecteds):
        assert r.dtype == e.dtype and r.shape == e.shape
        torch.testing.assert_close(r, e, equal_nan=True, **TOL)



@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()


@pytest.fixture(scope="module")
def squeezenet():
    torch.manual_seed(1)
    return torchvision.models.squeezenet1_1(num_classes=10).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random pictures (blobs SLIC can follow) with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear") + 0.05 * torch.randn(
        n, 3, SIZE, SIZE, generator=gen)


def slic_mask(image: torch.Tensor, n_segments: int = 8) -> torch.Tensor:
    """``(1, 1, H, W)`` int64 SLIC superpixel ids of one ``(C, H, W)`` image."""
    labels = slic(image.permute(1, 2, 0).numpy().astype(np.float64), n_segments=n_segments, compactness=10,
                  start_label=0, channel_axis=-1)
    return torch.from_numpy(labels).long().view(1, 1, *labels.shape)


def per_image_slic(x: torch.Tensor, n_segments: int = 8) -> torch.Tensor:
    return torch.cat([slic_mask(img, n_segments) for img in x])  # (N, 1, H, W)


def small_cnn() -> nn.Module:
    torch.manual_seed(2)
    return randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    )).eval()


class SumOfTwo(nn.Module):
    """A module with two image inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, a, b):
        return self.model(a + b)


# --- torchvision models with SLIC masks -------------------------------------------------------


def test_resnet18_per_image_slic_masks_match_captum(resnet18):
    x = images(2)
    masks = per_image_slic(x)
    assert not torch.equal(masks[0], masks[1])  # each image its own superpixels
    kwargs = dict(feature_mask=masks, target=[1, 7], baselines=0.5, perturbations_per_eval=8)
    fa = FeatureAblation(resnet18)
    assert_matches(fa.attribute(x, **kwargs), reference(resnet18, x, **kwargs))
    assert fa.last_path == "incremental", fa.last_fallback_reason
    assert fa.last_stats["incremental_segments"] == sum(len(torch.unique(m)) for m in masks)


def test_a_segment_absent_from_one_image_matches_captum():
    """Per-image masks whose ids differ: id 9 lies in the first image only (Captum ablates
    it in both; the second, untouched, gets 0 there), and the ids have gaps."""
    x = images(2, seed=2)
    masks = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.long)
    masks[:, :, :, SIZE // 2:] = 3
    masks[0, :, :6, :6] = 9
    kwargs = dict(feature_mask=masks, target=2, perturbations_per_eval=4)
    model = small_cnn()
    fa = FeatureAblation(model)
    assert_matches(fa.attribute(x, **kwargs), reference(model, x, **kwargs))
    assert fa.last_path == "incremental", fa.last_fallback_reason
    assert fa.last_stats["incremental_segments"] == 5


def test_resnet18_segment_in_two_pieces_and_per_example_baseline_match_captum(resnet18):
    x = images(2, seed=1)
    mask = slic_mask(x[0])  # (1, 1, H, W): one mask for both images
    top_left, bottom_right = int(mask[0, 0, 0, 0]), int(mask[0, 0, -1, -1])
    mask[mask == bottom_right] = top_left  # one segment in two pieces, far apart
    big = mask.clone()
    big[:, :, 4:, :] = 100  # and a segment covering most of the image
    baselines = torch.tensor([[0.2, -0.4, 0.1], [1.0, 0.0, -1.0]]).view(2, 3, 1, 1)
    for m in (mask, big):
        kwargs = dict(feature_mask=m, target=torch.tensor([3, 9]), baselines=baselines, perturbations_per_eval=4)
        fa = FeatureAblation(resnet18)
        assert_matches(fa.attribute(x, **kwargs), reference(resnet18, x, **kwargs))
        assert fa.last_path == "incremental", fa.last_fallback_reason


def test_squeezenet_per_channel_masks_and_baseline_image_match_captum(squeezenet):
    x = images(2, seed=2)
    base = slic_mask(x[0])[0, 0]
    # channel c numbers the superpixels differently, so one id covers other regions per channel
    mask = torch.stack([(base * (c + 1)) % 7 for c in range(3)]).unsqueeze(0)  # (1, 3, H, W)
    baseline = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    kwargs = dict(feature_mask=mask, target=4, baselines=baseline, perturbations_per_eval=3)
    fa = FeatureAblation(squeezenet)
    assert_matches(fa.attribute(x, **kwargs), reference(squeezenet, x, **kwargs))
    assert fa.last_path == "incremental", fa.last_fallback_reason


TARGETS = {
    "int": 3, "negative-int": -2, "tuple": (5,), "scalar-tensor": torch.tensor(6),
    "tensor": torch.tensor([0, 9]), "list": [2, 8], "list-of-tuples": [(1,), (4,)],
    "none": None,  # one attribution row per output entry
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_form_matches_captum(name):
    model = small_cnn()
    x = images(2, seed=4)
    # target None gives one row per output entry: per-image masks need one per image
    mask = slic_mask(x[0], 6) if name == "none" else per_image_slic(x, 6)
    kwargs = dict(feature_mask=mask, target=TARGETS[name], perturbations_per_eval=4)
    fa = FeatureAblation(model)
    assert_matches(fa.attribute(x, **kwargs), reference(model, x, **kwargs))
    assert fa.last_path == ("plain" if name == "none" else "incremental"), fa.last_fallback_reason


# --- the seam to the engine's segment ablation ------------------------------------------------


def reference_engine(model, calls):
    """``Explainer.ablate`` as its contract says, by running ``model`` on every ablated image."""

    def ablate(self, image, segments, baseline, label, batch_size):
        calls.append(batch_size)
        ids = torch.unique(segments)
        scores = []
        for lo in range(0, len(ids), batch_size):
            chunk = ids[lo:lo + batch_size]
            inside = segments.unsqueeze(0) == chunk.view(-1, *(1,) * segments.dim())
            ablated = torch.where(inside, torch.as_tensor(baseline, dtype=image.dtype), image)
            scores.append(model(ablated)[:, label])
        return SimpleNamespace(scores=torch.cat(scores).float().cpu())

    return ablate


SEAM_CASES = {
    "per-image-masks": lambda x: dict(feature_mask=per_image_slic(x), target=[1, 7], baselines=0.5),
    "per-channel-mask": lambda x: dict(
        feature_mask=torch.stack([(slic_mask(x[0])[0, 0] * (c + 1)) % 7 for c in range(3)]).unsqueeze(0),
        target=torch.tensor([3, 9]), baselines=torch.tensor([0.2, -0.4, 0.1]).view(1, 3, 1, 1)),
    "per-example-baseline-image": lambda x: dict(feature_mask=slic_mask(x[1]), target=2,
                                                 baselines=torch.rand(2, 3, SIZE, SIZE)),
}


@pytest.mark.parametrize("case", list(SEAM_CASES))
def test_incremental_seam_matches_captum(resnet18, monkeypatch, case):
    calls = []
    monkeypatch.setattr(Explainer, "ablate", reference_engine(resnet18, calls), raising=False)
    x = images(2, seed=5)
    kwargs = dict(SEAM_CASES[case](x), perturbations_per_eval=5)
    fa = FeatureAblation(resnet18)
    result = fa.attribute(x, **kwargs)
    assert fa.last_path == "incremental", fa.last_fallback_reason
    assert calls == [2 * 5] * 2  # one call per image, Captum's bound of ppe * N images per batch
    assert_matches(result, reference(resnet18, x, **kwargs))


FALLBACKS = {
    "function": ("not an nn.Module", lambda m, x, k: (lambda t: m(t), x, k)),
    "two-inputs": ("more than one input", lambda m, x, k: (
        SumOfTwo(m), (x, x), dict(k, feature_mask=(k["feature_mask"], k["feature_mask"] + 50)))),
    "channel-groups": ("not spatial segments", lambda m, x, k: (
        m, x, dict(k, feature_mask=torch.tensor([0, 1, 0]).view(1, 3, 1, 1)))),
    "no-target": ("no target", lambda m, x, k: (m, x, dict(k, target=None))),
    "nan-baseline": ("not finite", lambda m, x, k: (m, x, dict(k, baselines=float("nan")))),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_cases_outside_the_seam_run_plain_and_match_captum(monkeypatch, name):
    model = small_cnn()
    monkeypatch.setattr(Explainer, "ablate", reference_engine(model, []), raising=False)
    reason, make = FALLBACKS[name]
    x = images(1, seed=6)
    forward, inputs, kwargs = make(model, x, dict(feature_mask=slic_mask(x[0], 6), target=3,
                                                  perturbations_per_eval=8))
    fa = FeatureAblation(forward)
    result = fa.attribute(inputs, **kwargs)
    assert fa.last_path == "plain" and reason in fa.last_fallback_reason
    assert_matches(result, reference(forward, inputs, **kwargs))


def test_use_weights_runs_plain_and_matches_captum(monkeypatch):
    model = small_cnn()
    monkeypatch.setattr(Explainer, "ablate", reference_engine(model, []), raising=False)
    x = images(1, seed=7)
    kwargs = dict(feature_mask=slic_mask(x[0], 6), target=3)
    ours, theirs = FeatureAblation(model), captum_attr.FeatureAblation(model)
    ours.use_weights = theirs.use_weights = True
    assert_matches(ours.attribute(x, **kwargs), theirs.attribute(x, **kwargs))
    assert ours.last_fallback_reason == "use_weights is set"


# --- every broadcastable mask form, on a small function ---------------------------------------


def small_forward(seed: int, features: int, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(features, classes, generator=gen)
    return lambda t: torch.tanh(t.flatten(1) @ weight)


@settings(max_examples=30)
@given(case=ablation_cases())
def test_random_masks_baselines_and_targets_match_captum(case):
    n, c, h, w = case.shape
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(case.seed))
    forward = small_forward(case.seed, c * h * w)
    kwargs = dict(baselines=case.baseline, target=case.target, perturbations_per_eval=case.ppe)
    result = FeatureAblation(forward).attribute(x, feature_mask=case.mask, **kwargs)
    # A mask with fewer dimensions means the mask with leading ones (Captum's answer for
    # perturbations_per_eval=1; for more, Captum mixes the features of its copies).
    full_mask = case.mask.reshape((1,) * (4 - case.mask.dim()) + tuple(case.mask.shape))
    assert_matches(result, reference(forward, x, feature_mask=full_mask, **kwargs))


def test_tabular_inputs_with_additional_args_and_default_mask_match_captum():
    torch.manual_seed(8)
    a, b = torch.randn(3, 5), torch.randn(3, 2, 2)
    scale = torch.tensor([[2.0], [-1.0], [0.5]])

    def forward(a, b, scale, shift):
        return torch.stack([(a * scale).sum(1), b.flatten(1).prod(1)], 1) + shift

    kwargs = dict(target=1, additional_forward_args=(scale, 0.25), baselines=(0.5, torch.randn(1, 2, 2)),
                  perturbations_per_eval=4)
    assert_matches(FeatureAblation(forward).attribute((a, b), **kwargs), reference(forward, (a, b), **kwargs))
    masks = (torch.tensor([[0, 0, 1, 2, 2]]), torch.tensor([[[2, 3], [3, 0]]]))  # ids shared across inputs
    assert_matches(FeatureAblation(forward).attribute((a, b), feature_mask=masks, **kwargs),
                   reference(forward, (a, b), feature_mask=masks, **kwargs))


def test_attribute_future_equals_attribute():
    x = torch.randn(2, 3, 4, 4)
    forward = small_forward(0, 48)

    def future_forward(t):
        done = torch.futures.Future()
        done.set_result(forward(t))
        return done

    kwargs = dict(feature_mask=torch.arange(16).view(1, 1, 4, 4) // 3, target=[0, 2], perturbations_per_eval=3)
    assert_matches(FeatureAblation(future_forward).attribute_future(x, **kwargs).wait(),
                   FeatureAblation(forward).attribute(x, **kwargs))


def test_progress_bar_as_captum(capsys):
    x = torch.randn(2, 3, 4, 4)
    forward = small_forward(1, 48)
    kwargs = dict(feature_mask=torch.arange(16).view(1, 1, 4, 4) // 3, target=1, perturbations_per_eval=2,
                  show_progress=True)
    bars = []
    for ablation in (captum_attr.FeatureAblation, FeatureAblation):
        ablation(forward).attribute(x, **kwargs)
        bars.append(capsys.readouterr().err.rstrip().split("\r")[-1].split("[")[0])
    assert bars[0] == bars[1] and bars[1].startswith("Feature Ablation attribution: 100%")


# --- Captum's interface ---------------------------------------------------------------------


def test_interface_matches_captum():
    forward = small_forward(0, 4)
    ours, theirs = FeatureAblation(forward), captum_attr.FeatureAblation(forward)

    def parameters(method):  # annotations aside
        return [(p.name, p.default, p.kind) for p in inspect.signature(method).parameters.values()]

    for name in ("__init__", "attribute", "attribute_future"):
        assert parameters(getattr(FeatureAblation, name)) == parameters(getattr(captum_attr.FeatureAblation, name))
    assert FeatureAblation.attribute.__wrapped__.__name__ == "attribute"
    assert FeatureAblation.attribute_future.__wrapped__.__name__ == "attribute_future"
    assert ours.get_name() == theirs.get_name() == "Feature Ablation"
    assert ours.has_convergence_delta() is theirs.has_convergence_delta() is False
    assert ours.multiplies_by_inputs is theirs.multiplies_by_inputs is True
    assert ours.use_weights is theirs.use_weights is False
    public = lambda obj: {k for k in dir(obj) if not k.startswith("_")}  # noqa: E731
    assert public(theirs) <= public(ours)


# --- bad arguments --------------------------------------------------------------------------


def two_inputs(a, b):
    return torch.stack([a.flatten(1).sum(1), b.flatten(1).mean(1)], 1)


def returns_future(x):
    done = torch.futures.Future()
    done.set_result(x.flatten(1))
    return done


MASK = torch.arange(16).view(1, 1, 4, 4) // 4

# case: (arguments over the default call, forward, our error type, our message); Captum raises
# for each, and ours is an instance of what it raises.
CAPTUM_ERRORS = {
    "mask-does-not-broadcast": (dict(feature_mask=MASK[..., :3]), None, RuntimeError, "does not broadcast"),
    "mask-batch": (dict(feature_mask=MASK.expand(3, 1, 4, 4)), None, RuntimeError, "does not broadcast"),
    "mask-more-dims": (dict(feature_mask=MASK[None]), None, RuntimeError, "more dimensions"),
    "mask-list": (dict(feature_mask=[MASK]), None, TypeError, "tensor or a tuple of tensors"),
    "baseline-shape": (dict(baselines=torch.zeros(3, 4, 3)), None, RuntimeError, "does not broadcast"),
    "baseline-batch": (dict(baselines=torch.zeros(3, 3, 4, 4)), None, RuntimeError, "does not broadcast"),
    "baseline-type": (dict(baselines="grey"), None, TypeError, "number or a torch.Tensor"),
    "baselines-fewer": (dict(inputs=(torch.rand(2, 3, 4, 4),) * 2, feature_mask=(MASK, MASK + 4),
                             baselines=(0.0,)), two_inputs, IndexError, "one scalar or tensor per input"),
    "ppe-zero": (dict(perturbations_per_eval=0), None, ValueError, "perturbations_per_eval"),
    "ppe-float": (dict(perturbations_per_eval=2.0), None, ValueError, "perturbations_per_eval"),
    "target-out-of-range": (dict(target=5), None, IndexError, "out of range"),
    "target-list-length": (dict(target=[0, 1, 2]), None, ValueError, "one target per example"),
    "inputs-list": (dict(inputs=[[1.0]]), None, TypeError, "inputs must be"),
    "future-to-attribute": (dict(target=None), returns_future, ValueError, "attribute_future"),
    "per-example-masks-without-per-example-output": (dict(feature_mask=MASK.expand(2, 1, 4, 4), target=None),
                                                      None, RuntimeError, "one output per example"),
}

# Calls Captum answers without an error (ignoring an argument, or grouping by float values),
# refused here with one clear error.
CLEAR_ERRORS = {
    "ids-not-integers": (dict(feature_mask=MASK + 0.5), TypeError, "integer feature ids"),
    "ids-complex": (dict(feature_mask=MASK.to(torch.complex64)), TypeError, "integer feature ids"),
    "masks-more": (dict(feature_mask=(MASK, MASK)), IndexError, "one mask per input"),
    "baselines-more": (dict(baselines=(0.0, 1.0)), IndexError, "one scalar or tensor per input"),
    "baseline-adds-dims": (dict(baselines=torch.zeros(1, 1, 3, 4, 4)), RuntimeError, "does not broadcast"),
}


def default_call(update, forward=None):
    kwargs = dict(inputs=torch.rand(2, 3, 4, 4), feature_mask=MASK, target=1)
    kwargs.update(update)
    return forward or small_forward(0, 48), kwargs


@pytest.mark.parametrize("case", list(CAPTUM_ERRORS))
def test_bad_arguments_raise_what_captum_raises(case):
    update, forward, error, message = CAPTUM_ERRORS[case]
    forward, kwargs = default_call(update, forward)
    with pytest.raises(Exception) as captum_info:
        captum_attr.FeatureAblation(forward).attribute(**kwargs)
    with pytest.raises(error, match=message) as info:
        FeatureAblation(forward).attribute(**kwargs)
    assert isinstance(info.value, CaptumArgumentError)  # a ValueError and an AssertionError
    assert isinstance(info.value, type(captum_info.value)), (type(captum_info.value), captum_info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", list(CLEAR_ERRORS))
def test_nonsense_captum_takes_is_refused_with_one_clear_error(case):
    update, error, message = CLEAR_ERRORS[case]
    forward, kwargs = default_call(update)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            captum_attr.FeatureAblation(forward).attribute(**kwargs)
        except NotImplementedError:
            assert case == "ids-complex"  # torch.unique has no complex kernel
    with pytest.raises(error, match=message) as info:
        FeatureAblation(forward).attribute(**kwargs)
    assert isinstance(info.value, CaptumArgumentError) and "\n" not in str(info.value)


def test_forward_func_must_be_callable():
    with pytest.raises(TypeError, match="callable"):
        FeatureAblation("resnet")


# --- Felzenszwalb segments, and a MONAI network on supervoxels --------------------------------


def test_felzenszwalb_segments_per_image_match_captum(squeezenet):
    from krypton_fx.segments import felzenszwalb

    x = images(2, seed=8)
    masks = torch.stack([felzenszwalb(img, scale=20, min_size=10) for img in x]).unsqueeze(1)
    kwargs = dict(feature_mask=masks, target=[2, 5], baselines=-0.3, perturbations_per_eval=6)
    fa = FeatureAblation(squeezenet)
    assert_matches(fa.attribute(x, **kwargs), reference(squeezenet, x, **kwargs))
    assert fa.last_path == "incremental", fa.last_fallback_reason


def test_monai_resnet_on_supervoxels_matches_captum():
    monai_nets = pytest.importorskip("monai.networks.nets")
    from krypton_fx.segments import slic as slic_segments

    torch.manual_seed(3)
    net = randomize_batchnorm(monai_nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=3)).eval()
    gen = torch.Generator().manual_seed(9)
    x = F.interpolate(torch.rand(1, 1, 3, 3, 3, generator=gen), size=(12, 12, 12), mode="trilinear")
    mask = slic_segments(x[0], n_segments=6, compactness=0.1).view(1, 1, 12, 12, 12)
    kwargs = dict(feature_mask=mask, target=1, baselines=0.0, perturbations_per_eval=4)
    fa = FeatureAblation(net)
    assert_matches(fa.attribute(x, **kwargs), reference(net, x, **kwargs))
    assert fa.last_path == "incremental", fa.last_fallback_reason
