"""The functions the incremental graph calls, besides the gather ops (``krypton_fx.ops``):
the patch of a colour, 1x1x1 convs as matrix products, sum pools, the table
arithmetic of packed programs (several images per batch), and the decoder's
windowed ops (crops of transposed convs, resampling by source taps)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.profiler import record_function

__all__ = ["color_patch", "offset_first_axis", "whole_map_table", "pointwise_conv", "is_pointwise_3d",
           "sum_pool", "max_pool_channels_last", "channels_last", "crop_box", "full_size_stand_in",
           "resample_window"]


def channels_last(ndim: int) -> torch.memory_format:
    """The channels-last memory format of maps with ``ndim`` spatial axes (contiguous for one)."""
    return {2: torch.channels_last, 3: torch.channels_last_3d}.get(ndim, torch.contiguous_format)


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


@fx.wrap
def full_size_stand_in(patch: Tensor, full: tuple[int, ...]) -> Tensor:
    """A tensor without storage (device ``meta``) of the whole map's shape, ``(B, C, *full)``,
    for shape queries (``x.shape[-2:]``) of a map the incremental graph holds as a patch."""
    return torch.empty((patch.shape[0], patch.shape[1], *full), dtype=patch.dtype, device="meta")


@fx.wrap
def crop_box(x: Tensor, crop: tuple[int, ...], size: tuple[int, ...]) -> Tensor:
    """``x[..., crop_d : crop_d + size_d]`` on every spatial axis, channels-last (a transposed
    conv's result on a window holds the box at the same offset for every position)."""
    if all(c == 0 for c in crop) and tuple(x.shape[2:]) == tuple(size):
        return x
    box = x[(slice(None), slice(None), *(slice(c, c + n) for c, n in zip(crop, size)))]
    return box.contiguous(memory_format=channels_last(len(size)))


def _row_index(batch: int, size: tuple[int, ...], index: Sequence[Optional[Tensor]],
               device: torch.device) -> Tensor:
    """Flat row (of a ``(batch * prod(size), C)`` row view) of every element of ``(batch, *out)``
    where ``out[d]`` reads ``index[d][b, j_d]`` (int64 ``(B, M_d)``) on the axes that have an
    index and ``j_d`` on the others; ``(batch, *out)`` int64."""
    n = len(size)
    out = tuple(size[d] if i is None else i.shape[1] for d, i in enumerate(index))
    rows = torch.arange(batch, device=device).view(batch, *(1,) * n) * math.prod(size)
    step = 1
    for d in reversed(range(n)):
        coord = torch.arange(size[d], device=device)[None] if index[d] is None else index[d]
        shape = [coord.shape[0]] + [1] * n
        shape[d + 1] = out[d]
        rows = rows + (coord * step).view(shape)
        step *= size[d]
    return rows


@fx.wrap
def resample_window(window: Tensor, table: Tensor, first: Sequence[Tensor], weight: Sequence[Optional[Tensor]],
                    size: tuple[int, ...], lerp: Sequence[bool] = ()) -> Tensor:
    """A resampling op (``F.interpolate``) on each position's window, by source taps
    (:class:`krypton_fx.geometry.AxisTaps`): box output ``j`` on axis ``d`` is
    ``sum_t weight[d][o, t] * window[first[d][o] + t - w_d]``, ``o = x_d + j``.

    Args:
        window: ``(B, C, *R)`` gathered windows.
        table: int64 ``(B, 2N)`` rows ``[x_0..x_{N-1}, w_0..w_{N-1}]``: the box's start in the
            op's output, the window's start in its input.
        first: per axis, int64 ``(O_d,)`` first source of each output.
        weight: per axis, ``(O_d, T_d)`` tap weights, or None where the op copies (nearest).
        size: the box, ``N`` sizes.
        lerp: per axis, whether its two taps weigh ``1 - w`` and ``w`` (linear modes): one
            ``torch.lerp`` instead of a multiply and a multiply-add.

    Returns:
        ``(B, C, *size)``, channels-last. Axes with one tap of weight 1 are copied in one
        row gather; the others are resampled one after another (shrinking axes first),
        each tap a row gather, weighed and summed in place on rows of channels (in the
        weights' dtype: float32 for half-precision maps, rounded once at the end).
    """
    with record_function("krypton::resample"):
        return _resample_rows(window, table, first, weight, size, lerp)


def _resample_rows(window: Tensor, table: Tensor, first: Sequence[Tensor], weight: Sequence[Optional[Tensor]],
                   size: tuple[int, ...], lerp: Sequence[bool]) -> Tensor:
    n, batch, channels, dev = len(size), window.shape[0], window.shape[1], window.device
    taps, scaled = [], []
    for d in range(n):
        o = table[:, d, None] + torch.arange(size[d], device=dev)  # (B, M_d) outputs
        taps.append(first[d][o] - table[:, n + d, None])  # their first source in the window
        scaled.append(None if weight[d] is None else weight[d][o])  # (B, M_d, T_d)
    rows = window.movedim(1, -1).reshape(-1, channels)  # no copy when the window is channels-last
    current = tuple(window.shape[2:])
    copied = [d for d in range(n) if scaled[d] is None]
    if copied:
        index = [taps[d] if d in copied else None for d in range(n)]
        rows = rows.index_select(0, _row_index(batch, current, index, dev).reshape(-1))
        current = tuple(size[d] if d in copied else current[d] for d in range(n))
    for d in sorted((d for d in range(n) if scaled[d] is not None), key=lambda d: size[d] / current[d]):
        out = current[:d] + (size[d],) + current[d + 1:]
        view = [batch] + [1] * n
        view[1 + d] = size[d]
        terms = [rows.index_select(0, _row_index(batch, current, [taps[d] + t if e == d else None for e in range(n)],
                                                 dev).reshape(-1)).to(scaled[d].dtype)  # half: in float32
                 for t in range(scaled[d].shape[2])]
        weights = [scaled[d][:, :, t].reshape(view).expand(batch, *out).reshape(-1, 1) for t in range(len(terms))]
        if lerp and lerp[d]:  # linear modes: w0 = 1 - w1, one pass instead of two
            rows = terms[0].lerp_(terms[1], weights[1])
        else:
            rows = terms[0].mul_(weights[0])
            for term, w in zip(terms[1:], weights[1:]):
                rows.addcmul_(term, w)
        current = out
    return rows.to(window.dtype).view(batch, *size, channels).movedim(-1, 1)
