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
# Elements one program copies: enough work per program to hide latency, small
# enough that a (BLOCK_P, BLOCK_C) tile stays in registers.
_TILE_ELEMENTS = 4096
_MAX_BLOCK_C = 128
# Warps per program (bench/kernel_bandwidth.py sweeps this and the tile size).
_NUM_WARPS = 8


@triton.jit
def _tile_coords(n_rows, C, R, RW, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a channels-last ``(B, R, Rw, C)`` output, shared by all three
    kernels: output rows and channels, their masks, and each row's ``(b, i, j)``."""
    # int64 from the start: B * R * Rw * C overflows int32 for large batches.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    chans = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    area = R * RW  # small; rows is int64, so the divisions below are int64
    return rows, chans, rows < n_rows, chans < C, rows // area, (rows % area) // RW, rows % RW


@triton.jit
def _store_tile(out_ptr, value, rows, chans, row_mask, chan_mask, C):
    """Store a tile; channel is the fastest output axis, so stores are contiguous runs."""
    tl.store(out_ptr + rows[:, None] * C + chans[None, :], value,
             mask=row_mask[:, None] & chan_mask[None, :])


# Window and patch sizes differ per layer and only enter divisions and compares:
# not specialising on them saves a compile per layer. Strides and C stay
# specialised, their divisibility lets loads and stores vectorise.
@triton.jit(do_not_specialize=["n_rows", "R", "RW", "PATCH_H", "PATCH_W", "stride_tb",
                               "stride_tk"])
def _gather_window_kernel(
    out_ptr,        # (B, R, Rw, C) output, contiguous: channels-last (B, C, R, Rw)
    stored_ptr,     # (1, C, Hs, Ws) stored activation, any strides
    patch_ptr,      # (B, C, h, w) incoming patches, any strides; unused without HAS_PATCH
    table_ptr,      # int64 (B, 4) rows [win_y, win_x, off_y, off_x]
    n_rows,         # B * R * Rw: output spatial elements
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
    BLOCK_P: tl.constexpr,    # output spatial elements per program
    BLOCK_C: tl.constexpr,    # channels per program
):
    rows, chans, row_mask, chan_mask, b, i, j = _tile_coords(n_rows, C, R, RW, BLOCK_P, BLOCK_C)

    win_y = tl.load(table_ptr + b * stride_tb, mask=row_mask, other=0)
    win_x = tl.load(table_ptr + b * stride_tb + stride_tk, mask=row_mask, other=0)
    if HAS_PATCH:
        py = i - tl.load(table_ptr + b * stride_tb + 2 * stride_tk, mask=row_mask, other=0)
        px = j - tl.load(table_ptr + b * stride_tb + 3 * stride_tk, mask=row_mask, other=0)
        in_patch = (py >= 0) & (py < PATCH_H) & (px >= 0) & (px < PATCH_W) & row_mask
    else:
        py = i
        px = j
        in_patch = rows < 0  # all False

    # Patch elements win; stored is only read where no patch covers the element.
    from_stored = (row_mask & ~in_patch)[:, None] & chan_mask[None, :]
    stored_off = ((win_y + i) * stride_sh + (win_x + j) * stride_sw)[:, None] \
        + chans[None, :] * stride_sc
    value = tl.load(stored_ptr + stored_off, mask=from_stored, other=0)
    if HAS_PATCH:
        from_patch = in_patch[:, None] & chan_mask[None, :]
        patch_off = (b * stride_pb + py * stride_ph + px * stride_pw)[:, None] \
            + chans[None, :] * stride_pc
        patch_value = tl.load(patch_ptr + patch_off, mask=from_patch, other=0)
        value = tl.where(from_patch, patch_value, value)

    _store_tile(out_ptr, value, rows, chans, row_mask, chan_mask, C)


class _LaunchConfig:
    """Tile size and warps of all three kernels; one place, so a benchmark can sweep them."""

    tile_elements = _TILE_ELEMENTS
    num_warps = _NUM_WARPS


_config = _LaunchConfig()


def _tile_launch(batch: int, channels: int, window: tuple[int, int], like: Tensor):
    """Channels-last ``(B, C, R, Rw)`` output, row count, grid and block sizes of a launch."""
    r, rw = window
    out = torch.empty((batch, channels, r, rw), dtype=like.dtype, device=like.device,
                      memory_format=torch.channels_last)
    n_rows = batch * r * rw
    block_p, block_c = _block_sizes(channels)
    grid = (triton.cdiv(n_rows, block_p), triton.cdiv(channels, block_c))
    return out, n_rows, grid, block_p, block_c


def _block_sizes(channels: int) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_C)`` for a copy with ``channels`` channels: all channels in one
    program up to ``_MAX_BLOCK_C``, the rest of the tile spent on spatial elements."""
    block_c = min(triton.next_power_of_2(channels), _MAX_BLOCK_C)
    return max(16, _config.tile_elements // block_c), block_c


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

    One program copies a ``(BLOCK_P, BLOCK_C)`` tile of the channels-last output:
    each element is read from the position's patch if the patch covers it, from
    ``stored`` otherwise. No host synchronisation: the table stays on the device.

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
    out, n_rows, grid, block_p, block_c = _tile_launch(batch, channels, (r, rw), stored)
    if n_rows == 0 or channels == 0:
        return out
    has_patch = patch is not None
    patch_arg = patch if has_patch else stored
    patch_h, patch_w = patch.shape[-2:] if has_patch else (0, 0)
    _gather_window_kernel[grid](
        out, stored, patch_arg, table,
        n_rows, channels, r, rw, patch_h, patch_w,
        stored.stride(1), stored.stride(2), stored.stride(3),
        *patch_arg.stride(),
        table.stride(0), table.stride(1),
        HAS_PATCH=has_patch, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_config.num_warps,
    )
    return out


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
