"""Geometry against closed forms and against ground truth (the full layer run
with and without a patch)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from krypton_fx import geometry as geo
from krypton_fx.geometry import AxisSpec


@given(image=st.integers(1, 300), patch=st.integers(1, 300), stride=st.integers(1, 50))
def test_positions_per_axis_closed_form(image, patch, stride):
    assume(patch <= image)
    n = geo.positions_per_axis(image, patch, stride)
    # every position fits, and one more would not
    assert (n - 1) * stride + patch <= image < n * stride + patch
    assert n == math.floor((image - patch) / stride) + 1


def test_positions_per_axis_rejects_large_patch():
    with pytest.raises(ValueError):
        geo.positions_per_axis(10, 11, 1)


def test_occlusion_grid_row_major():
    ys, xs, grid = geo.occlusion_grid((10, 13), (3, 4), (2, 3))
    assert grid == (4, 4)
    assert ys.tolist() == [0] * 4 + [2] * 4 + [4] * 4 + [6] * 4
    assert xs.tolist() == [0, 3, 6, 9] * 4


@st.composite
def local_layers(draw):
    """A conv / pool layer and an input size it accepts."""
    kind = draw(st.sampled_from(["conv", "max", "avg"]))
    k = draw(st.integers(1, 5))
    d = draw(st.integers(1, 3)) if kind != "avg" else 1
    s = draw(st.integers(1, 4))
    p = draw(st.integers(0, k // 2))
    ceil = draw(st.booleans()) if kind != "conv" else False
    n = draw(st.integers(d * (k - 1) + 1, 24))
    return kind, k, d, s, p, ceil, n


def _apply(kind, x, k, d, s, p, ceil, weight=None):
    if kind == "conv":
        return F.conv2d(x, weight, None, s, p, d)
    if kind == "max":
        return F.max_pool2d(x, k, s, p, d, ceil)
    return F.avg_pool2d(x, k, s, p, ceil, count_include_pad=False)


@given(layer=local_layers(), data=st.data())
def test_output_box_contains_every_changed_element(layer, data):
    """Ground truth: run the layer on an image with and without a patch."""
    kind, k, d, s, p, ceil, n = layer
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(1, 2, n, n, generator=gen)
    weight = torch.randn(3, 2, k, k, generator=gen)
    try:
        base = _apply(kind, x, k, d, s, p, ceil, weight)
    except RuntimeError:
        assume(False)
    size = data.draw(st.integers(1, n))
    y0 = data.draw(st.integers(0, n - size))
    x0 = data.draw(st.integers(0, n - size))
    occluded = x.clone()
    occluded[..., y0:y0 + size, x0:x0 + size] = torch.randn(1, 2, size, size, generator=gen) * 5
    changed = (_apply(kind, occluded, k, d, s, p, ceil, weight) != base).any(1)[0]
    spec = AxisSpec(d * (k - 1) + 1, s, p, n, base.shape[-1])
    oy, oh = geo.local_box(torch.tensor([y0]), size, spec)
    ox, ow = geo.local_box(torch.tensor([x0]), size, spec)
    inside = torch.zeros_like(changed)
    inside[int(oy):int(oy) + oh, int(ox):int(ox) + ow] = True
    assert not (changed & ~inside).any()
    assert 0 <= int(oy) and int(oy) + oh <= base.shape[-2]


@given(layer=local_layers(), data=st.data())
def test_output_size_is_eq_23_and_start_eq_21(layer, data):
    kind, k, d, s, p, ceil, n = layer
    size = data.draw(st.integers(1, n))
    start = data.draw(st.integers(0, n - size))
    out = (n + 2 * p - (d * (k - 1) + 1)) // s + 1
    spec = AxisSpec(d * (k - 1) + 1, s, p, n, out)
    keff = d * (k - 1) + 1
    assert geo.output_size(size, spec) == min(math.ceil((size + keff - 1) / s), out)
    raw = max(math.ceil((p + start - keff + 1) / s), 0)
    assert int(geo.output_start(torch.tensor([start]), spec)) == raw


@given(layer=local_layers(), data=st.data())
def test_read_window_reproduces_the_output_box(layer, data):
    """Running the op with zero padding on the read window gives exactly the box's outputs."""
    _, k, d, s, p, _, n = layer
    size = data.draw(st.integers(1, n))
    start = data.draw(st.integers(0, n - size))
    x = torch.randn(1, 2, n, n)
    w = torch.randn(3, 2, k, k)
    full = F.conv2d(x, w, None, s, p, d)
    spec = AxisSpec(d * (k - 1) + 1, s, p, n, full.shape[-1])
    oy, oh = geo.local_box(torch.tensor([start]), size, spec)
    ry, rh = geo.read_window(oy, oh, spec)
    padded = F.pad(x, (p, p + rh, p, p + rh))
    r0 = int(ry) + p
    window = padded[..., r0:r0 + rh, r0:r0 + rh]
    got = F.conv2d(window, w, None, s, 0, d)
    o0 = int(oy)
    torch.testing.assert_close(got, full[..., o0:o0 + oh, o0:o0 + oh])


