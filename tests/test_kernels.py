"""Triton kernels against their torch references.

The kernels are copies (the weighted occlusion adds one multiply-add, done in
the reference's order), so every dtype must match exactly. Maps have 2 spatial
axes unless a test says otherwise (1 and 3: signals and volumes). On the CPU
they run under ``TRITON_INTERPRET=1`` (set in ``conftest.py``); with
``KRYPTON_TRITON_NATIVE=1`` on a CUDA machine they run on the GPU.
"""

from __future__ import annotations

import logging
import os
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import KERNEL_DTYPES, KERNEL_LAYOUTS, GatherCase, gather_cases, projection_cases

from krypton_fx import ops
from krypton_fx.triton_kernels import (
    LaunchConfig,
    _common,
    current_launch_config,
    gather,
    launch_config,
    occlusion,
    projection,
)
from krypton_fx.triton_kernels.gather import gather_window_triton
from krypton_fx.triton_kernels.occlusion import occlude_window_triton
from krypton_fx.triton_kernels.projection import project_to_full_triton
from krypton_fx.triton_kernels.reference import gather_window_torch, occlude_window_torch, project_to_full_torch

NATIVE = bool(os.environ.get("KRYPTON_TRITON_NATIVE"))
if NATIVE and not torch.cuda.is_available():
    pytest.skip("KRYPTON_TRITON_NATIVE=1 needs a CUDA device", allow_module_level=True)
DEVICE = torch.device("cuda" if NATIVE else "cpu")


# Natively each new size/stride pattern is a kernel compile: fewer examples per
# parametrization keep the GPU check within minutes.
examples = settings(max_examples=6) if NATIVE else (lambda test: test)


def _on_device(tensor):
    return None if tensor is None else tensor.to(DEVICE)


# Every dtype with every stored layout; hypothesis draws the rest (sizes, windows,
# offsets, channels, batch, patch layout and dtype).
dtype_and_layout = pytest.mark.parametrize(
    "dtype, layout", [(d, lay) for d in KERNEL_DTYPES for lay in KERNEL_LAYOUTS],
    ids=[f"{str(d)[6:]}-{lay}" for d in KERNEL_DTYPES for lay in KERNEL_LAYOUTS])


