"""Input occlusion: windows of the image with each position's patch colour
written in (the first node's input). With a full-size window it yields the
occluded image batch that naive occlusion runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gather import (_RowLaunch, _check_index, _check_map, _check_window, _in_patch,
                     _load_row_tile, _row_masks, _row_tile, _store_row_tile, gather_window_torch)

__all__ = ["occlude_window_triton", "occlude_window_torch"]


# Same launch geometry as the gather (see gather.py): one program per ROWS output
# rows of one position, a (BLOCK_J, BLOCK_C) tile of each row's columns and
# channels. Window and patch sizes only enter scalar math and compares: not
# specialising on them saves compiles; strides and C stay specialised
# (vectorisation).
@triton.jit(do_not_specialize=["R", "RW", "PATCH_H", "PATCH_W", "stride_tb", "stride_tk"])
def _occlude_window_kernel(
    out_ptr,        # (B, R, Rw, C) output, contiguous: channels-last (B, C, R, Rw)
    image_ptr,      # (1, C, Hs, Ws) image, any strides
    color_ptr,      # (C,) patch colour, contiguous, in the image's dtype
    table_ptr,      # int64 (B, 4) rows [win_y, win_x, off_y, off_x]
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
    BLOCK_J: tl.constexpr,    # window columns per program
    BLOCK_C: tl.constexpr,    # channels per program
    ROWS: tl.constexpr,       # rows per program
    WIDE: tl.constexpr,       # int64 in-row offsets (see gather._row_tile)
):
    b, i0, j, c, j_mask, c_mask = _row_tile(R, RW, C, ROWS, BLOCK_J, BLOCK_C, WIDE)

    # The position's table row, once per program, as scalars.
    entry = table_ptr + b * stride_tb
    win_y = tl.load(entry)
    win_x = tl.load(entry + stride_tk)
    off_y = tl.load(entry + 2 * stride_tk)
    px = j - tl.load(entry + 3 * stride_tk)       # column in the patch: a test per j
    color = tl.load(color_ptr + c, mask=c_mask, other=0)

    for r in tl.static_range(ROWS):
        i = i0 + r
        row_mask, tile_mask = _row_masks(i, R, j_mask, c_mask, ROWS)
        py = i - off_y                            # row in the patch: one scalar test
        in_patch = _in_patch(py, px, row_mask, PATCH_H, PATCH_W)

        # The image is only read where the patch does not cover the element.
        image_row = image_ptr + (win_y + i) * stride_ih + win_x * stride_iw
        value = _load_row_tile(image_row, j, c, stride_iw, stride_ic,
                               tile_mask & ~in_patch[:, None])
        value = tl.where(in_patch[:, None], color[None, :], value)

        _store_row_tile(out_ptr, value, b * R + i, j, c, row_mask, c_mask, RW, C)


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
    launch = _RowLaunch(batch, channels, (r, rw), image)
    if launch.empty:
        return launch.out
    _occlude_window_kernel[launch.grid](
        launch.out, image, color, table,
        channels, r, rw, patch_h, patch_w,
        image.stride(1), image.stride(2), image.stride(3),
        table.stride(0), table.stride(1),
        **launch.kwargs((image.stride(3), image.stride(1))),
    )
    return launch.out


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
