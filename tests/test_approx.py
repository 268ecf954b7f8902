"""Approximate modes: tau (eqs. 39-45), adaptive drill-down (eqs. 46-48), tau tuning
(section 4.4), and the synthetic lesion data the tuning runs on.

Exactness is checked against ``naive_occlusion``; costs against
``theoretical_speedup`` and ``conv_macs``; the tuner's curve fit against
synthetic SSIM curves with known answers. Models are random-initialised
where the weights do not matter.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st

import krypton_fx
from krypton_fx import approx, lesions
from krypton_fx.approx import (
    DrillDown,
    drill_down_speedup,
    drop_kept,
    heatmap_ssim,
    max_drill_down_speedup,
    select_tau,
    stage1_grid,
    stage1_stride,
    upsample_matrix,
)
from krypton_fx.explainer import OcclusionResult
from krypton_fx.report import conv_macs

TAUS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return lesions.build_model("tiny").eval()


@pytest.fixture(scope="module")
def lesion_images():
    return lesions.make_dataset(3, size=32, seed=11)[0]


def _compile(model, tau=1.0, size=32, patch=8, stride=2):
    return krypton_fx.compile(model, patch=patch, stride=stride, image_size=(size, size), tau=tau)


# --- tau ---------------------------------------------------------------------------


def test_tau_one_equals_naive(tiny, lesion_images):
    ex = _compile(tiny, tau=1.0)
    for image in lesion_images:
        res = ex(image)
        ref = krypton_fx.naive_occlusion(tiny, image, patch=8, stride=2)
        torch.testing.assert_close(res.heatmap, ref.heatmap, atol=1e-5, rtol=0)
        assert res.label == ref.label


@pytest.mark.parametrize("tau", TAUS[1:])
def test_tau_maps_have_exact_shape(tiny, lesion_images, tau):
    exact = _compile(tiny, tau=1.0)(lesion_images[0])
    res = _compile(tiny, tau=tau)(lesion_images[0], label=exact.label)
    assert res.heatmap.shape == exact.heatmap.shape
    assert res.heatmap.dtype == torch.float32 and torch.isfinite(res.heatmap).all()


# ResNet18 is the hard case: a residual block's two branches must keep their
# tau-capped boxes centred on the same change, and the union at the merge
# (eqs. 35-38) must be capped too, or it grows as tau shrinks: at 224 px two
# 6x6 boxes one column apart made layer4's 7x7 add dense at tau 0.8 but not 0.9.


@pytest.mark.parametrize("name, size, stride", [("resnet18", 64, 16), ("vgg11", 64, 16),
                                                ("resnet18", 224, 52)])
def test_smaller_tau_never_costs_more(name, size, stride):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=4).eval()
    size, patch = (size, size), 16
    speedups = [krypton_fx.theoretical_speedup(model, size, patch, tau=t) for t in TAUS]
    executed = []
    for t in TAUS:
        ex = krypton_fx.compile(model, patch=patch, stride=stride, image_size=size, tau=t)
        full, inc = conv_macs(ex.graph_module)
        executed.append(inc)
        assert inc <= full
    # TAUS decreases: speedups must not drop and executed MACs must not grow.
    assert all(a <= b + 1e-9 for a, b in zip(speedups, speedups[1:])), speedups
    assert all(a >= b for a, b in zip(executed, executed[1:])), executed
    assert speedups[-1] > speedups[0]


def test_capped_union_runs_and_stays_patched():
    """ResNet18 at 224 px, tau 0.8: layer4's first add merges two 6x6 boxes one column
    apart; capped, it stays a 6x6 patch (not dense), and the gathers that crop each
    branch onto it run."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    ex = krypton_fx.compile(model, patch=16, stride=52, image_size=(224, 224), tau=0.8, batch_size=4)
    add = ex.graph_module.graph.find_nodes(op="call_function", target=operator.add)[6]
    info = add.meta["krypton_patch"]
    assert info.state == "patched" and (info.box.h, info.box.w) == (6, 6)
    image = torch.randn(3, 224, 224)
    res = ex(image)
    exact = krypton_fx.compile(model, patch=16, stride=52, image_size=(224, 224))(image)
    assert res.heatmap.shape == exact.heatmap.shape and torch.isfinite(res.heatmap).all()
    # approximate, but of the same map: random-init logits barely move either way
    assert (res.heatmap - exact.heatmap).abs().max() < 0.05