def assert_same_output(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact values, same dtype, and the channels-last layout the next conv reads
    (memory ordered (B, *spatial, C))."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert actual.movedim(1, -1).is_contiguous()
    if actual.dim() in (4, 5):
        assert actual.is_contiguous(memory_format=torch.channels_last if actual.dim() == 4
                                    else torch.channels_last_3d)
    assert actual.stride() == expected.stride()


# ---------------------------------------------------------------------------
# Agreement with the torch references
# ---------------------------------------------------------------------------

@dtype_and_layout
@examples
@given(data=st.data())
def test_gather_window_matches_torch(dtype: torch.dtype, layout: str, data) -> None:
    case = data.draw(gather_cases(dtype=dtype, stored_layout=layout), label="case")
    stored, patch, table = _on_device(case.stored), _on_device(case.patch), _on_device(case.table)
    expected = gather_window_torch(stored, patch, table, case.window)
    assert_same_output(gather_window_triton(stored, patch, table, case.window), expected)


@dtype_and_layout
@examples
@given(data=st.data())
def test_occlude_window_matches_torch(dtype: torch.dtype, layout: str, data) -> None:
    case = data.draw(gather_cases(with_patch=False, dtype=dtype, stored_layout=layout,
                                  channels=st.one_of(st.just(3), st.just(1), st.integers(2, 70))),
                     label="case")
    image, color, table = _on_device(case.stored), _on_device(case.color), _on_device(case.table)
    expected = occlude_window_torch(image, color, table, case.window, case.patch_size)
    actual = occlude_window_triton(image, color, table, case.window, case.patch_size)
    assert_same_output(actual, expected)


@examples
@given(case=gather_cases(with_patch=False, max_size=11, channels=st.sampled_from((1, 3))))
def test_occlude_full_window_matches_torch(case: GatherCase) -> None:
    # Window = whole image: the occluded batch that naive occlusion runs.
    image, color = _on_device(case.stored), _on_device(case.color)
    window = tuple(image.shape[-2:])
    table = case.table.clone()
    table[:, :2] = 0
    table = _on_device(table)
    expected = occlude_window_torch(image, color, table, window, case.patch_size)
    assert_same_output(occlude_window_triton(image, color, table, window, case.patch_size),
                       expected)


@dtype_and_layout
@examples
@given(data=st.data())
def test_project_to_full_matches_torch(dtype: torch.dtype, layout: str, data) -> None:
    case = data.draw(projection_cases(dtype=dtype, stored_layout=layout), label="case")
    stored, patch, starts = _on_device(case.stored), _on_device(case.patch), _on_device(case.starts)
    expected = project_to_full_torch(stored, patch, starts)
    assert_same_output(project_to_full_triton(stored, patch, starts), expected)


# ---------------------------------------------------------------------------
# Tiles smaller than a row: several column blocks and channel blocks
# ---------------------------------------------------------------------------
# With the default launch config the cases above fit one (BLOCK_J, BLOCK_C) tile
# per output row (BLOCK_C >= C, BLOCK_J >= Rw). Here 4x4 tiles split rows into
# several column blocks (grid axis 1) and channels into several channel blocks
# (grid axis 2); wide=True also forces the int64 in-row offsets (WIDE).

def _launch_config(tile_elements: int, max_block_c: int, wide: bool, max_rows: int = 1):
    """Small tiles (several column and channel blocks), several rows per program, and
    int64 in-row offsets (WIDE) everywhere when ``wide``."""
    return launch_config(tile_elements=tile_elements, max_block_c=max_block_c,
                         max_rows=max_rows, wide_offsets=wide)


def _run_all_kernels(stored, patch, table, window, patch_size, color, starts):
    """(triton, torch) outputs of the three kernels on one problem."""
    return [
        (gather_window_triton(stored, patch, table, window),
         gather_window_torch(stored, patch, table, window)),
        (gather_window_triton(stored, None, table, window),
         gather_window_torch(stored, None, table, window)),
        (occlude_window_triton(stored, color, table, window, patch_size),
         occlude_window_torch(stored, color, table, window, patch_size)),
        (project_to_full_triton(stored, patch, starts),
         project_to_full_torch(stored, patch, starts)),
    ]


@pytest.mark.parametrize("wide", [False, True], ids=["int32-offsets", "int64-offsets"])
@pytest.mark.parametrize("batch", [1, 3])
def test_kernels_with_several_column_and_channel_blocks(batch: int, wide: bool) -> None:
    gen = torch.Generator().manual_seed(batch)
    channels, window, patch_hw = 11, (5, 10), (3, 4)
    stored = torch.randn(1, channels, 9, 13, generator=gen).to(DEVICE).contiguous(
        memory_format=torch.channels_last)
    patch = torch.randn(batch, channels, *patch_hw, generator=gen).to(DEVICE)
    # Patch inside, clipped on the right (across a column-block border), outside.
    table = torch.tensor([[4, 3, 1, 3], [0, 0, 3, 8], [2, 1, -4, 0]][:batch], device=DEVICE)
    starts = torch.tensor([[2, 3], [6, 11], [0, 0]][:batch], device=DEVICE)
    color = torch.randn(channels, generator=gen).to(DEVICE)
    with _launch_config(16, 4, wide):
        grids = [_common.RowLaunch(batch, channels, win, stored).grid
                 for win in (window, tuple(stored.shape[-2:]))]
        assert all(grid[1] > 1 and grid[2] > 1 for grid in grids), grids
        for actual, expected in _run_all_kernels(stored, patch, table, window, patch_hw, color,
                                                 starts):
            assert_same_output(actual, expected)


@settings(max_examples=6 if NATIVE else 12)
@given(case=gather_cases(with_patch=True, channels=st.integers(5, 20)),
       tiles=st.sampled_from([(16, 4), (32, 8), (8, 2)]), wide=st.booleans())
def test_kernels_with_small_tiles_match_torch(case: GatherCase, tiles: tuple[int, int],
                                              wide: bool) -> None:
    stored, patch, table = _on_device(case.stored), _on_device(case.patch), _on_device(case.table)
    color = _on_device(case.color)
    # Projection: the same patches at starts inside, clipped or outside the stored map.
    starts = _on_device(case.table[:, 2:])
    with _launch_config(*tiles, wide):
        for actual, expected in _run_all_kernels(stored, patch, table, case.window,
                                                 case.patch_size, color, starts):
            assert_same_output(actual, expected)


# ---------------------------------------------------------------------------
# Several rows per program
# ---------------------------------------------------------------------------
# With max_rows > 1 a program copies up to that many rows of one position; the
# last group of a window whose height is not a multiple is short (masked).

@settings(max_examples=6 if NATIVE else 12)
@given(case=gather_cases(with_patch=True), max_rows=st.sampled_from([2, 4, 8]),
       wide=st.booleans())
def test_kernels_with_several_rows_per_program_match_torch(case: GatherCase, max_rows: int,
                                                           wide: bool) -> None:
    stored, patch, table = _on_device(case.stored), _on_device(case.patch), _on_device(case.table)
    starts = _on_device(case.table[:, 2:])
    with _launch_config(4096, 256, wide, max_rows):
        launch = _common.RowLaunch(table.shape[0], stored.shape[1], case.window, stored)
        assert launch.rows == min(max_rows, 1 << (case.window[0].bit_length() - 1))
        for actual, expected in _run_all_kernels(stored, patch, table, case.window,
                                                 case.patch_size, _on_device(case.color),
                                                 starts):
            assert_same_output(actual, expected)


@pytest.mark.parametrize("height, block_j, block_c, max_rows, tile, rows", [
    (20, 32, 64, 1, 4096, 1),     # the default: one row per program
    (20, 32, 64, 4, 4096, 2),     # the tile budget holds two 32x64 rows
    (20, 32, 64, 4, 16384, 4),    # ... eight, capped at max_rows
    (3, 8, 4, 8, 4096, 2),        # a 3-row window: a power of two at most 3
    (20, 16, 256, 8, 4096, 1),    # a full tile already: one row
    (20, 16, 256, 8, 1024, 1),    # a row bigger than the budget: still one
])
def test_rows_per_program(height, block_j, block_c, max_rows, tile, rows) -> None:
    config = LaunchConfig(tile_elements=tile, max_rows=max_rows)
    assert _common.rows_per_program(height, block_j, block_c, config) == rows


# ---------------------------------------------------------------------------
# Signals and volumes: 1 and 3 spatial axes
# ---------------------------------------------------------------------------
# The same kernels with AXES = 1 (one row per position) and 3 (rows (b, d, i)):
# windows at every border, patches inside, clipped and outside, every dtype and
# layout (drawn). Volumes stay tiny: every output row is an interpreted program.

signals_and_volumes = pytest.mark.parametrize("axes, max_size", [(1, 13), (3, 5)],
                                              ids=["1d", "3d"])


@signals_and_volumes
@settings(max_examples=6 if NATIVE else 20)
@given(data=st.data())
def test_gather_window_nd_matches_torch(axes: int, max_size: int, data) -> None:
    case = data.draw(gather_cases(axes=axes, max_size=max_size, max_batch=3), label="case")
    stored, patch, table = _on_device(case.stored), _on_device(case.patch), _on_device(case.table)
    expected = gather_window_torch(stored, patch, table, case.window)
    assert expected.shape == (table.shape[0], stored.shape[1], *case.window)
    assert_same_output(gather_window_triton(stored, patch, table, case.window), expected)


@signals_and_volumes
@settings(max_examples=6 if NATIVE else 20)
@given(data=st.data())
def test_project_to_full_nd_matches_torch(axes: int, max_size: int, data) -> None:
    case = data.draw(projection_cases(axes=axes, max_size=max_size - (axes == 3), max_batch=3),
                     label="case")
    stored, patch, starts = _on_device(case.stored), _on_device(case.patch), _on_device(case.starts)
    expected = project_to_full_torch(stored, patch, starts)
    assert_same_output(project_to_full_triton(stored, patch, starts), expected)


@pytest.mark.parametrize("axes, max_size", [(1, 13), (2, 8), (3, 5)], ids=["1d", "2d", "3d"])
@settings(max_examples=6 if NATIVE else 20)
@given(data=st.data())
def test_occlude_window_nd_with_weight_and_scale_matches_torch(axes: int, max_size: int,
                                                               data) -> None:
    """Plain colour, a profile per channel or shared, a factor per position, or both."""
    case = data.draw(gather_cases(with_patch=False, axes=axes, max_size=max_size, max_batch=3,
                                  channels=st.one_of(st.just(1), st.just(3),
                                                     st.integers(2, 70)),
                                  factors="any"), label="case")
    image, color, table = _on_device(case.stored), _on_device(case.color), _on_device(case.table)
    weight, scale = _on_device(case.weight), _on_device(case.scale)
    expected = occlude_window_torch(image, color, table, case.window, case.patch_size,
                                    weight=weight, scale=scale)
    actual = occlude_window_triton(image, color, table, case.window, case.patch_size,
                                   weight=weight, scale=scale)
    assert_same_output(actual, expected)


@pytest.mark.parametrize("tile, max_block_c, wide, max_rows", [
    (16, 4, False, 1),      # several column and channel blocks
    (4096, 256, True, 4),   # 2 rows per program (R = 3: the last group is short), int64 offsets
], ids=["blocks", "rows-wide"])
def test_volume_kernels_with_small_tiles_and_several_rows(tile, max_block_c, wide,
                                                          max_rows) -> None:
    """Volumes under other launch configs: groups of rows of one (b, d) never run into
    the next depth or position."""
    gen = torch.Generator().manual_seed(tile)
    channels, window, patch_size = 7, (2, 3, 5), (2, 2, 3)
    stored = torch.randn(1, channels, 4, 4, 6, generator=gen).to(DEVICE).contiguous(
        memory_format=torch.channels_last_3d)
    patch = torch.randn(2, channels, *patch_size, generator=gen).to(DEVICE)
    # Patch inside, clipped across a column-block border and in depth.
    table = torch.tensor([[2, 1, 1, 0, 1, 1], [0, 0, 0, 1, 2, 3]], device=DEVICE)
    starts = torch.tensor([[1, 2, 3], [3, 0, 4]], device=DEVICE)
    color = torch.randn(channels, generator=gen).to(DEVICE)
    weight = torch.rand(channels, *patch_size, generator=gen).to(DEVICE)
    scale = torch.rand(2, generator=gen).to(DEVICE)
    with _launch_config(tile, max_block_c, wide, max_rows):
        launch = _common.RowLaunch(2, channels, window, stored)
        assert launch.rows == min(max_rows, 2)
        if tile == 16:
            assert launch.grid[1] > 1 and launch.grid[2] > 1, launch.grid
        for actual, expected in _run_all_kernels(stored, patch, table, window, patch_size,
                                                 color, starts):
            assert_same_output(actual, expected)
        assert_same_output(
            occlude_window_triton(stored, color, table, window, patch_size, weight, scale),
            occlude_window_torch(stored, color, table, window, patch_size, weight, scale))


@pytest.mark.parametrize("dtype, half_ulp", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11),
                                             (torch.float32, 2.0**-24)])
