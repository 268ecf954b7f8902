"""Gather with superimposition (Algorithm 1, lines 4-8).

For every occlusion position ``b``, copy a ``(R, Rw)`` read-in window out of the
stored activation of the unoccluded image and overlay that position's
incoming patch::

    out[b, :, i, j] = patch[b, :, i - off_y[b], j - off_x[b]]   if inside the patch
                    = stored[0, :, win_y[b] + i, win_x[b] + j]  otherwise

``stored`` is padded by the caller so that every window lies inside it. Patch
elements that fall outside the window are dropped (a strided op does not read
them). The result is channels-last: the convolution that follows reads it
as is.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["gather_window_triton", "gather_window_torch"]

# Dtypes the kernels copy; the output keeps the stored activation's dtype.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch geometry shared by the three kernels
# -------------------------------------------
# One output row ``(b, i)`` of a channels-last ``(B, R, Rw, C)`` output is one
# contiguous run of ``Rw * C`` elements. The grid is
#
#     axis 0: b * cdiv(R, ROWS) + g   ROWS rows i = g*ROWS .. g*ROWS + ROWS-1 of position b
#                                     (decoded once, as scalars)
#     axis 1: blocks of BLOCK_J       columns j of those rows
#     axis 2: blocks of BLOCK_C       channels c
#
# and a program copies, row after row (an unrolled loop), a ``(BLOCK_J, BLOCK_C)``
# tile built from two aranges: no per-element integer division, the position's
# table row is read once as scalars, and the overlay test is a scalar row test
# plus a per-j column test. ROWS is 1 by default (one program per row); more
# rows fill a program whose row tile is small, at the cost of registers
# (`_config.max_rows`, swept by bench/kernel_bandwidth.py).
#
# Channel blocks are a third grid axis, not a loop inside the program: each
# program then issues all its loads at once (a runtime loop over channel blocks
# would, unless the compiler pipelines it, wait for one tile's loads before the
# next), all programs are independent, and narrow layers still get many
# programs to keep the GPU full. The cost, re-reading the table row's four
# scalars per channel block, is a few cached loads.
# The axis is short (C / BLOCK_C, 1 for C <= BLOCK_C), well within the 65535
# limit of grid axes 1 and 2; axis 0 (about B * R) may go up to 2**31 - 1.
#
# Defaults: 4096 elements (16 KiB of float32) per program, 8 warps (16 elements,
# four 128-bit vectors of float32, per thread). Why 8 warps: compiled for sm_90
# (`python -m krypton_fx.triton_kernels.codegen`), a 16x256 tile with 4 warps
# takes 64 registers in float32 (half the SM's warp slots) and spills 24 bytes in
# float16/bfloat16; with 8 warps every kernel needs 26-32 registers, fills all
# 64 warp slots and spills nothing. And on an H200 the earlier, flat kernels ran
# fastest with 8 warps in all five bandwidth cases. These kernels' bandwidth is
# UNMEASURED on a GPU: `bash bench/gpu_check.sh` (or `python
# bench/kernel_bandwidth.py --sweep`) measures it and the alternatives in SWEEP.
_TILE_ELEMENTS = 4096
# Widest channel block: the rest of the tile goes to the row's columns.
_MAX_BLOCK_C = 256
# Fewest columns per tile (fewer tile shapes, so fewer compiles; see _block_sizes).
_MIN_BLOCK_J = 8
_NUM_WARPS = 8
# Most rows of one position per program (a power of two); the tile budget and
# the window's height may give fewer. 1: one program per row, as measured so far.
_MAX_ROWS = 1
# Elements per thread below which a small tile gets fewer warps (idle threads
# in a program only cost occupancy).
_MIN_ELEMENTS_PER_THREAD = 8
_MAX_GRID_YZ = 65535  # CUDA limit of grid axes 1 and 2
_INT32_MAX = 2**31 - 1


@triton.jit
def _row_tile(R, RW, C, ROWS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
              WIDE: tl.constexpr):
    """This program's tiles of a channels-last ``(B, R, Rw, C)`` output, shared by all
    three kernels: the position ``b`` and its first row ``i0`` (int64 scalars, one
    division per program; the program copies rows ``i0 .. i0 + ROWS - 1``), the
    tile's columns ``j`` and channels ``c`` and their masks.

    ``j`` and ``c`` are int32 (cheaper address math) unless ``WIDE``: only offsets
    inside one row of one image are formed from them, and the launcher sets
    ``WIDE`` when those can pass 2**31. Everything that scales with the batch
    (row * Rw * C, b * patch batch stride) goes into int64 scalar bases instead.
    """
    group = tl.program_id(0).to(tl.int64)
    groups = tl.cdiv(R, ROWS)  # row groups of one position; R itself when ROWS == 1
    b = group // groups
    i0 = (group - b * groups) * ROWS
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:
        j = j.to(tl.int64)
        c = c.to(tl.int64)
    return b, i0, j, c, j < RW, c < C


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
def _in_patch(py, px, j_mask, PATCH_H, PATCH_W):
    """Which columns ``j`` of this row the position's patch covers: ``py`` is the
    row's row in the patch (a scalar), ``px`` each column's column in it."""
    return (px >= 0) & (px < PATCH_W) & j_mask & (py >= 0) & (py < PATCH_H)


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


# Window and patch sizes differ per layer and only enter scalar math and
# compares: not specialising on them saves a compile per layer. Strides and C
# stay specialised, their divisibility lets loads and stores vectorise.
@triton.jit(do_not_specialize=["R", "RW", "PATCH_H", "PATCH_W", "stride_tb", "stride_tk"])
def _gather_window_kernel(
    out_ptr,        # (B, R, Rw, C) output, contiguous: channels-last (B, C, R, Rw)
    stored_ptr,     # (1, C, Hs, Ws) stored activation, any strides
    patch_ptr,      # (B, C, h, w) incoming patches, any strides; unused without HAS_PATCH
    table_ptr,      # int64 (B, 4) rows [win_y, win_x, off_y, off_x]
    C,              # channels
    R,              # window height
    RW,             # window width
    PATCH_H,        # patch height h
    PATCH_W,        # patch width w
    stride_sc,      # stored stride along C
    stride_sh,      # stored stride along H
    stride_sw,      # stored stride along W
    stride_pb,      # patch stride along B
    stride_pc,      # patch stride along C
    stride_ph,      # patch stride along h
    stride_pw,      # patch stride along w
    stride_tb,      # table stride along B
    stride_tk,      # table stride along its 4 columns
    HAS_PATCH: tl.constexpr,  # False: plain gather, no overlay
    BLOCK_J: tl.constexpr,    # window columns per program
    BLOCK_C: tl.constexpr,    # channels per program
    ROWS: tl.constexpr,       # rows per program
    WIDE: tl.constexpr,       # int64 in-row offsets (see _row_tile)
):
    b, i0, j, c, j_mask, c_mask = _row_tile(R, RW, C, ROWS, BLOCK_J, BLOCK_C, WIDE)

    # The position's table row, once per program, as scalars.
    entry = table_ptr + b * stride_tb
    win_y = tl.load(entry)
    win_x = tl.load(entry + stride_tk)
    if HAS_PATCH:
        off_y = tl.load(entry + 2 * stride_tk)
        off_x = tl.load(entry + 3 * stride_tk)
        px = j - off_x                           # column in the patch: a test per j

    for r in tl.static_range(ROWS):
        i = i0 + r
        row_mask, tile_mask = _row_masks(i, R, j_mask, c_mask, ROWS)
        if HAS_PATCH:
            py = i - off_y                       # row in the patch: one scalar test
            in_patch = _in_patch(py, px, row_mask, PATCH_H, PATCH_W)
        else:
            in_patch = j < 0  # all False

        # Patch elements win; stored is only read where no patch covers the element.
        # Row bases are int64 scalars; along the row the offsets are j*stride + c*stride.
        stored_row = stored_ptr + (win_y + i) * stride_sh + win_x * stride_sw
        value = _load_row_tile(stored_row, j, c, stride_sw, stride_sc,
                               tile_mask & ~in_patch[:, None])
        if HAS_PATCH:
            from_patch = in_patch[:, None] & c_mask[None, :]
            patch_row = patch_ptr + b * stride_pb + py * stride_ph - off_x * stride_pw
            patch_value = _load_row_tile(patch_row, j, c, stride_pw, stride_pc, from_patch)
            value = tl.where(from_patch, patch_value, value)

        _store_row_tile(out_ptr, value, b * R + i, j, c, row_mask, c_mask, RW, C)


class _LaunchConfig:
    """Tile size, widest channel block and warps of all three kernels; one place,
    so a benchmark can sweep them."""

    tile_elements = _TILE_ELEMENTS
    max_block_c = _MAX_BLOCK_C
    num_warps = _NUM_WARPS
    max_rows = _MAX_ROWS


_config = _LaunchConfig()


class _RowLaunch:
    """Output, grid and tile of one launch over the rows of a channels-last output."""

    def __init__(self, batch: int, channels: int, window: tuple[int, int], like: Tensor):
        r, rw = window
        self.out = torch.empty((batch, channels, r, rw), dtype=like.dtype, device=like.device,
                               memory_format=torch.channels_last)
        self.block_j, self.block_c = _block_sizes(channels, rw)
        self.rows = _rows_per_program(r, self.block_j, self.block_c)
        self.grid = (batch * triton.cdiv(r, self.rows), triton.cdiv(rw, self.block_j),
                     triton.cdiv(channels, self.block_c))
        self.num_warps = _num_warps(self.block_j, self.block_c)
        self.empty = self.out.numel() == 0

    def wide(self, *row_strides: tuple[int, int]) -> bool:
        """Whether an in-row offset ``j * stride_j + c * stride_c`` of some tensor can pass
        int32 for the tile's largest (masked) ``j`` and ``c``; ``row_strides`` are each read
        tensor's ``(stride_j, stride_c)``, the output's ``(C, 1)`` is included."""
        j_max = self.grid[1] * self.block_j - 1
        c_max = self.grid[2] * self.block_c - 1
        channels = self.out.shape[1]
        return any(j_max * sj + c_max * sc > _INT32_MAX
                   for sj, sc in ((channels, 1), *row_strides))

    def kwargs(self, *row_strides: tuple[int, int]) -> dict:
        """Block sizes, WIDE and launch options for the kernel call."""
        return dict(ROWS=self.rows, BLOCK_J=self.block_j, BLOCK_C=self.block_c,
                    WIDE=self.wide(*row_strides), num_warps=self.num_warps)


def _block_sizes(channels: int, width: int) -> tuple[int, int]:
    """``(BLOCK_J, BLOCK_C)`` for rows of ``width`` columns of ``channels`` channels:
    channels up to ``_config.max_block_c``, the rest of ``_config.tile_elements`` on
    columns, but no more than the row has. Both are powers of two; grid axes 1
    and 2 stay within CUDA's limit.

    Each distinct pair is a compile: BLOCK_J is at least ``_MIN_BLOCK_J`` so that
    narrow rows (small layers, where masked lanes cost little) share one shape.
    """
    tile = max(1, _config.tile_elements)
    block_c = min(triton.next_power_of_2(max(channels, 1)), _config.max_block_c, tile)
    row = max(triton.next_power_of_2(max(width, 1)), _MIN_BLOCK_J)
    block_j = min(row, max(1, tile // block_c))
    # Grid axes 1 and 2 are limited to 65535 programs: only absurd sizes get here.
    block_j = max(block_j, triton.next_power_of_2(triton.cdiv(width, _MAX_GRID_YZ)))
    block_c = max(block_c, triton.next_power_of_2(triton.cdiv(channels, _MAX_GRID_YZ)))
    return block_j, block_c


def _rows_per_program(height: int, block_j: int, block_c: int) -> int:
    """Rows of one position per program: as many as ``_config.max_rows`` allows, the
    tile budget ``_config.tile_elements`` holds and the window has, rounded down to a
    power of two (each value is a compile)."""
    rows = min(_config.max_rows, _config.tile_elements // (block_j * block_c), height)
    return 1 << (max(1, rows).bit_length() - 1)


def _num_warps(block_j: int, block_c: int) -> int:
    """``_config.num_warps``, fewer for a tile too small to give each thread
    ``_MIN_ELEMENTS_PER_THREAD`` elements (a power of two, at least 1)."""
    warps = max(1, _config.num_warps)
    while warps > 1 and block_j * block_c < warps * 32 * _MIN_ELEMENTS_PER_THREAD:
        warps //= 2
    return warps


def _check_map(name: str, tensor: Tensor) -> None:
    """Raise unless ``tensor`` is a 4-D float map of one image, ``(1, C, H, W)``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() != 4 or tensor.shape[0] != 1:
        raise ValueError(f"{name} must have shape (1, C, H, W), got {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} dtype must be one of {FLOAT_DTYPES}, got {tensor.dtype}")