# --- eqs. 46-48 ----------------------------------------------------------------------


@pytest.mark.parametrize("s1, s2, r, expected", [
    (16, 4, 0.25, 16 ** 2 / (4 ** 2 + 0.25 * 16 ** 2)),
    (8, 4, 0.5, 64 / (16 + 32)),
    (4, 4, 1.0, 0.5),
    ((16, 8), (4, 2), 0.1, (16 * 8) / (4 * 2 + 0.1 * 16 * 8)),
])
def test_eq46_closed_form(s1, s2, r, expected):
    assert drill_down_speedup(s1, s2, r) == pytest.approx(expected)


@given(speedup=st.floats(1.0, 50.0), r=st.floats(0.01, 0.99), s2=st.integers(1, 8))
def test_eq47_inverts_eq46(speedup, r, s2):
    if r * speedup >= 0.999:
        with pytest.raises(ValueError, match="at most"):
            stage1_stride(speedup, s2, r)
        return
    sy, sx = stage1_stride(speedup, s2, r)
    assert sy == pytest.approx(math.sqrt(speedup / (1 - r * speedup)) * s2)
    assert sy == sx
    assert drill_down_speedup((sy, sx), s2, r) == pytest.approx(speedup, rel=1e-9)


def test_eq47_pairs_scale_each_axis():
    sy, sx = stage1_stride(2.0, (4, 2), 0.25)
    factor = math.sqrt(2.0 / (1 - 0.5))
    assert (sy, sx) == pytest.approx((4 * factor, 2 * factor))


@pytest.mark.parametrize("r", [0.5, 0.25, 0.1])
def test_eq48_bound(r):
    assert max_drill_down_speedup(r) == pytest.approx(1 / r)
    # The bound is a supremum: approached as S1 grows, never reached.
    assert drill_down_speedup(1e6, 1, r) < 1 / r
    assert drill_down_speedup(1e6, 1, r) == pytest.approx(1 / r, rel=1e-6)
    with pytest.raises(ValueError, match=f"at most 1/r = {1 / r:g}"):
        DrillDown(r=r, speedup=1 / r)
    with pytest.raises(ValueError, match="at most"):
        DrillDown(r=r, speedup=1 / r + 1)
    DrillDown(r=r, speedup=0.99 / r if 0.99 / r >= 1 else 1.0)


@pytest.mark.parametrize("kwargs", [
    dict(r=0.0, speedup=2.0), dict(r=1.5, speedup=1.0), dict(r=-0.1, stage1_stride=8),
    dict(r=True, stage1_stride=8), dict(r=0.25), dict(r=0.25, speedup=2.0, stage1_stride=8),
    dict(r=0.25, speedup=0.5), dict(r=0.25, speedup=float("nan")), dict(r=0.25, speedup="2"),
    dict(r=0.25, stage1_stride=0), dict(r=0.25, stage1_stride=(8, 8, 8, 8)), dict(r=0.25, stage1_stride=(8, 0)),
    dict(r=0.25, stage1_stride=8.0), dict(r=0.25, stage1_stride=True),
])
def test_invalid_drill_down_raises(kwargs):
    with pytest.raises(ValueError, match="DrillDown|impossible"):
        DrillDown(**kwargs)


