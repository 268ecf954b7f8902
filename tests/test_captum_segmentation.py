"""The Captum drop-in on a segmentation net: a forward that aggregates the net's dense output (a
module, or a plain function as in Captum's segmentation tutorial) takes the incremental path
and gives Captum's answer; a plain function around a classifier still runs plain."""

from __future__ import annotations

import pytest
import torch
from torch import nn

captum_attr = pytest.importorskip("captum.attr")

from test_segmentation import _fcn  # noqa: E402

from krypton_fx.captum import Occlusion  # noqa: E402


class DictNet(nn.Module):
    """A segmentation net that returns torchvision's {"out": map}."""

    def __init__(self):
        super().__init__()
        self.body = _fcn(classes=3, in_ch=3)

    def forward(self, x):
        return {"out": self.body(x)}


def test_tutorial_aggregation_function_runs_incrementally_and_matches_captum():
    torch.manual_seed(0)
    seg = DictNet().eval()
    x = torch.randn(1, 3, 20, 24)
    with torch.no_grad():  # frozen from the unoccluded image, as in Captum's tutorial
        out_max = seg(x)["out"].argmax(1, keepdim=True)
    selected_inds = torch.zeros(1, 3, 20, 24).scatter_(1, out_max, 1)

    def agg_segmentation_wrapper(inp):
        model_out = seg(inp)["out"]
        return (model_out * selected_inds).sum(dim=(2, 3))

    kwargs = dict(sliding_window_shapes=(3, 6, 6), strides=(3, 4, 4), target=1, perturbations_per_eval=8)
    occ = Occlusion(agg_segmentation_wrapper)
    result = occ.attribute(x, **kwargs)
    assert occ.last_path == "incremental", occ.last_fallback_reason
    expected = captum_attr.Occlusion(agg_segmentation_wrapper).attribute(x, **kwargs)
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)


def test_a_module_aggregation_matches_captum_and_a_classifier_function_stays_plain():
    torch.manual_seed(1)
    seg = DictNet().eval()

    class Aggregate(nn.Module):
        def __init__(self):
            super().__init__()
            self.seg = seg
            self.register_buffer("weights", torch.rand(1, 3, 16, 16))

        def forward(self, x):
            return (self.seg(x)["out"] * self.weights).sum(dim=(2, 3))

    model = Aggregate().eval()
    x = torch.randn(2, 3, 16, 16)
    kwargs = dict(sliding_window_shapes=(3, 5, 5), strides=(3, 3, 3), target=[0, 2], perturbations_per_eval=4)
    occ = Occlusion(model)
    result = occ.attribute(x, **kwargs)
    assert occ.last_path == "incremental", occ.last_fallback_reason
    torch.testing.assert_close(result, captum_attr.Occlusion(model).attribute(x, **kwargs), atol=1e-4, rtol=1e-4)
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    plain = Occlusion(lambda t: classifier(t))
    plain.attribute(x, **kwargs)
    assert plain.last_path == "plain" and "aggregation" in plain.last_fallback_reason
