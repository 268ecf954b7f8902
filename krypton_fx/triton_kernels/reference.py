"""Torch implementations of the gather, projection and occlusion ops.

They are the CPU backend and the references the Triton kernels are tested
against, for any number N of spatial axes (the kernels take N = 1, 2, 3). No
Triton import: the package runs on machines without it.

Every op copies rows of channels: a map ``(1, C, *S)`` is read as ``prod(S)`` rows
of ``C`` values (a copy unless it is channels-last), the output is written as
``B * prod(window)`` rows, and the index of every row is computed for the whole
batch at once (no Python loop over positions; one small loop over the axes).
Outputs are channels-last: memory ordered ``(B, *spatial, C)``, which is
``torch.channels_last`` for 2 spatial axes, ``torch.channels_last_3d`` for 3, and
strides ``(L*C, 1, C)`` for 1.

Tables: ``table`` is int64 ``(B, 2N)``, columns ``[w_0..w_{N-1}, o_0..o_{N-1}]``:
the window's start in the stored map (pre-padded so every window is inside) and
the patch's start relative to the window (any integer: patch elements outside
the window are dropped).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["gather_window_torch", "project_to_full_torch", "occlude_window_torch",
           "channels_last_empty"]


def channels_last_empty(batch: int, channels: int, spatial: Sequence[int], like: Tensor) -> Tensor:
    """Uninitialised ``(batch, channels, *spatial)`` tensor of ``like``'s dtype and device,
    laid out channels-last: memory ordered ``(batch, *spatial, channels)``.

    Example:
        >>> out = channels_last_empty(2, 3, (4, 5), torch.zeros(1))
        >>> out.shape, out.is_contiguous(memory_format=torch.channels_last)
        (torch.Size([2, 3, 4, 5]), True)
    """
    return torch.empty((batch, *spatial, channels), dtype=like.dtype,
                       device=like.device).movedim(-1, 1)


def _channel_rows(tensor: Tensor) -> Tensor:
    """``(N, C, *S)`` as ``(N * prod(S), C)``: one row of channels per element."""
    return tensor.movedim(1, -1).reshape(-1, tensor.shape[1])


def _row_major_strides(size: Sequence[int]) -> list[int]:
    """Strides of a row-major array of ``size`` (in rows)."""
    strides, step = [], 1
    for extent in reversed(size):
        strides.append(step)
        step *= extent
    return strides[::-1]


def _grid_index(starts: Tensor, size: Sequence[int], strides: Sequence[int],
                clamp: Optional[Sequence[int]] = None) -> Tensor:
    """``(B, *size)`` flat index ``sum_d (starts[b, d] + k_d) * strides[d]`` of every element
    of a box of ``size`` starting at each row of ``starts`` (int64 ``(B, N)``); with
    ``clamp``, each coordinate is first clamped into ``[0, clamp[d])``."""
    batch, n = starts.shape[0], len(size)
    index = torch.zeros((batch,) + (1,) * n, dtype=torch.int64, device=starts.device)
    for d, extent in enumerate(size):
        coord = starts[:, d, None] + torch.arange(extent, device=starts.device)  # (B, extent)
        if clamp is not None:
            coord = coord.clamp(0, max(clamp[d] - 1, 0))
        shape = [batch] + [1] * n
        shape[d + 1] = extent
        index = index + (coord * strides[d]).view(shape)
    return index.expand(batch, *size)


def _box_offsets(size: tuple[int, ...], strides: tuple[int, ...], device: torch.device) -> Tensor:
    """``(prod(size),)`` flat index ``sum_d k_d * strides[d]`` of every element of a box of
    ``size``, row-major: the same for every position. (Made per call, not cached: a cached
    tensor would outlive the mode it was made in, a fake-tensor mode say.)"""
    index = torch.zeros((), dtype=torch.int64, device=device)
    for d, (extent, stride) in enumerate(zip(size, strides)):
        shape = [1] * len(size)
        shape[d] = extent
        index = index + (torch.arange(extent, device=device) * stride).view(shape)
    return index.reshape(-1)


def _dot(rows: Tensor, strides: Sequence[int]) -> Tensor:
    """``(B,)`` ``sum_d rows[:, d] * strides[d]`` of int64 ``(B, N)`` ``rows``."""
    out = rows[:, 0] * strides[0]
    for d in range(1, len(strides)):
        out = out + rows[:, d] * strides[d]
    return out


def _window_rows(starts: Tensor, window: Sequence[int], map_size: Sequence[int]) -> Tensor:
    """Row of the stored map (read as ``(prod(map_size), C)``) of every window element,
    ``(B, prod(window))``."""
    strides = tuple(_row_major_strides(map_size))
    return _dot(starts, strides)[:, None] + _box_offsets(tuple(window), strides, starts.device)[None, :]


def _in_range(starts: Tensor, size: Sequence[int], limits: Sequence[int]) -> Tensor:
    """``(B, *size)``: whether ``0 <= starts[b, d] + k_d < limits[d]`` on every axis, for each
    element ``k`` of a box of ``size`` at each row of ``starts`` (int64 ``(B, N)``)."""
    batch, n = starts.shape[0], len(size)
    inside = torch.ones((batch,) + (1,) * n, dtype=torch.bool, device=starts.device)
    for d, (extent, limit) in enumerate(zip(size, limits)):
        coord = starts[:, d, None] + torch.arange(extent, device=starts.device)
        shape = [batch] + [1] * n
        shape[d + 1] = extent
        inside = inside & ((coord >= 0) & (coord < limit)).view(shape)
    return inside


def _overlay_rows(offsets: Tensor, window: Sequence[int], patch_size: Sequence[int]) -> Tensor:
    """Row of the output (``(B * prod(window), C)``) of every patch element, flat over
    ``(B, *patch_size)``; ``B * prod(window)`` (one past the end) where it falls outside
    the window (clipped)."""
    batch, dev = offsets.shape[0], offsets.device
    rows_per_position = math.prod(window)
    inside = _in_range(offsets, patch_size, window)  # each patch element in the window
    dst = _grid_index(offsets, patch_size, _row_major_strides(window))
    dst = dst + (torch.arange(batch, device=dev) * rows_per_position).view(
        (batch,) + (1,) * len(window))
    return torch.where(inside, dst, batch * rows_per_position).reshape(-1)


# Channels from which a gather with a patch reads both from one source (below).
_ONE_SOURCE_CHANNELS = 8
# The largest join of stored and patch rows (bytes) made for a one-source read on the CPU.
# glibc serves allocations past 32 MiB with fresh pages each time: faulting them in cost
# more than the index_copy_ it saves (decoders: a batch's patches as large as its windows).
_ONE_SOURCE_MAX_BYTES = 32 << 20


def _reads_one_source(stored_rows: Tensor, patch_rows: Tensor, window_rows: int) -> bool:
    """Whether a gather with a patch joins the stored and patch rows and reads the window
    from the join in one index_select, rather than reading the window and writing the patch
    over it with index_copy_ (about 3x a read per row on the CPU). The join copies the whole
    stored map: only where it has no more rows than the batch's windows (a decoder reads
    small windows out of full-resolution maps), with enough channels that a row copy is
    not dominated by its overhead, and on the CPU only while the join is small
    (``_ONE_SOURCE_MAX_BYTES``)."""
    rows, c = stored_rows.shape
    if c < _ONE_SOURCE_CHANNELS or rows > window_rows:
        return False
    return stored_rows.is_cuda or (rows + patch_rows.shape[0]) * c * stored_rows.element_size() <= _ONE_SOURCE_MAX_BYTES


def _gather(stored: Tensor, table: Tensor, window: tuple[int, ...],
            patch_rows: Optional[Tensor], patch_size: Sequence[int]) -> Tensor:
    """The window of ``stored`` at each position with ``patch_rows`` (``(B * prod(patch_size),
    C)``, or None) written over it; channels-last ``(B, C, *window)``."""
    n, batch, c = len(window), table.shape[0], stored.shape[1]
    rows = _window_rows(table[:, :n], window, stored.shape[2:])
    stored_rows = _channel_rows(stored)
    if patch_rows is not None and _reads_one_source(stored_rows, patch_rows, batch * math.prod(window)):
        # One read from the stored rows followed by the patch rows: each element's row is
        # its patch row where it lies in its patch, else its window row.
        strides = tuple(_row_major_strides(patch_size))
        first = torch.arange(batch, device=table.device) * math.prod(patch_size) + stored_rows.shape[0]
        patch_index = (first - _dot(table[:, n:], strides))[:, None] + _box_offsets(
            window, strides, table.device)[None, :]
        in_patch = _in_range(-table[:, n:], window, patch_size).reshape(batch, -1)  # each window element
        rows = torch.where(in_patch, patch_index, rows)
        out = torch.cat([stored_rows, patch_rows]).index_select(0, rows.reshape(-1))
        return out.view(batch, *window, c).movedim(-1, 1)
    # One spare row receives every clipped patch element.
    out = torch.empty(batch * math.prod(window) + 1, c, dtype=stored.dtype, device=stored.device)
    torch.index_select(stored_rows, 0, rows.reshape(-1), out=out[:-1])
    if patch_rows is not None:
        out.index_copy_(0, _overlay_rows(table[:, n:], window, patch_size), patch_rows)
    return out[:-1].view(batch, *window, c).movedim(-1, 1)


def gather_window_torch(stored: Tensor, patch: Optional[Tensor], table: Tensor,
                        window: Sequence[int]) -> Tensor:
    """Gather with superimposition (Algorithm 1, lines 4-8), N spatial axes.

    ``out[b, c, i] = patch[b, c, i - o]`` where ``0 <= i_d - o_d < P_d`` on every axis,
    else ``stored[0, c, w + i]``.

    Args:
        stored: ``(1, C, *S)`` activation of the unoccluded image, padded so every
            window is inside. Channels-last avoids a copy per call.
        patch: ``(B, C, *P)`` incoming patches, or None for a plain gather.
        table: int64 ``(B, 2N)`` rows ``[w_0..w_{N-1}, o_0..o_{N-1}]``: window start in
            ``stored``, patch start relative to the window.
        window: ``N`` window sizes.

    Returns:
        ``(B, C, *window)`` channels-last tensor of ``stored``'s dtype.

    Example:
        >>> stored = torch.zeros(1, 1, 4, 4)
        >>> patch = torch.ones(1, 1, 2, 2)
        >>> out = gather_window_torch(stored, patch, torch.tensor([[1, 1, 1, 0]]), (3, 3))
        >>> out[0, 0].tolist()
        [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    """
    window = tuple(int(s) for s in window)
    if patch is None:
        return _gather(stored, table, window, None, ())
    return _gather(stored, table, window, _channel_rows(patch.to(stored.dtype)),
                   tuple(patch.shape[2:]))


def project_to_full_torch(stored: Tensor, patch: Tensor, starts: Tensor) -> Tensor:
    """Projection to full size (Algorithm 2), N spatial axes: ``stored`` with each
    position's patch written at its start; patch elements past the map are dropped.

    Args:
        stored: ``(1, C, *S)`` activation of the unoccluded image.
        patch: ``(B, C, *P)`` patches.
        starts: int64 ``(B, N)`` patch start in the map.

    Returns:
        ``(B, C, *S)`` channels-last tensor of ``stored``'s dtype.

    Example:
        >>> out = project_to_full_torch(torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 1, 2),
        ...                             torch.tensor([[2, 1]]))
        >>> out[0, 0].tolist()
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    """
    c, size, batch = stored.shape[1], tuple(stored.shape[2:]), starts.shape[0]
    elements = math.prod(size)
    if c >= _ONE_SOURCE_CHANNELS:  # one read, as in _gather: a whole map is a window at 0
        table = torch.cat([torch.zeros_like(starts), starts], 1)
        return _gather(stored, table, size, _channel_rows(patch.to(stored.dtype)), tuple(patch.shape[2:]))
    out = torch.empty(batch * elements + 1, c, dtype=stored.dtype, device=stored.device)
    out[:-1].view(batch, elements, c).copy_(_channel_rows(stored).expand(batch, -1, -1))
    out.index_copy_(0, _overlay_rows(starts, size, patch.shape[2:]),
                    _channel_rows(patch.to(stored.dtype)))
    return out[:-1].view(batch, *size, c).movedim(-1, 1)


def occlude_window_torch(image: Tensor, color: Tensor, table: Tensor, window: Sequence[int],
                         patch_size: Sequence[int], weight: Optional[Tensor] = None,
                         scale: Optional[Tensor] = None, ids: Optional[Tensor] = None,
                         segment: Optional[Tensor] = None, baseline: Optional[Tensor] = None) -> Tensor:
    """Input occlusion, N spatial axes: each position's window of the image with its
    occlusion patch applied.

    Inside the patch (``0 <= i_d - o_d < patch_size_d`` on every axis) the value is
    ``color[c]`` when ``weight`` and ``scale`` are both None (plain replacement), else
    ``image * w + color[c]`` with ``w = weight[c, i - o] * scale[b]`` (a missing factor
    is 1), computed in float32 in that order (``weight * scale``, times the image,
    plus the colour) and rounded once to the image's dtype.

    A *segment* (``ids`` and ``segment``, feature ablation): inside the patch only the
    elements whose label ``ids[c, e]`` (``ids[0, e]`` for a one-row mask) is the row's
    ``segment[b]`` change, to ``baseline[c, e]`` (a baseline image) or else ``color[c]``;
    every other element keeps the image's value. (Not with ``weight`` or ``scale``.)

    Args:
        image: ``(1, C, *S)`` image, padded so every window is inside.
        color: ``C`` colour values.
        table: int64 ``(B, 2N)`` as for :func:`gather_window_torch`.
        window: ``N`` window sizes.
        patch_size: ``N`` occlusion patch sizes.
        weight: ``(C, *patch_size)`` or ``(1, *patch_size)`` (one for all channels), or None.
        scale: ``(B,)`` one factor per position, or None.
        ids: int64 ``(1, C or 1, *S)`` segment labels, padded as the image, or None.
        segment: int64 ``(B,)`` the segment each row ablates (with ``ids``).
        baseline: ``(1, C, *S)`` values of the ablated elements, padded as the image, or
            None (``color``).

    Returns:
        ``(B, C, *window)`` channels-last tensor of the image's dtype.

    Example:
        >>> ids = torch.tensor([[[[1, 2, 2], [1, 1, 2], [2, 2, 2]]]])
        >>> out = occlude_window_torch(torch.ones(1, 1, 3, 3), torch.zeros(1),
        ...                            torch.tensor([[0, 0, 0, 0]]), (3, 3), (2, 3),
        ...                            ids=ids, segment=torch.tensor([2]))
        >>> out[0, 0].tolist()
        [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
        >>> out = occlude_window_torch(torch.ones(1, 1, 3, 3), torch.zeros(1),
        ...                            torch.tensor([[0, 0, 0, 0]]), (3, 3), (2, 2))
        >>> out[0, 0].tolist()
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
        >>> out = occlude_window_torch(torch.full((1, 1, 3), 2.0), torch.ones(1),
        ...                            torch.tensor([[0, 1]]), (3,), (2,),
        ...                            weight=torch.tensor([[0.5, 0.25]]))
        >>> out[0, 0].tolist()
        [2.0, 2.0, 1.5]
    """
    window = tuple(int(s) for s in window)
    patch_size = tuple(int(s) for s in patch_size)
    n, batch, c = len(window), table.shape[0], image.shape[1]
    elements = math.prod(patch_size)
    if ids is not None:
        return _occlude_segment(image, color, table, window, patch_size, ids, segment, baseline)
    if weight is None and scale is None:
        patch_rows = color.to(image.dtype).reshape(1, c).expand(batch * elements, c)
        return _gather(image, table, window, patch_rows, patch_size)
    # The image under each patch; coordinates past the image are clamped (those
    # elements lie outside the window, which is inside the image: they are dropped).
    under = _grid_index(table[:, :n] + table[:, n:], patch_size,
                        _row_major_strides(image.shape[2:]), clamp=image.shape[2:])
    x = _channel_rows(image).index_select(0, under.reshape(-1)).view(batch, elements, c)
    if weight is not None:
        factor = _channel_rows(weight.unsqueeze(0)).float().view(1, elements, -1)
        if scale is not None:
            factor = factor * scale.float().view(batch, 1, 1)
    else:
        assert scale is not None
        factor = scale.float().view(batch, 1, 1)
    occluded = x.float() * factor + color.float().reshape(1, 1, c)
    return _gather(image, table, window, occluded.to(image.dtype).view(-1, c), patch_size)


def _occlude_segment(image: Tensor, color: Tensor, table: Tensor, window: tuple[int, ...],
                     patch_size: tuple[int, ...], ids: Tensor, segment: Optional[Tensor],
                     baseline: Optional[Tensor]) -> Tensor:
    """:func:`occlude_window_torch` of a segment: the windows of the image, its labels and
    the baseline, and the baseline where a window element lies in the patch and has the
    row's label. Computed channels-last, ``(B, *window, C)``."""
    if segment is None:
        raise ValueError("occluding a segment needs segment= (one id per row) with ids=")
    n, batch, c = len(window), table.shape[0], image.shape[1]
    x = _gather(image, table, window, None, ()).movedim(1, -1)
    labels = _gather(ids, table, window, None, ()).movedim(1, -1)  # (B, *window, 1 or C)
    inside = _in_range(-table[:, n:], window, patch_size).unsqueeze(-1)  # in the patch
    hit = inside & (labels == segment.view((batch,) + (1,) * (n + 1)))
    if baseline is not None:
        fill = _gather(baseline.to(image.dtype), table, window, None, ()).movedim(1, -1)
    else:
        fill = color.to(image.dtype).reshape((1,) * (n + 1) + (c,))
    return torch.where(hit, fill, x).contiguous().movedim(-1, 1)
