"""Feature ablation with masks (``Explainer.ablate``, krypton_fx/ablation.py) against the model
run on every ablated input: 1-D, 2-D and 3-D, superpixels and label maps of every awkward
kind, colour and image baselines, per-channel masks, random DAGs x random label images;
the bucketing rule's closed forms; the segment helpers; bad input."""

import math

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import RandomNet, dag_model, random_cnns
from torch import nn

import krypton_fx
from krypton_fx import ablation, segments, viz_segments


def naive_scores(model, image, labels, baseline, label, output="logit"):
    """``model(where(labels == id, baseline, image))[label]`` for every id, ascending."""
    ids = torch.unique(labels)
    outs = []
    with torch.no_grad():
        for i in ids:
            ablated = torch.where(labels == i, torch.as_tensor(baseline, dtype=image.dtype), image)
            logits = model(ablated[None])
            outs.append(torch.softmax(logits, 1)[0, label] if output == "prob" else logits[0, label])
    return ids, torch.stack(outs).float()


def assert_exact(model, image, labels, baseline=0.0, output="logit", label=None, **compile_args):
    size = tuple(image.shape[1:])
    ex = krypton_fx.compile(model, patch=1, stride=size, image_size=size, channels=image.shape[0],
                            output=output, **compile_args)
    res = ex.ablate(image, labels, baseline=baseline, label=label)
    ids, want = naive_scores(model, image, labels, baseline, res.label, output)
    assert torch.equal(res.ids, ids)
    torch.testing.assert_close(res.scores, want, atol=1e-4, rtol=1e-4)
    return ex, res


def blobs(c: int, size: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A smooth random image (superpixels can follow it) with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, c, *(4,) * len(size), generator=gen)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return nn.functional.interpolate(coarse, size=size, mode=mode)[0] + 0.05 * torch.randn(c, *size, generator=gen)


# --- exactness ------------------------------------------------------------------------------


def test_superpixels_on_a_dag_with_colour_and_image_baselines():
    model = dag_model(seed=3)
    image = blobs(3, (28, 28))
    labels = segments.slic(image, n_segments=12)
    ex, res = assert_exact(model, image, labels, baseline=0.25)
    assert res.heatmap.shape == (28, 28) and torch.equal(res.heatmap, res.scores[labels])
    assert res.programs >= 2 and res.waste >= 1.0
    # A second image of the same explainer: the programs of its buckets are kept.
    kept = len(ex.current_build().programs)
    assert_exact(model, image.flip(2), segments.felzenszwalb(image.flip(2), scale=30), baseline=torch.rand(3, 28, 28))
    assert len(ex.current_build().programs) >= kept


