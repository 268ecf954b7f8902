"""What the three kernels share: the launch geometry, its jit helpers and the
launchers' input checks.

Launch geometry
---------------
Maps have 1, 2 or 3 spatial axes; the launchers view every map as a volume
``(1, C, D, H, W)`` with unit axes in front (a 2-D map has D = 1, a 1-D one
D = H = 1), and ``AXES`` (a constexpr) tells a kernel how many are real. One output
row ``(b, d, i)`` of a channels-last ``(B, D, R, Rw, C)`` output is one contiguous run
of ``Rw * C`` elements. The grid is

    axis 0: (b * D + d) * cdiv(R, ROWS) + g   ROWS rows i = g*ROWS .. g*ROWS + ROWS-1 of
                                              (b, d) (decoded once, as scalars)
    axis 1: blocks of BLOCK_J                 columns j of those rows
    axis 2: blocks of BLOCK_C                 channels c

and a program copies, row after row (an unrolled loop), a ``(BLOCK_J, BLOCK_C)``
tile built from two aranges: no per-element integer division, the position's
table row is read once as scalars, and the overlay test is a scalar row (and
depth) test plus a per-j column test. Decoding axis 0 takes one integer division
for 2 axes (b, i), two for 3 axes (b, d, i) and none for 1 axis (one row per
position); AXES is a constexpr, so each map rank is its own specialisation and
the 2-axis code is the same as before volumes existed. ROWS is 1 by default (one
program per row); more rows fill a program whose row tile is small, at the cost
of registers (``LaunchConfig.max_rows``, swept by bench/kernel_bandwidth.py).

Channel blocks are a third grid axis, not a loop inside the program: each
program then issues all its loads at once (a runtime loop over channel blocks
would, unless the compiler pipelines it, wait for one tile's loads before the
next), all programs are independent, and narrow layers still get many programs
to keep the GPU full. The cost, re-reading the table row's scalars per channel
block, is a few cached loads. The axis is short (C / BLOCK_C, 1 for C <= BLOCK_C),
well within the 65535 limit of grid axes 1 and 2; axis 0 (about B * D * R) may go
up to 2**31 - 1.

The tile's size and warps come from :func:`~krypton_fx.triton_kernels.config.
current_launch_config` (defaults and why: :class:`~krypton_fx.triton_kernels.config.
LaunchConfig`). These kernels' bandwidth is UNMEASURED on a GPU: ``bash
bench/gpu_check.sh`` (or ``python bench/kernel_bandwidth.py --sweep``) measures it.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import LaunchConfig, current_launch_config
from .reference import channels_last_empty

# Dtypes the kernels copy; the output keeps the stored activation's dtype.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Spatial axes the kernels take (the torch references take any number).
MAX_AXES = 3
# Fewest columns per tile (fewer tile shapes, so fewer compiles; see block_sizes).
_MIN_BLOCK_J = 8
# Elements per thread below which a small tile gets fewer warps (idle threads
# in a program only cost occupancy).
_MIN_ELEMENTS_PER_THREAD = 8
_MAX_GRID_YZ = 65535  # CUDA limit of grid axes 1 and 2
INT32_MAX = 2**31 - 1  # also CUDA's limit of grid axis 0


# ---------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------

@triton.jit
def _row_tile(D, R, RW, C, AXES: tl.constexpr, ROWS: tl.constexpr, BLOCK_J: tl.constexpr,
              BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    """This program's tiles of a channels-last ``(B, D, R, Rw, C)`` output: the position
    ``b``, depth ``d`` and first row ``i0`` (int64 scalars; the program copies rows
    ``i0 .. i0 + ROWS - 1`` of ``(b, d)``), the output row ``row0`` of ``(b, d, i0)``, the
    tile's columns ``j`` and channels ``c`` and their masks. Axes a map lacks get a
    literal 0 (``d`` below 3 axes, ``i0`` for 1 axis): the offsets they enter fold away
    (the kernels add the depth term only for 3 axes, which saves the interpreter work).

    ``j`` and ``c`` are int32 (cheaper address math) unless ``WIDE``: only offsets
    inside one row of one image are formed from them, and the launcher sets
    ``WIDE`` when those can pass 2**31. Everything that scales with the batch
    (row * Rw * C, b * patch batch stride) goes into int64 scalar bases instead.
    """
    group = tl.program_id(0).to(tl.int64)
    if AXES == 1:
        # One row per position (R == 1, ROWS == 1): the program number is the position.
        b = group
        d = 0
        i0 = 0
        row0 = b
    elif AXES == 2:
        groups = tl.cdiv(R, ROWS)  # row groups of one position; R itself when ROWS == 1
        b = group // groups
        d = 0
        i0 = (group - b * groups) * ROWS
        row0 = b * R + i0
    else:
        groups = tl.cdiv(R, ROWS)
        bd = group // groups       # (b, d) as one index: the first division
        b = bd // D                # the second
        d = bd - b * D
        i0 = (group - bd * groups) * ROWS
        row0 = bd * R + i0
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:
        j = j.to(tl.int64)
        c = c.to(tl.int64)
    return b, d, i0, row0, j, c, j < RW, c < C


@triton.jit
def _table_row(entry, stride_tk, FIRST: tl.constexpr, AXES: tl.constexpr):
    """``(depth, row, column)`` coordinates from ``AXES`` int64 table columns starting at
    column ``FIRST`` of the table row at ``entry``, loaded as scalars; a literal 0 for
    the axes a map of ``AXES`` axes lacks."""
    if AXES == 1:
        depth = 0
        row = 0
        column = tl.load(entry + FIRST * stride_tk)
    elif AXES == 2:
        depth = 0
        row = tl.load(entry + FIRST * stride_tk)
        column = tl.load(entry + (FIRST + 1) * stride_tk)
    else:
        depth = tl.load(entry + FIRST * stride_tk)
        row = tl.load(entry + (FIRST + 1) * stride_tk)
        column = tl.load(entry + (FIRST + 2) * stride_tk)
    return depth, row, column


@triton.jit
def _row_masks(i, R, j_mask, c_mask, ROWS: tl.constexpr):
    """Row ``i``'s column mask and ``(BLOCK_J, BLOCK_C)`` tile mask: ``j_mask``, off past
    the last row when a program copies several rows (the last group may be short;
    with one row the row always exists)."""
    row_mask = j_mask
    if ROWS > 1:
        row_mask = j_mask & (i < R)
    return row_mask, row_mask[:, None] & c_mask[None, :]


@triton.jit
def _in_patch(pd, py, px, j_mask, PATCH_D, PATCH_H, PATCH_W, AXES: tl.constexpr):
    """Which columns ``j`` of this row the position's patch covers: ``pd`` and ``py`` are
    the row's depth and row in the patch (scalars, tested only where the map has the
    axis), ``px`` each column's column in it."""
    inside = (px >= 0) & (px < PATCH_W) & j_mask
    if AXES >= 2:
        inside = inside & (py >= 0) & (py < PATCH_H)
    if AXES == 3:
        inside = inside & (pd >= 0) & (pd < PATCH_D)
    return inside


