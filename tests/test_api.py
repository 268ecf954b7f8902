"""The public contract: arguments, shapes, variants, and clear errors for bad input."""

import pytest
import torch
import torchvision
from torch import nn

import krypton_fx


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).eval()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.randn(3, 40, 52)


def _both(model, image, **kw):
    size = tuple(image.shape[-2:])
    ex = krypton_fx.compile(model, image_size=size, **kw)
    kw.pop("tau", None)
    got = ex(image)
    naive_kw = {k: v for k, v in kw.items() if k in ("patch", "stride", "color", "output")}
    want = krypton_fx.naive_occlusion(model, image, **naive_kw)
    return got, want


@pytest.mark.parametrize("patch,stride", [(16, 4), ((9, 13), (5, 3)), (7, 11), ((40, 5), 6)])
def test_non_square_patches_and_strides(resnet, image, patch, stride):
    got, want = _both(resnet, image, patch=patch, stride=stride)
    assert got.heatmap.shape == want.heatmap.shape
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    sy, sx = (stride, stride) if isinstance(stride, int) else stride
    assert got.heatmap.shape == ((40 - ph) // sy + 1, (52 - pw) // sx + 1)
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-4, rtol=0)
    assert got.label == want.label and got.base_prob == pytest.approx(want.base_prob, abs=1e-6)


def test_per_channel_color_and_logit_output(resnet, image):
    got, want = _both(resnet, image, patch=10, stride=7, color=[0.5, -1.0, 2.0], output="logit")
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        logits = resnet(image[None])
    assert got.base_prob == pytest.approx(float(logits[0, got.label]), rel=1e-5)


def test_explicit_label_and_batched_image(resnet, image):
    ex = krypton_fx.compile(resnet, patch=12, stride=10, image_size=(40, 52), batch_size=3)
    got = ex(image[None], label=5)
    want = krypton_fx.naive_occlusion(resnet, image, patch=12, stride=10, label=5)
    assert got.label == 5
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-4, rtol=0)


def test_heatmap_is_a_float32_cpu_tensor(resnet, image):
    res = krypton_fx.compile(resnet, patch=16, stride=12, image_size=(40, 52))(image)
    assert res.heatmap.dtype == torch.float32 and res.heatmap.device.type == "cpu"
    assert 0.0 <= float(res.heatmap.min()) and float(res.heatmap.max()) <= 1.0


def test_model_mode_is_restored(image):
    model = torchvision.models.resnet18(num_classes=3)
    model.train()
    krypton_fx.compile(model, patch=16, stride=16, image_size=(40, 52))(image)
    assert model.training and all(m.training for m in model.modules())


def test_theoretical_speedup_reference_values():
    # The paper's Figure 5 at patch 16 (docs/design.md: about 6.8, 2.2, 1.8).
    assert krypton_fx.theoretical_speedup(torchvision.models.vgg16(), (224, 224), 16) == pytest.approx(6.8, abs=0.05)
    assert krypton_fx.theoretical_speedup(torchvision.models.resnet18(), (224, 224), 16) == pytest.approx(2.2, abs=0.05)
    inception = torchvision.models.inception_v3(init_weights=False, aux_logits=False)
    assert krypton_fx.theoretical_speedup(inception, (299, 299), 16) == pytest.approx(1.8, abs=0.05)


def test_report_names_where_savings_stop(resnet):
    ex = krypton_fx.compile(resnet, patch=16, stride=8, image_size=(64, 64))
    text = ex.report()
    assert "incremental savings stop at:" in text
    assert "conv1" in text and "local" in text and "patched" in text


# --- bad input -----------------------------------------------------------------


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: cannot trace
            return x.mean((2, 3))
        return x.amax((2, 3))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"patch": 50}, ValueError, "larger than the image"),
    ({"patch": (8, 60)}, ValueError, "larger than the image"),
    ({"stride": 0}, ValueError, "stride must be >= 1"),
    ({"stride": -2}, ValueError, "stride must be >= 1"),
    ({"patch": "big"}, TypeError, "patch must be an int"),
    ({"tau": 0.0}, ValueError, "tau must be in"),
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ({"output": "probs"}, ValueError, "output must be"),
    ({"color": [1.0, 2.0]}, ValueError, "one value per channel"),
    ({"batch_size": 0}, ValueError, "batch_size"),
])
def test_compile_rejects_bad_arguments(resnet, kwargs, error, match):
    args = {"image_size": (40, 52), **kwargs}
    with pytest.raises(error, match=match):
        krypton_fx.compile(resnet, **args)


@pytest.fixture(scope="module")
def explainer(resnet):
    return krypton_fx.compile(resnet, patch=16, stride=12, image_size=(40, 52))


@pytest.mark.parametrize("bad,error,match", [
    (torch.randn(40, 52), ValueError, "shape"),
    (torch.randn(2, 3, 40, 52), ValueError, "shape"),
    (torch.randn(1, 3, 40, 40), ValueError, "compiled for"),
    (torch.randn(4, 40, 52), ValueError, "compiled for"),
    (torch.full((3, 40, 52), float("nan")), ValueError, "NaN"),
    (torch.zeros(3, 40, 52, dtype=torch.uint8), TypeError, "floating-point"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_explainer_rejects_bad_images(explainer, bad, error, match):
    with pytest.raises(error, match=match):
        explainer(bad)


@pytest.mark.parametrize("label", [7, -1, 100])
def test_label_out_of_range(explainer, image, label):
    with pytest.raises(ValueError, match="out of range"):
        explainer(image, label=label)


def test_untraceable_model_has_a_hint():
    with pytest.raises(krypton_fx.TraceError, match="Hint"):
        krypton_fx.compile(Branchy(), patch=4, image_size=(16, 16))
    assert issubclass(krypton_fx.TraceError, ValueError)


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        krypton_fx.compile(lambda x: x, image_size=(16, 16))


def test_model_that_does_not_classify():
    # compile traces; the model first runs on the first image (which is when this shows)
    ex = krypton_fx.compile(nn.Conv2d(3, 4, 3), patch=4, image_size=(16, 16))
    with pytest.raises(ValueError, match=r"\(N, classes\)"):
        ex(torch.randn(3, 16, 16))


def test_naive_rejects_bad_arguments(resnet, image):
    with pytest.raises(ValueError, match="larger than the image"):
        krypton_fx.naive_occlusion(resnet, image, patch=60)
    with pytest.raises(ValueError, match="stride"):
        krypton_fx.naive_occlusion(resnet, image, stride=0)
    with pytest.raises(ValueError, match="out of range"):
        krypton_fx.naive_occlusion(resnet, image, label=10)


@pytest.mark.parametrize("patch", [(40, 52), (40, 20), (3, 52)])
def test_patch_as_large_as_the_image(resnet, image, patch):
    got, want = _both(resnet, image, patch=patch, stride=5)
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-4, rtol=0)


def test_weights_changed_after_compile_are_used(image):
    """The explainer reads the model's current weights on every call."""
    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=4).eval()
    ex = krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 52))
    ex(image)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    got = ex(image)
    want = krypton_fx.naive_occlusion(model, image, patch=12, stride=10)
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-4, rtol=0)
