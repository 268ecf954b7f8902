"""Drill-down's covering stage one: every fine patch lies inside one stage-one patch.

A stage one that *samples* the fine grid every ``k`` cells misses any drop
narrower than its stride. This one groups the fine positions ``k`` at a time
along each axis and occludes, once per group, the union of the group's
patches: along an axis with starts ``s_0 < ... < s_{k-1}``, the patch
``[s_0, s_{k-1} + P)``, so ``P1 = P + (k - 1) * S`` on a regular grid. One patch
size serves every group (the largest), and a group whose patch would cross the
far border starts earlier, flush with it; it still contains every patch of its
group. Each fine cell then has one stage-one cell whose occluder contains its
patch (its *cover*), and the cover's drop is what the cell may drop at most if
a larger occluder containing a smaller one drops at least as much (the peak
rule's bound, :mod:`krypton_fx.peak`), not counting a rise of the score that
large occluders cause anywhere (:func:`cover_bound`).

The stage-one explainer is the same model compiled with the larger patch and
explicit starts (``compile(axis_starts=...)``); compiles are cached per
settings, so each image after the first costs one unoccluded pass and the
stage-one positions.

Example:
    >>> plan = cover_axis(list(range(0, 40, 4)), patch=16, size=56, step=3)
    >>> plan.starts, plan.patch, plan.owner.tolist()
    ((0, 12, 24, 32), 24, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import Tensor

from .. import geometry as geo
from ..explainer import Explainer
from ..explainer import compile as compile_explainer
from ..peak import variant

__all__ = ["AxisCover", "cover_axis", "fine_starts", "cover_plan", "stage1_explainer", "cover_index",
           "cover_bound"]


@dataclasses.dataclass(frozen=True)
class AxisCover:
    """The covering stage one along one axis.

    Attributes:
        starts: stage-one patch starts, in pixels.
        patch: stage-one patch length, in pixels.
        owner: ``(fine cells,)`` int64, the stage-one cell whose patch contains each fine patch.
    """

    starts: tuple[int, ...]
    patch: int
    owner: Tensor


def cover_axis(starts: Sequence[int], patch: int, size: int, step: int) -> AxisCover:
    """Group ``step`` consecutive fine starts and cover each group with one patch.

    Args:
        starts: the fine patch starts along the axis, increasing.
        patch: the fine patch length.
        size: the image's length along the axis.
        step: fine cells per group (capped at the number of cells).
    """
    n = len(starts)
    step = max(1, min(int(step), n))
    groups = [list(starts[i:i + step]) for i in range(0, n, step)]
    # every fine patch ends at most at `size`, so the spread plus the patch fits the image
    cover = max(g[-1] - g[0] for g in groups) + patch
    first = tuple(min(int(g[0]), size - cover) for g in groups)
    return AxisCover(first, int(cover), torch.arange(n, dtype=torch.int64) // step)


def fine_starts(ex: Explainer) -> list[list[int]]:
    """The explainer's patch starts per axis, in pixels."""
    s = ex.settings
    if s.axis_starts is not None:
        return [list(a) for a in s.axis_starts]
    grid = tuple(geo.positions_per_axis(n, p, st) for n, p, st in zip(s.image_size, s.patch, s.stride))
    return [[i * st for i in range(n)] for n, st in zip(grid, s.stride)]


def cover_plan(ex: Explainer, steps: Sequence[int]) -> list[AxisCover]:
    """One :class:`AxisCover` per spatial axis of ``ex``, grouping ``steps[a]`` cells on axis ``a``."""
    s = ex.settings
    return [cover_axis(st, p, n, k) for st, p, n, k in zip(fine_starts(ex), s.patch, s.image_size, steps)]


def stage1_explainer(ex: Explainer, plan: Sequence[AxisCover]) -> Explainer:
    """``ex``'s model and settings with the stage-one patch and starts (compiled once, then cached)."""
    # with explicit starts the stride only names the spacing (results, pictures)
    return variant(ex, compile_explainer, patch=tuple(a.patch for a in plan),
                   axis_starts=tuple(a.starts for a in plan),
                   stride=tuple(a.starts[1] - a.starts[0] if len(a.starts) > 1 else a.patch for a in plan))


def cover_index(plan: Sequence[AxisCover]) -> Tensor:
    """``(fine cells,)`` flat index of each fine cell's stage-one cell, row-major on both grids.

    Example:
        >>> plan = [cover_axis([0, 2, 4], 4, 8, 2), cover_axis([0, 2], 4, 6, 2)]
        >>> cover_index(plan).tolist()
        [0, 0, 0, 0, 1, 1]
    """
    index = torch.zeros(1, dtype=torch.int64)
    for axis in plan:
        index = (index.view(-1, 1) * len(axis.starts) + axis.owner.view(1, -1)).reshape(-1)
    return index


def cover_bound(base: float, covers: Tensor) -> Tensor:
    """The peak rule's bound of each fine cell: its cover's drop ``base - score``, plus the rise of
    the score that the stage-one occluders cause typically (minus their median drop, where it
    is negative).

    A model may read a large occluder anywhere as evidence for its label: on the VGG16-shaped
    lesion model most 28 px black squares *raise* P(lesion) by about 0.05, also over the lesion,
    where a 16 px patch drops it by 0.23. The bound then counts each cover's drop from the
    covers' typical score, not from the image's. Where occluders typically lower the score (a
    monotone model) the bound is the cover's drop as it is.

    Args:
        base: the unoccluded score.
        covers: ``(fine cells,)`` each fine cell's cover score.

    Example:
        >>> cover_bound(1.0, torch.tensor([1.1, 1.1, 1.1, 0.5])).tolist()   # covers raise it by 0.1
        [0.0, 0.0, 0.0, 0.6]
        >>> cover_bound(1.0, torch.tensor([0.9, 0.9, 0.5])).tolist()
        [0.1, 0.1, 0.5]
    """
    drop = base - covers.double()
    return drop - min(0.0, float(drop.median()))
