"""Adaptive drill-down (section 4.3, eqs. 46-48), with a stage one that cannot miss a peak.

A coarse stage one over the whole image, then the compiled stride only over
the fraction ``r`` of cells with the largest probability drop, then the peak
rule (:mod:`krypton_fx.peak`): the cells that could hold the strongest drop,
and those around it, recomputed exactly. ``DrillDown`` runs itself on a
compiled explainer: ``ex(image, drill_down=DrillDown(...))``.

Stage one comes in two kinds:

* ``"cover"`` (the default): every fine patch lies inside one stage-one patch
  (:mod:`.cover`), whose drop bounds the fine cells' drops (if a larger
  occluder drops at least ``1 - margin`` times as much as one inside it), so
  the fine map's strongest drop is always among the cells computed exactly;
* ``"sample"``: the paper's, the compiled grid sampled every ``k`` cells and
  interpolated; a drop narrower than its stride can fall between samples, and
  the peak rule then has only the interpolated values to go on.

Example:
    >>> import torch, krypton_fx
    >>> from krypton_fx import lesions
    >>> model = lesions.load_or_train("tiny")
    >>> images, _, _ = lesions.make_dataset(2, size=64, seed=3)
    >>> ex = krypton_fx.compile(model, patch=8, stride=2, image_size=(64, 64))
    >>> res = ex(images[0], drill_down=krypton_fx.DrillDown(r=0.05, stage1_stride=8))
    >>> tuple(res.heatmap.shape), res.stats["stage1_stride"], res.stats["stage1_patch"]
    ((29, 29), (8, 8), (14, 14))
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import common
from ..explainer import Explainer
from ..explainer import compile as compile_explainer
from ..peak import DEFAULT_MARGIN, neighbourhood_radius, refine_peak, variant
from ..results import OcclusionResult, RunStats
from .cover import cover_bound, cover_index, cover_plan, stage1_explainer

__all__ = ["DrillDown", "drill_down_speedup", "stage1_stride", "max_drill_down_speedup",
           "stage1_grid", "upsample_matrix", "run_drill_down", "STAGE1_KINDS"]

#: Stage-one kinds: covering (a guarantee under an assumption) and sampling (the paper's).
STAGE1_KINDS = ("cover", "sample")

Number = Union[int, float]
Pair = Union[Number, Sequence[Number]]


def _as_tuple(value: Pair, n: int = 2) -> tuple[float, ...]:
    """A number (the same on every axis) or one per axis, as floats."""
    if isinstance(value, (int, float)):
        return (float(value),) * n
    values = tuple(float(v) for v in value)
    if len(values) != n:
        raise ValueError(f"expected a number or {n} numbers (one per spatial axis), got {value!r}")
    return values


# --- eqs. 46-48 -------------------------------------------------------------------


def drill_down_speedup(s1: Pair, s2: Pair, r: float) -> float:
    """Expected speedup of adaptive drill-down over the full grid (eq. 46).

    ``S1^2 / (S2^2 + r * S1^2)``: positions scale with ``1 / S^2``; with
    ``(height, width)`` strides the squares become the products ``Sy * Sx``.

    Example:
        >>> drill_down_speedup(16, 4, 0.25)
        3.2
    """
    n = len(s2) if isinstance(s2, Sequence) else len(s1) if isinstance(s1, Sequence) else 2
    a, c = math.prod(_as_tuple(s1, n)), math.prod(_as_tuple(s2, n))
    return a / (c + r * a)


def max_drill_down_speedup(r: float) -> float:
    """Supremum of eq. 46 as ``S1`` grows: ``1 / r`` (the bound behind eq. 48).

    Eq. 48 as printed, ``1 / (r * speedup) > speedup``, reads ``speedup <
    1/sqrt(r)``; eqs. 46-47 only need ``1 - r * speedup > 0``, i.e.
    ``speedup < 1/r``, which is what a finite ``S1`` can reach.
    """
    return 1.0 / r


def stage1_stride(speedup: float, s2: Pair, r: float) -> tuple[float, ...]:
    """Stage-one stride that gives ``speedup`` (eq. 47), per axis.

    ``S1 = sqrt(speedup / (1 - r * speedup)) * S2`` for images; with ``n``
    spatial axes the root is the ``n``-th (positions scale with ``1 / S^n``).

    Raises:
        ValueError: if ``speedup >= 1/r`` (eq. 48: no stride reaches it).

    Example:
        >>> stage1_stride(3.2, 4, 0.25)
        (16.0, 16.0)
    """
    if not 0.0 < r <= 1.0:
        raise ValueError(f"r must be in (0, 1], got {r!r}")
    if not speedup > 0:
        raise ValueError(f"speedup must be > 0, got {speedup!r}")
    if r * speedup >= 1.0:
        raise ValueError(f"speedup {speedup:g} is impossible with r={r:g}: drill-down can reach at "
                         f"most 1/r = {max_drill_down_speedup(r):g} (eq. 48); lower speedup or r")
    n = len(s2) if isinstance(s2, Sequence) else 2
    # positions scale with 1 / prod(S): each axis grows by the n-th root of the factor
    factor = (speedup / (1.0 - r * speedup)) ** (1.0 / n)
    return tuple(factor * s for s in _as_tuple(s2, n))


@dataclasses.dataclass(frozen=True)
class DrillDown:
    """Adaptive drill-down settings (section 4.3).

    Give exactly one of ``speedup`` (the stage-one stride then follows from
    eq. 47) or ``stage1_stride`` (pixels, an int or one per spatial axis).

    Attributes:
        r: fraction of heat-map cells re-run at the compiled stride, in (0, 1].
        speedup: target speedup over the full grid, ``1 <= speedup < 1/r``.
        stage1_stride: stage-one stride in pixels.
        stage1: ``"cover"`` (stage-one patches that contain every fine patch:
            the peak cannot fall between them) or ``"sample"`` (the paper's
            sampled grid).
        margin: the peak rule's margin (:func:`krypton_fx.peak.refine_peak`):
            approximate cells whose drop may reach ``1 - margin`` times the
            strongest exact drop are recomputed exactly. None: no peak rule
            (the paper's drill-down).
        neighbourhood: cells recomputed around the peak, per axis (None: those
            whose patch overlaps half of the peak's; 0: none).

    Example:
        >>> DrillDown(r=0.25, speedup=3.0).r
        0.25
        >>> DrillDown(r=0.25, speedup=4.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: speedup 4 is impossible with r=0.25: drill-down can reach at most 1/r = 4 (eq. 48); ...
    """

    r: float = 0.25
    speedup: Optional[float] = None
    stage1_stride: Optional[Union[int, tuple[int, ...]]] = None
    stage1: str = "cover"
    margin: Optional[float] = DEFAULT_MARGIN
    neighbourhood: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, (int, float)) or not 0.0 < self.r <= 1.0:
            raise ValueError(f"DrillDown r must be a fraction in (0, 1], got {self.r!r}")
        if (self.speedup is None) == (self.stage1_stride is None):
            raise ValueError("DrillDown needs exactly one of speedup= or stage1_stride=, got "
                             f"speedup={self.speedup!r}, stage1_stride={self.stage1_stride!r}")
        if self.speedup is not None:
            if isinstance(self.speedup, bool) or not isinstance(self.speedup, (int, float)) \
                    or not self.speedup >= 1.0:
                raise ValueError(f"DrillDown speedup must be a number >= 1, got {self.speedup!r}")
            stage1_stride(self.speedup, 1, self.r)  # raises if eq. 48 rules the target out
        else:
            s = self.stage1_stride
            values = (s, s) if isinstance(s, int) else tuple(s) if isinstance(s, (tuple, list)) else None
            if values is None or not 1 <= len(values) <= 3 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
                raise ValueError(f"DrillDown stage1_stride must be an int >= 1 or one such int per spatial "
                                 f"axis, got {s!r}")
            object.__setattr__(self, "stage1_stride", values)
        if self.stage1 not in STAGE1_KINDS:
            raise ValueError(f"DrillDown stage1 must be one of {STAGE1_KINDS}, got {self.stage1!r}")
        m = self.margin
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < math.inf):
            raise ValueError(f"DrillDown margin must be a number >= 0 (a fraction of the peak's drop) or None "
                             f"(no peak rule), got {m!r}")
        k = self.neighbourhood
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"DrillDown neighbourhood must be an int >= 0 (cells per axis) or None, got {k!r}")

    def stage1_step(self, s2: tuple[int, ...]) -> tuple[int, ...]:
        """Stage-one step in heat-map cells of the compiled stride ``s2``, at least 1 per axis.

        The stage-one stride is rounded to the nearest multiple of ``s2`` so
        that stage one is a subset of the compiled grid (or, covering, groups
        whole cells).
        """
        s1 = self.stage1_stride if self.speedup is None else stage1_stride(self.speedup, s2, self.r)
        if len(s1) != len(s2):
            if len(set(s1)) != 1:
                raise ValueError(f"DrillDown stage1_stride {s1} has {len(s1)} axes but the explainer has "
                                 f"{len(s2)}: give an int or one value per axis")
            s1 = (s1[0],) * len(s2)  # an int given as a number means every axis
        return tuple(max(1, int(round(a / b))) for a, b in zip(s1, s2))

    def run(self, explainer: Explainer, image: Tensor, label=None, batch_size: Optional[int] = None,
            progress: bool = False) -> OcclusionResult:
        """The two-stage map of ``image`` on ``explainer``: see :func:`run_drill_down`."""
        return run_drill_down(explainer, image, self, label=label, batch_size=batch_size, progress=progress)


# --- drill-down ----------------------------------------------------------------------


def stage1_grid(cells: int, step: int) -> Tensor:
    """Stage-one rows (or columns) of a grid axis: ``0, k, 2k, ...`` and always the last one.

    Example:
        >>> stage1_grid(10, 4).tolist()
        [0, 4, 8, 9]
    """
    idx = torch.arange(0, cells, step, dtype=torch.int64)
    if idx[-1] != cells - 1:
        idx = torch.cat([idx, torch.tensor([cells - 1])])
    return idx


def upsample_matrix(samples: Tensor, cells: int) -> Tensor:
    """``(cells, len(samples))`` weights of piecewise-linear interpolation along one axis.

    Row ``i`` interpolates cell ``i`` from the two samples around it, so the
    upsampled map equals the stage-one values at the sampled cells and is
    linear in between (also across the shorter last interval).

    Example:
        >>> upsample_matrix(torch.tensor([0, 2, 3]), 4).tolist()
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    pos = torch.arange(cells, dtype=torch.float64)
    s = samples.to(torch.float64)
    right = torch.searchsorted(s, pos, right=False).clamp(1, max(1, len(s) - 1))
    weights = torch.zeros(cells, len(s), dtype=torch.float64)
    if len(s) == 1:
        weights[:, 0] = 1.0
        return weights
    left = right - 1
    frac = ((pos - s[left]) / (s[right] - s[left])).clamp(0.0, 1.0)
    rows = torch.arange(cells)
    weights[rows, left] = 1.0 - frac
    weights[rows, right] += frac
    return weights


class _ExactScores:
    """Exact scores of cells of one image: on ``ex`` itself at tau = 1, else on its tau = 1
    variant (compiled once, its unoccluded pass run at the first use)."""

    def __init__(self, ex: Explainer, image: Tensor, stored: list[Tensor], label: int, batch_size: Optional[int]):
        self.ex, self.image, self.label, self.batch_size = ex, image, label, batch_size
        self.stored: Optional[list[Tensor]] = stored if ex.tau == 1.0 else None

    def __call__(self, positions: Tensor) -> Tensor:
        if self.stored is None:
            self.ex = variant(self.ex, compile_explainer, tau=1.0)
            self.stored = self.ex.prepare(self.image)[1]
        return self.ex.run_positions(positions, self.stored, self.label, self.batch_size).float()


def _sampled_stage1(ex: Explainer, stored: list[Tensor], label: int, steps: Sequence[int],
                    batch_size: Optional[int], progress: bool) -> tuple[Tensor, Tensor]:
    """The paper's stage one: ``(heat, measured)``, the map interpolated from every ``steps``-th
    cell (plus the last) per axis, and which cells were run."""
    grid = ex.grid
    samples = [stage1_grid(n, k) for n, k in zip(grid, steps)]
    # Row-major flat index of every combination of sampled rows, columns (and slices).
    stage1 = torch.zeros(1, dtype=torch.int64)
    for axis_samples, n in zip(samples, grid):
        stage1 = (stage1.view(-1, 1) * n + axis_samples.view(1, -1)).reshape(-1)
    coarse = ex.run_positions(stage1, stored, label, batch_size, progress).view(*(len(a) for a in samples))
    # Piecewise-linear upsampling, one axis at a time (bilinear for images, trilinear for volumes).
    upsampled = coarse.double()
    for axis, (axis_samples, n) in enumerate(zip(samples, grid)):
        upsampled = torch.movedim(torch.tensordot(upsample_matrix(axis_samples, n), upsampled,
                                                  dims=([1], [axis])), 0, axis)
    measured = torch.zeros(math.prod(grid), dtype=torch.bool)
    measured[stage1] = True
    heat = upsampled.float().reshape(-1).clone()
    heat[stage1] = coarse.reshape(-1)  # exact copies, not interpolation round-off
    return heat, measured


@torch.no_grad()
def run_drill_down(ex: Explainer, image: Tensor, dd: DrillDown, label: Optional[int] = None,
                   batch_size: Optional[int] = None, progress: bool = False) -> OcclusionResult:
    """Two-stage occlusion heat map (section 4.3, fig. 10), then the peak rule.

    Stage one: ``"cover"`` runs the explainer's model with a patch that
    contains ``k`` fine patches per axis, once per group of ``k`` cells (the
    stage-one stride is ``k`` times the compiled one), at the explainer's tau;
    each fine cell shows its cover's score, an upper bound on its drop if a
    larger occluder drops at least ``1 - margin`` times as much as one inside
    it (counted from the covers' typical score where they typically raise it:
    :func:`krypton_fx.approx.cover.cover_bound`). ``"sample"`` runs the explainer on every ``k``-th cell (plus the last
    row and column) and interpolates piecewise-linearly (bilinear for images).

    Stage two re-runs, at the compiled stride, the ``ceil(r * cells)`` cells
    with the largest stage-one drop ``base_prob - score`` (covering: at tau = 1;
    sampling: at the explainer's tau, skipping cells stage one measured). Then
    the peak rule (:func:`krypton_fx.peak.refine_peak`, unless ``margin`` is
    None) recomputes at tau = 1 every approximate cell whose drop may reach
    ``1 - margin`` times the strongest exact one, and the cells around the
    peak, until there is none: the map's strongest drop is then an exact cell.
    With a covering stage one at tau = 1 that is the exact map's strongest drop
    whenever the assumption holds (docs/design.md). With ``r = 1`` every cell
    runs on the explainer (its exact or tau map, then the peak rule).

    ``result.stats``: ``expected_speedup`` (eq. 46 at the stage-one stride
    used, in positions), ``positions_run`` (all stages), ``achieved_speedup``
    (grid positions / ``positions_run``), ``stage1_stride`` and
    ``stage1_patch`` (pixels), ``stage1_positions``, ``stage2_positions``,
    ``peak_positions``, ``r``, ``margin``, ``exact_cells`` (which cells are
    exact), ``peak_bounded``.

    Example:
        >>> import torch, krypton_fx
        >>> from krypton_fx import lesions
        >>> model = lesions.load_or_train("tiny")
        >>> image = lesions.make_dataset(1, size=64, seed=3)[0][0]
        >>> ex = krypton_fx.compile(model, patch=8, stride=2, image_size=(64, 64))
        >>> exact = ex(image).heatmap
        >>> full = ex(image, drill_down=krypton_fx.DrillDown(r=1.0, stage1_stride=8)).heatmap
        >>> bool(torch.equal(exact, full))
        True
        >>> res = ex(image, drill_down=krypton_fx.DrillDown(r=0.05, stage1_stride=8))
        >>> int(res.heatmap.argmin()) == int(exact.argmin()), bool(res.stats.exact_cells.view(-1)[exact.argmin()])
        (True, True)
    """
    if not isinstance(dd, DrillDown):
        raise TypeError(f"drill_down must be a krypton_fx.DrillDown, got {type(dd).__name__}")
    start = time.perf_counter()
    grid, cells = ex.grid, math.prod(ex.grid)
    steps = dd.stage1_step(ex.stride)
    cover = dd.stage1 == "cover" and math.ceil(dd.r * cells) < cells
    if cover and ex.settings.fill.reads_image:
        raise ValueError("drill-down's covering stage one needs a patch that replaces the image (a colour); "
                         "this explainer's patch weights the image (MONAI's gaussian or mean_patch mode): "
                         "use DrillDown(stage1='sample')")
    logits, stored = ex.prepare(image)
    label = common.label_index(label, logits.shape[-1])
    label = int(logits.argmax(1)) if label is None else label
    base = float(common.scores(logits, label, ex.output))
    exact_scores = _ExactScores(ex, image, stored, label, batch_size)

    stage1_patch = None
    if math.ceil(dd.r * cells) >= cells:  # every cell at the compiled stride: no stage one
        heat = ex.run_positions(torch.arange(cells), stored, label, batch_size, progress).float()
        exact = torch.full((cells,), ex.tau == 1.0)
        n1, n2 = 0, cells
    elif cover:
        plan = cover_plan(ex, steps)
        stage1 = stage1_explainer(ex, plan)
        coarse = stage1.run_positions(torch.arange(stage1.positions), stage1.prepare(image)[1], label, batch_size,
                                      progress)
        heat = coarse.float()[cover_index(plan)]  # approximate cells show their cover's score
        bound = cover_bound(base, heat)
        exact = torch.zeros(cells, dtype=torch.bool)
        chosen = torch.argsort(bound, descending=True, stable=True)[:math.ceil(dd.r * cells)]
        heat[chosen] = exact_scores(chosen)
        exact[chosen] = True
        n1, n2, stage1_patch = len(coarse), len(chosen), stage1.patch
    else:
        heat, measured = _sampled_stage1(ex, stored, label, steps, batch_size, progress)
        chosen = torch.argsort(base - heat.double(), descending=True, stable=True)[:math.ceil(dd.r * cells)]
        stage2 = chosen[~measured[chosen]].sort().values
        if len(stage2):
            heat[stage2] = ex.run_positions(stage2, stored, label, batch_size, progress)
        exact = (measured.index_fill(0, stage2, True) if len(stage2) else measured) & (ex.tau == 1.0)
        n1, n2 = int(measured.sum()), len(stage2)

    ran = 0
    if dd.margin is not None:
        if dd.neighbourhood is None:
            radius: Optional[tuple[int, ...]] = neighbourhood_radius(ex.patch, ex.stride)
        else:
            radius = (dd.neighbourhood,) * len(grid) if dd.neighbourhood else None
        bound = bound if cover else base - heat.double()  # interpolated or tau values: estimates
        ran = refine_peak(exact_scores, base, heat, exact, bound, grid, dd.margin, radius)
    run = n1 + n2 + ran
    s1_px = tuple(k * s for k, s in zip(steps, ex.stride))
    bounded = bool(exact.all()) or (cover and ex.tau == 1.0 and dd.margin is not None)
    stats = RunStats(cells, min(batch_size or ex.batch_size, run), run, time.perf_counter() - start,
                     stage1_stride=s1_px, stage1_positions=n1, stage2_positions=n2, r=dd.r,
                     expected_speedup=drill_down_speedup(s1_px, ex.stride, dd.r), achieved_speedup=cells / run,
                     exact_cells=exact.view(grid), peak_positions=ran, margin=dd.margin, peak_bounded=bounded,
                     stage1_patch=stage1_patch)
    return OcclusionResult(heat.view(grid), label, base, ex.stride, ex.patch, ex.output, stats)
