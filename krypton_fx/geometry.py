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
Workloads"). Its eqs. 21-38 cover sliding windows (conv, pool); the decoder's
ops extend them here: transposed convolutions (and pixel shuffle) scatter each
input over a window of outputs, resampling (``F.interpolate``) reads a few
source taps per output (docs/design.md, "Geometry").
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
    "TransposedSpec",
    "transposed_box",
    "align_box",
    "transposed_window",
    "AxisTaps",
    "resample_box",
    "resample_window",
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


def _cap_centred(start: Tensor, reached: Tensor, size: int, full: int, tau: float) -> tuple[Tensor, int]:
    """Eqs. 39-45 for a box whose outputs really reached per position are ``reached``
    (``(P,)``, from ``start``): cap the size at ``round(tau * full)``, centred on them."""
    limited = tau_limit(size, full, tau)
    if limited < size:
        start = start + torch.div(torch.clamp(reached - limited, min=0), 2, rounding_mode="floor")
        size = limited
    return start, size


# --- transposed convolutions ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TransposedSpec:
    """One axis of a transposed convolution (or pixel shuffle: kernel = stride = r, pad 0).

    Input ``i`` adds ``w[k] * x[i]`` to output ``o = i * S - P + k * D`` for every tap
    ``k < K``: an input patch *scatters* over ``(n - 1) * S + D * (K - 1) + 1`` outputs.

    Attributes:
        kernel: effective kernel extent ``D * (K - 1) + 1`` (dilation folded in).
        stride: ``S``, the upsampling factor.
        pad: ``P``, outputs cropped before the first (``output_padding`` only shows
            in ``out_size``).
        in_size: input extent.
        out_size: output extent, as the op computes it.
    """

    kernel: int
    stride: int
    pad: int
    in_size: int
    out_size: int


def transposed_box(in_start: Tensor, in_size: int, spec: TransposedSpec,
                   tau: float = 1.0) -> tuple[Tensor, int]:
    """Outputs a transposed conv's input patch reaches (the transposed eqs. 21-24, 29-34).

    ``x_O = max(x_I * S - P, 0)``, ``W_O = min((W_I - 1) * S + K, W_out)``, then
    shifted inside the map (eqs. 29-34); with ``tau < 1`` capped as in eqs.
    39-45, centred on the outputs really reached. Exact (the box is the set of
    outputs that any input of the patch adds to) for stride 1, dilation 1.

    Example:
        >>> spec = TransposedSpec(kernel=3, stride=2, pad=1, in_size=4, out_size=8)
        >>> start, size = transposed_box(torch.tensor([0, 1, 3]), 1, spec)
        >>> start.tolist(), size
        ([0, 1, 5], 3)
    """
    raw = in_start * spec.stride - spec.pad
    size = min((in_size - 1) * spec.stride + spec.kernel, spec.out_size)
    start = torch.clamp(raw, min=0)
    reached = torch.clamp(raw + (in_size - 1) * spec.stride + spec.kernel, max=spec.out_size) - start
    start, size = _cap_centred(start, reached, size, spec.out_size, tau)
    return clamp_to_border(start, size, spec.out_size), size


def align_box(start: Tensor, size: int, full: int, stride: int) -> tuple[Tensor, int]:
    """The smallest boxes, one static size, that contain each ``[start, start + size)``
    and start at ``phase + k * stride`` for one ``phase`` shared by every position.

    A transposed conv run on a window of its input computes outputs from a
    multiple of the stride on (in padded coordinates): boxes aligned to the
    stride are cropped out of every position's result at one static offset.
    Aligned boxes must also fit the map at both borders, so the size grows by
    at most ``2 * (stride - 1)`` (often by 0: the boxes of a kernel that is a
    multiple of the stride are aligned already). A size that reaches ``full``
    gives the whole map.

    Example:
        >>> start, size = align_box(torch.tensor([0, 3, 5]), 3, 8, 2)
        >>> start.tolist(), size
        ([0, 2, 4], 4)
    """
    if stride == 1 or size >= full:
        return start, min(size, full)
    for grown in range(size, min(size + 2 * (stride - 1), full - 1) + 1):
        for phase in range(stride):
            # the last aligned start at or before the box that leaves room for ``grown``
            last = torch.clamp(start, max=full - grown)
            aligned = last - torch.remainder(last - phase, stride)
            if bool(((aligned >= 0) & (aligned + grown >= start + size)).all()):
                return aligned, grown
    return torch.zeros_like(start), full


