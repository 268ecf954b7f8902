"""Geometry of the decoder's ops against ground truth: run the layer on an input and on the
input with a box changed; the box PatchProp computes contains every element that changes
(tight for nearest resampling and stride-1 transposed convs), and the op run on the read
window, cropped (or resampled by its taps), gives the layer's own outputs in the box."""

import doctest

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from krypton_fx import geometry as geo
from krypton_fx import resampling
from krypton_fx.passes import windowed
from krypton_fx.passes.graph_fns import resample_window
from krypton_fx.passes.patch_prop import META_KEY, PatchProp, State
from krypton_fx.passes.windowed import WindowedOps, transposed_padding
from krypton_fx.tracing import trace

_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _Layer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _layer_info(fn, x, patch, starts):
    """PatchProp's annotation of the one node that ``fn`` traces to, on input ``x``."""
    gm = trace(_Layer(fn))
    PatchProp(gm, patch, starts).run(x)
    node = next(n for n in gm.graph.nodes if n.op in ("call_function", "call_module"))
    return node.meta[META_KEY]


def _starts(data, full, patch, count=3):
    """Patch starts per axis for ``count`` positions, biased to the borders."""
    cols = [[data.draw(st.one_of(st.just(0), st.just(n - p), st.integers(0, n - p))) for _ in range(count)]
            for n, p in zip(full, patch)]
    return tuple(torch.tensor(c) for c in cols)


def _changed_extents(fn, x, patch, starts, position):
    """Per axis, ``(first, last)`` changed output index when position's patch is changed
    (None where nothing changes)."""
    base = fn(x)
    occluded = x.clone()
    box = tuple(slice(int(s[position]), int(s[position]) + p) for s, p in zip(starts, patch))
    occluded[(slice(None), slice(None), *box)] += 1.0 + torch.rand(occluded[(slice(None), slice(None), *box)].shape)
    changed = (fn(occluded) != base).any(1)[0]
    if not changed.any():
        return None
    idx = changed.nonzero()
    return [(int(idx[:, a].min()), int(idx[:, a].max())) for a in range(changed.dim())], base


def _check_contains(info, extents, position, tight=False):
    box = info.box
    for a, (lo, hi) in enumerate(extents):
        s = int(box.starts[a][position])
        assert 0 <= s and s + box.sizes[a] <= box.full[a]
        assert s <= lo and hi < s + box.sizes[a], f"axis {a}: changed {lo}..{hi} outside box {s}+{box.sizes[a]}"
        if tight:
            assert (s, box.sizes[a]) == (lo, hi - lo + 1)


def _window(x, info, position):
    """The read window of ``position`` out of ``x``, zero outside the map."""
    read = info.reads[0].window
    pad = max(max(-int(s.min()), int(s.max()) + n - f, 0) for s, n, f in zip(read.starts, read.sizes, read.full))
    padded = F.pad(x, (pad,) * (2 * (x.dim() - 2)))
    sl = tuple(slice(int(s[position]) + pad, int(s[position]) + pad + n) for s, n in zip(read.starts, read.sizes))
    return padded[(slice(None), slice(None), *sl)]


def _box_of(y, info, position):
    box = info.box
    return y[(slice(None), slice(None), *(slice(int(s[position]), int(s[position]) + n)
                                          for s, n in zip(box.starts, box.sizes)))]


@st.composite
def transposed_layers(draw):
    """A transposed conv (any stride, padding, output padding, dilation, groups), an input."""
    dims = draw(st.integers(1, 3))
    k, s, d = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    p = draw(st.integers(0, d * (k - 1)))
    op = draw(st.integers(0, max(s, d) - 1))
    groups = draw(st.sampled_from([1, 2]))
    size = tuple(draw(st.integers(2, 9 if dims < 3 else 5)) for _ in range(dims))
    return dims, k, s, p, op, d, groups, size