@triton.jit
def _load_row_tile(row_ptr, j, c, stride_j, stride_c, mask):
    """Load a ``(BLOCK_J, BLOCK_C)`` tile of one map row that starts at ``row_ptr``
    (an int64 scalar base); in-row offsets are ``j * stride_j + c * stride_c``."""
    return tl.load(row_ptr + (j[:, None] * stride_j + c[None, :] * stride_c), mask=mask, other=0)


@triton.jit
def _store_row_tile(out_ptr, value, row, j, c, j_mask, c_mask, RW, C):
    """Store a tile into output row ``row``: the row starts at ``row * Rw * C`` (int64,
    overflows int32 for large batches) and is one contiguous run, channel fastest."""
    out_row = out_ptr + row * RW * C
    tl.store(out_row + (j[:, None] * C + c[None, :]), value,
             mask=j_mask[:, None] & c_mask[None, :])


# ---------------------------------------------------------------------------
# Launch geometry
# ---------------------------------------------------------------------------

def as_volume(tensor: Tensor) -> Tensor:
    """``(N, C, *S)`` with 1 to 3 spatial axes viewed as ``(N, C, D, H, W)``: unit axes in
    front of the spatial ones (no copy)."""
    while tensor.dim() < 5:
        tensor = tensor.unsqueeze(2)
    return tensor