def test_weighted_occlusion_rounds_to_nearest_even_like_torch(dtype, half_ulp) -> None:
    """``image * scale + color`` on exact ties of the dtype (to even: 1 stays 1, the next
    value goes up), infinities, NaN and overflow: the kernel rounds as torch does."""
    big = torch.finfo(dtype).max
    values = [1.0, 1.0 + 2 * half_ulp, -1.0, float("inf"), float("nan"), big, 0.0]
    image = torch.tensor(values, dtype=dtype, device=DEVICE).view(1, 1, -1)
    color = torch.tensor([half_ulp], device=DEVICE)
    table = torch.tensor([[0, 0], [0, 0]], device=DEVICE)
    scale = torch.tensor([1.0, 2.0], device=DEVICE)
    out = occlude_window_triton(image, color, table, (7,), (7,), scale=scale)
    expected = occlude_window_torch(image, color, table, (7,), (7,), scale=scale)
    assert_same_output(out, expected)
    first = out[0, 0].float().tolist()
    assert first[:3] == [1.0, 1.0 + 4 * half_ulp, -1.0 + half_ulp] and first[3] == float("inf")
    assert out[0, 0, 4].isnan() and out[1, 0, 5].isinf()


def test_nd_docstring_examples() -> None:
    out = occlude_window_triton(torch.full((1, 1, 3), 2.0, device=DEVICE),
                                torch.ones(1, device=DEVICE),
                                torch.tensor([[0, 1]], device=DEVICE), (3,), (2,),
                                weight=torch.tensor([[0.5, 0.25]], device=DEVICE))
    assert out[0, 0].tolist() == [2.0, 2.0, 1.5]
    # One axis: (B, C, L), channels-last memory (B, L, C).
    out = gather_window_triton(torch.arange(6.0, device=DEVICE).view(1, 2, 3), None,
                               torch.tensor([[1, 0]], device=DEVICE), (2,))
    assert out.tolist() == [[[1.0, 2.0], [4.0, 5.0]]] and out.stride() == (4, 1, 2)