def transposed_window(out_start: Tensor, out_size: int, spec: TransposedSpec) -> tuple[Tensor, int, int]:
    """The input window whose transposed conv (padding 0) holds an aligned output box,
    and where in that result the box starts.

    The window starts at ``w = min(ceil((x_O + P - K + 1) / S), floor((x_O + P) / S))``,
    the first input that reaches the box (or, for a kernel shorter than the stride,
    the one before: it reaches only outputs before the box). Its result's element
    ``j`` is output ``w * S - P + j``, so the box starts at ``crop = x_O + P - w * S``,
    the same for every position of boxes aligned by :func:`align_box`. The window
    is ``max(floor((x_O + W_O - 1 + P) / S) - w + 1, ceil((crop + W_O - K) / S) + 1)``
    long: every input that reaches the box, and enough for the result to hold it
    (inputs past the last one reach only outputs past the box).

    Returns:
        ``(window start, window size, crop)``.

    Example:
        >>> spec = TransposedSpec(kernel=3, stride=2, pad=1, in_size=4, out_size=8)
        >>> start, size, crop = transposed_window(torch.tensor([0, 2, 4]), 4, spec)
        >>> start.tolist(), size, crop
        ([0, 1, 2], 3, 1)
    """
    s, p, k = spec.stride, spec.pad, spec.kernel
    first = -((-(out_start + p - k + 1)) // s)
    start = torch.minimum(first, torch.div(out_start + p, s, rounding_mode="floor"))
    crops = out_start + p - start * s
    crop = int(crops[0]) if crops.numel() else 0
    if not bool((crops == crop).all()):
        raise ValueError("transposed_window needs boxes aligned to the stride (align_box)")
    last = torch.div(out_start + out_size - 1 + p, s, rounding_mode="floor")
    reach = int((last - start).max()) + 1 if crops.numel() else 1
    size = max(reach, -(-(crop + out_size - k) // s) + 1, 1)
    return start, size, crop


# --- resampling (F.interpolate) ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class AxisTaps:
    """Where each output of a separable resampling op reads, along one axis.

    Output ``o`` is ``sum_t weight[o, t] * x[first[o] + t]`` over ``T`` taps; the
    taps past ``last[o]`` (the last source with a nonzero weight) weigh 0. Nearest
    modes have one tap of weight 1, linear modes two, bicubic four; ``first`` and
    ``last`` never decrease with ``o``. Made by :meth:`from_matrix` from the op's
    own weights, so every index is the one the op's kernel picks (its float
    rounding included).

    Attributes:
        first: int64 ``(O,)`` first source index with a nonzero weight.
        last: int64 ``(O,)`` last source index with a nonzero weight.
        weight: ``(O, T)`` weight of source ``first[o] + t``.
        in_size: input extent.
    """

    first: Tensor
    last: Tensor
    weight: Tensor
    in_size: int

    @property
    def out_size(self) -> int:
        """Output extent."""
        return int(self.first.shape[0])

    @property
    def taps(self) -> int:
        """Sources per output, ``T``."""
        return int(self.weight.shape[1])

    @property
    def selects(self) -> bool:
        """One tap of weight 1 everywhere: the op copies (nearest modes)."""
        return self.taps == 1 and bool((self.weight == 1).all())

    @classmethod
    def from_matrix(cls, matrix: Tensor) -> "AxisTaps":
        """Taps of a resampling matrix ``(O, I)`` (output ``o`` is ``matrix[o] @ x``).

        Example:
            >>> m = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.0, 0.75, 0.25], [0.0, 0.0, 1.0]])
            >>> taps = AxisTaps.from_matrix(m)
            >>> taps.first.tolist(), taps.last.tolist(), taps.weight.tolist()
            ([0, 0, 1, 2], [0, 1, 2, 2], [[1.0, 0.0], [0.25, 0.75], [0.75, 0.25], [1.0, 0.0]])
        """
        out, size = matrix.shape
        nonzero = matrix != 0
        if not bool(nonzero.any(1).all()):
            raise ValueError("every output of a resampling op must read a source")
        index = torch.arange(size, device=matrix.device)
        first = torch.where(nonzero, index, size).amin(1)
        last = torch.where(nonzero, index, -1).amax(1)
        if bool((first[1:] < first[:-1]).any() or (last[1:] < last[:-1]).any()):
            raise ValueError("the resampling op's sources do not move forward with its outputs")
        taps = int((last - first).max()) + 1
        cols = first[:, None] + torch.arange(taps, device=matrix.device)
        weight = torch.where(cols < size, matrix.gather(1, cols.clamp(max=size - 1)), 0)
        return cls(first.cpu(), last.cpu(), weight.cpu(), size)


def resample_box(in_start: Tensor, in_size: int, taps: AxisTaps, tau: float = 1.0) -> tuple[Tensor, int]:
    """Outputs of a resampling op that read an input patch ``[x_I, x_I + W_I)``.

    ``x_O = min{o : last[o] >= x_I}``, up to ``max{o : first[o] <= x_I + W_I - 1}``
    (the supports are monotone: two binary searches per position); the static
    size is the widest over positions (at least 1), then shifted inside the map
    (eqs. 29-34) and with ``tau < 1`` capped as in eqs. 39-45. Exact for nearest
    modes (each output reads one source).

    Example:
        >>> m = torch.eye(4).repeat_interleave(2, 0)       # nearest, scale 2
        >>> start, size = resample_box(torch.tensor([0, 1, 3]), 2, AxisTaps.from_matrix(m))
        >>> start.tolist(), size
        ([0, 2, 4], 4)
    """
    full = taps.out_size
    start = torch.searchsorted(taps.last, in_start.cpu().contiguous()).to(in_start.device)
    end = torch.searchsorted(taps.first, (in_start + in_size - 1).cpu().contiguous(),
                             right=True).to(in_start.device)
    reached = torch.clamp(end - start, min=0)
    size = min(max(int(reached.max()) if reached.numel() else 1, 1), full)
    start, size = _cap_centred(start, reached, size, full, tau)
    return clamp_to_border(start, size, full), size


def resample_window(out_start: Tensor, out_size: int, taps: AxisTaps) -> tuple[Tensor, int]:
    """Input window that an output box ``[x_O, x_O + W_O)`` of a resampling op reads.

    From ``first[x_O]`` to ``first[x_O + W_O - 1] + T - 1``, ``T`` the taps: every
    tap of every output in the box (taps of weight 0 past the map read the
    window's fill).

    Example:
        >>> m = torch.eye(4).repeat_interleave(2, 0)
        >>> start, size = resample_window(torch.tensor([0, 2, 4]), 4, AxisTaps.from_matrix(m))
        >>> start.tolist(), size
        ([0, 1, 2], 2)
    """
    first = taps.first.to(out_start.device)
    start = first[out_start]
    size = int((first[out_start + out_size - 1] - start).max()) + taps.taps if out_start.numel() else taps.taps
    return start, size


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