def volume_size(size: Sequence[int]) -> tuple[int, int, int]:
    """1 to 3 spatial sizes as ``(D, H, W)``, unit sizes in front."""
    depth, height, width = (1,) * (MAX_AXES - len(size)) + tuple(size)
    return depth, height, width


class RowLaunch:
    """Output, grid and tile of one launch over the rows of a channels-last output
    ``(B, C, *window)``, under the current launch config."""

    def __init__(self, batch: int, channels: int, window: tuple[int, ...], like: Tensor,
                 config: Optional[LaunchConfig] = None):
        self.config = config if config is not None else current_launch_config()
        self.axes = len(window)
        depth, height, width = volume_size(window)
        self.block_j, self.block_c = block_sizes(channels, width, self.config)
        self.rows = rows_per_program(height, self.block_j, self.block_c, self.config)
        self.grid = (batch * depth * triton.cdiv(height, self.rows),
                     triton.cdiv(width, self.block_j), triton.cdiv(channels, self.block_c))
        if self.grid[0] > INT32_MAX:
            raise ValueError(f"{batch} positions of {depth * height} rows need {self.grid[0]} "
                             f"programs, more than one launch takes ({INT32_MAX}); "
                             "use a smaller batch")
        self.num_warps = num_warps(self.block_j, self.block_c, self.config)
        self.out = channels_last_empty(batch, channels, window, like)
        self.empty = self.out.numel() == 0

    def wide(self, *row_strides: tuple[int, int]) -> bool:
        """Whether an in-row offset ``j * stride_j + c * stride_c`` of some tensor can pass
        int32 for the tile's largest (masked) ``j`` and ``c`` (or the config asks for
        int64 offsets); ``row_strides`` are each read tensor's ``(stride_j, stride_c)``,
        the output's ``(C, 1)`` is included."""
        j_max = self.grid[1] * self.block_j - 1
        c_max = self.grid[2] * self.block_c - 1
        channels = self.out.shape[1]
        return self.config.wide_offsets or any(
            j_max * sj + c_max * sc > INT32_MAX for sj, sc in ((channels, 1), *row_strides))

    def kwargs(self, *row_strides: tuple[int, int]) -> dict:
        """AXES, block sizes, WIDE and launch options for the kernel call."""
        return dict(AXES=self.axes, ROWS=self.rows, BLOCK_J=self.block_j, BLOCK_C=self.block_c,
                    WIDE=self.wide(*row_strides), num_warps=self.num_warps)