def test_docstring_examples() -> None:
    stored = torch.zeros(1, 1, 4, 4, device=DEVICE)
    patch = torch.ones(1, 1, 2, 2, device=DEVICE)
    table = torch.tensor([[1, 1, 1, 0]], device=DEVICE)
    assert gather_window_triton(stored, patch, table, (3, 3))[0, 0].tolist() == \
        [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    out = project_to_full_triton(torch.zeros(1, 1, 3, 3, device=DEVICE),
                                 torch.ones(1, 1, 1, 2, device=DEVICE),
                                 torch.tensor([[2, 1]], device=DEVICE))
    assert out[0, 0].tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    out = occlude_window_triton(torch.ones(1, 1, 3, 3, device=DEVICE),
                                torch.zeros(1, device=DEVICE),
                                torch.tensor([[0, 0, 0, 0]], device=DEVICE), (3, 3), (2, 2))
    assert out[0, 0].tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]


def test_empty_batch_returns_empty_output() -> None:
    stored = torch.randn(1, 5, 6, 7, device=DEVICE)
    table = torch.zeros(0, 4, dtype=torch.int64, device=DEVICE)
    out = gather_window_triton(stored, None, table, (3, 3))
    assert out.shape == (0, 5, 3, 3)


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def _good_gather_args():
    stored = torch.randn(1, 3, 8, 8, device=DEVICE)
    patch = torch.randn(2, 3, 2, 2, device=DEVICE)
    table = torch.zeros(2, 4, dtype=torch.int64, device=DEVICE)
    return stored, patch, table, (4, 4)


