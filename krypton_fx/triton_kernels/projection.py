"""Projection to full size (Algorithm 2), 1 to 3 spatial axes: the stored
activation with each position's patch written in. Runs before the first global
op. The torch version is :func:`~krypton_fx.triton_kernels.reference.project_to_full_torch`.
"""

from __future__ import annotations

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
    volume_size,
)
from .ahead import launch as launch_kernel

# Kept importable from here, where it used to live (callers and tests patch this name).
from .reference import project_to_full_torch  # noqa: F401

__all__ = ["project_to_full_triton"]


# Same launch geometry as the gather (see _common.py): one program per ROWS output
# rows of one (position, depth), a (BLOCK_J, BLOCK_C) tile of each row's columns and
# channels. Map and patch sizes only enter scalar math and compares: not
# specialising on them saves a compile per layer; strides and C stay specialised
# (vectorisation).
@triton.jit(do_not_specialize=["D", "H", "W", "PATCH_D", "PATCH_H", "PATCH_W",
                               "stride_tb", "stride_tk"])
def _project_to_full_kernel(
    out_ptr,        # (B, D, H, W, C) output, contiguous: channels-last (B, C, D, H, W)
    stored_ptr,     # (1, C, D, H, W) stored activation, any strides
    patch_ptr,      # (B, C, d, h, w) patches, any strides
    starts_ptr,     # int64 (B, AXES) patch start in the map
    C,              # channels
    D,              # map depth (1 below 3 axes)
    H,              # map height (1 for 1 axis)
    W,              # map width
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
    stride_tb,      # starts stride along B
    stride_tk,      # starts stride along its columns
    AXES: tl.constexpr,       # spatial axes of the map: 1, 2 or 3
    BLOCK_J: tl.constexpr,    # map columns per program
    BLOCK_C: tl.constexpr,    # channels per program
    ROWS: tl.constexpr,       # rows per program
    WIDE: tl.constexpr,       # int64 in-row offsets (see _common._row_tile)
):
    b, d, i0, row0, j, c, j_mask, c_mask = _row_tile(D, H, W, C, AXES, ROWS, BLOCK_J, BLOCK_C,
                                                     WIDE)

    # The window is the whole map (start 0), so the patch offset is its start;
    # read once per program, as scalars.
    start_d, start_y, start_x = _table_row(starts_ptr + b * stride_tb, stride_tk, 0, AXES)
    px = j - start_x                        # column in the patch: a test per j
    pd = d - start_d                        # depth in the patch: one scalar test

    for r in tl.static_range(ROWS):
        i = i0 + r
        row_mask, tile_mask = _row_masks(i, H, j_mask, c_mask, ROWS)
        py = i - start_y                    # row in the patch: one scalar test
        in_patch = _in_patch(pd, py, px, row_mask, PATCH_D, PATCH_H, PATCH_W, AXES)

        stored_row = stored_ptr + i * stride_sh
        if AXES == 3:
            stored_row += d * stride_sd
        value = _load_row_tile(stored_row, j, c, stride_sw, stride_sc,
                               tile_mask & ~in_patch[:, None])
        from_patch = in_patch[:, None] & c_mask[None, :]
        patch_row = patch_ptr + b * stride_pb + py * stride_ph - start_x * stride_pw
        if AXES == 3:
            patch_row += pd * stride_pd
        patch_value = _load_row_tile(patch_row, j, c, stride_pw, stride_pc, from_patch)
        value = tl.where(from_patch, patch_value, value)

        _store_row_tile(out_ptr, value, row0 + r, j, c, row_mask, c_mask, W, C)


def project_to_full_triton(stored: Tensor, patch: Tensor, starts: Tensor) -> Tensor:
    """Triton projection to full size; same contract as
    :func:`~krypton_fx.triton_kernels.reference.project_to_full_torch`, for 1 to 3
    spatial axes.

    A gather whose window is the whole map: one program copies a
    ``(BLOCK_J, BLOCK_C)`` tile of one output row ``(b, d, i)`` of the channels-last
    output, reading the patch where it covers the element and ``stored``
    elsewhere. Patch elements outside the map are dropped, as in the torch
    version.

    Args:
        stored: ``(1, C, *S)`` activation with N = 1, 2 or 3 spatial axes,
            float32/float16/bfloat16, any memory format.
        patch: ``(B, C, *P)`` patches of any layout; cast to ``stored``'s dtype.
        starts: int64 ``(B, N)`` patch start in the map.

    Returns:
        ``(B, C, *S)`` channels-last tensor of ``stored``'s dtype.

    Raises:
        ValueError: on a wrong shape or a device mismatch.
        TypeError: on a wrong type or dtype.

    Example (on CUDA, or on the CPU under ``TRITON_INTERPRET=1``):
        >>> out = project_to_full_triton(torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 1, 2),
        ...                              torch.tensor([[2, 1]]))  # doctest: +SKIP
        >>> out[0, 0].tolist()  # doctest: +SKIP
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    """
    axes = check_map("stored", stored)
    check_index("starts", starts, axes, stored.device)
    batch, channels = starts.shape[0], stored.shape[1]
    patch = check_patch(patch, batch, stored)
    launch = RowLaunch(batch, channels, tuple(stored.shape[2:]), stored)
    if launch.empty:
        return launch.out
    stored_v, patch_v = as_volume(stored), as_volume(patch)
    launch_kernel(
        _project_to_full_kernel, launch.grid, launch.out, stored_v, patch_v, starts,
        channels, *volume_size(stored.shape[2:]), *volume_size(patch.shape[2:]),
        *stored_v.stride()[1:],
        *patch_v.stride(),
        starts.stride(0), starts.stride(1),
        **launch.kwargs((stored_v.stride(4), stored_v.stride(1)),
                        (patch_v.stride(4), patch_v.stride(1))),
    )
    return launch.out
