"""Projection to full size (Algorithm 2): the stored activation with each
position's patch written in. Runs before the first global op."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gather import (_RowLaunch, _check_index, _check_map, _check_patch, _in_patch,
                     _load_row_tile, _overlay_rows, _row_masks, _row_tile, _store_row_tile)

__all__ = ["project_to_full_triton", "project_to_full_torch"]


# Same launch geometry as the gather (see gather.py): one program per ROWS output
# rows of one position, a (BLOCK_J, BLOCK_C) tile of each row's columns and
# channels. Map and patch sizes only enter scalar math and compares: not
# specialising on them saves a compile per layer; strides and C stay specialised
# (vectorisation).
@triton.jit(do_not_specialize=["H", "W", "PATCH_H", "PATCH_W", "stride_tb", "stride_tk"])
def _project_to_full_kernel(
    out_ptr,        # (B, H, W, C) output, contiguous: channels-last (B, C, H, W)
    stored_ptr,     # (1, C, H, W) stored activation, any strides
    patch_ptr,      # (B, C, h, w) patches, any strides
    starts_ptr,     # int64 (B, 2) patch top-left [y, x] in the map
    C,              # channels
    H,              # map height
    W,              # map width
    PATCH_H,        # patch height h
    PATCH_W,        # patch width w
    stride_sc,      # stored stride along C
    stride_sh,      # stored stride along H
    stride_sw,      # stored stride along W
    stride_pb,      # patch stride along B
    stride_pc,      # patch stride along C
    stride_ph,      # patch stride along h
    stride_pw,      # patch stride along w
    stride_tb,      # starts stride along B
    stride_tk,      # starts stride along its 2 columns
    BLOCK_J: tl.constexpr,    # map columns per program
    BLOCK_C: tl.constexpr,    # channels per program
    ROWS: tl.constexpr,       # rows per program
    WIDE: tl.constexpr,       # int64 in-row offsets (see gather._row_tile)
):
    b, i0, j, c, j_mask, c_mask = _row_tile(H, W, C, ROWS, BLOCK_J, BLOCK_C, WIDE)

    # The window is the whole map (start 0), so the patch offset is its start;
    # read once per program, as scalars.
    entry = starts_ptr + b * stride_tb
    start_y = tl.load(entry)
    start_x = tl.load(entry + stride_tk)
    px = j - start_x                        # column in the patch: a test per j

    for r in tl.static_range(ROWS):
        i = i0 + r
        row_mask, tile_mask = _row_masks(i, H, j_mask, c_mask, ROWS)
        py = i - start_y                    # row in the patch: one scalar test
        in_patch = _in_patch(py, px, row_mask, PATCH_H, PATCH_W)

        stored_row = stored_ptr + i * stride_sh
        value = _load_row_tile(stored_row, j, c, stride_sw, stride_sc,
                               tile_mask & ~in_patch[:, None])
        from_patch = in_patch[:, None] & c_mask[None, :]
        patch_row = patch_ptr + b * stride_pb + py * stride_ph - start_x * stride_pw
        patch_value = _load_row_tile(patch_row, j, c, stride_pw, stride_pc, from_patch)
        value = tl.where(from_patch, patch_value, value)

        _store_row_tile(out_ptr, value, b * H + i, j, c, row_mask, c_mask, W, C)


def project_to_full_triton(stored: Tensor, patch: Tensor, starts: Tensor) -> Tensor:
    """Triton projection to full size; same contract as :func:`project_to_full_torch`.

    A gather whose window is the whole map: one program copies a
    ``(BLOCK_J, BLOCK_C)`` tile of one output row ``(b, i)`` of the channels-last
    output, reading the patch where it covers the element and ``stored``
    elsewhere. Patch elements outside the map are dropped, as in the torch
    version.

    Args:
        stored: ``(1, C, H, W)`` activation, float32/float16/bfloat16, any
            memory format.
        patch: ``(B, C, h, w)`` patches of any layout; cast to ``stored``'s dtype.
        starts: int64 ``(B, 2)`` patch top-left ``[y, x]``.

    Returns:
        ``(B, C, H, W)`` channels-last tensor of ``stored``'s dtype.

    Raises:
        ValueError: on a wrong shape or a device mismatch.
        TypeError: on a wrong dtype.

    Example (on CUDA, or on the CPU under ``TRITON_INTERPRET=1``):
        >>> out = project_to_full_triton(torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 1, 2),
        ...                              torch.tensor([[2, 1]]))  # doctest: +SKIP
        >>> out[0, 0].tolist()  # doctest: +SKIP
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    """
    _check_map("stored", stored)
    _check_index("starts", starts, 2, stored.device)
    _, channels, h_full, w_full = stored.shape
    batch = starts.shape[0]
    patch = _check_patch(patch, batch, channels, stored)
    launch = _RowLaunch(batch, channels, (h_full, w_full), stored)
    if launch.empty:
        return launch.out
    _project_to_full_kernel[launch.grid](
        launch.out, stored, patch, starts,
        channels, h_full, w_full, patch.shape[2], patch.shape[3],
        stored.stride(1), stored.stride(2), stored.stride(3),
        *patch.stride(),
        starts.stride(0), starts.stride(1),
        **launch.kwargs((stored.stride(3), stored.stride(1)), (patch.stride(3), patch.stride(1))),
    )
    return launch.out


def project_to_full_torch(stored: Tensor, patch: Tensor, starts: Tensor) -> Tensor:
    """Torch projection; also the kernel's reference.

    Args:
        stored: ``(1, C, H, W)`` activation of the unoccluded image.
        patch: ``(B, C, h, w)`` patches, inside the map.
        starts: int64 ``(B, 2)`` patch top-left ``[y, x]``.

    Returns:
        ``(B, C, H, W)`` channels-last.

    Example:
        >>> out = project_to_full_torch(torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 1, 2),
        ...                             torch.tensor([[2, 1]]))
        >>> out[0, 0].tolist()
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    """
    _, c, h_full, w_full = stored.shape
    batch = starts.shape[0]
    out = torch.empty(batch * h_full * w_full + 1, c, dtype=stored.dtype, device=stored.device)
    out[:-1].view(batch, h_full * w_full, c).copy_(
        stored.permute(0, 2, 3, 1).reshape(1, -1, c).expand(batch, -1, -1))
    table = torch.cat([torch.zeros_like(starts), starts], dim=1)
    src = patch.to(stored.dtype).permute(0, 2, 3, 1).reshape(-1, c)
    out.index_copy_(0, _overlay_rows(table, (h_full, w_full), tuple(patch.shape[-2:])), src)
    return out[:-1].view(batch, h_full, w_full, c).permute(0, 3, 1, 2)