def _check_index(name: str, index: Tensor, columns: int, device: torch.device) -> None:
    """Raise unless ``index`` is an int64 ``(B, columns)`` tensor on ``device``."""
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(index).__name__}")
    if index.dim() != 2 or index.shape[1] != columns:
        raise ValueError(f"{name} must have shape (B, {columns}), got {tuple(index.shape)}")
    if index.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {index.dtype}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the data is on {device}")


def _check_patch(patch: Tensor, batch: int, channels: int, stored: Tensor) -> Tensor:
    """Raise unless ``patch`` is ``(batch, channels, h, w)`` on ``stored``'s device;
    returns it in ``stored``'s dtype (strides kept: the kernel reads any layout)."""
    if not isinstance(patch, Tensor):
        raise TypeError(f"patch must be a tensor, got {type(patch).__name__}")
    if patch.dim() != 4 or patch.shape[0] != batch or patch.shape[1] != channels:
        raise ValueError(f"patch must have shape ({batch}, {channels}, h, w), "
                         f"got {tuple(patch.shape)}")
    if patch.dtype not in FLOAT_DTYPES:
        raise TypeError(f"patch dtype must be one of {FLOAT_DTYPES}, got {patch.dtype}")
    if patch.device != stored.device:
        raise ValueError(f"patch is on {patch.device} but stored is on {stored.device}")
    return patch.to(stored.dtype)


