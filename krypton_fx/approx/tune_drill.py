"""Choosing drill-down settings that keep the peak (``tune(..., drill_down=True)``).

For each candidate stage-one step ``k`` the covering stage one
(:mod:`.cover`) runs once per sample image; everything after it is decided by
values the exact maps already hold, so stage two and the peak rule are
replayed offline (:func:`replay`) for every ``r`` without running the model
again. Per step, the tuner measures the *peak ratio*: at the exact map's
strongest drop, how much the covering occluder drops relative to the patch.
The peak rule's assumption is that this ratio is at least ``1 - margin``;
the margin chosen is ``1 - (smallest ratio seen) + slack``, at least
``min_margin``, and below 1 (at 1 the cover's drop bounds nothing: on the
3-D lesion model a larger black cube raised the probability at the peak). A
setting qualifies when, on every sample image with a real drop, the replayed
map's strongest drop is the exact map's cell (so all of its drop is kept) and
its SSIM reaches the target; the cheapest qualifying
one wins, by conv multiply-adds (eqs. 16-20: stage-one positions at the larger
patch, fine positions at the compiled one), and of those within 10 % of its
cost the one with the largest peak ratio (the assumption held by the most).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import common
from ..explainer import Explainer
from ..peak import neighbourhood_radius, refine_peak
from ..report import theoretical_speedup
from ..results import OcclusionResult
from .cover import cover_bound, cover_index, cover_plan, stage1_explainer
from .drilldown import DrillDown
from .metrics import drop_kept, heatmap_ssim, peak_kept

__all__ = ["DrillDownTrial", "peak_ratio", "replay", "choose_drill_down", "STEPS", "RS"]

logger = logging.getLogger(__name__)

#: Stage-one steps tried (cells of the compiled stride per stage-one cell, per axis).
STEPS = (2, 3, 4, 6, 8)
#: Fractions refined in stage two tried, smallest first.
RS = (0.005, 0.01, 0.02, 0.05, 0.1)


@dataclasses.dataclass(frozen=True)
class DrillDownTrial:
    """One candidate drill-down, measured on the sample images.

    Attributes:
        step: stage-one cells per axis.
        stage1_stride: stage-one stride in pixels.
        stage1_patch: stage-one patch in pixels.
        r: stage two's fraction.
        margin: the peak rule's margin.
        peak_ratio: smallest peak ratio over the images (the cover's drop over the patch's, at the
            exact map's strongest drop); the assumption holds where it is >= ``1 - margin``.
        peaks_kept: images whose replayed map has its strongest drop at the exact map's cell.
        images: images with a real drop (the others do not vote).
        min_drop_kept: smallest drop kept (:func:`drop_kept`) over those images.
        min_ssim: smallest SSIM to the exact map over all images.
        mean_ssim: mean SSIM.
        positions: mean positions run per image (stage one, stage two, peak rule).
        speedup: conv multiply-adds of the exact map over the drill-down's (theory, eqs. 16-20).
        ok: every image kept its peak and reached the SSIM target, with a margin below 1.
    """

    step: int
    stage1_stride: tuple[int, ...]
    stage1_patch: tuple[int, ...]
    r: float
    margin: float
    peak_ratio: float
    peaks_kept: int
    images: int
    min_drop_kept: float
    min_ssim: float
    mean_ssim: float
    positions: float
    speedup: float
    ok: bool

    def row(self) -> str:
        stride, patch = "x".join(map(str, self.stage1_stride)), "x".join(map(str, self.stage1_patch))
        return (f"{self.step:>4} {stride:>8} {patch:>8} "
                f"{self.r:6.3f} {self.margin:6.2f} {self.peak_ratio:6.2f} {self.peaks_kept:>3}/{self.images:<3} "
                f"{self.min_drop_kept:6.2f} {self.min_ssim:6.3f} {self.positions:8.0f} {self.speedup:7.1f}x"
                f"{'  ok' if self.ok else ''}")

    HEADER = (f"{'step':>4} {'stride':>8} {'patch':>8} {'r':>6} {'margin':>6} {'ratio':>6} {'peaks':>7} "
              f"{'kept':>6} {'SSIM':>6} {'positions':>8} {'theory':>8}")


def peak_ratio(exact: OcclusionResult, stage1: Tensor, min_drop: float) -> float:
    """The cover's bound (:func:`cover_bound`) over the patch's drop at the exact map's strongest
    drop (NaN without one).

    Example:
        >>> ex = OcclusionResult(torch.tensor([0.9, 0.2]), 0, 1.0, (1,), (1,))
        >>> round(peak_ratio(ex, torch.tensor([0.5, 0.3]), 0.02), 3)
        0.875
    """
    flat = exact.heatmap.reshape(-1).double()
    k = int(flat.argmin())
    drop = exact.base_prob - float(flat[k])
    bound = cover_bound(exact.base_prob, stage1.reshape(-1))
    return float(bound[k]) / drop if drop > min_drop else float("nan")


def replay(exact: OcclusionResult, stage1: Tensor, r: float, margin: float,
           radius: Optional[Sequence[int]]) -> tuple[Tensor, int]:
    """Drill-down after a covering stage one (``stage1``: each cell's cover score, flat), with the
    exact map's values standing in for the runs: ``(heat, fine positions run)``."""
    truth = exact.heatmap.reshape(-1)
    base, cells = exact.base_prob, truth.numel()
    heat = stage1.reshape(-1).float().clone()
    bound = cover_bound(base, heat)
    exact_cells = torch.zeros(cells, dtype=torch.bool)
    chosen = torch.argsort(bound, descending=True, stable=True)[:math.ceil(r * cells)]
    heat[chosen] = truth[chosen]
    exact_cells[chosen] = True
    ran = refine_peak(lambda p: truth[p], base, heat, exact_cells, bound, exact.heatmap.shape, margin, radius)
    return heat.view(exact.heatmap.shape), len(chosen) + ran


def choose_drill_down(ex: Explainer, images: Sequence[Tensor], exact: Sequence[OcclusionResult],
                      target_ssim: float = 0.9, steps: Sequence[int] = STEPS, rs: Sequence[float] = RS,
                      min_margin: float = 0.1, slack: float = 0.1, data_range: Optional[float] = 1.0,
                      min_drop: float = 0.02, progress: bool = False
                      ) -> tuple[Optional[DrillDown], list[DrillDownTrial]]:
    """The cheapest covering drill-down that keeps every sample image's peak (see the module).

    Args:
        ex: the exact explainer (tau = 1).
        images: the sample images.
        exact: their exact maps (``ex(image)``).
        target_ssim: the SSIM every replayed map must reach.
        steps: stage-one steps to try.
        rs: stage-two fractions to try.
        min_margin: the least margin chosen.
        slack: added to ``1 - (smallest peak ratio)``.
        data_range: SSIM's ``L`` (:func:`heatmap_ssim`).
        min_drop: an exact drop below this is no peak.
        progress: a progress bar over the steps.

    Returns:
        ``(drill_down, trials)``: the chosen :class:`DrillDown` (None if no
        setting qualifies: use exact maps) and every setting measured.
    """
    if ex.tau != 1.0:
        raise ValueError(f"choose_drill_down needs the exact explainer (tau = 1), got tau {ex.tau}")
    model, size = ex.model, ex.settings.image_size
    fine_cost = 1.0 / theoretical_speedup(model, size, ex.patch, channels=ex.settings.channels)
    cells = ex.positions
    radius = neighbourhood_radius(ex.patch, ex.stride)
    trials, seen = [], set()
    for k in common.progress(steps, progress, "tune drill-down", unit="step"):
        plan = cover_plan(ex, (k,) * len(ex.grid))
        patch1 = tuple(a.patch for a in plan)
        if patch1 in seen or patch1 == tuple(ex.patch):  # a step past the grid, or no grouping at all
            continue
        seen.add(patch1)
        stage1 = stage1_explainer(ex, plan)
        index = cover_index(plan)
        covers = [stage1.run_positions(torch.arange(stage1.positions), stage1.prepare(img)[1], ref.label)[index]
                  for img, ref in zip(images, exact)]
        ratios = np.array([peak_ratio(ref, c, min_drop) for ref, c in zip(exact, covers)])
        voting = np.isfinite(ratios)
        worst = float(ratios[voting].min()) if voting.any() else 1.0
        margin = round(max(min_margin, 1.0 - worst + slack), 2)
        stage1_cost = stage1.positions / theoretical_speedup(model, size, patch1, channels=ex.settings.channels)
        for r in sorted(rs):
            replays = [replay(ref, c, r, margin, radius) for ref, c in zip(exact, covers)]
            kept = np.array([peak_kept(ref, heat, min_drop) for ref, (heat, _) in zip(exact, replays)])
            drops = np.array([drop_kept(ref, heat, min_drop) for ref, (heat, _) in zip(exact, replays)])
            ssims = np.array([heatmap_ssim(ref.heatmap, heat, data_range) for ref, (heat, _) in zip(exact, replays)])
            fine = float(np.mean([n for _, n in replays]))
            trial = DrillDownTrial(
                k, tuple(k * s for s in ex.stride), patch1, r, margin, worst, int(np.nansum(kept)),
                int(voting.sum()), float(np.nanmin(drops)) if voting.any() else float("nan"),
                float(ssims.min()), float(ssims.mean()), stage1.positions + fine,
                cells * fine_cost / (stage1_cost + fine * fine_cost),
                # a margin of 1 or more trusts the cover's drop for nothing: the rule would run every
                # cell that drops at all (a larger occluder raised the score at a peak)
                bool(np.nansum(kept) == voting.sum() and ssims.min() >= target_ssim - 1e-9 and margin < 1.0))
            trials.append(trial)
            logger.info("tune drill-down: %s", trial.row())
            if trial.ok:  # a larger r only costs more
                break
    good = [t for t in trials if t.ok]
    if not good:
        return None, trials
    # the cheapest; of settings within 10 % of its cost, the one whose assumption held by the most
    fastest = max(t.speedup for t in good)
    best = max((t for t in good if t.speedup >= fastest / 1.1), key=lambda t: (t.peak_ratio, t.speedup))
    return DrillDown(r=best.r, stage1_stride=best.stage1_stride, margin=best.margin), trials