def test_drill_down_is_frozen_and_normalises_stride():
    dd = DrillDown(r=0.25, stage1_stride=8)
    assert dd.stage1_stride == (8, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dd.r = 0.5  # type: ignore[misc]
    assert dd.stage1_step((4, 4)) == (2, 2)
    assert DrillDown(r=0.25, stage1_stride=(2, 13)).stage1_step((4, 4)) == (1, 3)
    # eq. 47: speedup 3.2 with r = 0.25 and S2 = 4 is S1 = 16, i.e. 4 cells.
    assert DrillDown(r=0.25, speedup=3.2).stage1_step((4, 4)) == (4, 4)


# --- drill-down ------------------------------------------------------------------------


@pytest.mark.parametrize("cells, step", [(1, 1), (1, 4), (10, 4), (12, 4), (13, 4), (7, 1), (7, 9)])
def test_stage1_grid_covers_both_ends(cells, step):
    idx = stage1_grid(cells, step).tolist()
    assert idx[0] == 0 and idx[-1] == cells - 1
    assert idx == sorted(set(idx))
    assert all(i % step == 0 for i in idx[:-1])


@pytest.mark.parametrize("cells, step", [(10, 4), (13, 3), (5, 1), (6, 10), (1, 2)])
def test_upsample_matrix_is_exact_on_samples_and_linear_between(cells, step):
    samples = stage1_grid(cells, step)
    weights = upsample_matrix(samples, cells)
    assert weights.shape == (cells, len(samples))
    torch.testing.assert_close(weights.sum(1), torch.ones(cells, dtype=torch.float64))
    line = 3.0 * samples.double() - 2.0
    torch.testing.assert_close(weights @ line, 3.0 * torch.arange(cells).double() - 2.0)
    torch.testing.assert_close(weights[samples], torch.eye(len(samples), dtype=torch.float64))


@pytest.mark.parametrize("tau", [1.0, 0.6])
@pytest.mark.parametrize("stage1", [4, (8, 4), 100])
@pytest.mark.parametrize("kind", ["cover", "sample"])
def test_drill_down_r1_equals_exact(tiny, lesion_images, tau, stage1, kind):
    ex = _compile(tiny, tau=tau)
    for image in lesion_images[:2]:
        exact = ex(image)  # tau < 1: the tau map with its peak recomputed exactly, as drill-down's
        res = ex(image, drill_down=DrillDown(r=1.0, stage1_stride=stage1, stage1=kind))
        # The same positions in other batches: CPU convolutions may round differently
        # for another batch size (seen with tau 0.6, stage-one step 4: 6e-8).
        torch.testing.assert_close(res.heatmap, exact.heatmap, atol=1e-6, rtol=0)
        assert res.stats["positions_run"] == ex.positions + res.stats["peak_positions"]
        assert (res.stats["peak_positions"] == 0) == (tau == 1.0)
        assert bool(res.stats.exact_cells.all()) == (tau == 1.0)
        assert (res.label, res.base_prob) == (exact.label, exact.base_prob)


def test_drill_down_r1_equals_naive(tiny, lesion_images):
    ex = _compile(tiny)
    res = ex(lesion_images[0], drill_down=DrillDown(r=1.0, stage1_stride=8))
    ref = krypton_fx.naive_occlusion(tiny, lesion_images[0], patch=8, stride=2)
    torch.testing.assert_close(res.heatmap, ref.heatmap, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dd", [DrillDown(r=0.25, speedup=3.0, stage1="sample"),
                                DrillDown(r=0.1, stage1_stride=8, stage1="sample", margin=None),
                                DrillDown(r=0.5, stage1_stride=(4, 6), stage1="sample"),
                                DrillDown(r=0.01, speedup=10.0, stage1="sample", margin=None)])