@pytest.mark.parametrize("change, error", [
    (lambda a: (a[0][0], *a[1:]), ValueError),                                   # no batch axis
    (lambda a: (a[0].expand(2, -1, -1, -1), *a[1:]), ValueError),                # stored batch 2
    (lambda a: (a[0].double(), *a[1:]), TypeError),                              # float64
    (lambda a: (a[0].to(torch.int32), *a[1:]), TypeError),                       # int map
    (lambda a: (a[0], a[1][0], *a[2:]), ValueError),                             # patch 3-D
    (lambda a: (a[0], a[1][:, :2], *a[2:]), ValueError),                         # patch channels
    (lambda a: (a[0], a[1][:1], *a[2:]), ValueError),                            # patch batch
    (lambda a: (a[0], a[1], a[2][:, :3], a[3]), ValueError),                     # table (B, 3)
    (lambda a: (a[0], a[1], a[2][0], a[3]), ValueError),                         # table 1-D
    (lambda a: (a[0], a[1], a[2].to(torch.int32), a[3]), TypeError),             # table int32
    (lambda a: (*a[:3], (4,)), ValueError),                                      # window rank
    (lambda a: (*a[:3], (4, -1)), ValueError),                                   # negative window
    (lambda a: (a[0], a[1], a[2].tolist(), a[3]), TypeError),                    # table a list
], ids=["stored-3d", "stored-batch", "stored-f64", "stored-int", "patch-3d", "patch-channels",
        "patch-batch", "table-cols", "table-1d", "table-int32", "window-rank", "window-negative",
        "table-list"])
def test_gather_window_rejects_bad_inputs(change, error) -> None:
    with pytest.raises(error):
        gather_window_triton(*change(_good_gather_args()))