def test_awkward_segments_are_exact():
    """Any ids (negative, gaps), a segment in two far pieces, one covering most of the image,
    and two segments sharing one bounding box (so one bucket and one grid start)."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=5).eval()
    image = blobs(3, (32, 32), seed=1)
    labels = torch.full((32, 32), 1000)
    labels[:4, :4] = -7
    labels[-4:, -4:] = -7                        # two pieces, far apart
    labels[10:14, 10:14] = 3
    labels[10:14, 10:14][::2, ::2] = 4           # a checkerboard: two segments, one box
    labels[20:22, 2:30] = 12
    assert_exact(model, image, labels, baseline=-0.5, output="prob")
    ex, res = assert_exact(model, image, labels.unsqueeze(0), baseline=torch.rand(3, 1, 1), label=2)
    assert res.label == 2


def test_per_channel_masks_and_an_image_baseline():
    model = dag_model(seed=4)
    image = blobs(3, (24, 24), seed=2)
    base = segments.slic(image, n_segments=8)
    per_channel = torch.stack([(base * (c + 1)) % 5 for c in range(3)])
    ex, res = assert_exact(model, image, per_channel, baseline=torch.randn(3, 24, 24))
    assert res.heatmap.shape == (3, 24, 24)


@pytest.mark.parametrize("dims, size", [(1, (40,)), (3, (12, 12, 12))], ids=["1d", "3d"])
def test_signals_and_volumes(dims, size):
    torch.manual_seed(dims)
    blocks = [{"op": "conv", "out": 4, "kernel": (3,) * dims, "stride": 1, "pad": (1,) * dims, "dilation": 1,
               "groups": 1, "bias": True},
              {"op": "max", "kernel": 2, "stride": 2, "pad": 0, "dilation": 1, "ceil": False},
              {"op": "residual", "stride": 1, "out": 4, "kernel": 3}]
    model = RandomNet(blocks, 2, dims=dims).eval()
    image = blobs(2, size, seed=dims)
    coarse = torch.randint(0, 5, (3,) * dims)
    labels = coarse
    for axis, n in enumerate(size):
        labels = labels.repeat_interleave(-(-n // 3), axis).narrow(axis, 0, n)
    assert_exact(model, image, labels, baseline=0.5)
    if dims == 3:
        assert_exact(model, image, segments.slic(image, n_segments=6, compactness=0.1), baseline=0.0)


def test_tau_reaches_the_bucket_programs():
    """Approximate mode: a bucket's boxes are capped as the explainer's patches are."""
    model = dag_model(seed=5)
    image = blobs(3, (28, 28), seed=3)
    labels = torch.arange(4).repeat_interleave(7).repeat(28, 1)  # four vertical bands
    macs = {}
    for tau in (1.0, 0.5):
        ex = krypton_fx.compile(model, patch=1, stride=28, image_size=28, output="logit", tau=tau, cache=False)
        res = ex.ablate(image, labels)
        assert res.scores.shape == (4,) and torch.isfinite(res.scores).all()
        programs = [p for key, p in ex.current_build().programs.items() if key[0] == "segments"]
        macs[tau] = sum(n.meta["krypton_patch"].macs_inc for p in programs for n in p.capture.graph.nodes
                        if "krypton_patch" in n.meta)
    assert 0 < macs[0.5] < macs[1.0]


def test_triton_kernels_in_the_graph():
    """The Triton occlusion kernel in the bucket programs (interpreted on the CPU)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    image = blobs(3, (12, 12), seed=4)
    labels = torch.arange(9).view(3, 3).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert_exact(model, image, labels, baseline=torch.rand(3, 12, 12), backend="triton")


@settings(max_examples=10, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=random_cnns(max_blocks=4), size=st.integers(12, 24), cells=st.integers(2, 5),
       ids=st.lists(st.integers(-5, 50), min_size=1, max_size=6, unique=True),
       seed=st.integers(0, 2**16), tensor_baseline=st.booleans())