def test_sampled_drill_down_stats_and_measured_cells(tiny, lesion_images, dd):
    ex = _compile(tiny)
    image = lesion_images[1]
    exact = ex(image)
    res = ex(image, drill_down=dd)
    assert res.heatmap.shape == exact.heatmap.shape and res.heatmap.dtype == torch.float32
    stats = res.stats
    assert stats["positions_run"] == stats["stage1_positions"] + stats["stage2_positions"] + stats["peak_positions"]
    assert stats["stage2_positions"] <= math.ceil(dd.r * ex.positions)
    assert (stats["peak_positions"] == 0) if dd.margin is None else stats["margin"] == dd.margin
    assert stats["achieved_speedup"] == pytest.approx(ex.positions / stats["positions_run"])
    s1 = stats["stage1_stride"]
    assert s1[0] % ex.stride[0] == 0 and s1[1] % ex.stride[1] == 0 and min(s1) >= min(ex.stride)
    assert stats["expected_speedup"] == pytest.approx(drill_down_speedup(s1, ex.stride, dd.r))
    # Every measured cell (stage one or two) holds the exact value; stats.exact_cells says which.
    hm, wm = ex.grid
    rows = stage1_grid(hm, s1[0] // ex.stride[0])
    cols = stage1_grid(wm, s1[1] // ex.stride[1])
    coarse = res.heatmap[rows][:, cols]
    torch.testing.assert_close(coarse, exact.heatmap[rows][:, cols], atol=0, rtol=0)
    mask = stats["exact_cells"]
    assert int(mask.sum()) == stats["positions_run"] and bool(mask[rows][:, cols].all())
    torch.testing.assert_close(res.heatmap[mask], exact.heatmap[mask], atol=1e-6, rtol=0)
    assert stats["peak_bounded"] is False
    if dd.margin is not None:  # the strongest drop shown is an exact cell
        assert bool(mask.view(-1)[res.heatmap.argmin()])


@pytest.mark.parametrize("dd", [DrillDown(r=0.25, speedup=3.0), DrillDown(r=0.01, stage1_stride=8),
                                DrillDown(r=0.05, stage1_stride=(4, 6), neighbourhood=0),
                                DrillDown(r=0.01, speedup=10.0, margin=0.0)])
def test_covering_drill_down_stats_and_exact_cells(tiny, lesion_images, dd):
    ex = _compile(tiny)
    image = lesion_images[1]
    exact = ex(image)
    res = ex(image, drill_down=dd)
    stats = res.stats
    steps = dd.stage1_step(ex.stride)
    assert stats["stage1_positions"] == math.prod(math.ceil(n / k) for n, k in zip(ex.grid, steps))
    assert stats["stage1_patch"] == tuple(p + (k - 1) * s for p, s, k in zip(ex.patch, ex.stride, steps))
    assert stats["stage2_positions"] == math.ceil(dd.r * ex.positions)
    assert stats["positions_run"] == stats["stage1_positions"] + stats["stage2_positions"] + stats["peak_positions"]
    assert stats["peak_bounded"] is True and stats["margin"] == dd.margin
    mask = stats["exact_cells"]
    assert int(mask.sum()) == stats["stage2_positions"] + stats["peak_positions"]
    torch.testing.assert_close(res.heatmap[mask], exact.heatmap[mask], atol=1e-6, rtol=0)
    peak = int(res.heatmap.argmin())
    assert bool(mask.view(-1)[peak]) and (res.heatmap[~mask] > res.heatmap.view(-1)[peak]).all()


def test_drill_down_keeps_the_largest_drop():
    # The trained lesion model and the default (covering) stage one: the approximate map's strongest
    # drop is the exact map's, cell and value, with 1 % of the cells in stage two, on every image.
    model = lesions.load_or_train("tiny")
    images, labels, _ = lesions.make_dataset(8, size=64, seed=11)
    ex = _compile(model, size=64, patch=8, stride=2)
    for image in images[labels == 1][:2]:
        exact = ex(image).heatmap
        res = ex(image, drill_down=DrillDown(r=0.01, stage1_stride=8))
        k = int(exact.argmin())
        assert int(res.heatmap.argmin()) == k and res.heatmap.view(-1)[k] == exact.view(-1)[k]
        assert res.stats["achieved_speedup"] > 4


def test_drill_down_rejects_non_drill_down(tiny, lesion_images):
    with pytest.raises(TypeError, match="DrillDown"):
        _compile(tiny)(lesion_images[0], drill_down={"r": 0.25})


# --- SSIM and tau selection ---------------------------------------------------------------


def test_heatmap_ssim_guards():
    m = torch.rand(9, 9)
    assert heatmap_ssim(m, m) == pytest.approx(1.0)
    assert heatmap_ssim(m, 1 - m) < 0.5
    flat = torch.full((9, 9), 0.7)
    assert heatmap_ssim(flat, flat) == 1.0
    assert heatmap_ssim(flat, m) < 1.0
    for shape in [(3, 3), (4, 6), (5, 5), (2, 8), (1, 1)]:
        a = torch.rand(shape)
        assert heatmap_ssim(a, a) == pytest.approx(1.0)
        assert math.isfinite(heatmap_ssim(a, torch.rand(shape)))
    with pytest.raises(ValueError, match="shape"):
        heatmap_ssim(torch.rand(4, 4), torch.rand(4, 5))
    with pytest.raises(ValueError, match="data_range"):
        heatmap_ssim(m, m, data_range=0.0)


def test_heatmap_ssim_data_range():
    from skimage.metrics import structural_similarity
    gen = torch.Generator().manual_seed(0)
    exact = 0.3 + 0.6 * torch.rand(20, 20, generator=gen, dtype=torch.float64)
    approx = exact + 0.02 * torch.randn(20, 20, generator=gen, dtype=torch.float64)
    # L = 1 is skimage's SSIM with the range probabilities can take ...
    assert heatmap_ssim(exact, approx) == pytest.approx(
        structural_similarity(exact.numpy(), approx.numpy(), data_range=1.0, win_size=7))
    # ... and None the exact map's own span (here 0.6: a little stricter).
    span = float(exact.max() - exact.min())
    assert heatmap_ssim(exact, approx, None) == pytest.approx(
        structural_similarity(exact.numpy(), approx.numpy(), data_range=span, win_size=7))
    assert heatmap_ssim(exact, approx, None) < heatmap_ssim(exact, approx)
    # A nearly flat map (the model barely reacts to any patch): the same absolute
    # error is invisible on the probability scale, large on the map's own scale.
    flat = 0.97 + 0.02 * torch.rand(20, 20, generator=gen, dtype=torch.float64)
    noisy = flat + 0.005 * torch.randn(20, 20, generator=gen, dtype=torch.float64)
    assert heatmap_ssim(flat, noisy) > 0.95
    assert heatmap_ssim(flat, noisy, None) < 0.8


def _quadratic_curve(taus, width):
    # SSIM = 1 - (1 - tau)^2 / width: crosses 0.9 at tau = 1 - sqrt(0.1 * width).
    return np.array([1 - (1 - t) ** 2 / width for t in taus])


@pytest.mark.parametrize("width", [0.5, 1.0, 2.0, 3.6])
def test_select_tau_on_a_known_curve(width):
    taus = TAUS[1:]
    noise = np.random.default_rng(0).normal(0, 0.003, (20, len(taus)))
    ssims = _quadratic_curve(taus, width)[None] + noise - noise.mean(0)
    tau, coeffs = select_tau(taus, ssims, target=0.9)
    expected = max(min(taus), 1 - math.sqrt(0.1 * width))
    assert tau == pytest.approx(expected, abs=2e-3)
    assert coeffs.shape == (3,)
    assert coeffs[0] == pytest.approx(-1 / width, rel=1e-6)


def test_select_tau_extremes():
    taus = TAUS[1:]
    assert select_tau(taus, np.ones(len(taus)), 0.9)[0] == pytest.approx(0.4)
    # Target unreachable anywhere on the fitted curve: stay exact.
    assert select_tau(taus, np.full(len(taus), 0.5), 0.9)[0] == 1.0
    # A dip in the middle disqualifies the small taus beyond it.
    dip = [1 - 0.3 * math.sin(math.pi * (1 - t) / 0.6) for t in taus]
    tau, coeffs = select_tau(taus, dip, 0.9)
    grid = np.linspace(tau, 1, 200)
    assert (np.polyval(coeffs, grid) >= 0.9 - 1e-9).all()
    assert tau > 0.4
    with pytest.raises(ValueError, match="3 or more"):
        select_tau((0.5, 0.5, 1.0), [0.9, 0.9, 1.0], 0.9)


class _FakeExplainer:
    """Stands in for a compiled explainer: its heat map encodes its tau."""

    def __init__(self, tau):
        self.tau = tau

    def __call__(self, image, label=None):
        heat = torch.full((5, 5), self.tau)
        return OcclusionResult(heat, 0 if label is None else label, 1.0, (4, 4), (16, 16))


def test_tune_fits_and_selects_with_injected_ssim(monkeypatch):
    width = 1.6  # crosses SSIM 0.9 at tau = 0.6
    monkeypatch.setattr(approx.tuning, "compile_explainer", lambda model, tau, **kw: _FakeExplainer(tau))

    ranges = []

    def ssim_of_tau(exact, approximate, data_range):  # the fake map holds its explainer's tau
        ranges.append(data_range)
        return float(_quadratic_curve([approximate[0, 0].item()], width)[0])

    monkeypatch.setattr(approx.tuning, "heatmap_ssim", ssim_of_tau)
    monkeypatch.setattr(approx.tuning, "theoretical_speedup", lambda model, size, patch, tau, channels: 1 / tau)
    tuned = krypton_fx.tune(torch.nn.Identity(), torch.zeros(4, 3, 32, 32), target_ssim=0.9, drill_down=False)
    assert tuned.tau == pytest.approx(0.6, abs=2e-3)
    assert tuned.ssims.shape == (4, 6)
    assert tuned.expected_speedup == pytest.approx(1 / tuned.tau)
    assert tuned.fitted_ssim == pytest.approx(0.9, abs=2e-3)
    text = str(tuned)
    assert "chosen tau = 0.60" in text and text.count("\n") == 2 + 6
    # probability maps are compared with SSIM's L = 1; logit maps by their own span
    assert set(ranges) == {1.0}
    ranges.clear()
    krypton_fx.tune(torch.nn.Identity(), torch.zeros(2, 3, 32, 32), output="logit", drill_down=False)
    assert set(ranges) == {None}


def test_tune_drop_kept_guard_raises_tau(monkeypatch):
    width = 1.6  # the SSIM fit alone picks tau = 0.6
    monkeypatch.setattr(approx.tuning, "compile_explainer", lambda model, tau, **kw: _FakeExplainer(tau))
    monkeypatch.setattr(approx.tuning, "heatmap_ssim", lambda exact, approximate, data_range: float(
        _quadratic_curve([approximate[0, 0].item()], width)[0]))
    # the approximate maps keep a fraction tau of the strongest drop
    monkeypatch.setattr(approx.tuning, "drop_kept", lambda exact, approximate, min_drop: approximate[0, 0].item())
    monkeypatch.setattr(approx.tuning, "theoretical_speedup", lambda model, size, patch, tau, channels: 1 / tau)
    images = torch.zeros(3, 3, 32, 32)
    plain = krypton_fx.tune(torch.nn.Identity(), images, min_drop_kept=None, drill_down=False)  # the paper's
    assert plain.tau == pytest.approx(0.6, abs=2e-3) and plain.ssim_tau == plain.tau
    assert plain.drop_kept.shape == (3, 6)
    np.testing.assert_allclose(plain.drop_kept[0], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # by default every image must keep 95 % of its drop: no tau measured does
    assert krypton_fx.tune(torch.nn.Identity(), images, drill_down=False).tau == 1.0
    guarded = krypton_fx.tune(torch.nn.Identity(), images, min_drop_kept=0.75, drill_down=False)
    assert guarded.tau == pytest.approx(0.8) and guarded.ssim_tau == pytest.approx(0.6, abs=2e-3)
    assert guarded.expected_speedup == pytest.approx(1 / 0.8)
    assert "the SSIM fit alone picks 0.60" in str(guarded)
    with pytest.raises(ValueError, match="min_drop_kept"):
        krypton_fx.tune(torch.nn.Identity(), images, min_drop_kept=1.5, drill_down=False)


def test_drop_kept_closed_form():
    exact = OcclusionResult(torch.tensor([[0.95, 0.30], [0.90, 0.95]]), 0, 0.95, (1, 1), (1, 1))
    # the strongest exact drop is 0.95 -> 0.30 at (0, 1)
    assert drop_kept(exact, exact.heatmap) == pytest.approx(1.0)
    assert drop_kept(exact, torch.tensor([[0.0, 0.95], [0.0, 0.0]])) == pytest.approx(0.0, abs=1e-6)
    assert drop_kept(exact, torch.tensor([[0.9, 0.625], [0.9, 0.9]])) == pytest.approx(0.5)
    flat = OcclusionResult(torch.full((2, 2), 0.94), 0, 0.95, (1, 1), (1, 1))
    assert math.isnan(drop_kept(flat, flat.heatmap))  # a 0.01 drop is no evidence
    assert drop_kept(flat, flat.heatmap, min_drop=0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("kept, tau, expected", [
    ([[1.0, 0.9, 0.3]], 0.4, 0.6),           # 0.4 loses the drop
    ([[1.0, 0.9, 0.9]], 0.4, 0.4),           # nothing to guard against
    ([[1.0, 0.9, 0.9]], 0.7, 0.7),           # never lowers the SSIM choice
    ([[0.5, 0.9, 0.9]], 0.4, 1.0),           # the largest measured tau already fails
    # NaN does not vote: 0.8 and 0.6 pass, 0.4 fails on the first image
    ([[np.nan, np.nan, 0.2], [0.9, np.nan, 0.9]], 0.4, 0.6),
    # every image, not on average: 0.8's mean 0.825 would pass, its first image fails
    ([[0.7, 0.9, 0.9], [0.95, 0.9, 0.9]], 0.4, 1.0),
])
def test_guard_tau(kept, tau, expected):
    assert approx.guard_tau([0.8, 0.6, 0.4], np.array(kept), tau, 0.8) == pytest.approx(expected)


def test_guard_tau_keeps_the_peak_cell():
    kept = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    # 0.4 moves one image's peak; NaN (no peak) does not vote
    peaks = np.array([[1.0, 1.0, 0.0], [1.0, np.nan, 1.0]])
    assert approx.guard_tau([0.8, 0.6, 0.4], kept, 0.4, 0.8, peaks) == pytest.approx(0.6)


def test_tune_real_model(tiny, lesion_images, tmp_path):
    ex = _compile(tiny, size=32, patch=8, stride=4)
    tuned = krypton_fx.tune(ex, lesion_images[:2], target_ssim=0.9, taus=(0.8, 0.6, 0.4), drill_down=False)
    assert 0.4 <= tuned.tau <= 1.0
    assert tuned.ssims.shape == (2, 3)
    assert np.isfinite(tuned.ssims).all() and (tuned.ssims <= 1 + 1e-9).all()
    assert tuned.expected_speedup >= 1.0
    assert len(tuned.speedups) == 3
    tuned.plot(tmp_path / "tune.png")
    assert (tmp_path / "tune.png").stat().st_size > 1000


def test_tune_rejects_bad_arguments(tiny, lesion_images):
    with pytest.raises(ValueError, match="taus"):
        krypton_fx.tune(tiny, lesion_images, taus=(0.5, 1.5))
    with pytest.raises(ValueError, match="target_ssim"):
        krypton_fx.tune(tiny, lesion_images, target_ssim=0.0)
    with pytest.raises(TypeError, match="Explainer or an nn.Module"):
        krypton_fx.tune("resnet", lesion_images)


# --- lesion data and models ------------------------------------------------------------------


def test_make_dataset_is_seeded_and_consistent():
    images, labels, boxes = lesions.make_dataset(16, size=64, seed=3)
    again = lesions.make_dataset(16, size=64, seed=3)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1]) and torch.equal(boxes, again[2])
    assert not torch.equal(images, lesions.make_dataset(16, size=64, seed=4)[0])
    assert images.shape == (16, 3, 64, 64) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and boxes.dtype == torch.int64 and boxes.shape == (16, 4)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert 0 < labels.sum() < 16
    assert (boxes[labels == 0] == -1).all()
    lesion = boxes[labels == 1]
    assert (lesion >= 0).all() and (lesion[:, 0] + lesion[:, 2] <= 64).all()
    assert (lesion[:, 1] + lesion[:, 3] <= 64).all()
    # The lesion is bright: its box is brighter than the image on average.
    for img, (y, x, h, w) in zip(images[labels == 1], lesion.tolist()):
        assert img[:, y:y + h, x:x + w].mean() > img.mean()


@pytest.mark.parametrize("arch, size", [("tiny", 32), ("vgg16", 64), ("resnet18", 64), ("inception_v3", 75)])
def test_build_model_runs(arch, size):
    model = lesions.build_model(arch).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 2)
    with pytest.raises(ValueError, match="unknown arch"):
        lesions.build_model("alexnet")


def test_narrow_resnet_is_exact_under_krypton():
    torch.manual_seed(0)
    model = lesions.build_model("resnet18").eval()
    image = torch.rand(3, 64, 64)
    res = krypton_fx.compile(model, patch=16, stride=16, image_size=(64, 64))(image)
    ref = krypton_fx.naive_occlusion(model, image, patch=16, stride=16)
    torch.testing.assert_close(res.heatmap, ref.heatmap, atol=1e-5, rtol=0)


def test_load_or_train_caches(tmp_path, monkeypatch):
    monkeypatch.setitem(lesions._SCHEDULE, "tiny", (8, 3, 1e-3))
    first = lesions.load_or_train("tiny", size=32, cache_dir=str(tmp_path))
    path = lesions.checkpoint_path("tiny", 32, str(tmp_path))
    assert path.exists() and not first.training
    info = lesions.training_info("tiny", 32, str(tmp_path))
    assert info["steps"] == 3 and 0.0 <= info["accuracy"] <= 1.0
    second = lesions.load_or_train("tiny", size=32, cache_dir=str(tmp_path))
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    monkeypatch.setenv("KRYPTON_CACHE", str(tmp_path / "env"))
    assert lesions.checkpoint_path("tiny", 32).parent == tmp_path / "env"
