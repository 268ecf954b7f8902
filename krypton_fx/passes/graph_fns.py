"""The functions the incremental graph calls, besides the gather ops (``krypton_fx.ops``):
the patch of a colour, 1x1x1 convs as matrix products, sum pools, and the table
arithmetic of packed programs (several images per batch)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.profiler import record_function

__all__ = ["color_patch", "offset_first_axis", "whole_map_table", "pointwise_conv", "is_pointwise_3d",
           "sum_pool", "max_pool_channels_last"]


@fx.wrap
def color_patch(color: Tensor, positions: Tensor, patch: tuple[int, ...]) -> Tensor:
    """The occlusion patch itself, ``(B, C, *patch)``, for point ops on the image."""
    c = color.shape[0]
    return color.view(1, c, *(1,) * len(patch)).expand(positions.shape[0], c, *patch)


def offset_first_axis(table: Tensor, image: Tensor, extent: int) -> Tensor:
    """``table`` with ``image * extent`` added to each row's first column: the window's
    start in maps of several images stacked along their first spatial axis."""
    return torch.cat([table[:, :1] + (image * extent)[:, None], table[:, 1:]], 1)


def whole_map_table(offsets: Tensor, image: Tensor, extent: int) -> Tensor:
    """Gather table of each row's whole map out of maps stacked along their first spatial
    axis (``extent`` each): window start ``(image * extent, 0, ...)``, then the patch offsets."""
    starts = torch.cat([(image * extent)[:, None], torch.zeros_like(offsets[:, 1:])], 1)
    return torch.cat([starts, offsets], 1)


@fx.wrap
def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: tuple[int, ...]) -> Tensor:
    """A 1x1x1 convolution (no padding, no groups) as a matrix product over channels.

    PyTorch's CPU backend runs 1x1x1 ``conv3d`` through its slow im2col path
    (and copies a channels-last input first); on a channels-last map the same
    sum is one GEMM whose output is channels-last again, with no copy.
    """
    if any(s != 1 for s in stride):
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
    with record_function("krypton::pointwise_conv"):
        # The graph keeps maps channels-last (a no-op then): the GEMM's output is channels-last too.
        x = x.contiguous(memory_format=torch.channels_last_3d)
        return F.linear(x.movedim(1, -1), weight.flatten(1), bias).movedim(-1, 1)


def is_pointwise_3d(weight_shape, stride, padding, dilation, groups) -> bool:
    """A 3-D conv that :func:`pointwise_conv` computes: kernel 1, no padding, one group."""
    return (len(weight_shape) == 5 and all(k == 1 for k in weight_shape[2:]) and groups == 1
            and all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,))))


@fx.wrap
def sum_pool(window: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
    """Sum over each pooling window (no padding): an average pool with divisor 1.

    ``avg_pool1d`` has no ``divisor_override``: one spatial axis is pooled as a
    map one row high.
    """
    if len(kernel) == 1:
        return F.avg_pool2d(window.unsqueeze(2), (1, *kernel), (1, *stride), 0, False, True, 1).squeeze(2)
    pool = F.avg_pool3d if len(kernel) == 3 else F.avg_pool2d
    return pool(window, kernel, stride, 0, False, True, 1)


@fx.wrap
def max_pool_channels_last(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                           dilation: tuple[int, ...], ceil_mode: bool) -> Tensor:
    """A 2-D or 3-D max pool that runs a contiguous CPU map through a channels-last copy.

    The same values and layout as ``max_poolNd`` (a max rounds nothing, and the
    result is contiguous again), but PyTorch's CPU kernel for contiguous maps is
    slow: measured on one thread, ResNet18's 3x3 stem pool at 112x112 takes 7.9
    ms contiguous and 1.5 ms through the copy, VGG16's first 2x2 pool 24.6 and 14.3.
    The capture graph (each image's unoccluded pass) calls it for the model's max pools.
    """
    pool, layout = (F.max_pool3d, torch.channels_last_3d) if len(kernel) == 3 else (F.max_pool2d, torch.channels_last)
    if x.device.type != "cpu" or x.dim() != len(kernel) + 2 or not x.is_contiguous():
        return pool(x, kernel, stride, padding, dilation, ceil_mode)
    return pool(x.contiguous(memory_format=layout), kernel, stride, padding, dilation, ceil_mode).contiguous()