def _check_window(window: tuple[int, int], name: str = "window") -> tuple[int, int]:
    """Raise unless ``window`` is a pair of non-negative integers; returns python ints."""
    try:
        if len(window) != 2 or any(isinstance(s, bool) for s in window):
            raise TypeError
        pair = (operator.index(window[0]), operator.index(window[1]))
    except TypeError:
        raise ValueError(f"{name} must be a pair of non-negative ints, got {window!r}") from None
    if min(pair) < 0:
        raise ValueError(f"{name} must be a pair of non-negative ints, got {window!r}")
    return pair


def gather_window_triton(stored: Tensor, patch: Optional[Tensor], table: Tensor,
                         window: tuple[int, int]) -> Tensor:
    """Triton gather-with-superimposition; same contract as :func:`gather_window_torch`.

    One program copies a ``(BLOCK_J, BLOCK_C)`` tile of one output row ``(b, i)``
    of the channels-last output: each element is read from the position's patch
    if the patch covers it, from ``stored`` otherwise. No host synchronisation:
    the table stays on the device.

    Args:
        stored: ``(1, C, Hs, Ws)`` activation, float32/float16/bfloat16, any
            memory format, padded so every window is inside (not checked).
        patch: ``(B, C, h, w)`` patches of any layout, or None; cast to
            ``stored``'s dtype.
        table: int64 ``(B, 4)`` rows ``[win_y, win_x, off_y, off_x]``.
        window: ``(R, Rw)``.

    Returns:
        ``(B, C, R, Rw)`` channels-last tensor of ``stored``'s dtype.

    Raises:
        ValueError: on a wrong shape or a device mismatch.
        TypeError: on a wrong dtype.

    Example (on CUDA, or on the CPU under ``TRITON_INTERPRET=1``):
        >>> stored = torch.zeros(1, 1, 4, 4)
        >>> patch = torch.ones(1, 1, 2, 2)
        >>> table = torch.tensor([[1, 1, 1, 0]])
        >>> out = gather_window_triton(stored, patch, table, (3, 3))  # doctest: +SKIP
        >>> out[0, 0].tolist()  # doctest: +SKIP
        [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    """
    _check_map("stored", stored)
    _check_index("table", table, 4, stored.device)
    r, rw = _check_window(window)
    batch, channels = table.shape[0], stored.shape[1]
    if patch is not None:
        patch = _check_patch(patch, batch, channels, stored)
    launch = _RowLaunch(batch, channels, (r, rw), stored)
    if launch.empty:
        return launch.out
    has_patch = patch is not None
    patch_arg = patch if has_patch else stored
    patch_h, patch_w = patch.shape[-2:] if has_patch else (0, 0)
    row_strides = [(stored.stride(3), stored.stride(1))]
    if has_patch:
        row_strides.append((patch.stride(3), patch.stride(1)))
    _gather_window_kernel[launch.grid](
        launch.out, stored, patch_arg, table,
        channels, r, rw, patch_h, patch_w,
        stored.stride(1), stored.stride(2), stored.stride(3),
        *patch_arg.stride(),
        table.stride(0), table.stride(1),
        HAS_PATCH=has_patch, **launch.kwargs(*row_strides),
    )
    return launch.out