def test_project_to_full_rejects_bad_inputs() -> None:
    stored = torch.randn(1, 3, 8, 8, device=DEVICE)
    patch = torch.randn(2, 3, 2, 2, device=DEVICE)
    starts = torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError):
        project_to_full_triton(stored, patch, torch.zeros(2, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError):
        project_to_full_triton(stored[0], patch, starts)
    with pytest.raises(ValueError):
        project_to_full_triton(stored, patch[:1], starts)
    with pytest.raises(TypeError):
        project_to_full_triton(stored, patch, starts.float())


def test_occlude_window_rejects_bad_inputs() -> None:
    image = torch.randn(1, 3, 8, 8, device=DEVICE)
    color = torch.zeros(3, device=DEVICE)
    table = torch.zeros(2, 4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError):
        occlude_window_triton(image, torch.zeros(2, device=DEVICE), table, (4, 4), (2, 2))
    with pytest.raises(ValueError):
        occlude_window_triton(image[0], color, table, (4, 4), (2, 2))
    with pytest.raises(ValueError):
        occlude_window_triton(image, color, table[:, :2], (4, 4), (2, 2))
    with pytest.raises(ValueError):
        occlude_window_triton(image, color, table, (4, 4), (2,))
    with pytest.raises(TypeError):
        occlude_window_triton(image, 0.0, table, (4, 4), (2, 2))


def _volume(*shape):
    return torch.zeros(*shape, device=DEVICE)


def _index(*shape):
    return torch.zeros(*shape, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("call, error, match", [
    (lambda: gather_window_triton(_volume(1, 2, 3, 3, 3, 3), None, _index(1, 8), (1, 1, 1, 1)),
     ValueError, "1 to 3 spatial axes"),
    (lambda: gather_window_triton(_volume(1, 2, 4, 4, 4), _volume(1, 2, 2, 2), _index(1, 6),
                                  (2, 2, 2)), ValueError, "patch must have shape"),
    (lambda: gather_window_triton(_volume(1, 2, 4, 4, 4), None, _index(1, 4), (2, 2, 2)),
     ValueError, r"table must have shape \(B, 6\)"),
    (lambda: gather_window_triton(_volume(1, 2, 4, 4, 4), None, _index(1, 6), (2, 2)),
     ValueError, "window must be 3"),
    (lambda: gather_window_triton(_volume(1, 2, 9), None, _index(1, 2), (2.5,)),
     ValueError, "window must be 1"),
    (lambda: project_to_full_triton(_volume(1, 2, 4, 4, 4), _volume(1, 2, 2, 2, 2), _index(1, 2)),
     ValueError, r"starts must have shape \(B, 3\)"),
    (lambda: occlude_window_triton(_volume(1, 2, 4, 4, 4), _volume(2), _index(1, 6), (2, 2, 2),
                                   (2, 2)), ValueError, "patch_size must be 3"),
    (lambda: occlude_window_triton(_volume(1, 2, 9), _volume(2), _index(3, 2), (4,), (2,),
                                   weight=_volume(2, 3)), ValueError, "weight must have shape"),
    (lambda: occlude_window_triton(_volume(1, 2, 9), _volume(2), _index(3, 2), (4,), (2,),
                                   weight=_index(1, 2)), TypeError, "floating-point"),
    (lambda: occlude_window_triton(_volume(1, 2, 9), _volume(2), _index(3, 2), (4,), (2,),
                                   weight=torch.zeros(1, 2, device="meta")),
     ValueError, "weight is on meta"),
    (lambda: occlude_window_triton(_volume(1, 2, 9), _volume(2), _index(3, 2), (4,), (2,),
                                   scale=_volume(2)), ValueError, r"scale must have shape \(3,\)"),
    (lambda: occlude_window_triton(_volume(1, 2, 9), _volume(2), _index(3, 2), (4,), (2,),
                                   scale=[1.0, 1.0, 1.0]), TypeError, "scale must be a tensor"),
    (lambda: _common.RowLaunch(2**31, 0, (2, 2), _volume(1)), ValueError, "smaller batch"),
], ids=["four-axes", "patch-rank", "table-columns", "window-rank", "window-float", "starts-columns",
        "patch-size-rank", "weight-shape", "weight-int", "weight-device", "scale-shape",
        "scale-list", "grid-too-long"])
def test_nd_launchers_reject_bad_inputs(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------
# Launch config
# ---------------------------------------------------------------------------

def test_launch_config_is_frozen_and_checked() -> None:
    config = LaunchConfig()
    with pytest.raises(AttributeError):
        config.num_warps = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="num_warps"):
        LaunchConfig(num_warps=0)
    with pytest.raises(ValueError, match="wide_offsets"):
        LaunchConfig(wide_offsets=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        with launch_config(warps=4):
            pass


def test_launch_config_scopes_nest_and_restore() -> None:
    default = current_launch_config()
    with launch_config(num_warps=4) as outer:
        assert current_launch_config() is outer and outer.num_warps == 4
        with launch_config(max_rows=2) as inner:  # changes the current config, not the default
            assert (inner.num_warps, inner.max_rows) == (4, 2)
        with launch_config(LaunchConfig(tile_elements=64)) as replaced:
            assert (replaced.num_warps, replaced.tile_elements) == (8, 64)
        with pytest.raises(RuntimeError):
            with launch_config(max_rows=8):
                raise RuntimeError
        assert current_launch_config() is outer
    assert current_launch_config() == default == LaunchConfig()


def test_launch_config_is_per_thread() -> None:
    """A sweep in one thread does not change the launches of another."""
    seen = []
    with launch_config(num_warps=2):
        thread = threading.Thread(target=lambda: seen.append(current_launch_config().num_warps))
        thread.start()
        thread.join()
    assert seen == [8]


# ---------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------

class _Spy:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_dispatcher_triton_backend_runs_kernels(monkeypatch) -> None:
    spies = {
        "gather": _Spy(gather.gather_window_triton),
        "projection": _Spy(projection.project_to_full_triton),
        "occlusion": _Spy(occlusion.occlude_window_triton),
    }
    monkeypatch.setattr(gather, "gather_window_triton", spies["gather"])
    monkeypatch.setattr(projection, "project_to_full_triton", spies["projection"])
    monkeypatch.setattr(occlusion, "occlude_window_triton", spies["occlusion"])
    gen = torch.Generator().manual_seed(0)
    stored = torch.randn(1, 5, 9, 7, generator=gen).to(DEVICE)
    patch = torch.randn(3, 5, 3, 2, generator=gen).to(DEVICE)
    table = torch.tensor([[0, 0, -1, 0], [4, 2, 2, 3], [2, 1, 1, 1]], device=DEVICE)
    starts = torch.tensor([[0, 0], [6, 5], [3, 2]], device=DEVICE)
    color = torch.arange(5, dtype=torch.float32, device=DEVICE)

    assert_same_output(ops.gather_window(stored, patch, table, (5, 5), backend="triton"),
                       gather_window_torch(stored, patch, table, (5, 5)))
    assert_same_output(ops.project_to_full(stored, patch, starts, backend="triton"),
                       project_to_full_torch(stored, patch, starts))
    assert_same_output(ops.occlude_window(stored, color, table, (5, 5), (3, 2), backend="triton"),
                       occlude_window_torch(stored, color, table, (5, 5), (3, 2)))
    assert {name: spy.calls for name, spy in spies.items()} == \
        {"gather": 1, "projection": 1, "occlusion": 1}

    ops.gather_window(stored, patch, table, (5, 5), backend="torch")
    ops.project_to_full(stored, patch, starts, backend="torch")
    ops.occlude_window(stored, color, table, (5, 5), (3, 2), backend="torch")
    assert all(spy.calls == 1 for spy in spies.values())

    # One spatial axis, and an occlusion weight and scale, go through as well.
    signal, table_1d = stored[:, :, 0], table[:, 1::2]
    weight, scale = torch.rand(1, 2, device=DEVICE), torch.rand(3, device=DEVICE)
    assert_same_output(ops.gather_window(signal, patch[:, :, 0], table_1d, (4,), backend="triton"),
                       gather_window_torch(signal, patch[:, :, 0], table_1d, (4,)))
    assert_same_output(ops.occlude_window(signal, color, table_1d, (4,), (2,), backend="triton",
                                          weight=weight, scale=scale),
                       occlude_window_torch(signal, color, table_1d, (4,), (2,), weight, scale))
    assert (spies["gather"].calls, spies["occlusion"].calls) == (2, 2)


def test_auto_backend_without_triton_runs_torch_on_cuda_and_says_so_once(monkeypatch,
                                                                         caplog) -> None:
    """Where Triton cannot be imported, backend="auto" on CUDA tensors runs the torch ops
    (logged once, at INFO) and backend="triton" says what to do."""
    missing = ImportError("No module named 'triton'")
    monkeypatch.setattr(ops, "_import_kernels", lambda: missing)
    monkeypatch.setattr(ops, "_fallback_logged", threading.Event())
    from torch._subclasses.fake_tensor import FakeTensorMode

    stored, patch = torch.randn(1, 3, 6, 6), torch.randn(2, 3, 2, 2)
    table = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 0]])
    # A fake CUDA device: shapes, dtypes and devices, no data.
    with FakeTensorMode() as mode, caplog.at_level(logging.INFO, logger="krypton_fx.ops"):
        stored, patch, table = (mode.from_tensor(t).to("cuda") for t in (stored, patch, table))
        assert not ops.triton_available() and not ops.use_triton("auto", stored)
        for _ in range(2):
            out = ops.gather_window(stored, patch, table, (4, 4), backend="auto")
            assert out.device.type == "cuda" and out.shape == (2, 3, 4, 4)
        with pytest.raises(ImportError, match=r"pip install triton.*backend='torch'"):
            ops.gather_window(stored, patch, table, (4, 4), backend="triton")
    infos = [r for r in caplog.records if r.name == "krypton_fx.ops"]
    assert len(infos) == 1 and infos[0].levelno == logging.INFO, infos
    assert "No module named 'triton'" in infos[0].getMessage()


