"""``krypton_fx.explain_many``: every kind of input, one compile per size, the same maps as one
``Explainer`` call per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import krypton_fx
from krypton_fx.scale import many as many_mod
from krypton_fx.scale.many import ExplainerCache


def small_model(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).eval()


SETTINGS = dict(patch=8, stride=4, color=0.25)


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(5, 3, 32, 32)


def one_by_one(model, images, labels=None):
    out = []
    for i, x in enumerate(images):
        ex = krypton_fx.compile(model, image_size=tuple(x.shape[-2:]), **SETTINGS)
        out.append(ex(x, label=None if labels is None else labels[i]))
    return out


def assert_same(results, expected):
    assert len(results) == len(expected)
    for r, e in zip(results, expected):
        # bit for bit: a map never depends on which other images shared its chunk
        assert r.label == e.label and r.base_prob == e.base_prob
        torch.testing.assert_close(r.heatmap, e.heatmap, atol=0, rtol=0)


class PairDataset(Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def test_tensor_batch_and_list_equal_one_explainer_call_per_image(model, images):
    expected = one_by_one(model, images)
    assert_same(list(krypton_fx.explain_many(model, images, **SETTINGS)), expected)
    ex = krypton_fx.compile(model, image_size=(32, 32), **SETTINGS)
    results = list(krypton_fx.explain_many(ex, list(images)))
    assert_same(results, expected)
    assert [r.stats["index"] for r in results] == list(range(5))
    assert results[2].stats["source"] == "images[2]"


def test_dataset_and_dataloader_labels(model, images):
    labels = torch.tensor([0, 1, 2, 1, 0])
    expected = one_by_one(model, images, labels.tolist())
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    assert_same(list(krypton_fx.explain_many(model, loader, **SETTINGS)), expected)
    assert_same(list(krypton_fx.explain_many(model, PairDataset(images, labels), **SETTINGS)), expected)
    # "predicted" ignores the dataset's labels; an int explains that class everywhere
    predicted = list(krypton_fx.explain_many(model, loader, labels="predicted", **SETTINGS))
    assert_same(predicted, one_by_one(model, images))
    twos = list(krypton_fx.explain_many(model, images, labels=2, **SETTINGS))
    assert {r.label for r in twos} == {2}


def test_files_folders_and_a_transform(model, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.png"):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / name)
    pixels = [torch.from_numpy(np.array(Image.open(tmp_path / n))).permute(2, 0, 1).float() / 255
              for n in ("a.png", "b.png")]
    expected = one_by_one(model, pixels)
    by_folder = list(krypton_fx.explain_many(model, tmp_path, **SETTINGS))  # sorted: a, b
    assert [r.stats["source"] for r in by_folder] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert_same(by_folder, expected)
    assert_same(list(krypton_fx.explain_many(model, [tmp_path / "a.png", str(tmp_path / "b.png")],
                                             **SETTINGS)), expected)
    halved = list(krypton_fx.explain_many(model, [tmp_path / "a.png"], transform=lambda img: torch.from_numpy(
        np.array(img)).permute(2, 0, 1).float() / 510, **SETTINGS))
    assert_same(halved, one_by_one(model, [pixels[0] / 2]))


def test_one_compile_per_size_in_order(model, monkeypatch):
    compiled = []
    real = many_mod.compile_explainer

    def counting(m, **kwargs):
        compiled.append(kwargs["image_size"])
        return real(m, **kwargs)

    monkeypatch.setattr(many_mod, "compile_explainer", counting)
    torch.manual_seed(2)
    sizes = [32, 32, 24, 32, 24, 32]
    images = [torch.rand(3, s, s) for s in sizes]
    results = list(krypton_fx.explain_many(model, images, chunk=2, **SETTINGS))
    assert sorted(compiled) == [(24, 24), (32, 32)]
    assert [tuple(r.heatmap.shape) for r in results] == [(7, 7), (7, 7), (5, 5), (7, 7), (5, 5), (7, 7)]
    assert_same(results, one_by_one(model, images))


def test_an_explainer_with_run_many_gets_whole_chunks(model, images):
    calls = []

    class Packed(krypton_fx.Explainer):
        def run_many(self, batch, labels, batch_size):
            calls.append(len(batch))
            return [self(x, label=y) for x, y in zip(batch, labels)]

    base = krypton_fx.compile(model, image_size=(32, 32), **SETTINGS)
    packed = Packed(base.model, base.settings)
    results = list(krypton_fx.explain_many(packed, images, chunk=3))
    assert calls == [3, 2]
    assert_same(results, one_by_one(model, images))


def test_on_the_cpu_images_share_batches_with_one_calls_maps(model, images):
    ex = krypton_fx.compile(model, image_size=(32, 32), batch_size=128, cache=False, **SETTINGS)  # 49 positions
    sizes = []
    real_run = ex.run_program
    ex.run_program = lambda positions, *a, **k: sizes.append(len(positions)) or real_run(positions, *a, **k)
    expected = [ex(x) for x in images]
    sizes.clear()
    # two images a batch: two packs, the check's first and last image alone, and the fifth alone
    assert_same(list(krypton_fx.explain_many(ex, images)), expected)
    assert sizes == [2 * 49, 49, 49, 2 * 49, 49] and ex._build.packs_checked and not ex._build.pack_failed
    sizes.clear()
    results = list(krypton_fx.explain_many(ex, images, pack=True))  # the fifth image a short pack
    assert sizes == [2 * 49, 2 * 49, 49]
    for r, e in zip(results, expected):
        assert r.label == e.label and r.base_prob == pytest.approx(e.base_prob, abs=1e-6)
        torch.testing.assert_close(r.heatmap, e.heatmap, atol=1e-6, rtol=0)  # up to rounding


def test_pack_false_and_bad_pack_values(model, images):
    ex = krypton_fx.compile(model, image_size=(32, 32), batch_size=128, cache=False, **SETTINGS)
    assert_same(ex.run_many(images, pack=False), [ex(x) for x in images])
    assert ex._build.packed is None
    with pytest.raises(ValueError, match="pack must be None, True or False"):
        ex.run_many(images, pack="yes")


def test_bad_images_name_the_image(model, images, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        list(krypton_fx.explain_many(model, [tmp_path / "broken.png"], **SETTINGS))
    with pytest.raises(ValueError, match=r"images\[1\]"):
        list(krypton_fx.explain_many(model, [images[0], torch.rand(4, 32, 32)], **SETTINGS))
    with pytest.raises(TypeError, match="image_size"):
        list(krypton_fx.explain_many(model, images, image_size=(32, 32)))
    ex = krypton_fx.compile(model, image_size=(32, 32), **SETTINGS)
    with pytest.raises(TypeError, match="explainer's settings apply"):
        list(krypton_fx.explain_many(ex, images, stride=8))
    with pytest.raises(ValueError, match="one label per image"):
        list(krypton_fx.explain_many(model, images, labels=[0, 1], **SETTINGS))


def test_explainer_cache_keys_on_size_and_colour(model):
    cache = ExplainerCache(model, patch=8, stride=8)
    a = cache.get((32, 32))
    assert cache.get([32, 32]) is a and cache.get((32, 32), 0.0) is a
    assert cache.get((32, 32), [0.5, 0.5, 0.5]) is not a
    assert cache.compiles == 2