def test_random_dags_by_random_label_images(net, size, cells, ids, seed, tensor_baseline):
    blocks, in_ch = net
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = RandomNet(blocks, in_ch).eval()
    image = torch.randn(in_ch, size, size, generator=gen)
    try:
        model(image[None].clone())
    except RuntimeError:
        assume(False)  # the drawn layers shrink the map below one element
    coarse = torch.tensor(ids)[torch.randint(len(ids), (cells, cells), generator=gen)]
    step = -(-size // cells)
    labels = coarse.repeat_interleave(step, 0).repeat_interleave(step, 1)[:size, :size]
    baseline = torch.randn(in_ch, size, size, generator=gen) if tensor_baseline else float(seed % 3 - 1)
    assert_exact(model, image, labels, baseline=baseline)


# --- buckets --------------------------------------------------------------------------------


@given(extent=st.integers(1, 300), axes=st.integers(1, 3), data=st.data())
def test_a_bucket_box_holds_its_segment_from_a_grid_start(extent, axes, data):
    lo = data.draw(st.integers(0, extent - 1))
    hi = data.draw(st.integers(lo + 1, extent))
    (size,), (start,) = ablation.place_segments(torch.tensor([lo]), torch.tensor([hi]), extent, axes)
    size, start = int(size), int(start)
    assert size in ablation.ladder(extent)
    assert start <= lo and hi <= start + size <= extent
    starts = ablation.grid_starts(extent, size, axes)
    assert start in starts.tolist() and len(starts) ** axes <= 2 * ablation.MAX_GRID
    # No smaller size on the ladder holds it from its own aligned start.
    for smaller in (b for b in ablation.ladder(extent) if b < size):
        step = ablation.alignment(smaller, extent, axes)
        assert min(lo // step * step, extent - smaller) + smaller < hi
    # The waste bound of the module's docstring.
    bound = ablation.LADDER_RATIO * (hi - lo + ablation.alignment(size, extent, axes) - 1)
    assert size <= max(math.ceil(bound), ablation.MIN_BOX) or size == extent


def test_grid_and_ladder_closed_forms():
    assert ablation.ladder(3) == [3]
    assert ablation.ladder(224) == [4, 6, 9, 14, 20, 30, 46, 68, 103, 154, 224]
    assert ablation.grid_starts(10, 10, 2).tolist() == [0]
    assert ablation.grid_starts(224, 24, 2).tolist() == list(range(0, 201, 3)) + [200]
    assert len(ablation.grid_starts(128, 4, 3)) == 32  # within MAX_GRID starts in a volume


# --- segments -------------------------------------------------------------------------------


def test_label_files(tmp_path):
    from PIL import Image

    grey = (torch.arange(16).view(4, 4) // 4 * 40).numpy().astype("uint8")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert segments.read_labels(tmp_path / "grey.png").tolist() == [[0] * 4, [1] * 4, [2] * 4, [3] * 4]
    colour = torch.zeros(4, 4, 3, dtype=torch.uint8)
    colour[:, 2:] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    Image.fromarray(colour.numpy()).save(tmp_path / "colour.png")
    assert segments.read_labels(tmp_path / "colour.png").tolist() == [[0, 0, 1, 1]] * 4
    nib = pytest.importorskip("nibabel")
    import numpy as np

    volume = np.zeros((4, 5, 6), dtype=np.int16)
    volume[1:3, 1:4, 2:5] = 17
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "atlas.nii.gz")
    labels = segments.read_labels(tmp_path / "atlas.nii.gz")
    assert labels.shape == (4, 5, 6) and torch.equal(labels, torch.from_numpy((volume == 17).astype("int64")))
    with pytest.raises(segments.SegmentFileError, match="does not exist"):
        segments.read_labels(tmp_path / "missing.png")


# --- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_explainer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    return krypton_fx.compile(model, patch=1, stride=8, image_size=8, output="logit")


@pytest.mark.parametrize("segs, baseline, error, match", [
    (torch.zeros(8, 8), 0.0, TypeError, "integer ids"),
    (torch.zeros(8, 8, dtype=torch.bool), 0.0, TypeError, "integer ids"),
    (torch.zeros(8, 7, dtype=torch.long), 0.0, ValueError, r"segments must have shape \(8, 8\)"),
    (torch.zeros(2, 8, 8, dtype=torch.long), 0.0, ValueError, "per channel"),
    (torch.zeros(8, 8, dtype=torch.long), torch.zeros(2, 8, 8), ValueError, "broadcastable to the image"),
    (torch.zeros(8, 8, dtype=torch.long), float("nan"), ValueError, "finite"),
    (torch.zeros(8, 8, dtype=torch.long), "grey", TypeError, "number or a tensor"),
])
def test_bad_input_is_one_clear_error(small_explainer, segs, baseline, error, match):
    with pytest.raises(error, match=match):
        small_explainer.ablate(torch.rand(3, 8, 8), segs, baseline=baseline)


@pytest.mark.parametrize("module", [ablation, segments, viz_segments], ids=["ablation", "segments", "viz"])
def test_docstring_examples(module):
    import doctest

    assert doctest.testmod(module).failed == 0


def test_a_segmentation_target_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    ex = krypton_fx.compile(net, patch=2, stride=2, image_size=8, target=krypton_fx.SegmentationTarget(1))
    with pytest.raises(ValueError, match="without target= and norm_stats="):
        ex.ablate(torch.rand(3, 8, 8), torch.arange(64).view(8, 8) // 16)