@given(starts=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20)), min_size=1, max_size=4),
       full=st.integers(20, 60))
def test_union_box_contains_inputs_and_stays_inside(starts, full):
    boxes = [(min(s, full - n), n) for s, n in starts if n <= full]
    assume(boxes)
    start, size = geo.union_box([torch.tensor([s]) for s, _ in boxes], [n for _, n in boxes], full)
    lo, hi = int(start), int(start) + size
    assert 0 <= lo and hi <= full
    for s, n in boxes:
        assert lo <= s and s + n <= hi
    # eqs. 35-38: the tightest such box (unless shifted back at the border)
    assert size == max(s + n for s, n in boxes) - min(s for s, _ in boxes)


@given(starts=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20)), min_size=2, max_size=4),
       full=st.integers(20, 60), cap=st.integers(1, 20))
def test_capped_union_box_is_centred_inside_the_union(starts, full, cap):
    boxes = [(min(s, full - n), n) for s, n in starts if n <= full]
    assume(boxes)
    cap = max(cap, max(n for _, n in boxes))  # patch_prop caps at the largest input box
    start, size = geo.union_box([torch.tensor([s]) for s, _ in boxes], [n for _, n in boxes], full,
                                cap=cap)
    lo, hi = min(s for s, _ in boxes), max(s + n for s, n in boxes)
    assert size == min(cap, hi - lo)
    assert lo <= int(start) and int(start) + size <= hi  # inside the union and the map
    # centred: the parts cut off on either side differ by at most one
    assert abs((int(start) - lo) - (hi - int(start) - size)) <= 1


@given(start=st.integers(-5, 80), size=st.integers(1, 50), full=st.integers(1, 50))
def test_clamp_to_border_keeps_size_and_covers(start, size, full):
    assume(size <= full and start < full)
    s = int(geo.clamp_to_border(torch.tensor([start]), size, full))
    assert 0 <= s and s + size <= full
    # the shifted box still holds the part of the original box inside the map
    assert s <= max(start, 0) and min(start + size, full) <= s + size


@given(size=st.integers(1, 100), full=st.integers(1, 100), tau=st.floats(0.05, 1.0))
def test_tau_limit(size, full, tau):
    assume(size <= full)
    limited = geo.tau_limit(size, full, tau)
    assert 1 <= limited <= size
    if tau == 1.0:
        assert limited == size
    else:
        assert limited == max(1, min(size, round(tau * full)))


def test_tau_box_is_centred_on_the_change():
    # a 2-wide change at 1..2 under a 3x3 conv (pad 1) reaches outputs 0..3;
    # capped at 2 outputs, the box keeps the middle two.
    spec = AxisSpec(kernel=3, stride=1, pad=1, in_size=4, out_size=4)
    start, size = geo.local_box(torch.tensor([1]), 2, spec, tau=0.4)
    assert (int(start), size) == (1, 2)


@given(layer=local_layers(), data=st.data(), tau=st.floats(0.1, 1.0))
def test_tau_box_stays_inside_and_never_grows(layer, data, tau):
    _, k, d, s, p, _, n = layer
    out = (n + 2 * p - (d * (k - 1) + 1)) // s + 1
    assume(out >= 1)
    spec = AxisSpec(d * (k - 1) + 1, s, p, n, out)
    size = data.draw(st.integers(1, n))
    start = torch.tensor([data.draw(st.integers(0, n - size))])
    exact_start, exact_size = geo.local_box(start, size, spec)
    approx_start, approx_size = geo.local_box(start, size, spec, tau)
    assert approx_size <= exact_size
    assert 0 <= int(approx_start) and int(approx_start) + approx_size <= out