def _window_rows(table: Tensor, window: tuple[int, int], width: int) -> Tensor:
    """Flat row index into ``stored`` (as ``(Hs*Ws, C)`` rows) of every window element."""
    dev = table.device
    iy = torch.arange(window[0], device=dev)
    ix = torch.arange(window[1], device=dev)
    rows = (table[:, 0:1] + iy) * width  # (B, R)
    cols = table[:, 1:2] + ix            # (B, Rw)
    return (rows[:, :, None] + cols[:, None, :]).reshape(-1)


def _overlay_rows(table: Tensor, window: tuple[int, int], patch_hw: tuple[int, int]) -> Tensor:
    """Flat row index into the output of every patch element; one past the end where clipped."""
    dev = table.device
    batch = table.shape[0]
    r, rw = window
    py = table[:, 2:3] + torch.arange(patch_hw[0], device=dev)  # (B, h) rows in the window
    px = table[:, 3:4] + torch.arange(patch_hw[1], device=dev)  # (B, w)
    inside = ((py >= 0) & (py < r))[:, :, None] & ((px >= 0) & (px < rw))[:, None, :]
    base = torch.arange(batch, device=dev)[:, None, None] * (r * rw)
    dst = base + py[:, :, None] * rw + px[:, None, :]
    return torch.where(inside, dst, batch * r * rw).reshape(-1)


