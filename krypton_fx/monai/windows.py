"""MONAI's occlusion window grid, and the blend of per-window outputs into a map.

MONAI's ``OcclusionSensitivity`` runs ``sliding_window_inference`` over a
meshgrid of the image: every window of the scan is one occlusion, its model
output is spread over the window's voxels (weighted by the blend's importance
map) and every voxel averages the windows that cover it. This module is that
scan as plain data, so the windows can be inferred by any engine:

* :func:`window_grid` lists the windows (MONAI's ``_get_scan_interval`` and
  ``dense_patch_slices`` rules, after ``crop_meshgrid``'s ``b_box`` crop);
* :func:`blend_windows` turns the ``(n_windows, classes)`` outputs into the
  per-voxel average, without materialising one window-sized tensor per window.

Example:
    >>> grid = window_grid((10, 12), mask_size=(4, 6), overlap=0.5)
    >>> grid.axis_starts, grid.n_windows
    (((0, 2, 4, 6), (0, 3, 6)), 12)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["WindowGrid", "scan_interval", "axis_starts", "scanned_region", "window_grid",
           "blend_windows"]


@dataclasses.dataclass(frozen=True)
class WindowGrid:
    """The windows of one occlusion scan, in MONAI's order.

    Windows are the Cartesian product of the per-axis starts, first axis
    slowest (``np.meshgrid(..., indexing="ij")`` flattened, as MONAI's
    ``dense_patch_slices``); window ``i`` has multi-index
    ``np.unravel_index(i, grid.counts)``.

    Attributes:
        image_size: spatial shape of the image.
        region_start: first voxel of the scanned region (the ``b_box`` crop
            widened by half a mask; zeros without ``b_box``).
        region_size: spatial shape of the scanned region.
        mask_size: window shape (MONAI clamps the mask to the region).
        interval: scan step per axis.
        axis_starts: per axis, the window starts in image coordinates.
    """

    image_size: tuple[int, ...]
    region_start: tuple[int, ...]
    region_size: tuple[int, ...]
    mask_size: tuple[int, ...]
    interval: tuple[int, ...]
    axis_starts: tuple[tuple[int, ...], ...]

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of windows along each axis."""
        return tuple(len(s) for s in self.axis_starts)

    @property
    def n_windows(self) -> int:
        """Total number of windows."""
        return math.prod(self.counts)

    def corners(self, device: Optional[torch.device] = None) -> Tensor:
        """Top-left corner of every window in image coordinates, ``(n_windows, N)`` int64.

        Example:
            >>> window_grid((4, 5), mask_size=(4, 3), overlap=0).corners().tolist()
            [[0, 0], [0, 2]]
        """
        axes = [torch.tensor(s, dtype=torch.int64, device=device) for s in self.axis_starts]
        return torch.stack([a.reshape(-1) for a in torch.meshgrid(*axes, indexing="ij")], dim=1)

    def window_slices(self, index: int) -> tuple[slice, ...]:
        """Spatial slices of window ``index`` in the image.

        Example:
            >>> window_grid((4, 5), mask_size=(4, 3), overlap=0).window_slices(1)
            (slice(0, 4, None), slice(2, 5, None))
        """
        slices = []
        for starts, m in zip(reversed(self.axis_starts), reversed(self.mask_size)):
            index, j = divmod(index, len(starts))
            slices.append(slice(starts[j], starts[j] + m))
        return tuple(reversed(slices))

    def region_slices(self) -> tuple[slice, ...]:
        """Spatial slices of the scanned region in the image."""
        return tuple(slice(s, s + n) for s, n in zip(self.region_start, self.region_size))


def scan_interval(region_size: Sequence[int], mask_size: Sequence[int],
                  overlap: Sequence[float]) -> tuple[int, ...]:
    """Scan step per axis: ``int(mask * (1 - overlap))``, at least 1.

    A mask as long as its axis gets step ``mask`` (one window), as in MONAI's
    ``_get_scan_interval``. The float expression is MONAI's own, so steps that
    round (``int(10 * (1 - 0.7)) == 3``) round the same way.

    Example:
        >>> scan_interval((16, 16, 8), (4, 5, 8), (0.6, 0.5, 0.5))
        (1, 2, 8)
    """
    steps = []
    for size, m, o in zip(region_size, mask_size, overlap):
        steps.append(int(m) if m == size else max(int(m * (1 - o)), 1))
    return tuple(steps)


