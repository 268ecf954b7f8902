"""``norm_stats="frozen"``: instance and group norms with the unoccluded image's statistics are
point ops; the incremental map equals naive occlusion with those statistics frozen (written
independently here, with hooks on the norm modules), exact mode stays dense and says so."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import krypton_fx
from krypton_fx import SegmentationTarget


class NormNet(nn.Module):
    """Instance norms (affine or not), a group norm, F.instance_norm, a pool and a transposed conv."""

    def __init__(self, dims: int = 2):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        inorm = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        self.c1, self.n1 = conv(2, 6, 3, padding=1), inorm(6, affine=True)
        self.c2, self.n2 = conv(6, 6, 3, padding=1), nn.GroupNorm(3, 6)
        self.c3, self.n3 = conv(6, 4, 3, padding=1), inorm(4)
        self.head = conv(4, 3, 1)
        with torch.no_grad():
            for m in (self.n1, self.n2):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        x = F.relu(self.n2(self.c2(x)))
        x = F.instance_norm(self.c3(x)) + self.n3(self.c3(x))
        return self.head(x)


def _occluded_cells(model, image, patch, stride, category, mask):
    """Naive occlusion's map (patches of 0): mean P(category) over the mask, one forward a position."""
    grids = [range(0, n - p + 1, s) for n, p, s in zip(image.shape[1:], patch, stride)]
    cells = []
    for starts in itertools.product(*grids):
        x = image.clone()
        x[(slice(None), *(slice(a, a + p) for a, p in zip(starts, patch)))] = 0.0
        prob = torch.softmax(model(x[None]).double(), 1)[0, category]
        cells.append(float((prob * mask).sum() / mask.sum()))
    return torch.tensor(cells).view(*(len(g) for g in grids))


