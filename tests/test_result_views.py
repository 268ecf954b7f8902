"""What a notebook shows of a result: ``res.drop``, ``res.upsample()``, ``res.plot(image)`` for signals,
images and volumes, ``res.save(path, image)`` and Jupyter's rich display, on results of the explainer,
of ``explain_many`` and of naive occlusion; what the pictures draw is the result's own map."""

from __future__ import annotations

import doctest
import io

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

import krypton_fx
from krypton_fx import result_views, results
from krypton_fx.results import OcclusionResult
from krypton_fx.viz import display_scale, upsample_heatmap_nd


def _net(dims: int, channels: int) -> nn.Module:
    conv, pool = {1: (nn.Conv1d, nn.AdaptiveAvgPool1d), 2: (nn.Conv2d, nn.AdaptiveAvgPool2d),
                  3: (nn.Conv3d, nn.AdaptiveAvgPool3d)}[dims]
    torch.manual_seed(dims)
    return nn.Sequential(conv(channels, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 3, padding=1), nn.ReLU(), pool(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


# (spatial size, channels, patch, stride): odd patches put every patch centre on a pixel
CASES = {1: ((29,), 2, (5,), (3,)), 2: ((17, 14), 3, (5, 5), (3, 3)), 3: ((11, 11, 11), 1, (5, 5, 5), (3, 3, 3))}


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["signal", "image", "volume"])
def explained(request):
    dims = request.param
    size, channels, patch, stride = CASES[dims]
    model = _net(dims, channels)
    image = torch.rand(channels, *size, generator=torch.Generator().manual_seed(dims))
    ex = krypton_fx.compile(model, patch=patch, stride=stride, image_size=size, channels=channels)
    return dims, image, ex(image), model


def test_drop_is_base_minus_map_and_upsample_puts_each_cell_at_its_patch_centre(explained):
    dims, image, res, _ = explained
    size, _, patch, stride = CASES[dims]
    assert torch.equal(res.drop, res.base_prob - res.heatmap)
    up = res.upsample(size)
    assert up.shape == size
    np.testing.assert_array_equal(up, res.base_prob - upsample_heatmap_nd(res.heatmap.numpy(), size, patch, stride))
    centres = np.ix_(*[np.arange(n) * s + (p - 1) // 2 for n, p, s in zip(res.heatmap.shape, patch, stride)])
    np.testing.assert_allclose(up[centres], res.drop.double().numpy(), rtol=0, atol=1e-6)
    # without a size: the least input with this grid
    assert res.upsample().shape == tuple((n - 1) * s + p for n, p, s in zip(res.heatmap.shape, patch, stride))
    with pytest.raises(ValueError, match="comes from an input of"):
        res.upsample(tuple(n + 5 for n in size))


def test_plot_draws_the_results_own_map_over_the_input(explained):
    dims, image, res, _ = explained
    size = CASES[dims][0]
    fig = res.plot(image)
    assert isinstance(fig, Figure)
    up = res.upsample(size)
    title = fig.get_suptitle()
    assert f"class {res.label}" in title and f"{res.base_prob:.3f}" in title
    if dims == 2:  # image, overlay, map, colour bar
        assert len(fig.axes) == 4
        np.testing.assert_allclose(np.asarray(fig.axes[2].images[0].get_array()), up, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), image.permute(1, 2, 0).double().numpy())
    elif dims == 3:  # three planes through the strongest drop: volume, overlay, map; colour bar
        assert len(fig.axes) == 10
        voxel = np.unravel_index(int(np.argmax(up)), up.shape)
        assert f"voxel {tuple(int(v) for v in voxel)}" in title
        np.testing.assert_allclose(np.asarray(fig.axes[2].images[0].get_array()), up[voxel[0]], atol=1e-12)
        np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), display_scale(image)[voxel[0]])
    else:  # the signal, the drop; colour bar
        assert len(fig.axes) == 3
        np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), image[0].double().numpy())
        np.testing.assert_allclose(fig.axes[1].lines[1].get_ydata(), up, atol=1e-12)  # after the zero line
    with pytest.raises(ValueError, match="pass the input the result was computed on"):
        res.plot(torch.rand(image.shape[0], *(n + 7 for n in size)))