def test_use_triton() -> None:
    cpu = torch.zeros(1)
    assert ops.use_triton("triton", cpu) and not ops.use_triton("auto", cpu)
    assert not ops.use_triton("torch", cpu) and ops.triton_available()


def test_residual_and_concat_model_on_the_triton_backend(monkeypatch) -> None:
    """The whole incremental graph on Triton kernels (interpreted on the CPU, natively on
    the GPU) equals naive."""
    from strategies import dag_model

    import krypton_fx

    if NATIVE:  # a native launch needs CUDA tensors; float32 exactness needs TF32 off
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = dag_model().to(DEVICE)
    image = torch.randn(3, 21, 19, device=DEVICE)
    ex = krypton_fx.compile(model, patch=(5, 4), stride=(4, 3), image_size=(21, 19),
                            color=[0.1, -0.2, 0.3], backend="triton", batch_size=7, device=DEVICE)
    assert ex.device.type == DEVICE.type
    got = ex(image)
    want = krypton_fx.naive_occlusion(model, image, patch=(5, 4), stride=(4, 3),
                                      color=[0.1, -0.2, 0.3])
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-5, rtol=0)
    kinds = {n.target.__name__ for n in ex.program.module.graph.nodes if n.op == "call_function"}
    assert {"gather_window", "occlude_window", "project_to_full"} <= kinds  # all three kernels run


