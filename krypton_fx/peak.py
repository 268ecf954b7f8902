"""Exact where it matters: the cells that decide an approximate map's reading, recomputed exactly.

The one thing a reader looks for in an occlusion map is its strongest drop
``base - score`` and where it lies. An approximate map (tau, drill-down) can
move or flatten it. The *peak rule* recomputes exactly, at the compiled patch
and stride with tau = 1, the approximate cells that could hold the peak, and
around the peak, until the strongest drop is an exactly computed cell and every
approximate cell lies clearly below it:

    D* = the strongest drop among exact cells
    stop when every approximate cell c has  bound(c) < D* - margin * |D*|

``bound(c)`` is what the approximation says cell ``c`` may drop: the drop of a
larger occluder that contains the cell's patch (drill-down's covering stage
one, :mod:`krypton_fx.approx.cover`), or the approximate drop itself (a tau map,
an interpolated stage one). With a covering stage one at tau = 1 the rule is a
guarantee under one assumption, that a larger occluder containing a smaller one
drops at least ``1 - margin`` times as much; otherwise it is an estimate
(docs/design.md, "Approximate maps that keep the peak").

Nothing here knows what a score is: a target whose heat map is one value per
position (a class probability, a segmentation target's reduced score) has its
peak at the strongest drop ``base - value``.

Example:
    >>> heat = torch.tensor([0.9, 0.3, 0.9, 0.2])          # approximate; the true map is below
    >>> truth = torch.tensor([0.9, 0.6, 0.9, 0.1])
    >>> exact = torch.zeros(4, dtype=torch.bool)
    >>> refine_peak(lambda p: truth[p], 1.0, heat, exact, 1.0 - heat.double(), (4,), margin=0.3, batch=1)
    2
    >>> int(heat.argmin()), exact.tolist()      # cell 1 (bound 0.7) could reach 0.7 x the peak's 0.9
    (3, [False, True, False, True])
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import common
from .results import OcclusionResult, RunStats

if TYPE_CHECKING:  # annotations only: the explainer calls keep_peak, not the other way round
    from .explainer import Explainer

__all__ = ["DEFAULT_MARGIN", "PEAK_BATCH", "neighbourhood_radius", "neighbours", "refine_peak", "variant",
           "keep_peak"]

logger = logging.getLogger(__name__)

#: How far an approximate cell's value is trusted, as a fraction of the peak's drop, where
#: nothing was tuned (``krypton_fx.tune`` measures it): at the exact peak, a covering
#: occluder dropped 0.47-0.91 as much as the patch on the ResNet18-shaped lesion model
#: (stage-one steps 2-8), 0.15-0.24 on the VGG16-shaped one at steps 2-4 (docs/design.md).
#: Where the map is flat away from its peak a large margin costs few cells.
DEFAULT_MARGIN = 0.5

#: Cells recomputed per round of the rule: the strongest candidates first, so that the
#: peak found early prunes the rest; small enough to waste little, large enough for a batch.
PEAK_BATCH = 32


def neighbourhood_radius(patch: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """Cells around the peak that are recomputed with it, per axis: those whose patch
    overlaps at least half of the peak's (``ceil(P / S) // 2``, at least 1).

    Example:
        >>> neighbourhood_radius((16, 16), (4, 4)), neighbourhood_radius((16, 16, 16), (8, 8, 8))
        ((2, 2), (1, 1, 1))
    """
    return tuple(max(1, math.ceil(p / s) // 2) for p, s in zip(patch, stride))


def neighbours(cell: int, grid: Sequence[int], radius: Sequence[int]) -> Tensor:
    """Flat indices of the cells within ``radius`` (per axis) of flat ``cell``, itself included.

    Example:
        >>> neighbours(4, (3, 3), (1, 1)).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7, 8]
        >>> neighbours(0, (3, 4), (1, 1)).tolist()
        [0, 1, 4, 5]
    """
    index = torch.zeros(1, dtype=torch.int64)
    rest = cell
    coords = []
    for n in reversed(grid):
        coords.append(rest % n)
        rest //= n
    for c, n, r in zip(reversed(coords), grid, radius):
        axis = torch.arange(max(0, c - r), min(n, c + r + 1), dtype=torch.int64)
        index = (index.view(-1, 1) * n + axis.view(1, -1)).reshape(-1)
    return index


def refine_peak(run_exact: Callable[[Tensor], Tensor], base: float, heat: Tensor, exact: Tensor, bound: Tensor,
                grid: Sequence[int], margin: float = DEFAULT_MARGIN, radius: Optional[Sequence[int]] = None,
                batch: int = PEAK_BATCH) -> int:
    """Recompute exactly the cells that decide the reading (the peak rule), in place.

    Each round takes the approximate cells within ``radius`` of the strongest
    exact drop, and the ``batch`` approximate cells with the largest ``bound``
    that could still reach the peak (``bound >= D* - margin * |D*|``), and
    computes them exactly. It stops when there are none: then the map's
    strongest drop is an exact cell and its value exact, and every approximate
    cell shows less (its ``bound`` is shown, or less).

    Args:
        run_exact: exact scores of flat cell indices (an ``int64`` tensor).
        base: the unoccluded score.
        heat: ``(cells,)`` float32 map, approximate where ``exact`` is False;
            exact cells are written into it.
        exact: ``(cells,)`` bool, which cells of ``heat`` are exact; updated.
        bound: ``(cells,)`` the drop each approximate cell may have (trusted up
            to ``margin``); ignored where ``exact``.
        grid: the heat map's shape (for the neighbourhood).
        margin: fraction of the peak's drop by which an approximate cell may
            understate its own (>= 0).
        radius: cells recomputed around the peak per axis; None: none.
        batch: the most cells of the bound recomputed per round.

    Returns:
        The number of cells recomputed.
    """
    if not margin >= 0.0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    bound = bound.double()
    run = 0
    while True:
        drop = torch.where(exact, base - heat.double(), torch.tensor(-math.inf, dtype=torch.float64))
        peak = int(drop.argmax())  # the first of equal drops, as the exact map's argmin
        strongest = float(drop[peak])
        todo = []
        if math.isfinite(strongest) and radius is not None:
            near = neighbours(peak, grid, radius)
            todo.append(near[~exact[near]])
        threshold = strongest - margin * abs(strongest) if math.isfinite(strongest) else -math.inf
        candidates = torch.nonzero(~exact & (bound >= threshold)).view(-1)
        if len(candidates):
            order = torch.argsort(bound[candidates], descending=True, stable=True)
            todo.append(candidates[order[:batch]])
        cells = torch.unique(torch.cat(todo)) if todo else torch.empty(0, dtype=torch.int64)
        if not len(cells):
            return run
        heat[cells] = run_exact(cells).to(heat.dtype)
        exact[cells] = True
        run += len(cells)


def variant(ex: "Explainer", compile_fn: Callable[..., "Explainer"], **changes) -> "Explainer":
    """``ex``'s model compiled with its settings, some changed (``tau=1.0``, a larger ``patch``), by
    ``compile_fn`` (:func:`krypton_fx.compile`, whose cache compiles each settings once)."""
    settings = {f.name: getattr(ex.settings, f.name) for f in dataclasses.fields(ex.settings)}
    return compile_fn(ex.model, **{**settings, **changes})


@torch.no_grad()
def keep_peak(ex: "Explainer", compile_fn: Callable[..., "Explainer"], image: Tensor, label: Optional[int] = None,
              batch_size: Optional[int] = None, progress: bool = False, margin: float = DEFAULT_MARGIN,
              radius: Optional[Sequence[int]] = None) -> OcclusionResult:
    """The map of ``ex`` (a tau < 1 explainer) with its peak recomputed at tau = 1.

    Every position runs on ``ex``; then :func:`refine_peak` with each cell's
    approximate drop as its bound (an estimate: tau may understate a drop by
    more than ``margin``, see ``krypton_fx.tune``). ``res.stats.exact_cells``
    says which cells are exact.

    Args:
        ex: the approximate explainer.
        compile_fn: :func:`krypton_fx.compile`, for ``ex``'s settings at tau = 1 (:func:`variant`).
        image, label, batch_size, progress: as ``Explainer.__call__``.
        margin: see :func:`refine_peak`.
        radius: cells recomputed around the peak per axis (None:
            :func:`neighbourhood_radius`).
    """
    start = time.perf_counter()
    logits, stored = ex.prepare(image)
    label = common.label_index(label, logits.shape[-1])
    label = int(logits.argmax(1)) if label is None else label
    base = float(common.scores(logits, label, ex.output))
    cells = ex.positions
    heat = ex.run_positions(torch.arange(cells), stored, label, batch_size, progress).float()
    exact = torch.full((cells,), ex.tau == 1.0)
    ran = 0
    if not exact.all():
        exact_ex = variant(ex, compile_fn, tau=1.0)
        _, exact_stored = exact_ex.prepare(image)
        ran = refine_peak(lambda p: exact_ex.run_positions(p, exact_stored, label, batch_size), base, heat, exact,
                          base - heat.double(), ex.grid, margin,
                          neighbourhood_radius(ex.patch, ex.stride) if radius is None else radius)
        logger.debug("keep_peak: %d of %d cells recomputed exactly", ran, cells)
    batch = min(batch_size or ex.batch_size, cells)
    stats = RunStats(cells, batch, cells + ran, time.perf_counter() - start, exact_cells=exact.view(ex.grid),
                     peak_positions=ran, margin=margin, peak_bounded=False)
    return OcclusionResult(heat.view(ex.grid), label, base, ex.stride, ex.patch, ex.output, stats)
