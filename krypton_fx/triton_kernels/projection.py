"""Projection to full size (Algorithm 2): the stored activation with each
position's patch written in. Runs before the first global op."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gather import (_tile_launch, _config, _store_tile, _tile_coords,
                     _check_index, _check_map, _check_patch, _overlay_rows)

__all__ = ["project_to_full_triton", "project_to_full_torch"]


# Map and patch sizes only enter divisions and compares: not specialising on them
# saves a compile per layer; strides and C stay specialised (vectorisation).
@triton.jit(do_not_specialize=["n_rows", "H", "W", "PATCH_H", "PATCH_W", "stride_tb",
                               "stride_tk"])
def _project_to_full_kernel(
    out_ptr,        # (B, H, W, C) output, contiguous: channels-last (B, C, H, W)
    stored_ptr,     # (1, C, H, W) stored activation, any strides
    patch_ptr,      # (B, C, h, w) patches, any strides
    starts_ptr,     # int64 (B, 2) patch top-left [y, x] in the map
    n_rows,         # B * H * W: output spatial elements
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
    BLOCK_P: tl.constexpr,    # output spatial elements per program
    BLOCK_C: tl.constexpr,    # channels per program
):
    rows, chans, row_mask, chan_mask, b, i, j = _tile_coords(n_rows, C, H, W, BLOCK_P, BLOCK_C)

    # The window is the whole map (start 0), so the patch offset is its start.
    py = i - tl.load(starts_ptr + b * stride_tb, mask=row_mask, other=0)
    px = j - tl.load(starts_ptr + b * stride_tb + stride_tk, mask=row_mask, other=0)
    in_patch = (py >= 0) & (py < PATCH_H) & (px >= 0) & (px < PATCH_W) & row_mask

    from_stored = (row_mask & ~in_patch)[:, None] & chan_mask[None, :]
    stored_off = (i * stride_sh + j * stride_sw)[:, None] + chans[None, :] * stride_sc
    value = tl.load(stored_ptr + stored_off, mask=from_stored, other=0)
    from_patch = in_patch[:, None] & chan_mask[None, :]
    patch_off = (b * stride_pb + py * stride_ph + px * stride_pw)[:, None] \
        + chans[None, :] * stride_pc
    patch_value = tl.load(patch_ptr + patch_off, mask=from_patch, other=0)
    value = tl.where(from_patch, patch_value, value)

    _store_tile(out_ptr, value, rows, chans, row_mask, chan_mask, C)


def project_to_full_triton(stored: Tensor, patch: Tensor, starts: Tensor) -> Tensor:
    """Triton projection to full size; same contract as :func:`project_to_full_torch`.

    A gather whose window is the whole map: one program copies a
    ``(BLOCK_P, BLOCK_C)`` tile of the channels-last output, reading the patch
    where it covers the element and ``stored`` elsewhere. Patch elements
    outside the map are dropped, as in the torch version.

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
    out, n_rows, grid, block_p, block_c = _tile_launch(batch, channels, (h_full, w_full), stored)
    if n_rows == 0 or channels == 0:
        return out
    _project_to_full_kernel[grid](
        out, stored, patch, starts,
        n_rows, channels, h_full, w_full, patch.shape[2], patch.shape[3],
        stored.stride(1), stored.stride(2), stored.stride(3),
        *patch.stride(),
        starts.stride(0), starts.stride(1),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_config.num_warps,
    )
    return out


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