@pytest.mark.parametrize("axes, max_size", [(1, 13), (2, 8), (3, 5)], ids=["1d", "2d", "3d"])
@settings(max_examples=6 if NATIVE else 15)
@given(data=st.data(), per_channel=st.booleans(), baseline_image=st.booleans())
def test_occlude_window_segments_nd_matches_torch(axes: int, max_size: int, data, per_channel: bool,
                                                  baseline_image: bool) -> None:
    """A segment (feature ablation): only the patch's elements whose label is the row's id
    change, to the colour or a baseline image; one-row labels (read for every channel) or
    per-channel ones, in any layout."""
    case = data.draw(gather_cases(with_patch=False, axes=axes, max_size=max_size, max_batch=3,
                                  channels=st.one_of(st.just(1), st.just(3), st.integers(2, 40))),
                     label="case")
    image, color, table = _on_device(case.stored), _on_device(case.color), _on_device(case.table)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    rows = image.shape[1] if per_channel else 1
    ids = torch.randint(-1, 3, (1, rows, *image.shape[2:]), generator=gen)
    if data.draw(st.booleans(), label="channels-last ids") and axes == 2:
        ids = ids.contiguous(memory_format=torch.channels_last)
    segment = torch.randint(-1, 3, (table.shape[0],), generator=gen)
    baseline = torch.randn(image.shape, generator=gen).to(image.dtype) if baseline_image else None
    ids, segment, baseline = _on_device(ids), _on_device(segment), _on_device(baseline)
    expected = occlude_window_torch(image, color, table, case.window, case.patch_size, ids=ids,
                                    segment=segment, baseline=baseline)
    actual = occlude_window_triton(image, color, table, case.window, case.patch_size, ids=ids,
                                   segment=segment, baseline=baseline)
    assert_same_output(actual, expected)
    # The closed form: the baseline exactly where the patch holds the row's label.
    window_image = gather_window_torch(image, None, table, case.window)
    changed = (actual != window_image).any(1)
    labels = gather_window_torch(ids, None, table, case.window)
    may_change = (labels == segment.view(-1, *(1,) * (axes + 1))).any(1)
    assert not (changed & ~may_change).any()


def test_occlude_window_segment_arguments_are_checked() -> None:
    image, table = torch.zeros(1, 3, 4, 4, device=DEVICE), torch.zeros(2, 4, dtype=torch.int64, device=DEVICE)
    color, ids = torch.zeros(3, device=DEVICE), torch.zeros(1, 1, 4, 4, dtype=torch.int64, device=DEVICE)
    segment = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="ids= needs segment="):
        occlude_window_triton(image, color, table, (4, 4), (2, 2), ids=ids)
    with pytest.raises(TypeError, match="ids must be int64"):
        occlude_window_triton(image, color, table, (4, 4), (2, 2), ids=ids.int(), segment=segment)
    with pytest.raises(ValueError, match="ids must have shape"):
        occlude_window_triton(image, color, table, (4, 4), (2, 2), ids=ids[..., :3], segment=segment)
    with pytest.raises(ValueError, match="baseline must have the image's shape"):
        occlude_window_triton(image, color, table, (4, 4), (2, 2), ids=ids, segment=segment,
                              baseline=image[..., :3])
    with pytest.raises(ValueError, match="segment= and baseline= need ids="):
        occlude_window_triton(image, color, table, (4, 4), (2, 2), segment=segment)
    with pytest.raises(ValueError, match="takes no weight"):
        occlude_window_triton(image, color, table, (4, 4), (2, 2), ids=ids, segment=segment,
                              scale=torch.ones(2, device=DEVICE))