def gather_window_torch(stored: Tensor, patch: Optional[Tensor], table: Tensor,
                        window: tuple[int, int]) -> Tensor:
    """Torch gather-with-superimposition; also the kernel's reference.

    Args:
        stored: ``(1, C, Hs, Ws)`` activation of the unoccluded image, padded so
            every window is inside. Channels-last avoids a copy per call.
        patch: ``(B, C, h, w)`` incoming patches, or None for a plain gather.
        table: int64 ``(B, 4)`` rows ``[win_y, win_x, off_y, off_x]``: window
            top-left in ``stored``, patch top-left relative to the window.
        window: ``(R, Rw)``.

    Returns:
        ``(B, C, R, Rw)`` channels-last tensor of ``stored``'s dtype.

    Example:
        >>> stored = torch.zeros(1, 1, 4, 4)
        >>> patch = torch.ones(1, 1, 2, 2)
        >>> out = gather_window_torch(stored, patch, torch.tensor([[1, 1, 1, 0]]), (3, 3))
        >>> out[0, 0].tolist()
        [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    """
    _, c, _, ws = stored.shape
    batch = table.shape[0]
    r, rw = window
    rows = stored.permute(0, 2, 3, 1).reshape(-1, c)
    # One spare row receives every clipped patch element.
    out = torch.empty(batch * r * rw + 1, c, dtype=stored.dtype, device=stored.device)
    torch.index_select(rows, 0, _window_rows(table, window, ws), out=out[:-1])
    if patch is not None:
        h, w = patch.shape[-2:]
        src = patch.to(stored.dtype).permute(0, 2, 3, 1).reshape(-1, c)
        out.index_copy_(0, _overlay_rows(table, window, (h, w)), src)
    return out[:-1].view(batch, r, rw, c).permute(0, 3, 1, 2)
