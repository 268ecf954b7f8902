"""Triton kernels against their torch references.

The kernels are pure copies, so every dtype must match exactly. On the CPU
they run under ``TRITON_INTERPRET=1`` (set in ``conftest.py``); with
``KRYPTON_TRITON_NATIVE=1`` on a CUDA machine they run on the GPU.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import KERNEL_DTYPES, KERNEL_LAYOUTS, GatherCase, gather_cases, projection_cases

from krypton_fx import ops
from krypton_fx.triton_kernels import gather, occlusion, projection
from krypton_fx.triton_kernels.gather import gather_window_torch, gather_window_triton
from krypton_fx.triton_kernels.occlusion import occlude_window_torch, occlude_window_triton
from krypton_fx.triton_kernels.projection import project_to_full_torch, project_to_full_triton

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
    """Exact values, same dtype, and the channels-last layout the next conv reads."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert actual.is_contiguous(memory_format=torch.channels_last)
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
    expected = occlude_window_torch(image, color, table, case.window, case.patch_hw)
    actual = occlude_window_triton(image, color, table, case.window, case.patch_hw)
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
    expected = occlude_window_torch(image, color, table, window, case.patch_hw)
    assert_same_output(occlude_window_triton(image, color, table, window, case.patch_hw),
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

@contextlib.contextmanager
def _launch_config(tile_elements: int, max_block_c: int, wide: bool, max_rows: int = 1):
    config = gather._config
    saved = (config.tile_elements, config.max_block_c, config.max_rows, gather._INT32_MAX)
    config.tile_elements, config.max_block_c, config.max_rows = tile_elements, max_block_c, max_rows
    if wide:
        gather._INT32_MAX = 0  # every in-row offset "may pass int32": WIDE=True
    try:
        yield
    finally:
        config.tile_elements, config.max_block_c, config.max_rows, gather._INT32_MAX = saved


def _run_all_kernels(stored, patch, table, window, patch_hw, color, starts):
    """(triton, torch) outputs of the three kernels on one problem."""
    return [
        (gather_window_triton(stored, patch, table, window),
         gather_window_torch(stored, patch, table, window)),
        (gather_window_triton(stored, None, table, window),
         gather_window_torch(stored, None, table, window)),
        (occlude_window_triton(stored, color, table, window, patch_hw),
         occlude_window_torch(stored, color, table, window, patch_hw)),
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
        grids = [gather._RowLaunch(batch, channels, win, stored).grid
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
                                                 case.patch_hw, color, starts):
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
        launch = gather._RowLaunch(table.shape[0], stored.shape[1], case.window, stored)
        assert launch.rows == min(max_rows, 1 << (case.window[0].bit_length() - 1))
        for actual, expected in _run_all_kernels(stored, patch, table, case.window,
                                                 case.patch_hw, _on_device(case.color), starts):
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
    with _launch_config(tile, 256, False, max_rows):
        assert gather._rows_per_program(height, block_j, block_c) == rows


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
    (lambda a: (a[0][0], *a[1:]), ValueError),                                   # stored 3-D
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
