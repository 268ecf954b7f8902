"""Gather with superimposition (Algorithm 1, lines 4-8), 1 to 3 spatial axes.

For every occlusion position ``b``, copy a read-in window out of the stored
activation of the unoccluded image and overlay that position's incoming patch::

    out[b, :, i] = patch[b, :, i - o[b]]    if 0 <= i_d - o_d[b] < P_d on every axis d
                 = stored[0, :, w[b] + i]   otherwise

``stored`` is padded by the caller so that every window lies inside it. Patch
elements that fall outside the window are dropped (a strided op does not read
them). The result is channels-last: the convolution that follows reads it as
is. The torch version is :func:`~krypton_fx.triton_kernels.reference.gather_window_torch`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    RowLaunch,
    _in_patch,
    _load_row_tile,
    _row_masks,
    _row_tile,
    _store_row_tile,
    _table_row,
    as_volume,
    check_index,
    check_map,
    check_patch,
    check_sizes,
    volume_size,
)
from .ahead import launch as launch_kernel

# Kept importable from here, where it used to live (callers and tests patch this name).
from .reference import gather_window_torch  # noqa: F401

__all__ = ["gather_window_triton"]


# Window and patch sizes differ per layer and only enter scalar math and
# compares: not specialising on them saves a compile per layer. Strides and C
# stay specialised, their divisibility lets loads and stores vectorise.
@triton.jit(do_not_specialize=["D", "R", "RW", "PATCH_D", "PATCH_H", "PATCH_W",
                               "stride_tb", "stride_tk"])
def _gather_window_kernel(
    out_ptr,        # (B, D, R, Rw, C) output, contiguous: channels-last (B, C, D, R, Rw)
    stored_ptr,     # (1, C, Ds, Hs, Ws) stored activation, any strides
    patch_ptr,      # (B, C, d, h, w) incoming patches, any strides; unused without HAS_PATCH
    table_ptr,      # int64 (B, 2 * AXES) rows [window start..., patch offset...]
    C,              # channels
    D,              # window depth (1 below 3 axes)
    R,              # window height (1 for 1 axis)
    RW,             # window width
    PATCH_D,        # patch depth d
    PATCH_H,        # patch height h
    PATCH_W,        # patch width w
    stride_sc,      # stored stride along C
    stride_sd,      # stored stride along D (unused below 3 axes)
    stride_sh,      # stored stride along H (unused for 1 axis)
    stride_sw,      # stored stride along W
    stride_pb,      # patch stride along B
    stride_pc,      # patch stride along C
    stride_pd,      # patch stride along d (unused below 3 axes)
    stride_ph,      # patch stride along h (unused for 1 axis)
    stride_pw,      # patch stride along w
    stride_tb,      # table stride along B
    stride_tk,      # table stride along its columns
    AXES: tl.constexpr,       # spatial axes of the map: 1, 2 or 3
    HAS_PATCH: tl.constexpr,  # False: plain gather, no overlay
    BLOCK_J: tl.constexpr,    # window columns per program
    BLOCK_C: tl.constexpr,    # channels per program
    ROWS: tl.constexpr,       # rows per program
    WIDE: tl.constexpr,       # int64 in-row offsets (see _common._row_tile)
):
    b, d, i0, row0, j, c, j_mask, c_mask = _row_tile(D, R, RW, C, AXES, ROWS, BLOCK_J, BLOCK_C,
                                                     WIDE)

    # The position's table row, once per program, as scalars.
    entry = table_ptr + b * stride_tb
    win_d, win_y, win_x = _table_row(entry, stride_tk, 0, AXES)
    if HAS_PATCH:
        off_d, off_y, off_x = _table_row(entry, stride_tk, AXES, AXES)
        px = j - off_x                           # column in the patch: a test per j
        pd = d - off_d                           # depth in the patch: one scalar test

    for r in tl.static_range(ROWS):
        i = i0 + r
        row_mask, tile_mask = _row_masks(i, R, j_mask, c_mask, ROWS)
        if HAS_PATCH:
            py = i - off_y                       # row in the patch: one scalar test
            in_patch = _in_patch(pd, py, px, row_mask, PATCH_D, PATCH_H, PATCH_W, AXES)
        else:
            in_patch = j < 0  # all False

        # Patch elements win; stored is only read where no patch covers the element.
        # Row bases are int64 scalars; along the row the offsets are j*stride + c*stride.
        stored_row = stored_ptr + (win_y + i) * stride_sh + win_x * stride_sw
        if AXES == 3:
            stored_row += (win_d + d) * stride_sd
        value = _load_row_tile(stored_row, j, c, stride_sw, stride_sc,
                               tile_mask & ~in_patch[:, None])
        if HAS_PATCH:
            from_patch = in_patch[:, None] & c_mask[None, :]
            patch_row = patch_ptr + b * stride_pb + py * stride_ph - off_x * stride_pw
            if AXES == 3:
                patch_row += pd * stride_pd
            patch_value = _load_row_tile(patch_row, j, c, stride_pw, stride_pc, from_patch)
            value = tl.where(from_patch, patch_value, value)

        _store_row_tile(out_ptr, value, row0 + r, j, c, row_mask, c_mask, RW, C)


def gather_window_triton(stored: Tensor, patch: Optional[Tensor], table: Tensor,
                         window: Sequence[int]) -> Tensor:
    """Triton gather-with-superimposition; same contract as
    :func:`~krypton_fx.triton_kernels.reference.gather_window_torch`, for 1 to 3 spatial axes.

    One program copies a ``(BLOCK_J, BLOCK_C)`` tile of one output row ``(b, d, i)``
    of the channels-last output: each element is read from the position's patch
    if the patch covers it, from ``stored`` otherwise. No host synchronisation:
    the table stays on the device.

    Args:
        stored: ``(1, C, *S)`` activation with N = 1, 2 or 3 spatial axes,
            float32/float16/bfloat16, any memory format, padded so every window is
            inside (not checked).
        patch: ``(B, C, *P)`` patches of any layout, or None; cast to ``stored``'s dtype.
        table: int64 ``(B, 2N)`` rows ``[w_0..w_{N-1}, o_0..o_{N-1}]``: window start in
            ``stored``, patch start relative to the window.
        window: ``N`` window sizes.

    Returns:
        ``(B, C, *window)`` channels-last tensor of ``stored``'s dtype (for one axis,
        strides ``(L*C, 1, C)``).

    Raises:
        ValueError: on a wrong shape or a device mismatch.
        TypeError: on a wrong type or dtype.

    Example (on CUDA, or on the CPU under ``TRITON_INTERPRET=1``):
        >>> stored = torch.zeros(1, 1, 4, 4)
        >>> patch = torch.ones(1, 1, 2, 2)
        >>> table = torch.tensor([[1, 1, 1, 0]])
        >>> out = gather_window_triton(stored, patch, table, (3, 3))  # doctest: +SKIP
        >>> out[0, 0].tolist()  # doctest: +SKIP
        [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    """
    axes = check_map("stored", stored)
    check_index("table", table, 2 * axes, stored.device)
    window = check_sizes(window, axes)
    batch, channels = table.shape[0], stored.shape[1]
    if patch is not None:
        patch = check_patch(patch, batch, stored)
    launch = RowLaunch(batch, channels, window, stored)
    if launch.empty:
        return launch.out
    stored_v = as_volume(stored)
    row_strides = [(stored_v.stride(4), stored_v.stride(1))]
    if patch is not None:
        patch_v = as_volume(patch)
        patch_d, patch_h, patch_w = volume_size(patch.shape[2:])
        row_strides.append((patch_v.stride(4), patch_v.stride(1)))
    else:  # the kernel reads no patch: stored stands in
        patch_v, (patch_d, patch_h, patch_w) = stored_v, (0, 0, 0)
    launch_kernel(
        _gather_window_kernel, launch.grid, launch.out, stored_v, patch_v, table,
        channels, *volume_size(window), patch_d, patch_h, patch_w,
        *stored_v.stride()[1:],
        *patch_v.stride(),
        table.stride(0), table.stride(1),
        HAS_PATCH=patch is not None, **launch.kwargs(*row_strides),
    )
    return launch.out
