"""Input occlusion, 1 to 3 spatial axes: windows of the image with each position's
occlusion patch applied (the first node's input). With a full-size window it
yields the occluded image batch that naive occlusion runs.

Inside the patch an element becomes ``color[c]`` (plain replacement), or, with a
``weight`` profile and/or a per-position ``scale``, ``image * w + color[c]`` with
``w = weight[c, i - o] * scale[b]``: MONAI's gaussian mode is a ``weight`` and
colour 0, its mean_patch mode a ``scale`` and colour 0. A *segment* (feature
ablation) changes only the elements of the patch whose label in ``ids`` is the row's
``segment[b]``, to a ``baseline`` image's value or the colour. The torch version is
:func:`~krypton_fx.triton_kernels.reference.occlude_window_torch`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
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
    check_sizes,
    check_tensor,
    volume_size,
)
from .ahead import launch as launch_kernel

# Kept importable from here, where it used to live (callers and tests patch this name).
from .reference import occlude_window_torch  # noqa: F401

__all__ = ["occlude_window_triton"]

# How a weight profile covers the channels (the kernel's WEIGHT constexpr).
_NO_WEIGHT, _WEIGHT_PER_CHANNEL, _WEIGHT_SHARED = 0, 1, 2


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to nearest-even in ``dtype``, as torch's ``.to(dtype)`` rounds.

    bfloat16 is rounded on the bits (torch's own formula; NaN stays NaN): the
    interpreter's float32-to-bfloat16 cast truncates, so the cast would be exact on
    the GPU and wrong in the tests. The GPU's cast gives the same result.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x == x, bits + ((bits >> 16) & 1) + 0x7FFF, 0x7FC00000)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        rounded = x.to(dtype)
    return rounded


# Same launch geometry as the gather (see _common.py): one program per ROWS output
# rows of one (position, depth), a (BLOCK_J, BLOCK_C) tile of each row's columns
# and channels. Window and patch sizes only enter scalar math and compares: not
# specialising on them saves compiles; strides and C stay specialised
# (vectorisation).
@triton.jit(do_not_specialize=["D", "R", "RW", "PATCH_D", "PATCH_H", "PATCH_W",
                               "stride_tb", "stride_tk"])
def _occlude_window_kernel(
    out_ptr,        # (B, D, R, Rw, C) output, contiguous: channels-last (B, C, D, R, Rw)
    image_ptr,      # (1, C, Ds, Hs, Ws) image, any strides
    color_ptr,      # (C,) patch colour, contiguous: the image's dtype, float32 if weighted
    table_ptr,      # int64 (B, 2 * AXES) rows [window start..., patch offset...]
    weight_ptr,     # float32 (C or 1, d, h, w) weight profile; unused without WEIGHT
    scale_ptr,      # float32 (B,) factor per position; unused without HAS_SCALE
    ids_ptr,        # int64 (1, C or 1, Ds, Hs, Ws) segment labels; unused without SEGMENT
    segment_ptr,    # int64 (B,) the segment each row ablates; unused without SEGMENT
    baseline_ptr,   # (1, C, Ds, Hs, Ws) baseline image, image dtype; unused without BASELINE
    C,              # channels
    D,              # window depth (1 below 3 axes)
    R,              # window height (1 for 1 axis)
    RW,             # window width
    PATCH_D,        # occlusion patch depth d
    PATCH_H,        # occlusion patch height h
    PATCH_W,        # occlusion patch width w
    stride_ic,      # image stride along C
    stride_id,      # image stride along D (unused below 3 axes)
    stride_ih,      # image stride along H (unused for 1 axis)
    stride_iw,      # image stride along W
    stride_wc,      # weight stride along C (unused unless WEIGHT is per channel)
    stride_wd,      # weight stride along d
    stride_wh,      # weight stride along h
    stride_ww,      # weight stride along w
    stride_sb,      # scale stride along B
    stride_mc,      # ids stride along C (0 for a one-row mask: the same label for every channel)
    stride_md,      # ids stride along D
    stride_mh,      # ids stride along H
    stride_mw,      # ids stride along W
    stride_gb,      # segment stride along B
    stride_bc,      # baseline stride along C
    stride_bd,      # baseline stride along D
    stride_bh,      # baseline stride along H
    stride_bw,      # baseline stride along W
    stride_tb,      # table stride along B
    stride_tk,      # table stride along its columns
    AXES: tl.constexpr,       # spatial axes of the image: 1, 2 or 3
    WEIGHT: tl.constexpr,     # 0: no weight; 1: one profile per channel; 2: one for all
    HAS_SCALE: tl.constexpr,  # multiply by scale[b]
    SEGMENT: tl.constexpr,    # only where ids == segment[b] (not with WEIGHT or HAS_SCALE)
    BASELINE: tl.constexpr,   # a segment's elements take the baseline image, not the colour
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
    off_d, off_y, off_x = _table_row(entry, stride_tk, AXES, AXES)
    px = j - off_x                                # column in the patch: a test per j
    pd = d - off_d                                # depth in the patch: one scalar test
    color = tl.load(color_ptr + c, mask=c_mask, other=0)
    if HAS_SCALE:
        position_scale = tl.load(scale_ptr + b * stride_sb)
    if SEGMENT:
        segment = tl.load(segment_ptr + b * stride_gb)

    for r in tl.static_range(ROWS):
        i = i0 + r
        row_mask, tile_mask = _row_masks(i, R, j_mask, c_mask, ROWS)
        py = i - off_y                            # row in the patch: one scalar test
        in_patch = _in_patch(pd, py, px, row_mask, PATCH_D, PATCH_H, PATCH_W, AXES)
        image_row = image_ptr + (win_y + i) * stride_ih + win_x * stride_iw
        if AXES == 3:
            image_row += (win_d + d) * stride_id

        if SEGMENT:
            # Replacement where the label is the row's segment: the labels are read only in
            # the patch, the image only where the segment does not cover it.
            ids_row = ids_ptr + (win_y + i) * stride_mh + win_x * stride_mw
            if AXES == 3:
                ids_row += (win_d + d) * stride_md
            labels = _load_row_tile(ids_row, j, c, stride_mw, stride_mc, tile_mask & in_patch[:, None])
            hit = in_patch[:, None] & (labels == segment)
            value = _load_row_tile(image_row, j, c, stride_iw, stride_ic, tile_mask & ~hit)
            if BASELINE:
                baseline_row = baseline_ptr + (win_y + i) * stride_bh + win_x * stride_bw
                if AXES == 3:
                    baseline_row += (win_d + d) * stride_bd
                fill = _load_row_tile(baseline_row, j, c, stride_bw, stride_bc, tile_mask & hit)
            else:
                fill = color[None, :]
            value = tl.where(hit, fill, value)
        elif WEIGHT == 0 and not HAS_SCALE:
            # Plain replacement: the image is only read where the patch does not cover it.
            value = _load_row_tile(image_row, j, c, stride_iw, stride_ic,
                                   tile_mask & ~in_patch[:, None])
            value = tl.where(in_patch[:, None], color[None, :], value)
        else:
            # image * (weight * scale) + color in float32, rounded once: the torch
            # reference's order (the launch turns off FMA contraction, so it stays exact).
            value = _load_row_tile(image_row, j, c, stride_iw, stride_ic, tile_mask)
            weight_row = weight_ptr + py * stride_wh - off_x * stride_ww
            if AXES == 3:
                weight_row += pd * stride_wd
            if WEIGHT == 1:
                factor = _load_row_tile(weight_row, j, c, stride_ww, stride_wc,
                                        in_patch[:, None] & c_mask[None, :])
                if HAS_SCALE:
                    factor = factor * position_scale
            elif WEIGHT == 2:
                factor = tl.load(weight_row + j * stride_ww, mask=in_patch, other=0)[:, None]
                if HAS_SCALE:
                    factor = factor * position_scale
            else:
                factor = position_scale
            occluded = value.to(tl.float32) * factor + color[None, :]
            value = tl.where(in_patch[:, None], _round_to(occluded, out_ptr.dtype.element_ty),
                             value)

        _store_row_tile(out_ptr, value, row0 + r, j, c, row_mask, c_mask, RW, C)


def _check_factor(name: str, factor: Tensor, shapes: list[tuple[int, ...]],
                  device: torch.device) -> Tensor:
    """Raise unless ``factor`` is a floating tensor of one of ``shapes`` on ``device``;
    returns it as float32 (the kernel's arithmetic)."""
    check_tensor(name, factor)
    if tuple(factor.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, "
                         f"got {tuple(factor.shape)}")
    if not factor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {factor.dtype}")
    if factor.device != device:
        raise ValueError(f"{name} is on {factor.device} but the image is on {device}")
    return factor.to(torch.float32)


def _check_segment(image: Tensor, table: Tensor, weighted: bool, ids: Optional[Tensor],
                   segment: Optional[Tensor], baseline: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's ``ids``, ``segment`` and ``baseline`` arguments, checked: volumes of the
    image's shape (a one-row mask's channel stride 0), ``(B,)`` int64 ids; where there is no
    segment, the table stands in (never read)."""
    if ids is None:
        if segment is not None or baseline is not None:
            raise ValueError("segment= and baseline= need ids= (a segment's labels)")
        return table, table[:, 0], table
    if weighted:
        raise ValueError("a segment takes no weight= or scale=")
    check_tensor("ids", ids)
    channels, spatial = image.shape[1], tuple(image.shape[2:])
    if ids.dim() != image.dim() or ids.shape[0] != 1 or ids.shape[1] not in (1, channels) \
            or tuple(ids.shape[2:]) != spatial:
        raise ValueError(f"ids must have shape (1, 1 or {channels}, *{spatial}), got {tuple(ids.shape)}")
    if ids.dtype != torch.int64:
        raise TypeError(f"ids must be int64, got {ids.dtype}")
    if segment is None:
        raise ValueError("ids= needs segment= (one id per row)")
    check_index("segment", segment.unsqueeze(1), 1, image.device)
    if segment.numel() != table.shape[0]:
        raise ValueError(f"segment must have {table.shape[0]} ids (one per row), got {segment.numel()}")
    if ids.device != image.device:
        raise ValueError(f"ids is on {ids.device} but the image is on {image.device}")
    ids_v = as_volume(ids).expand(1, channels, *as_volume(ids).shape[2:])
    if baseline is None:
        return ids_v, segment, image
    check_tensor("baseline", baseline)
    if tuple(baseline.shape) != tuple(image.shape):
        raise ValueError(f"baseline must have the image's shape {tuple(image.shape)}, got {tuple(baseline.shape)}")
    if baseline.device != image.device:
        raise ValueError(f"baseline is on {baseline.device} but the image is on {image.device}")
    return ids_v, segment, as_volume(baseline.to(image.dtype))


def occlude_window_triton(image: Tensor, color: Tensor, table: Tensor, window: Sequence[int],
                          patch_size: Sequence[int], weight: Optional[Tensor] = None,
                          scale: Optional[Tensor] = None, ids: Optional[Tensor] = None,
                          segment: Optional[Tensor] = None, baseline: Optional[Tensor] = None) -> Tensor:
    """Triton input occlusion; same contract as
    :func:`~krypton_fx.triton_kernels.reference.occlude_window_torch`, for 1 to 3
    spatial axes.

    A gather whose patch is computed, never materialised: each covered element
    takes ``color[c]``, or ``image * w + color[c]`` with a weight profile and/or scale.

    Args:
        image: ``(1, C, *S)`` image with N = 1, 2 or 3 spatial axes,
            float32/float16/bfloat16, any memory format, padded so every window is
            inside (not checked).
        color: ``C`` patch colour values (any shape with ``C`` elements, on the
            image's device); cast to the image's dtype (to float32 when weighted).
        table: int64 ``(B, 2N)`` ``[w_0..w_{N-1}, o_0..o_{N-1}]``.
        window: ``N`` window sizes.
        patch_size: ``N`` occlusion patch sizes.
        weight: floating ``(C, *patch_size)`` or ``(1, *patch_size)`` profile, or None.
        scale: floating ``(B,)`` factor per position, or None.
        ids: int64 ``(1, C or 1, *S)`` segment labels laid out as the image (padded alike),
            or None; with ``segment``, int64 ``(B,)``: a segment per row.
        baseline: ``(1, C, *S)`` baseline image of the image's dtype (padded alike), or None.

    Returns:
        ``(B, C, *window)`` channels-last tensor of the image's dtype.

    Raises:
        ValueError: on a wrong shape or a device mismatch.
        TypeError: on a wrong type or dtype.

    Example (on CUDA, or on the CPU under ``TRITON_INTERPRET=1``):
        >>> table = torch.tensor([[0, 0, 0, 0]])
        >>> out = occlude_window_triton(torch.ones(1, 1, 3, 3), torch.zeros(1), table,
        ...                             (3, 3), (2, 2))  # doctest: +SKIP
        >>> out[0, 0].tolist()  # doctest: +SKIP
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    """
    axes = check_map("image", image)
    check_index("table", table, 2 * axes, image.device)
    window = check_sizes(window, axes)
    patch_size = check_sizes(patch_size, axes, "patch_size")
    batch, channels = table.shape[0], image.shape[1]
    check_tensor("color", color)
    if color.numel() != channels:
        raise ValueError(f"color must have {channels} values, got shape {tuple(color.shape)}")
    if color.device != image.device:
        raise ValueError(f"color is on {color.device} but the image is on {image.device}")
    weighted = weight is not None or scale is not None
    ids_arg, segment_arg, baseline_arg = _check_segment(image, table, weighted, ids, segment, baseline)
    color = color.reshape(channels).to(torch.float32 if weighted else image.dtype).contiguous()
    weight_mode = _NO_WEIGHT
    if weight is not None:
        weight = _check_factor("weight", weight, [(channels, *patch_size), (1, *patch_size)],
                               image.device)
        weight_mode = _WEIGHT_PER_CHANNEL if weight.shape[0] == channels else _WEIGHT_SHARED
        if channels == 1:
            weight_mode = _WEIGHT_SHARED  # one channel: the same profile, loaded per column
    if scale is not None:
        scale = _check_factor("scale", scale, [(batch,)], image.device)
    launch = RowLaunch(batch, channels, window, image)
    if launch.empty:
        return launch.out
    image_v = as_volume(image)
    # Without a weight or scale the kernel never reads them: the colour stands in.
    weight_arg = as_volume(weight[None])[0] if weight is not None else color
    weight_strides = weight_arg.stride() if weight is not None else (0, 0, 0, 0)
    scale_arg = scale if scale is not None else color
    launch_kernel(
        _occlude_window_kernel, launch.grid, launch.out, image_v, color, table, weight_arg, scale_arg,
        ids_arg, segment_arg, baseline_arg,
        channels, *volume_size(window), *volume_size(patch_size),
        *image_v.stride()[1:],
        *weight_strides,
        scale_arg.stride(0),
        *(ids_arg.stride()[1:] if ids is not None else (0, 0, 0, 0)),
        segment_arg.stride(0),
        *(baseline_arg.stride()[1:] if baseline is not None else (0, 0, 0, 0)),
        table.stride(0), table.stride(1),
        WEIGHT=weight_mode, HAS_SCALE=scale is not None, SEGMENT=ids is not None,
        BASELINE=baseline is not None, enable_fp_fusion=False,
        **launch.kwargs((image_v.stride(4), image_v.stride(1))),
    )
    return launch.out
