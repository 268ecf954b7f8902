"""Approximate maps that keep the peak: drill-down's covering stage one, the peak rule, tau maps.

The guarantee (docs/design.md, "Approximate maps that keep the peak"): with a
covering stage one at tau = 1, the approximate map's strongest drop is the
exact map's, cell and value, whenever a larger occluder containing a smaller one
drops at least ``1 - margin`` times as much. Monotone nets (non-negative
weights, non-decreasing point ops) on non-negative images occluded with 0 meet
that assumption exactly; random ones of them, with a planted bright box
narrower than the stage-one stride, check the guarantee against the exact map.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import dag_model, monotone_net, planted_drops, planted_image, random_cnns

import krypton_fx
from krypton_fx import lesions
from krypton_fx.approx import DrillDown
from krypton_fx.approx.cover import cover_axis, cover_index
from krypton_fx.peak import DEFAULT_MARGIN, neighbourhood_radius, neighbours, refine_peak

# --- the covering stage one -------------------------------------------------------------


@given(n=st.integers(1, 40), patch=st.integers(1, 20), stride=st.integers(1, 6), step=st.integers(1, 12),
       extra=st.integers(0, 5))
def test_cover_axis_contains_every_fine_patch(n, patch, stride, step, extra):
    size = (n - 1) * stride + patch + extra
    starts = [i * stride for i in range(n)]
    cover = cover_axis(starts, patch, size, step)
    assert len(cover.starts) == math.ceil(n / min(step, n))
    assert cover.patch == (min(step, n) - 1) * stride + patch
    assert list(cover.starts) == sorted(set(cover.starts)) and cover.starts[0] == 0
    for s, owner in zip(starts, cover.owner.tolist()):
        c = cover.starts[owner]
        assert 0 <= c <= s and s + patch <= c + cover.patch <= size


def test_cover_index_is_row_major_over_both_grids():
    plan = [cover_axis([0, 2, 4, 6], 4, 10, 2), cover_axis([0, 3, 6], 3, 9, 2)]
    index = cover_index(plan).view(4, 3)
    assert index.tolist() == [[0, 0, 1], [0, 0, 1], [2, 2, 3], [2, 2, 3]]


# --- the peak rule -----------------------------------------------------------------------


def test_neighbours_and_radius():
    assert sorted(neighbours(5, (4, 4), (1, 1)).tolist()) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert neighbours(13, (3, 3, 3), (0, 0, 0)).tolist() == [13]
    assert len(neighbours(13, (3, 3, 3), (1, 1, 1))) == 27
    assert neighbourhood_radius((16, 16), (4, 4)) == (2, 2)
    assert neighbourhood_radius((3,), (8,)) == (1,)


@settings(max_examples=60)
@given(data=st.data(), cells=st.integers(1, 60), margin=st.sampled_from([0.0, 0.1, 0.5]),
       batch=st.integers(1, 8), radius=st.sampled_from([None, (1,)]))
def test_refine_peak_ends_on_an_exact_peak(data, cells, margin, batch, radius):
    """Bounds that understate each true drop by less than the margin: the rule ends on the
    true peak, cell and value; every approximate cell shows less than it."""
    floats = st.floats(0.0, 1.0, allow_nan=False, width=32)
    truth = torch.tensor(data.draw(st.lists(floats, min_size=cells, max_size=cells)))
    base = 1.0
    # an approximate cell may understate its drop by up to the margin, and overstate it freely
    factor = torch.tensor(data.draw(st.lists(st.floats(1.0 - margin, 3.0), min_size=cells, max_size=cells)))
    bound = (base - truth.double()) * factor.double()
    heat = (base - bound).float()
    exact = torch.zeros(cells, dtype=torch.bool)
    ran = refine_peak(lambda p: truth[p], base, heat, exact, bound, (cells,), margin, radius, batch)
    assert ran == int(exact.sum()) >= 1
    torch.testing.assert_close(heat[exact], truth[exact], rtol=0, atol=0)
    peak = int(heat.argmin())
    assert exact[peak] and heat[peak] == truth.min()
    strongest = base - float(truth.min())
    assert (bound[~exact] < strongest - margin * abs(strongest)).all()


def test_refine_peak_rejects_a_negative_margin():
    with pytest.raises(ValueError, match="margin"):
        refine_peak(lambda p: p.float(), 1.0, torch.zeros(3), torch.zeros(3, dtype=torch.bool),
                    torch.zeros(3), (3,), margin=-0.1)


# --- the guarantee on random monotone DAGs with a planted narrow drop ------------------------


def _assert_peak_kept(net, image, patch, stride, step, dims):
    ex = krypton_fx.compile(net, patch=patch, stride=stride, color=0.0, image_size=image.shape[1:],
                            channels=image.shape[0], output="logit")
    exact = ex(image)
    dd = DrillDown(r=1e-6, stage1_stride=tuple(step * s for s in stride), margin=1e-3)
    res = ex(image, drill_down=dd)
    assert res.heatmap.shape == exact.heatmap.shape and res.label == exact.label
    want, got = int(exact.heatmap.argmin()), int(res.heatmap.argmin())
    assert got == want, (got, want, float(exact.heatmap.min()), float(res.heatmap.view(-1)[want]))
    torch.testing.assert_close(res.heatmap.view(-1)[got], exact.heatmap.view(-1)[want], atol=1e-5, rtol=1e-5)
    stats = res.stats
    assert stats.peak_bounded and bool(stats.exact_cells.view(-1)[got])
    assert stats.stage1_patch == tuple(p + (min(step, n) - 1) * s for p, s, n in zip(patch, stride, ex.grid))
    assert stats.positions_run == stats.stage1_positions + stats.stage2_positions + stats.peak_positions
    # exact cells hold exact values; every other cell shows a drop below the peak's
    mask = stats.exact_cells
    torch.testing.assert_close(res.heatmap[mask], exact.heatmap[mask], atol=1e-5, rtol=1e-5)
    assert (res.heatmap[~mask] > res.heatmap.view(-1)[got]).all()
    return exact, res


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], max_examples=20)
@given(net=random_cnns(max_blocks=4), drop=planted_drops(), seed=st.integers(0, 2**16))
def test_covering_drill_down_keeps_a_planted_peak(net, drop, seed):
    blocks, in_ch = net
    size, patch, stride, step, corner, side = drop
    model = monotone_net(blocks, in_ch, seed=seed)
    image = planted_image(in_ch, size, corner, side, seed)
    try:
        model(image[None].clone())
    except RuntimeError:
        assume(False)  # the drawn layers shrink the map below one element
    _assert_peak_kept(model, image, patch, stride, step, 2)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], max_examples=6)
@given(net=random_cnns(max_blocks=3, dims=3), drop=planted_drops(dims=3), seed=st.integers(0, 2**16))
def test_covering_drill_down_keeps_a_planted_peak_in_3d(net, drop, seed):
    blocks, in_ch = net
    size, patch, stride, step, corner, side = drop
    model = monotone_net(blocks, in_ch, dims=3, seed=seed)
    image = planted_image(in_ch, size, corner, side, seed)
    try:
        model(image[None].clone())
    except RuntimeError:
        assume(False)
    _assert_peak_kept(model, image, patch, stride, step, 3)


def test_sampling_misses_the_drop_that_covering_keeps():
    """A 2x2 box that only the patch at cell (5, 5) covers whole: the paper's sampled stage one
    (every other cell) sees it only in part, and its 1 % refines the wrong cell; the covering
    stage one keeps the peak."""
    torch.manual_seed(0)
    model = dag_model(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("bias"):
                p.abs_()
    image = planted_image(3, (24, 24), (11, 11), (2, 2))  # patch 4 at stride 2: rows 10-13 cover it
    exact, res = _assert_peak_kept(model, image, (4, 4), (2, 2), 2, 2)
    want = int(exact.heatmap.argmin())
    ex = krypton_fx.compile(model, patch=4, stride=2, color=0.0, image_size=(24, 24), output="logit")
    paper = ex(image, drill_down=DrillDown(r=0.01, stage1_stride=4, stage1="sample", margin=None))
    assert int(paper.heatmap.argmin()) != want
    assert paper.stats.exact_cells.view(-1)[want].item() is False


# --- tau maps and the lesion model ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lesion():
    model = lesions.load_or_train("tiny")
    images, labels, _ = lesions.make_dataset(6, size=32, seed=11)
    return model, images[labels == 1][:2]


def test_tau_map_keeps_its_peak_exact(tiny_lesion):
    model, images = tiny_lesion
    exact_ex = krypton_fx.compile(model, patch=8, stride=2, image_size=(32, 32))
    ex = krypton_fx.compile(model, patch=8, stride=2, image_size=(32, 32), tau=0.5)
    for image in images:
        exact = exact_ex(image)
        res = ex(image, label=exact.label)
        stats = res.stats
        mask = stats.exact_cells
        assert mask.shape == exact.heatmap.shape and 0 < int(mask.sum()) < ex.positions
        assert stats.positions_run == ex.positions + stats.peak_positions == ex.positions + int(mask.sum())
        assert stats.margin == DEFAULT_MARGIN and stats.peak_bounded is False
        torch.testing.assert_close(res.heatmap[mask], exact.heatmap[mask], atol=1e-6, rtol=0)
        # the strongest drop shown is an exact one, and the approximate cells show less
        assert bool(mask.view(-1)[res.heatmap.argmin()])
        assert (res.heatmap[~mask] > res.heatmap.min()).all()
        # run_many takes the same path, one image at a time
        many = ex.run_many(image[None], [exact.label])[0]
        torch.testing.assert_close(many.heatmap, res.heatmap, atol=1e-6, rtol=0)


def test_drill_down_on_a_tau_explainer_refines_at_tau_one(tiny_lesion):
    model, images = tiny_lesion
    exact = krypton_fx.compile(model, patch=8, stride=2, image_size=(32, 32))(images[0])
    ex = krypton_fx.compile(model, patch=8, stride=2, image_size=(32, 32), tau=0.6)
    res = ex(images[0], drill_down=DrillDown(r=0.05, stage1_stride=6))
    mask = res.stats.exact_cells
    assert res.stats.peak_bounded is False and res.stats.stage1_patch == (12, 12)
    torch.testing.assert_close(res.heatmap[mask], exact.heatmap[mask], atol=1e-6, rtol=0)
    assert bool(mask.view(-1)[res.heatmap.argmin()])


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage1="grid"), "stage1"), (dict(margin=-0.5), "margin"), (dict(margin=float("nan")), "margin"),
    (dict(margin=True), "margin"), (dict(neighbourhood=-1), "neighbourhood"),
    (dict(neighbourhood=1.5), "neighbourhood"),
])
def test_invalid_peak_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DrillDown(r=0.1, stage1_stride=8, **kwargs)


def test_tune_chooses_a_drill_down_that_keeps_held_out_peaks():
    """Tuned on two lesion images, the drill-down keeps the peak of three others, cell and value."""
    model = lesions.load_or_train("tiny")
    images, labels, _ = lesions.make_dataset(16, size=64, seed=21)
    images = images[labels == 1]
    ex = krypton_fx.compile(model, patch=8, stride=4, image_size=(64, 64))
    tuned = krypton_fx.tune(ex, images[:2], taus=())
    assert tuned.tau == 1.0 and tuned.drill_down is not None and tuned.drill_down.stage1 == "cover"
    chosen = [t for t in tuned.drill_down_trials if t.ok and t.r == tuned.drill_down.r
              and t.stage1_stride == tuned.drill_down.stage1_stride]
    assert chosen and chosen[0].peaks_kept == chosen[0].images == 2 and chosen[0].min_drop_kept == 1.0
    assert chosen[0].margin >= 1 - chosen[0].peak_ratio  # the assumption held on the samples
    # the cheapest, or of those within 10 % of its cost the one whose assumption held by the most
    fastest = max(t.speedup for t in tuned.drill_down_trials if t.ok)
    close = [t for t in tuned.drill_down_trials if t.ok and t.speedup >= fastest / 1.1]
    assert chosen[0] in close and chosen[0].peak_ratio == max(t.peak_ratio for t in close) and fastest > 1
    assert "chosen drill-down: r=" in str(tuned)
    for image in images[2:5]:
        exact = ex(image)
        res = ex(image, drill_down=tuned.drill_down)
        k = int(exact.heatmap.argmin())
        assert int(res.heatmap.argmin()) == k
        torch.testing.assert_close(res.heatmap.view(-1)[k], exact.heatmap.view(-1)[k], atol=1e-6, rtol=0)


# --- pictures mark the approximate regions -------------------------------------------------------


def _hatched(ax) -> bool:
    from matplotlib.contour import ContourSet

    return any(isinstance(c, ContourSet) and any(c.hatches) for c in ax.collections)


def test_pictures_hatch_the_approximate_cells():
    import numpy as np

    from krypton_fx.viz import approximate_pixels, heatmap_figure, volume_figure

    exact_cells = torch.zeros(5, 5, dtype=torch.bool)
    exact_cells[1:3, 1:3] = True
    # pixels nearer an exact cell's patch centre than an approximate one's stay clear
    pixels = approximate_pixels(exact_cells, (32, 32), (8, 8), (6, 6))
    assert pixels.shape == (32, 32) and pixels[0, 0] and pixels[31, 31] and not pixels[12, 12]
    args = (np.zeros((32, 32, 3)), np.ones((5, 5)), (8, 8), (6, 6), 1, 1.0)
    fig = heatmap_figure(*args, exact_cells=exact_cells)
    assert [_hatched(ax) for ax in fig.axes[:3]] == [False, True, True]
    assert any("approximate" in t.get_text() for t in fig.axes[2].get_legend().get_texts())
    assert fig.axes[2].get_xlim() == heatmap_figure(*args).axes[2].get_xlim()  # the panel's extent stays
    for plain in (heatmap_figure(*args), heatmap_figure(*args, exact_cells=torch.ones(5, 5, dtype=torch.bool))):
        assert not any(_hatched(ax) for ax in plain.axes)
    approximate = np.ones((8, 8, 8), dtype=bool)
    approximate[3:6, 3:6, 3:6] = False
    fig = volume_figure(np.zeros((8, 8, 8)), np.ones((8, 8, 8)), (4, 4, 4), 1, 0.9, approximate=approximate)
    assert sum(_hatched(ax) for ax in fig.axes) == 6  # the two map panels of each plane


def test_replay_is_the_drill_down_the_explainer_runs(tiny_lesion):
    """tune replays stage two and the peak rule on exact maps: the same cells, the same map."""
    from krypton_fx.approx.cover import cover_plan, stage1_explainer
    from krypton_fx.approx.tune_drill import replay

    model, images = tiny_lesion
    ex = krypton_fx.compile(model, patch=8, stride=2, image_size=(32, 32))
    dd = DrillDown(r=0.02, stage1_stride=6, margin=0.3)
    plan = cover_plan(ex, dd.stage1_step(ex.stride))
    stage1 = stage1_explainer(ex, plan)
    for image in images:
        exact = ex(image)
        covers = stage1.run_positions(torch.arange(stage1.positions), stage1.prepare(image)[1], exact.label)
        radius = neighbourhood_radius(ex.patch, ex.stride)
        heat, fine = replay(exact, covers[cover_index(plan)], dd.r, dd.margin, radius)
        res = ex(image, drill_down=dd)
        assert fine == res.stats.stage2_positions + res.stats.peak_positions
        torch.testing.assert_close(heat, res.heatmap, atol=1e-6, rtol=0)