def block_sizes(channels: int, width: int, config: LaunchConfig) -> tuple[int, int]:
    """``(BLOCK_J, BLOCK_C)`` for rows of ``width`` columns of ``channels`` channels:
    channels up to ``config.max_block_c``, the rest of ``config.tile_elements`` on
    columns, but no more than the row has. Both are powers of two; grid axes 1
    and 2 stay within CUDA's limit.

    Each distinct pair is a compile: BLOCK_J is at least ``_MIN_BLOCK_J`` so that
    narrow rows (small layers, where masked lanes cost little) share one shape.

    Example:
        >>> block_sizes(64, 20, LaunchConfig()), block_sizes(3, 224, LaunchConfig())
        ((32, 64), (256, 4))
    """
    tile = config.tile_elements
    block_c = min(triton.next_power_of_2(max(channels, 1)), config.max_block_c, tile)
    row = max(triton.next_power_of_2(max(width, 1)), _MIN_BLOCK_J)
    block_j = min(row, max(1, tile // block_c))
    # Grid axes 1 and 2 are limited to 65535 programs: only absurd sizes get here.
    block_j = max(block_j, triton.next_power_of_2(triton.cdiv(width, _MAX_GRID_YZ)))
    block_c = max(block_c, triton.next_power_of_2(triton.cdiv(channels, _MAX_GRID_YZ)))
    return block_j, block_c


def rows_per_program(height: int, block_j: int, block_c: int, config: LaunchConfig) -> int:
    """Rows of one ``(b, d)`` per program: as many as ``config.max_rows`` allows, the tile
    budget ``config.tile_elements`` holds and the window has, rounded down to a power
    of two (each value is a compile)."""
    rows = min(config.max_rows, config.tile_elements // (block_j * block_c), height)
    return 1 << (max(1, rows).bit_length() - 1)


def num_warps(block_j: int, block_c: int, config: LaunchConfig) -> int:
    """``config.num_warps``, fewer for a tile too small to give each thread
    ``_MIN_ELEMENTS_PER_THREAD`` elements (a power of two, at least 1)."""
    warps = config.num_warps
    while warps > 1 and block_j * block_c < warps * 32 * _MIN_ELEMENTS_PER_THREAD:
        warps //= 2
    return warps


# ---------------------------------------------------------------------------
# Input checks: one-line TypeError (wrong type or dtype) or ValueError (shape, device)
# ---------------------------------------------------------------------------

def check_tensor(name: str, tensor: object) -> Tensor:
    """Raise unless ``tensor`` is a tensor."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    return tensor


def check_float(name: str, tensor: Tensor) -> None:
    """Raise unless ``tensor`` has one of the kernels' float dtypes."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} dtype must be one of {FLOAT_DTYPES}, got {tensor.dtype}")


def check_map(name: str, tensor: Tensor) -> int:
    """Raise unless ``tensor`` is a float map of one image, ``(1, C, *S)`` with 1 to 3
    spatial axes; returns the number of spatial axes."""
    check_tensor(name, tensor)
    if not 3 <= tensor.dim() <= 2 + MAX_AXES or tensor.shape[0] != 1:
        raise ValueError(f"{name} must have shape (1, C, *spatial) with 1 to {MAX_AXES} "
                         f"spatial axes, got {tuple(tensor.shape)}")
    check_float(name, tensor)
    return tensor.dim() - 2


def check_index(name: str, index: Tensor, columns: int, device: torch.device) -> None:
    """Raise unless ``index`` is an int64 ``(B, columns)`` tensor on ``device``."""
    check_tensor(name, index)
    if index.dim() != 2 or index.shape[1] != columns:
        raise ValueError(f"{name} must have shape (B, {columns}), got {tuple(index.shape)}")
    if index.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {index.dtype}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the data is on {device}")


def check_patch(patch: Tensor, batch: int, stored: Tensor) -> Tensor:
    """Raise unless ``patch`` is ``(batch, C, *P)`` with ``stored``'s channels and spatial
    axes, on its device; returns it in ``stored``'s dtype (strides kept: the kernels
    read any layout)."""
    check_tensor("patch", patch)
    axes, channels = stored.dim() - 2, stored.shape[1]
    if patch.dim() != stored.dim() or patch.shape[0] != batch or patch.shape[1] != channels:
        raise ValueError(f"patch must have shape ({batch}, {channels}) + {axes} patch sizes, "
                         f"got {tuple(patch.shape)}")
    check_float("patch", patch)
    if patch.device != stored.device:
        raise ValueError(f"patch is on {patch.device} but stored is on {stored.device}")
    return patch.to(stored.dtype)


def check_sizes(sizes: Sequence[int], axes: int, name: str = "window") -> tuple[int, ...]:
    """Raise unless ``sizes`` holds ``axes`` non-negative integers; returns python ints."""
    try:
        if len(sizes) != axes or any(isinstance(s, bool) for s in sizes):
            raise TypeError
        ints = tuple(operator.index(s) for s in sizes)
    except TypeError:
        raise ValueError(f"{name} must be {axes} non-negative ints (one per spatial axis), "
                         f"got {sizes!r}") from None
    if min(ints, default=0) < 0:
        raise ValueError(f"{name} must be {axes} non-negative ints (one per spatial axis), "
                         f"got {sizes!r}")
    return ints