@settings(max_examples=30)
@given(layer=transposed_layers(), data=st.data())
def test_transposed_conv_box_contains_the_change_and_its_window_reproduces_it(layer, data):
    dims, k, s, p, op, d, groups, size = layer
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(1, 2, *size, generator=gen)
    w = torch.randn(2, 3 if groups == 1 else 1, *(k,) * dims, generator=gen)
    bias = torch.randn(w.shape[1] * groups, generator=gen)
    fn = lambda t: _CONV_T[dims](t, w, bias, s, p, op, groups, d)  # noqa: E731
    try:
        full = fn(x)
    except RuntimeError:
        assume(False)
    patch = tuple(data.draw(st.integers(1, n)) for n in size)
    starts = _starts(data, size, patch)
    info = _layer_info(fn, x, patch, starts)
    if info.state is State.DENSE:  # the box would cover the whole output
        return
    assert all(c >= 0 for c in info.crop)
    for position in range(3):
        found = _changed_extents(fn, x, patch, starts, position)
        if found is None:
            continue
        extents, _ = found
        _check_contains(info, extents, position)
        if s == 1 and d == 1 and all(0 < lo and hi < n - 1 for (lo, hi), n in zip(extents, full.shape[2:])):
            _check_contains(info, extents, position, tight=True)
        # the op on the window, cropped at the static offset, is the layer's output in the box
        local = _CONV_T[dims](_window(x, info, position), w, bias, s, 0, 0, groups, d)
        crop = local[(slice(None), slice(None), *(slice(c, c + n) for c, n in zip(info.crop, info.box.sizes)))]
        torch.testing.assert_close(crop, _box_of(full, info, position), atol=1e-5, rtol=1e-5)
        # as the incremental graph runs it: padded so that it returns little more than the box
        pad, out_pad, at = WindowedOps._transposed_padding(info)
        local = _CONV_T[dims](_window(x, info, position), w, bias, s, pad, out_pad, groups, d)
        crop = local[(slice(None), slice(None), *(slice(c, c + n) for c, n in zip(at, info.box.sizes)))]
        torch.testing.assert_close(crop, _box_of(full, info, position), atol=1e-5, rtol=1e-5)


RESAMPLE_MODES = {1: ["nearest", "nearest-exact", "linear", "area"],
                  2: ["nearest", "nearest-exact", "bilinear", "bicubic", "area"],
                  3: ["nearest", "nearest-exact", "trilinear", "area"]}


@st.composite
def resample_layers(draw):
    """``F.interpolate`` by scale factor (integer or not) or by size, every mode, align_corners."""
    dims = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(RESAMPLE_MODES[dims]))
    size = tuple(draw(st.integers(2, 12 if dims < 3 else 6)) for _ in range(dims))
    kwargs = {"mode": mode}
    if mode in ("linear", "bilinear", "bicubic", "trilinear"):
        kwargs["align_corners"] = draw(st.booleans())
        if dims == 2 and not kwargs["align_corners"]:
            kwargs["antialias"] = draw(st.booleans())
    if draw(st.booleans()):
        kwargs["scale_factor"] = tuple(draw(st.sampled_from([0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]))
                                       for _ in range(dims))
        kwargs["recompute_scale_factor"] = draw(st.sampled_from([None, True]))
    else:
        kwargs["size"] = tuple(draw(st.integers(1, 3 * n)) for n in size)
    return dims, size, kwargs


@settings(max_examples=40)
@given(layer=resample_layers(), data=st.data())
def test_resampling_box_contains_the_change_and_its_taps_reproduce_it(layer, data):
    dims, size, kwargs = layer
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(1, 3, *size, generator=gen)
    fn = lambda t: F.interpolate(t, **kwargs)  # noqa: E731
    try:
        full = fn(x)
    except (RuntimeError, ValueError, NotImplementedError):
        assume(False)
    assume(all(n >= 1 for n in full.shape[2:]))
    patch = tuple(data.draw(st.integers(1, n)) for n in size)
    starts = _starts(data, size, patch)
    info = _layer_info(fn, x, patch, starts)
    if info.state is State.DENSE:
        return
    nearest = kwargs["mode"].startswith("nearest")
    sizes = []
    for position in range(3):
        found = _changed_extents(fn, x, patch, starts, position)
        if found is not None:
            extents, _ = found
            _check_contains(info, extents, position)
            sizes.append([hi - lo + 1 for lo, hi in extents])
        table = torch.stack([s[position:position + 1] for s in info.box.starts]
                            + [s[position:position + 1] for s in info.reads[0].window.starts], 1)
        got = resample_window(_window(x, info, position), table, tuple(t.first for t in info.taps),
                              tuple(None if t.selects else t.weight for t in info.taps), info.box.sizes)
        torch.testing.assert_close(got, _box_of(full, info, position), atol=1e-5, rtol=1e-5)
    if nearest and len(sizes) == 3:  # tight: the static size is the widest change over positions
        assert list(info.box.sizes) == [max(s[a] for s in sizes) for a in range(dims)]


def test_nearest_box_is_exactly_the_change():
    x = torch.randn(1, 2, 7, 9)
    for kwargs in ({"scale_factor": 2.0}, {"size": (10, 20)}, {"scale_factor": (1.7, 0.6)}):
        fn = lambda t, kw=kwargs: F.interpolate(t, mode="nearest", **kw)  # noqa: E731
        starts = (torch.tensor([3]), torch.tensor([4]))
        info = _layer_info(fn, x, (2, 3), starts)
        extents, _ = _changed_extents(fn, x, (2, 3), starts, 0)
        _check_contains(info, extents, 0, tight=True)


