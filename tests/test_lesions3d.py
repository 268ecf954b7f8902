"""The 3-D demo's data and model (krypton_fx.lesions3d): seeded volumes whose lesion lies in its
box, a small 3-D CNN that learns it on a small budget, and occlusion maps hottest in the lesion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import krypton_fx
from krypton_fx import lesions3d
from krypton_fx.viz import upsample_heatmap_nd


def test_volumes_are_seeded_in_range_and_labelled():
    a = lesions3d.make_volumes(6, size=20, seed=3)
    b = lesions3d.make_volumes(6, size=20, seed=3)
    c = lesions3d.make_volumes(6, size=20, seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    volumes, labels, boxes = a
    assert volumes.shape == (6, 1, 20, 20, 20) and volumes.dtype == torch.float32
    assert float(volumes.min()) >= 0.0 and float(volumes.max()) <= 1.0
    assert ((labels == 1) == (boxes[:, 0] >= 0)).all() and (boxes[labels == 0] == -1).all()
    with pytest.raises(ValueError):
        lesions3d.make_volumes(2, size=8)


def test_the_lesion_lies_in_its_box_and_is_what_sets_the_classes_apart():
    volumes, labels, boxes = lesions3d.make_volumes(40, size=32, seed=11)
    assert 10 <= int(labels.sum()) <= 30
    for x, label, box in zip(volumes, labels, boxes):
        if label == 0:
            continue
        d, h, w, sd, sh, sw = box.tolist()
        assert 4 <= min(sd, sh, sw) and max(sd, sh, sw) <= 8  # a small lesion, whole in a patch of 8
        assert d >= 0 and d + sd <= 32 and h + sh <= 32 and w + sw <= 32
        brightest = np.unravel_index(int(x[0].argmax()), x[0].shape)
        assert lesions3d.lesion_contains(box, brightest)
        inside = x[0, d:d + sd, h:h + sh, w:w + sw]
        assert float(inside.max()) > float(np.percentile(x[0].numpy(), 99)) + 0.15
    healthy_peak = volumes[labels == 0].amax(dim=(1, 2, 3, 4))
    lesion_peak = volumes[labels == 1].amax(dim=(1, 2, 3, 4))
    assert float(lesion_peak.min()) > float(healthy_peak.max())


def test_lesion_contains():
    box = (4, 5, 6, 2, 3, 4)
    assert lesions3d.lesion_contains(box, (4, 5, 6)) and lesions3d.lesion_contains(box, (5, 7, 9))
    assert not lesions3d.lesion_contains(box, (6, 5, 6)) and not lesions3d.lesion_contains(box, (4, 8, 6))
    assert not lesions3d.lesion_contains((-1,) * 6, (0, 0, 0))


@pytest.fixture(scope="module")
def trained():
    """The demo's model on a small budget (it stops early on this task anyway: seconds on a CPU)."""
    return lesions3d.train(size=lesions3d.TRAIN_SIZE, max_steps=40)


def test_training_on_a_small_budget_learns_the_lesion(trained):
    model, info = trained
    assert not model.training and info["steps"] <= 40 and info["size"] == lesions3d.TRAIN_SIZE
    assert info["accuracy"] >= 0.9
    assert lesions3d.evaluate(model, size=32, n=32) >= 0.9  # fully convolutional: larger volumes too


def test_the_hottest_voxel_lies_in_the_lesion_and_the_map_is_exact(trained):
    model, _ = trained
    volumes, labels, boxes = lesions3d.make_volumes(16, size=32, seed=7)  # the demo's held-out seed
    chosen = [i for i in range(16) if labels[i] == 1][:3]
    assert len(chosen) == 3
    patch, stride, color = (8, 8, 8), (4, 4, 4), 0.4  # the demo's settings
    ex = krypton_fx.compile(model, patch=patch, stride=stride, color=color, image_size=(32, 32, 32), channels=1)
    for i in chosen:
        res = ex(volumes[i])
        assert res.label == 1
        drop = res.base_prob - upsample_heatmap_nd(res.heatmap.numpy(), (32, 32, 32), patch, stride)
        hottest = np.unravel_index(int(np.argmax(drop)), drop.shape)
        assert lesions3d.lesion_contains(boxes[i], hottest), (i, hottest, boxes[i].tolist())
        assert float(drop.max()) > 0.2
    naive = krypton_fx.naive_occlusion(model, volumes[chosen[0]], patch, stride, color, spatial_dims=3)
    torch.testing.assert_close(ex(volumes[chosen[0]]).heatmap, naive.heatmap, atol=1e-5, rtol=0)


def test_load_or_train_caches_and_reloads(trained, tmp_path, monkeypatch):
    model, info = trained
    monkeypatch.setattr(lesions3d, "train", lambda size, progress=False: (model, info))  # no second training
    first = lesions3d.load_or_train(cache_dir=str(tmp_path))
    path = tmp_path / f"lesion-{lesions3d.ARCH}-{lesions3d.TRAIN_SIZE}.pt"
    assert path.exists() and lesions3d.training_info(cache_dir=str(tmp_path))["accuracy"] == info["accuracy"]
    monkeypatch.setattr(lesions3d, "train", None)  # a reload must not train
    again = lesions3d.load_or_train(cache_dir=str(tmp_path))
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert lesions3d.training_info(cache_dir=str(tmp_path / "empty")) == {}
