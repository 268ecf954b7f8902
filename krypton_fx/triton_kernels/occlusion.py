"""Input occlusion: windows of the image with each position's patch colour
written in (the first node's input). With a full-size window it yields the
occluded image batch that naive occlusion runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gather import (_tile_launch, _config, _store_tile, _tile_coords,
                     _check_index, _check_map, _check_window, gather_window_torch)

__all__ = ["occlude_window_triton", "occlude_window_torch"]


# Window and patch sizes only enter divisions and compares: not specialising on
# them saves compiles; strides and C stay specialised (vectorisation).
@triton.jit(do_not_specialize=["n_rows", "R", "RW", "PATCH_H", "PATCH_W", "stride_tb",
                               "stride_tk"])
def _occlude_window_kernel(
    out_ptr,        # (B, R, Rw, C) output, contiguous: channels-last (B, C, R, Rw)
    image_ptr,      # (1, C, Hs, Ws) image, any strides
    color_ptr,      # (C,) patch colour, contiguous, in the image's dtype
    table_ptr,      # int64 (B, 4) rows [win_y, win_x, off_y, off_x]
    n_rows,         # B * R * Rw: output spatial elements
    C,              # channels
    R,              # window height
    RW,             # window width
    PATCH_H,        # occlusion patch height h
    PATCH_W,        # occlusion patch width w
    stride_ic,      # image stride along C
    stride_ih,      # image stride along H
    stride_iw,      # image stride along W
    stride_tb,      # table stride along B
    stride_tk,      # table stride along its 4 columns
    BLOCK_P: tl.constexpr,    # output spatial elements per program
    BLOCK_C: tl.constexpr,    # channels per program
):
    rows, chans, row_mask, chan_mask, b, i, j = _tile_coords(n_rows, C, R, RW, BLOCK_P, BLOCK_C)

    win_y = tl.load(table_ptr + b * stride_tb, mask=row_mask, other=0)
    win_x = tl.load(table_ptr + b * stride_tb + stride_tk, mask=row_mask, other=0)
    py = i - tl.load(table_ptr + b * stride_tb + 2 * stride_tk, mask=row_mask, other=0)
    px = j - tl.load(table_ptr + b * stride_tb + 3 * stride_tk, mask=row_mask, other=0)
    in_patch = (py >= 0) & (py < PATCH_H) & (px >= 0) & (px < PATCH_W) & row_mask

    # The image is only read where the patch does not cover the element.
    from_image = (row_mask & ~in_patch)[:, None] & chan_mask[None, :]
    image_off = ((win_y + i) * stride_ih + (win_x + j) * stride_iw)[:, None] \
        + chans[None, :] * stride_ic
    value = tl.load(image_ptr + image_off, mask=from_image, other=0)
    color = tl.load(color_ptr + chans, mask=chan_mask, other=0)
    value = tl.where(in_patch[:, None], color[None, :], value)

    _store_tile(out_ptr, value, rows, chans, row_mask, chan_mask, C)


def occlude_window_triton(image: Tensor, color: Tensor, table: Tensor, window: tuple[int, int],
                          patch_hw: tuple[int, int]) -> Tensor:
    """Triton input occlusion; same contract as :func:`occlude_window_torch`.

    A gather whose patch is the constant colour: the patch is never
    materialised, each covered element takes ``color[c]``.

    Args:
        image: ``(1, C, Hs, Ws)`` image, float32/float16/bfloat16, any memory
            format, padded so every window is inside (not checked).
        color: ``C`` patch colour values (any shape with ``C`` elements, on the
            image's device); cast to the image's dtype.
        table: int64 ``(B, 4)`` ``[win_y, win_x, off_y, off_x]``.
        window: ``(R, Rw)``.
        patch_hw: occlusion patch ``(h, w)``.

    Returns:
        ``(B, C, R, Rw)`` channels-last tensor of the image's dtype.

    Raises:
        ValueError: on a wrong shape or a device mismatch.
        TypeError: on a wrong dtype.

    Example (on CUDA, or on the CPU under ``TRITON_INTERPRET=1``):
        >>> table = torch.tensor([[0, 0, 0, 0]])
        >>> out = occlude_window_triton(torch.ones(1, 1, 3, 3), torch.zeros(1), table,
        ...                             (3, 3), (2, 2))  # doctest: +SKIP
        >>> out[0, 0].tolist()  # doctest: +SKIP
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    """
    _check_map("image", image)
    _check_index("table", table, 4, image.device)
    r, rw = _check_window(window)
    patch_h, patch_w = _check_window(patch_hw, "patch_hw")
    batch, channels = table.shape[0], image.shape[1]
    if not isinstance(color, Tensor):
        raise TypeError(f"color must be a tensor, got {type(color).__name__}")
    if color.numel() != channels:
        raise ValueError(f"color must have {channels} values, got shape {tuple(color.shape)}")
    if color.device != image.device:
        raise ValueError(f"color is on {color.device} but the image is on {image.device}")
    color = color.reshape(channels).to(image.dtype).contiguous()
    out, n_rows, grid, block_p, block_c = _tile_launch(batch, channels, (r, rw), image)
    if n_rows == 0 or channels == 0:
        return out
    _occlude_window_kernel[grid](
        out, image, color, table,
        n_rows, channels, r, rw, patch_h, patch_w,
        image.stride(1), image.stride(2), image.stride(3),
        table.stride(0), table.stride(1),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_config.num_warps,
    )
    return out


def occlude_window_torch(image: Tensor, color: Tensor, table: Tensor, window: tuple[int, int],
                         patch_hw: tuple[int, int]) -> Tensor:
    """Torch input occlusion; also the kernel's reference.

    Args:
        image: ``(1, C, Hs, Ws)`` image, padded so every window is inside.
        color: ``(C,)`` patch colour.
        table: int64 ``(B, 4)`` ``[win_y, win_x, off_y, off_x]`` as for
            :func:`gather_window_torch`.
        window: ``(R, Rw)``.
        patch_hw: occlusion patch ``(h, w)``.

    Example:
        >>> out = occlude_window_torch(torch.ones(1, 1, 3, 3), torch.zeros(1),
        ...                            torch.tensor([[0, 0, 0, 0]]), (3, 3), (2, 2))
        >>> out[0, 0].tolist()
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    """
    batch, c = table.shape[0], image.shape[1]
    patch = color.to(image.dtype).view(1, c, 1, 1).expand(batch, c, *patch_hw)
    return gather_window_torch(image, patch, table, window)