@pytest.mark.parametrize("factor", [2, 3])
def test_pixel_shuffle_and_unshuffle_boxes(factor):
    x = torch.randn(1, 2 * factor * factor, 5, 6)
    starts = (torch.tensor([0, 2, 3]), torch.tensor([1, 3, 4]))
    for fn in (lambda t: F.pixel_shuffle(t, factor), lambda t: F.pixel_unshuffle(F.pixel_shuffle(t, factor), 1)):
        info = _layer_info(fn, x, (2, 2), starts)
        for position in range(3):
            extents, full = _changed_extents(fn, x, (2, 2), starts, position)
            _check_contains(info, extents, position, tight=True)  # shuffling only moves elements
    y = torch.randn(1, 3, 5 * factor, 4 * factor)
    info = _layer_info(lambda t: F.pixel_unshuffle(t, factor), y, (3, 2), starts)
    for position in range(3):
        extents, full = _changed_extents(lambda t: F.pixel_unshuffle(t, factor), y, (3, 2), starts, position)
        _check_contains(info, extents, position)
        torch.testing.assert_close(F.pixel_unshuffle(_window(y, info, position), factor),
                                   _box_of(full, info, position))


@given(full=st.integers(1, 40), data=st.data(), stride=st.integers(1, 4), dilation=st.integers(1, 3))
def test_transposed_padding_keeps_the_box_and_returns_the_shortest_stride_multiple(full, data, stride, dilation):
    crop = data.draw(st.integers(0, full - 1))
    size = data.draw(st.integers(1, full - crop))
    pad, out_pad, at = transposed_padding(full, crop, size, stride, dilation)
    length = full - 2 * pad + out_pad
    assert 0 <= out_pad < max(stride, dilation) and pad >= 0
    assert at == crop - pad and 0 <= at and at + size <= length  # the box is inside, where it says
    # every (padding, output padding) pytorch takes that keeps the box: none is better
    valid = [full - 2 * p + q for q in range(max(stride, dilation)) for p in range(crop + 1)
             if crop + size <= full - p + q]
    best = min(valid, key=lambda n: (n % stride != 0, n))
    assert (length % stride != 0, length) == (best % stride != 0, best)


@given(start=st.lists(st.integers(0, 40), min_size=1, max_size=5), size=st.integers(1, 20),
       full=st.integers(1, 60), stride=st.integers(1, 4))
def test_align_box_covers_fits_and_is_aligned(start, size, full, stride):
    assume(size <= full)
    starts = torch.tensor([min(s, full - size) for s in start])
    aligned, grown = geo.align_box(starts, size, full, stride)
    assert size <= grown <= min(size + 2 * (stride - 1), full)
    assert bool(((aligned >= 0) & (aligned + grown <= full)).all())
    assert bool(((aligned <= starts) & (aligned + grown >= starts + size)).all())
    if grown < full:  # one phase for every position
        assert len(set(torch.remainder(aligned, stride).tolist())) == 1


def test_tau_caps_transposed_and_resampled_boxes():
    spec = geo.TransposedSpec(kernel=4, stride=2, pad=1, in_size=16, out_size=32)
    start, size = geo.transposed_box(torch.tensor([6]), 4, spec)
    capped_start, capped = geo.transposed_box(torch.tensor([6]), 4, spec, tau=0.25)
    assert (size, capped) == (10, 8) and int(start) + 1 == int(capped_start)  # centred
    taps = geo.AxisTaps.from_matrix(torch.eye(16).repeat_interleave(2, 0))
    assert geo.resample_box(torch.tensor([6]), 4, taps, tau=0.125)[1] == 4


def test_resample_taps_are_the_ops_own_indices():
    """Nearest by a scale whose float reciprocal rounds down: the op's index, not o // scale."""
    from krypton_fx.registry import LocalOp, Resample
    op = LocalOp("resample", (1,), (1,), (0,), resample=Resample("nearest", None, (1.0 / 0.3,)))
    taps, = resampling.resample_taps(op, (30,), (100,))
    want = F.interpolate(torch.arange(30.0).view(1, 1, 30), scale_factor=1.0 / 0.3, mode="nearest")
    assert taps.first.tolist() == want.flatten().long().tolist()


@pytest.mark.parametrize("module", [geo, resampling, windowed], ids=["geometry", "resampling", "windowed"])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0
