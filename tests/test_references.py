"""The torch references (the CPU backend and the kernels' oracle) against plain loops.

The loops below state each op's contract element by element, for any number of
spatial axes; the references compute it with vectorised indexing. Both are torch
only: no Triton, no interpreter, so the cases can have up to 4 spatial axes.
"""

from __future__ import annotations

import doctest
import itertools
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import GatherCase, gather_cases, projection_cases

from krypton_fx.triton_kernels import config, reference
from krypton_fx.triton_kernels.reference import gather_window_torch, occlude_window_torch, project_to_full_torch

ALL = slice(None)


def _inside(index, size) -> bool:
    return all(0 <= k < n for k, n in zip(index, size))


def gather_loop(stored, patch, table, window):
    """``out[b, :, i] = patch[b, :, i - o]`` inside the patch, ``stored[0, :, w + i]`` else."""
    n, batch = len(window), table.shape[0]
    out = torch.empty(batch, stored.shape[1], *window, dtype=stored.dtype)
    for b in range(batch):
        start, offset = table[b, :n].tolist(), table[b, n:].tolist()
        for i in itertools.product(*map(range, window)):
            p = [k - o for k, o in zip(i, offset)]
            if patch is not None and _inside(p, patch.shape[2:]):
                out[(b, ALL, *i)] = patch[(b, ALL, *p)].to(stored.dtype)
            else:
                out[(b, ALL, *i)] = stored[(0, ALL, *[w + k for w, k in zip(start, i)])]
    return out


def project_loop(stored, patch, starts):
    """``stored`` with each patch written at its start; what falls off the map is dropped."""
    batch = starts.shape[0]
    out = stored.expand(batch, *stored.shape[1:]).clone()
    for b in range(batch):
        for p in itertools.product(*map(range, patch.shape[2:])):
            at = [s + k for s, k in zip(starts[b].tolist(), p)]
            if _inside(at, stored.shape[2:]):
                out[(b, ALL, *at)] = patch[(b, ALL, *p)].to(stored.dtype)
    return out


def occlude_loop(image, color, table, window, patch_size, weight=None, scale=None):
    """The image's window; inside the patch ``color[c]``, or with a weight and/or scale
    ``image * (weight[c, p] * scale[b]) + color[c]`` in float32 (0-d float32 tensors:
    python floats would compute in float64), rounded to the image's dtype."""
    n, batch, channels = len(window), table.shape[0], image.shape[1]
    out = gather_loop(image, None, table, window)
    for b in range(batch):
        offset = table[b, n:].tolist()
        for i in itertools.product(*map(range, window)):
            p = [k - o for k, o in zip(i, offset)]
            if not _inside(p, patch_size):
                continue
            for c in range(channels):
                if weight is None and scale is None:
                    out[(b, c, *i)] = color[c].to(image.dtype)
                    continue
                factor = None if weight is None else weight[(c % weight.shape[0], *p)].float()
                if scale is not None:
                    factor = scale[b].float() if factor is None else factor * scale[b].float()
                x = out[(b, c, *i)].float()
                out[(b, c, *i)] = (x * factor + color[c].float()).to(image.dtype)
    return out


def assert_same(actual, expected):
    """Exact values, and channels-last memory: ``(B, *spatial, C)``."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert actual.movedim(1, -1).is_contiguous()


spatial_axes = pytest.mark.parametrize("axes, max_size", [(1, 9), (2, 6), (3, 4), (4, 3)],
                                       ids=["1d", "2d", "3d", "4d"])


@spatial_axes
@settings(max_examples=25)
@given(data=st.data())
def test_gather_window_torch_matches_loops(axes, max_size, data):
    case: GatherCase = data.draw(gather_cases(axes=axes, max_size=max_size, max_batch=3,
                                              channels=st.integers(1, 3)), label="case")
    assert_same(gather_window_torch(case.stored, case.patch, case.table, case.window),
                gather_loop(case.stored, case.patch, case.table, case.window))


@pytest.mark.parametrize("one_source", [True, False], ids=["joined", "overlaid"])
@settings(max_examples=15)
@given(data=st.data())
def test_both_ways_of_writing_the_patch_match_loops(one_source, data):
    """The gather and projection read stored and patch rows from one join, or write the
    patch over the window (reference._reads_one_source picks by size): the same values."""
    axes = data.draw(st.integers(1, 3), label="axes")
    case: GatherCase = data.draw(gather_cases(axes=axes, max_size=5, max_batch=3,
                                              channels=st.integers(8, 10)), label="case")
    projection = data.draw(projection_cases(axes=axes, max_size=5, max_batch=3), label="projection")
    stored = projection.stored.repeat(1, 8, *(1,) * axes)  # enough channels for either way
    patch = projection.patch.repeat(1, 8, *(1,) * axes)
    with mock.patch.object(reference, "_reads_one_source", lambda *args: one_source):
        assert_same(gather_window_torch(case.stored, case.patch, case.table, case.window),
                    gather_loop(case.stored, case.patch, case.table, case.window))
        assert_same(project_to_full_torch(stored, patch, projection.starts),
                    project_loop(stored, patch, projection.starts))


@spatial_axes
@settings(max_examples=25)
@given(data=st.data())
def test_project_to_full_torch_matches_loops(axes, max_size, data):
    case = data.draw(projection_cases(axes=axes, max_size=max_size, max_batch=3), label="case")
    assert_same(project_to_full_torch(case.stored, case.patch, case.starts),
                project_loop(case.stored, case.patch, case.starts))


@spatial_axes
@settings(max_examples=25)
@given(data=st.data())
def test_occlude_window_torch_matches_loops(axes, max_size, data):
    case = data.draw(gather_cases(with_patch=False, axes=axes, max_size=max_size, max_batch=3,
                                  channels=st.integers(1, 3), factors="any"), label="case")
    args = (case.stored, case.color, case.table, case.window, case.patch_size)
    assert_same(occlude_window_torch(*args, weight=case.weight, scale=case.scale),
                occlude_loop(*args, weight=case.weight, scale=case.scale))


def test_full_window_occlusion_is_the_naive_batch():
    """With the whole image as the window, each position's image with its patch coloured."""
    image = torch.randn(1, 2, 5, 4, 3)
    table = torch.tensor([[0, 0, 0, 1, 2, 0], [0, 0, 0, 3, -1, 2]])
    out = occlude_window_torch(image, torch.tensor([7.0, 8.0]), table, (5, 4, 3), (2, 2, 2))
    naive = image.expand(2, -1, -1, -1, -1).clone()
    naive[0, 0, 1:3, 2:4, 0:2], naive[0, 1, 1:3, 2:4, 0:2] = 7.0, 8.0
    naive[1, 0, 3:5, 0:1, 2:3], naive[1, 1, 3:5, 0:1, 2:3] = 7.0, 8.0
    assert torch.equal(out, naive)


@pytest.mark.parametrize("module", [reference, config], ids=["reference", "config"])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0
