"""Patch geometry: pure, vectorised arithmetic over occlusion positions.

Every function here works on one spatial axis at a time and takes patch
*starts* as int64 tensors of shape ``(P,)`` (one entry per occlusion position)
while patch *sizes* are plain ints: a compiled explainer uses one static patch
size per node, so every position's patch of a node has the same shape and the
positions can be batched.

Equation numbers are those of the KRYPTON paper (Nakandala, Kumar and
Papakonstantinou, "Incremental and Approximate Inference for Faster
Occlusion-based Deep CNN Explanations", SIGMOD 2019), numbered as in its
preprint ("KRYPTON: Accelerating Occlusion based Deep CNN Explainability
Workloads").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "Box",
    "AxisSpec",
    "occlusion_grid",
    "grid_from_starts",
    "positions_per_axis",
    "output_start",
    "output_size",
    "read_window",
    "clamp_to_border",
    "union_box",
    "tau_limit",
    "local_box",
]


def positions_per_axis(image: int, patch: int, stride: int) -> int:
    """Number of patch positions along one axis.

    Positions are ``0, S, 2S, ...`` while the patch fits inside the image:
    ``floor((W - P) / S) + 1``. (Eqs. 1-2 of the paper count one short when
    ``S > 1``.)

    Example:
        >>> positions_per_axis(224, 16, 4)
        53
    """
    if patch > image:
        raise ValueError(f"patch {patch} is larger than the image ({image})")
    return (image - patch) // stride + 1


def occlusion_grid(image_size: Sequence[int], patch: Sequence[int], stride: Sequence[int]):
    """Patch starts of every occlusion position, row-major, for any number of spatial axes.

    Returns:
        ``(*starts, grid)``: one int64 tensor of shape ``(prod(grid),)`` per
        axis, then the heat map's shape; position ``k`` is cell
        ``numpy.unravel_index(k, grid)`` (the last axis varies fastest). For
        two axes that is ``(ys, xs, (H_M, W_M))``.

    Example:
        >>> ys, xs, shape = occlusion_grid((8, 8), (4, 4), (2, 2))
        >>> shape, ys[:4].tolist(), xs[:4].tolist()
        ((3, 3), [0, 0, 0, 2], [0, 2, 4, 0])
        >>> zs, ys, xs, shape = occlusion_grid((6, 8, 8), (4, 4, 4), (2, 4, 4))
        >>> shape, zs.tolist()[:5]
        ((2, 2, 2), [0, 0, 0, 0, 2])
    """
    if not len(image_size) == len(patch) == len(stride):
        raise ValueError(f"image {tuple(image_size)}, patch {tuple(patch)} and stride {tuple(stride)} "
                         "must have one entry per spatial axis")
    grid = tuple(positions_per_axis(i, p, s) for i, p, s in zip(image_size, patch, stride))
    axes = [torch.arange(n, dtype=torch.int64) * s for n, s in zip(grid, stride)]
    starts = torch.meshgrid(*axes, indexing="ij")
    return (*(t.reshape(-1) for t in starts), grid)


def grid_from_starts(axis_starts: Sequence[Sequence[int]]):
    """Like :func:`occlusion_grid`, from explicit patch starts per axis (row-major product).

    Example:
        >>> ys, xs, shape = grid_from_starts([(0, 4, 6), (0, 3)])
        >>> shape, ys.tolist(), xs.tolist()
        ((3, 2), [0, 0, 4, 4, 6, 6], [0, 3, 0, 3, 0, 3])
    """
    axes = [torch.tensor(list(a), dtype=torch.int64) for a in axis_starts]
    starts = torch.meshgrid(*axes, indexing="ij")
    return (*(t.reshape(-1) for t in starts), tuple(len(a) for a in axes))


@dataclasses.dataclass(frozen=True)
class AxisSpec:
    """One axis of a local (sliding-window) op.

    Attributes:
        kernel: effective kernel extent ``d * (K - 1) + 1`` (dilation folded in).
        stride: window stride.
        pad: padding before the first element (``P`` in eqs. 21-22, 25-26);
            padding after the last element only shows in ``out_size``.
        in_size: input extent along this axis.
        out_size: output extent along this axis (as the op computes it, so
            ``ceil_mode`` and asymmetric padding are already accounted for).
    """

    kernel: int
    stride: int
    pad: int
    in_size: int
    out_size: int


def output_start(in_start: Tensor, spec: AxisSpec) -> Tensor:
    """First output index whose window touches the input patch (eqs. 21-22).

    ``max(ceil((P + x_I - K + 1) / S), 0)``; ceil of a/b is ``-((-a) // b)``.
    """
    num = spec.pad + in_start - spec.kernel + 1
    return torch.clamp(-((-num) // spec.stride), min=0)


def output_size(in_size: int, spec: AxisSpec) -> int:
    """Static output patch size (eqs. 23-24).

    ``min(ceil((W_I + K - 1) / S), W_O)``: an upper bound on the number of
    outputs whose window meets an input patch of ``in_size`` elements,
    wherever the patch lies.
    """
    return min(-(-(in_size + spec.kernel - 1) // spec.stride), spec.out_size)


def tau_limit(size: int, full: int, tau: float) -> int:
    """Largest patch size allowed by the projective-field threshold (eqs. 40-41).

    ``round(tau * W_O)``, at least 1; ``tau = 1`` never limits.
    """
    if tau >= 1.0:
        return size
    return max(1, min(size, int(round(tau * full))))


def clamp_to_border(start: Tensor, size: int, full: int) -> Tensor:
    """Shift boxes that run past the far border back inside (eqs. 29-34).

    Every position keeps the same static ``size``; the shifted box still
    contains the original one (it only grows towards the near side), so
    results stay exact.
    """
    return torch.clamp(start, min=0, max=full - size)


def read_window(out_start: Tensor, out_size: int, spec: AxisSpec) -> tuple[Tensor, int]:
    """Input window an output patch reads (eqs. 25-28).

    Returns ``(start, size)`` with ``start = x_O * S - P`` (negative inside
    the padding) and ``size = K + (W_O - 1) * S``.
    """
    return out_start * spec.stride - spec.pad, spec.kernel + (out_size - 1) * spec.stride


def local_box(in_start: Tensor, in_size: int, spec: AxisSpec,
              tau: float = 1.0) -> tuple[Tensor, int]:
    """Output patch of a local op on one axis: eqs. 21-24 then 29-34.

    With ``tau < 1`` the output size is capped by eqs. 39-41 and the input
    patch is re-centred (eqs. 42-45) before the start is computed, so the
    output box stays centred on the change.

    Returns:
        ``(out_start, out_size)``.

    Example:
        >>> spec = AxisSpec(kernel=3, stride=1, pad=1, in_size=8, out_size=8)
        >>> start, size = local_box(torch.tensor([0, 3, 6]), 2, spec)
        >>> start.tolist(), size
        ([0, 2, 4], 4)
    """
    size = output_size(in_size, spec)
    start = output_start(in_start, spec)
    limited = tau_limit(size, spec.out_size, tau)
    if limited < size:
        # Eqs. 42-45 shrink the input patch to what maps onto the capped
        # width and shift it by half the difference, so the kept outputs stay
        # centred on the change. Centring the capped box directly on the
        # outputs the patch really reaches (within the map) does the same
        # without eq. 45's rounding towards the near side, which let the two
        # branches of a residual block drift apart and their union grow.
        last = torch.clamp((in_start + in_size - 1 + spec.pad) // spec.stride, max=spec.out_size - 1)
        reached = last - start + 1
        start = start + torch.div(reached - limited, 2, rounding_mode="floor")
        size = limited
    return clamp_to_border(start, size, spec.out_size), size


def union_box(starts: Sequence[Tensor], sizes: Sequence[int], full: int,
              cap: Optional[int] = None) -> tuple[Tensor, int]:
    """Union of several per-position boxes on one axis (eqs. 35-38).

    The union's start is the smallest start; its size is the largest extent
    over all positions (so it is static), then boxes that would run past the
    border are shifted back inside.

    ``cap`` (approximate mode only) limits the union's size, centred on the
    union, the way tau limits a single box (eqs. 42-45): two tau-capped
    branches that reach a merge slightly offset would otherwise grow the
    union past the cap, so a smaller tau could cost more.

    Example:
        >>> s, n = union_box([torch.tensor([0, 4]), torch.tensor([1, 2])], [2, 5], 10)
        >>> s.tolist(), n
        ([0, 2], 6)
        >>> s, n = union_box([torch.tensor([0, 4]), torch.tensor([1, 2])], [2, 5], 10, cap=5)
        >>> s.tolist(), n
        ([0, 2], 5)
    """
    lo = torch.stack(list(starts)).amin(0)
    hi = torch.stack([s + n for s, n in zip(starts, sizes)]).amax(0)
    size = min(int((hi - lo).max()), full)
    if cap is not None and cap < size:
        lo = lo + torch.div(torch.clamp(hi - lo - cap, min=0), 2, rounding_mode="floor")
        size = cap
    return clamp_to_border(lo, size, full), size


@dataclasses.dataclass(frozen=True)
class Box:
    """A per-position box on a feature map with any number of spatial axes.

    Attributes:
        starts: one int64 ``(P,)`` tensor per spatial axis: each position's box start.
        sizes: static box size per axis (the same for every position).
        full: the feature map's size per axis.

    For two axes, ``y, x, h, w, H, W`` name ``starts``, ``sizes`` and ``full``
    as rows and columns.
    """

    starts: tuple[Tensor, ...]
    sizes: tuple[int, ...]
    full: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """Spatial axes."""
        return len(self.sizes)

    @property
    def is_full(self) -> bool:
        """True once the box covers the whole map: no savings remain."""
        return all(s >= f for s, f in zip(self.sizes, self.full))

    @property
    def area_fraction(self) -> float:
        """The box's share of the map (volume in 3-D, length in 1-D)."""
        return math.prod(self.sizes) / float(math.prod(self.full))

    def same_as(self, other: "Box") -> bool:
        """Same sizes and the same start for every position."""
        return self.sizes == other.sizes and all(torch.equal(a, b) for a, b in zip(self.starts, other.starts))

    # Two-axis names.
    y = property(lambda self: self.starts[-2])
    x = property(lambda self: self.starts[-1])
    h = property(lambda self: self.sizes[-2])
    w = property(lambda self: self.sizes[-1])
    H = property(lambda self: self.full[-2])
    W = property(lambda self: self.full[-1])

    def __repr__(self) -> str:  # tensors would flood reports
        return f"Box({'x'.join(map(str, self.sizes))} of {'x'.join(map(str, self.full))})"
