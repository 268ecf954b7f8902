"""What a new user meets first (issue 24): channels from the model, every class at once."""

import pytest
import torch
from torch import nn

import krypton_fx
from krypton_fx.tracing import input_channels, trace


def _gray_net(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, classes)).eval()


def test_a_one_channel_model_compiles_without_channels_and_equals_naive():
    net = _gray_net()
    image = torch.rand(1, 32, 32)
    ex = krypton_fx.compile(net, patch=8, stride=8, image_size=(32, 32), cache=False)
    assert ex.channels == 1
    res = ex(image)
    ref = krypton_fx.naive_occlusion(net, image, patch=8, stride=8)
    torch.testing.assert_close(res.heatmap, ref.heatmap, atol=1e-5, rtol=0)


def test_a_one_channel_monai_3d_net_compiles_without_channels_and_equals_naive():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=2).eval()
    volume = torch.rand(1, 16, 16, 16)
    ex = krypton_fx.compile(net, patch=8, stride=8, image_size=(16, 16, 16), cache=False)
    res = ex(volume)
    ref = krypton_fx.naive_occlusion(net, volume, patch=8, stride=8, spatial_dims=3)
    torch.testing.assert_close(res.heatmap, ref.heatmap, atol=1e-5, rtol=0)


def test_channels_come_from_the_first_layer_the_image_meets_not_the_first_registered():
    class HeadFirst(nn.Module):  # registers a 3-channel head before the 2-channel stem
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, 4, 1)
            self.stem = nn.Conv2d(2, 3, 3)

        def forward(self, x):
            return self.head(self.stem(x)).mean((2, 3))

    assert input_channels(trace(HeadFirst())) == 2
    assert input_channels(trace(nn.Sequential(nn.ReLU(), nn.Flatten()))) is None


def test_without_a_layer_that_says_the_first_image_gives_the_channels():
    net = nn.Sequential(nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.LazyLinear(3))
    net(torch.rand(1, 2, 16, 16))
    ex = krypton_fx.compile(net.eval(), patch=4, stride=4, image_size=(16, 16), cache=False)
    assert ex.channels is None
    res = ex(torch.rand(2, 16, 16))
    assert ex.channels == 2 and res.heatmap.shape == (4, 4)


def test_a_channel_mismatch_names_channels():
    ex = krypton_fx.compile(_gray_net(), patch=8, stride=8, image_size=(32, 32), cache=False)
    with pytest.raises(ValueError, match=r"image has 3 channels .* compiled for 1; compile with channels=3"):
        ex(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="color has 3 values but the image has 1 channels"):
        krypton_fx.compile(_gray_net(), patch=8, image_size=(32, 32), color=(0.1, 0.2, 0.3), cache=False)


def test_every_class_at_once_equals_one_call_per_class_bit_for_bit():
    torch.manual_seed(1)
    net = _gray_net(classes=7)
    image = torch.rand(1, 24, 24)
    ex = krypton_fx.compile(net, patch=6, stride=3, image_size=(24, 24), batch_size=16, cache=False)
    one = {k: ex(image, label=k) for k in range(7)}
    every = ex(image, labels="all")
    assert every.labels == list(range(7)) and every.heatmaps.shape == (7, *one[0].heatmap.shape)
    for k in range(7):
        assert torch.equal(every.heatmaps[k], one[k].heatmap)
        assert every.base_probs[k] == one[k].base_prob
    some = ex(image, labels=[5, 2])
    assert some.label == 5 and torch.equal(some.heatmap, one[5].heatmap) and torch.equal(some.heatmaps[1],
                                                                                          one[2].heatmap)
    top = ex(image, top_k=3)
    order = sorted(range(7), key=lambda k: -one[k].base_prob)[:3]
    assert top.labels == order and torch.equal(top.heatmaps[2], one[order[2]].heatmap)
    assert ex(image).labels == [ex(image).label] and ex(image).heatmaps.shape[0] == 1
    logits = ex(image, labels="all", batch_size=5)
    assert torch.equal(logits.heatmaps, every.heatmaps)  # the batch does not change the bits


@pytest.mark.parametrize("kwargs, match", [
    ({"label": 1, "top_k": 2}, "at most one of label=, labels= and top_k="),
    ({"top_k": 0}, "top_k must be a positive int"),
    ({"labels": []}, "labels must be a non-empty sequence"),
    ({"labels": [1, 9]}, "label 9 is out of range"),
    ({"labels": [1, 2], "tau": 0.5}, "approximate maps .* explain one class"),
])
def test_bad_labels_are_one_clear_error(kwargs, match):
    ex = krypton_fx.compile(_gray_net(), patch=8, stride=8, image_size=(32, 32), tau=kwargs.pop("tau", 1.0))
    with pytest.raises(ValueError, match=match):
        ex(torch.rand(1, 32, 32), **kwargs)