def _naive_frozen(model, image, patch, stride, category, mask):
    """Naive occlusion with every norm's statistics taken from the unoccluded image (hooks)."""
    norms = [m for m in model.modules() if isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm))]
    saved = {}

    def record(m, args):
        x = args[0].double()
        g = m.num_groups if isinstance(m, nn.GroupNorm) else x.shape[1]
        grouped = x.reshape(x.shape[0], g, -1)
        saved[m] = (grouped.mean(2), grouped.var(2, unbiased=False))

    def frozen(m, args, out):
        x = args[0].double()
        n, c = x.shape[:2]
        g = m.num_groups if isinstance(m, nn.GroupNorm) else c
        mean, var = (v.repeat_interleave(c // g, 1).view(1, c, *(1,) * (x.dim() - 2)) for v in saved[m])
        y = (x - mean) / torch.sqrt(var + m.eps)
        if m.weight is not None:
            y = y * m.weight.double().view(1, c, *(1,) * (x.dim() - 2)) + m.bias.double().view(
                1, c, *(1,) * (x.dim() - 2))
        return y.float()

    # The forward's one F.instance_norm call is frozen too: recorded, then replaced, around the runs.
    calls, plain = [], F.instance_norm

    inside = []  # the norm modules running (they call F.instance_norm themselves)

    def recording(x, *a, **k):
        if not inside:
            calls.append(x.double())
        return plain(x, *a, **k)

    with torch.no_grad():
        tracking = [m.register_forward_pre_hook(lambda m, args: inside.append(m)) for m in norms] + [
            m.register_forward_hook(lambda *_: inside.pop() and None) for m in norms]
        hooks = [m.register_forward_pre_hook(record) for m in norms]
        F.instance_norm = recording
        try:
            base_out = model(image[None])
        finally:
            F.instance_norm = plain
        for h in hooks:
            h.remove()
        (seen,) = calls
        mean_f, var_f = seen.mean((2, 3), keepdim=True), seen.var((2, 3), unbiased=False, keepdim=True)
        hooks = [m.register_forward_hook(frozen) for m in norms]
        F.instance_norm = lambda x, *a, **k: plain(x, *a, **k) if inside else (
            (x.double() - mean_f) / torch.sqrt(var_f + 1e-5)).float()
        try:
            cells = _occluded_cells(model, image, patch, stride, category, mask)
        finally:
            F.instance_norm = plain
            for h in hooks + tracking:
                h.remove()
    return cells, base_out


def test_frozen_norms_are_point_ops_and_match_naive_with_frozen_statistics():
    torch.manual_seed(0)
    model = NormNet().eval()
    image = torch.randn(2, 20, 24)
    mask = torch.rand(20, 24)
    target = SegmentationTarget(1, mask=mask)
    ex = krypton_fx.compile(model, patch=5, stride=4, image_size=(20, 24), target=target, norm_stats="frozen",
                            cache=False)
    res = ex(image)
    ref, _ = _naive_frozen(model, image, (5, 5), (4, 4), 1, mask.double())
    assert float((res.heatmap.double() - ref).abs().max()) < 1e-5
    report = ex.report()
    assert "norm statistics: frozen" in report and "4 instance/group/layer norms" in report
    assert all(info.state != "dense" for n, info in ex.infos() if n.op != "output")
    exact = krypton_fx.compile(model, patch=5, stride=4, image_size=(20, 24), target=target, cache=False)
    exact(image)
    assert "instance norm: statistics over the whole map" in exact.report()
    assert krypton_fx.theoretical_speedup(model, (20, 24), 5, target=target, norm_stats="frozen") > \
        1.5 * krypton_fx.theoretical_speedup(model, (20, 24), 5, target=target)


def test_frozen_norms_in_3d_and_a_classifier():
    torch.manual_seed(1)
    model = NormNet(3).eval()
    ex = krypton_fx.compile(model, patch=3, stride=3, image_size=(6, 9, 6), target=SegmentationTarget(
        0, mask=torch.ones(6, 9, 6)), norm_stats="frozen", cache=False)
    assert ex(torch.randn(2, 6, 9, 6)).heatmap.shape == (2, 3, 2)
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Linear(4, 2)).eval()
    image = torch.randn(3, 16, 16)
    frozen = krypton_fx.compile(classifier, patch=4, stride=4, image_size=(16, 16), norm_stats="frozen",
                                cache=False)(image)
    exact = krypton_fx.naive_occlusion(classifier, image, 4, 4)
    assert frozen.heatmap.shape == exact.heatmap.shape and abs(frozen.base_prob - exact.base_prob) < 1e-5


def test_norm_stats_is_checked():
    with pytest.raises(ValueError, match="norm_stats must be one of"):
        krypton_fx.compile(NormNet(), image_size=(16, 16), norm_stats="running")


class LayerNormNet(nn.Module):
    """Layer norms over (C, H, W): a module with a spatially varying affine map, F.layer_norm
    without one; and a layer norm over the last axis only, which stays exact."""

    def __init__(self, size=(12, 14)):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(2, 4, 3, padding=1), nn.LayerNorm((4, *size))
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3, self.n3 = nn.Conv2d(4, 4, 3, padding=1), nn.LayerNorm(size[-1])
        self.head = nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            self.n1.weight.uniform_(0.5, 1.5)
            self.n1.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        x = F.relu(F.layer_norm(self.c2(x), (4, 12, 14), eps=1e-4))
        return self.head(self.n3(self.c3(x)))


def _naive_frozen_layer_norms(model, image, patch, stride, category, mask):
    """Naive occlusion with the (C, H, W) layer norms' mean and variance from the unoccluded image."""
    saved, plain = [], F.layer_norm

    def recording(x, shape, weight=None, bias=None, eps=1e-5):
        if len(shape) == 3:
            saved.append((x.double().mean((1, 2, 3), keepdim=True), x.double().var((1, 2, 3), unbiased=False,
                                                                                    keepdim=True)))
        return plain(x, shape, weight, bias, eps)

    def frozen(x, shape, weight=None, bias=None, eps=1e-5):
        if len(shape) != 3:
            return plain(x, shape, weight, bias, eps)
        mean, var = saved[len(calls) % len(saved)]
        calls.append(1)
        y = (x.double() - mean) / torch.sqrt(var + eps)
        if weight is not None:
            y = y * weight.double() + bias.double()
        return y.float()

    calls = []
    with torch.no_grad():
        F.layer_norm = recording
        try:
            model(image[None])
            F.layer_norm = frozen
            cells = _occluded_cells(model, image, patch, stride, category, mask)
        finally:
            F.layer_norm = plain
    return cells


def test_frozen_layer_norms_over_the_whole_map_match_naive_with_frozen_statistics():
    torch.manual_seed(2)
    model = LayerNormNet().eval()
    image = torch.randn(2, 12, 14)
    mask = torch.rand(12, 14)
    target = SegmentationTarget(2, mask=mask)
    ex = krypton_fx.compile(model, patch=4, stride=3, image_size=(12, 14), target=target, norm_stats="frozen",
                            cache=False)
    res = ex(image)
    ref = _naive_frozen_layer_norms(model, image, (4, 4), (3, 3), 2, mask.double())
    assert float((res.heatmap.double() - ref).abs().max()) < 1e-5
    assert "2 instance/group/layer norms" in ex.report()
    states = {n.name: info.state for n, info in ex.infos()}
    assert states["c3"] == "patched" and states["n3"] == "dense"  # over W only: exact, global
    exact = krypton_fx.compile(model, patch=4, stride=3, image_size=(12, 14), target=target, cache=False)
    exact(image)
    assert "layer norm: statistics over the whole map" in exact.report()