def axis_starts(size: int, mask: int, interval: int) -> tuple[int, ...]:
    """Window starts along one axis: ``0, s, 2s, ...`` and the last window flush with the end.

    The scan stops at the first window that reaches the end, shifted back to
    end exactly at ``size`` (MONAI's ``dense_patch_slices``).

    Example:
        >>> axis_starts(10, 4, 3), axis_starts(10, 4, 2), axis_starts(4, 4, 4)
        ((0, 3, 6), (0, 2, 4, 6), (0,))
    """
    starts = []
    for k in range(math.ceil(size / interval)):
        start = k * interval
        if start + mask >= size:
            starts.append(size - mask)
            break
        starts.append(start)
    return tuple(starts)


def scanned_region(image_size: Sequence[int], mask_size: Sequence[int],
                   b_box: Optional[Sequence[int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Start and shape of the region MONAI scans for a ``b_box``.

    MONAI's ``crop_meshgrid`` widens the box by ``(mask - 1) // 2`` on both
    sides, clipped to the image; a maximum of exactly ``-1`` means "to the
    end". Other negative maxima are Python slice stops (counted from the end),
    and axes without ``b_box`` entries are not cropped, both as in MONAI.

    Example:
        >>> scanned_region((12, 14), (4, 4), [2, 8, -1, -1])
        ((1, 0), (8, 14))
    """
    start, size = [0] * len(image_size), list(image_size)
    if b_box is None:
        return tuple(start), tuple(size)
    for axis, (lo, hi, m, n) in enumerate(zip(b_box[::2], b_box[1::2], mask_size, image_size)):
        edge = (m - 1) // 2
        stop = n if hi == -1 else min(hi + edge, n)
        first, last, _ = slice(max(lo - edge, 0), stop).indices(n)
        if last <= first:
            raise ValueError(f"b_box {list(b_box)} selects no voxels along spatial axis {axis} (size {n}): "
                             "give each axis a minimum below its maximum, or -1 for the whole axis")
        start[axis], size[axis] = first, last - first
    return tuple(start), tuple(size)


def window_grid(image_size: Sequence[int], mask_size: Sequence[int], overlap: Sequence[float] | float,
                b_box: Optional[Sequence[int]] = None) -> WindowGrid:
    """The windows MONAI 1.6's ``OcclusionSensitivity`` visits for one image.

    Args:
        image_size: spatial shape of the image.
        mask_size: window shape, one entry per spatial axis.
        overlap: overlap of neighbouring windows, one float or one per axis, in ``[0, 1)``.
        b_box: MONAI's bounding box ``[min0, max0, min1, max1, ...]``, or None.

    Raises:
        ValueError: the overlap is outside ``[0, 1)``, a mask entry is below 1,
            or the mask is larger than the image (MONAI's error).

    Example:
        >>> grid = window_grid((16, 16), mask_size=(5, 5), overlap=0.6, b_box=[4, 9, -1, -1])
        >>> grid.region_start, grid.region_size, grid.axis_starts[0]
        ((2, 0), (9, 16), (2, 4, 6))
    """
    n = len(image_size)
    overlaps = tuple(overlap) if isinstance(overlap, Sequence) else (overlap,) * n
    if len(overlaps) != n or any(not 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must be >= 0 and < 1 (one value, or one per spatial axis), got {overlap}")
    mask = tuple(int(m) for m in mask_size)
    if any(m < 1 for m in mask):
        raise ValueError(f"mask_size {mask} has an entry below 1; every window axis needs at least one voxel")
    start, size = scanned_region(image_size, mask, b_box)
    if b_box is not None:  # MONAI shrinks the mask to a small region rather than failing
        mask = tuple(min(m, s) for m, s in zip(mask, size))
    if any(m > s for m, s in zip(mask, size)):
        raise ValueError(f"Image (spatial shape) {tuple(size)} should be bigger than mask {mask}: "
                         "use a mask_size no larger than the image along every axis")
    interval = scan_interval(size, mask, overlaps)
    starts = tuple(tuple(s0 + s for s in axis_starts(s_n, m, i))
                   for s0, s_n, m, i in zip(start, size, mask, interval))
    return WindowGrid(tuple(int(s) for s in image_size), start, size, mask, interval, starts)


# --- blending ------------------------------------------------------------------------------


def _axis_blocks(starts: Sequence[int], interval: int) -> list[tuple[slice, int, int]]:
    """Split one axis's starts into evenly spaced runs: ``(index slice, first start, step)``.

    All starts but the last are ``0, s, 2s, ...``; the last may be pulled back
    to the end of the axis, so it is a run of its own.
    """
    blocks = [(slice(len(starts) - 1, len(starts)), starts[-1], 1)]
    if len(starts) > 1:
        blocks.insert(0, (slice(0, len(starts) - 1), starts[0], interval))
    return blocks


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _spread(values: Tensor, grid: WindowGrid, weights: Tensor) -> Tensor:
    """``sum_w values[:, w] * weights`` placed at each window, ``(K, *region_size)``.

    ``values`` is ``(K, *grid.counts)``. Evenly spaced windows are one strided
    transposed convolution with the weights as kernel; the grid splits into at
    most ``2 ** N`` such blocks (the end-aligned last window of each axis).
    """
    k = values.shape[0]
    out = values.new_zeros((k, *grid.region_size))
    rel = [tuple(s - s0 for s in starts) for starts, s0 in zip(grid.axis_starts, grid.region_start)]
    conv = _CONV_TRANSPOSE.get(len(grid.mask_size))
    for block in itertools.product(*[_axis_blocks(s, i) for s, i in zip(rel, grid.interval)]):
        index, first, step = zip(*block)
        sub = values[(slice(None), *index)]
        if conv is not None:
            spread = conv(sub.unsqueeze(1), weights[None, None], stride=step).squeeze(1)
            out[(slice(None), *[slice(f, f + n) for f, n in zip(first, spread.shape[1:])])] += spread
            continue
        for pos in itertools.product(*[range(n) for n in sub.shape[1:]]):  # N > 3: window by window
            window = tuple(slice(f + p * s, f + p * s + m) for f, p, s, m in zip(first, pos, step, grid.mask_size))
            out[(slice(None), *window)] += sub[(slice(None), *pos)].reshape(-1, *[1] * len(pos)) * weights
    return out


def blend_windows(outputs: Tensor, grid: WindowGrid, weights: Tensor) -> Tensor:
    """Per-voxel weighted mean of the window outputs that cover each voxel.

    MONAI spreads each window's output over the window, multiplied by the
    importance map, sums, and divides by the summed importance maps. This
    computes the same sums directly from the ``(n_windows, K)`` outputs, in
    float64 (so no TF32 convolution or summation order costs accuracy), and
    returns them in ``outputs``' dtype.

    Args:
        outputs: ``(n_windows, K)`` per-window outputs, in the grid's order.
        grid: the windows.
        weights: importance map of one window, ``grid.mask_size``.

    Returns:
        ``(K, *grid.region_size)``: the map over the scanned region.

    Example:
        >>> grid = window_grid((6,), mask_size=(4,), overlap=0.5)
        >>> blend_windows(torch.tensor([[1.0], [3.0]]), grid, torch.ones(4)).tolist()
        [[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]]
    """
    if outputs.ndim != 2 or outputs.shape[0] != grid.n_windows:
        raise ValueError(f"expected outputs of shape ({grid.n_windows}, classes), got {tuple(outputs.shape)}")
    values = outputs.to(torch.float64).T.reshape(-1, *grid.counts)
    w = weights.to(device=outputs.device, dtype=torch.float64)
    total = _spread(values, grid, w)
    coverage = _spread(torch.ones_like(values[:1]), grid, w)
    return (total / coverage).to(outputs.dtype)