def test_save_writes_a_png_atomically_and_a_result_displays_as_its_map(explained, tmp_path):
    dims, image, res, _ = explained
    path = res.save(tmp_path / "heat.png", image)
    assert path == tmp_path / "heat.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png"]  # no temporary left behind
    shown = Image.open(io.BytesIO(res._repr_png_()))
    assert shown.format == "PNG" and shown.size[0] < png.size[0]  # the map alone, small
    with pytest.raises(ValueError, match="unknown picture format"):
        res.save(tmp_path / "heat.xyz", image)
    with pytest.raises(ValueError, match="does not exist"):
        res.save(tmp_path / "missing" / "heat.png", image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png"]


def test_naive_and_explain_many_results_plot_too(tmp_path):
    size, channels, patch, stride = CASES[2]
    model = _net(2, channels)
    images = torch.rand(2, channels, *size, generator=torch.Generator().manual_seed(5))
    many = list(krypton_fx.explain_many(model, images, patch=patch, stride=stride))
    naive = krypton_fx.naive_occlusion(model, images[1], patch=patch, stride=stride)
    for res in (*many, naive):
        assert len(res.plot(images[1]).axes) == 4
    many[1].save(tmp_path / "many.png", images[1])
    naive.save(tmp_path / "naive.png", images[1])
    with Image.open(tmp_path / "many.png") as a, Image.open(tmp_path / "naive.png") as b:
        assert a.size == b.size


def test_pictures_of_images_as_a_notebook_holds_them():
    grid, patch, stride = (4, 4), (5, 5), (3, 3)
    rgb = np.random.default_rng(0).random((14, 14, 3))
    # channels last (PIL's layout), 8-bit, PIL, a batch of one, channels first: the same picture
    eight_bit = (rgb * 255).round().astype(np.uint8)
    as_pil = result_views.picture(Image.fromarray(eight_bit), grid, patch, stride)
    np.testing.assert_allclose(as_pil, eight_bit / 255.0)
    np.testing.assert_array_equal(result_views.picture(rgb, grid, patch, stride), rgb)
    np.testing.assert_array_equal(result_views.picture(torch.from_numpy(rgb).permute(2, 0, 1)[None], grid, patch,
                                                       stride), rgb)
    # a normalised input is stretched to [0, 1]; one channel is grey
    normalised = (torch.from_numpy(rgb).permute(2, 0, 1) - 0.45) / 0.22
    shown = result_views.picture(normalised, grid, patch, stride)
    assert shown.min() == 0.0 and shown.max() == 1.0
    np.testing.assert_allclose(shown, (rgb - rgb.min()) / (rgb.max() - rgb.min()), atol=1e-12)
    assert result_views.picture(torch.rand(1, 14, 14), grid, patch, stride).shape == (14, 14)
    with pytest.raises(TypeError, match="expected an image"):
        result_views.picture("image.png", grid, patch, stride)


def test_label_picks_one_map_of_a_several_label_result():
    res = OcclusionResult(torch.tensor([[0.75, 0.5]]), 3, 0.75, (4, 4), (4, 4))
    with pytest.raises(ValueError, match=r"label 5 is not in this result \(labels \[3\]\)"):
        res.plot(label=5)
    # the fields a several-label result carries (the first label's map stays ``heatmap``)
    res.labels, res.heatmaps, res.base_probs = [3, 5], torch.tensor([[[0.75, 0.5]], [[0.25, 0.125]]]), [0.75, 0.5]
    five = res.for_label(5)
    assert five.label == 5 and five.base_prob == 0.5 and torch.equal(five.heatmap, res.heatmaps[1])
    np.testing.assert_array_equal(res.upsample(label=5), five.upsample())
    assert "class 5: P = 0.500" in res.plot(label=5).get_suptitle()
    assert "class 3: P = 0.750" in res.plot(label=3).get_suptitle()
    assert res.for_label(3) is res


@pytest.mark.parametrize("module", [results, result_views], ids=["results", "result_views"])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0
