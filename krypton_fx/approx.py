"""Approximate occlusion: adaptive drill-down (eqs. 46-48) and tau tuning (section 4.4).

Projective-field thresholding itself (eqs. 39-45) lives in
:func:`krypton_fx.geometry.local_box` and is switched on by
``compile(tau=...)``; this module adds the two things built on top of it:

* :class:`DrillDown` / :func:`run_drill_down`: a coarse stage-one map at a
  larger stride over the whole image, then the compiled stride only over the
  fraction ``r`` of cells with the largest probability drop.
* :func:`tune`: pick the smallest ``tau`` whose heat maps keep a target SSIM
  against the exact ones, from a degree-2 fit of SSIM against ``tau``.

Example:
    >>> import torch, krypton_fx
    >>> from krypton_fx import lesions
    >>> model = lesions.load_or_train("tiny")
    >>> images, _, _ = lesions.make_dataset(2, size=64, seed=3)
    >>> ex = krypton_fx.compile(model, patch=8, stride=2, image_size=(64, 64))
    >>> res = ex(images[0], drill_down=krypton_fx.DrillDown(r=0.25, stage1_stride=8))
    >>> tuple(res.heatmap.shape), res.stats["stage1_stride"]
    ((29, 29), (8, 8))
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .explainer import Explainer, OcclusionResult, _check_label, _scores
from .explainer import compile as compile_explainer
from .report import theoretical_speedup

__all__ = ["DrillDown", "drill_down_speedup", "stage1_stride", "max_drill_down_speedup",
           "stage1_grid", "upsample_matrix", "run_drill_down", "heatmap_ssim", "drop_kept",
           "select_tau", "guard_tau", "TuneResult", "tune"]

Number = Union[int, float]
Pair = Union[Number, Sequence[Number]]


def _as_pair(value: Pair) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    pair = tuple(float(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"expected a number or a (height, width) pair, got {value!r}")
    return pair  # type: ignore[return-value]


# --- eqs. 46-48 -------------------------------------------------------------------


def drill_down_speedup(s1: Pair, s2: Pair, r: float) -> float:
    """Expected speedup of adaptive drill-down over the full grid (eq. 46).

    ``S1^2 / (S2^2 + r * S1^2)``: positions scale with ``1 / S^2``; with
    ``(height, width)`` strides the squares become the products ``Sy * Sx``.

    Example:
        >>> drill_down_speedup(16, 4, 0.25)
        3.2
    """
    (a, b), (c, d) = _as_pair(s1), _as_pair(s2)
    return (a * b) / (c * d + r * a * b)


def max_drill_down_speedup(r: float) -> float:
    """Supremum of eq. 46 as ``S1`` grows: ``1 / r`` (the bound behind eq. 48).

    Eq. 48 as printed, ``1 / (r * speedup) > speedup``, reads ``speedup <
    1/sqrt(r)``; eqs. 46-47 only need ``1 - r * speedup > 0``, i.e.
    ``speedup < 1/r``, which is what a finite ``S1`` can reach.
    """
    return 1.0 / r


def stage1_stride(speedup: float, s2: Pair, r: float) -> tuple[float, float]:
    """Stage-one stride that gives ``speedup`` (eq. 47), per axis.

    ``S1 = sqrt(speedup / (1 - r * speedup)) * S2``.

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
    factor = math.sqrt(speedup / (1.0 - r * speedup))
    sy, sx = _as_pair(s2)
    return factor * sy, factor * sx


@dataclasses.dataclass(frozen=True)
class DrillDown:
    """Adaptive drill-down settings (section 4.3).

    Give exactly one of ``speedup`` (the stage-one stride then follows from
    eq. 47) or ``stage1_stride`` (pixels, an int or ``(h, w)``).

    Attributes:
        r: fraction of heat-map cells re-run at the compiled stride, in (0, 1].
        speedup: target speedup over the full grid, ``1 <= speedup < 1/r``.
        stage1_stride: stage-one stride in pixels.

    Example:
        >>> DrillDown(r=0.25, speedup=3.0).r
        0.25
        >>> DrillDown(r=0.25, speedup=4.0)
        Traceback (most recent call last):
        ...
        ValueError: speedup 4 is impossible with r=0.25: drill-down can reach at most 1/r = 4 (eq. 48); lower speedup or r
    """

    r: float = 0.25
    speedup: Optional[float] = None
    stage1_stride: Optional[Union[int, tuple[int, int]]] = None

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
            pair = (s, s) if isinstance(s, int) else tuple(s) if isinstance(s, (tuple, list)) else None
            if pair is None or len(pair) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
                raise ValueError(f"DrillDown stage1_stride must be an int >= 1 or a (h, w) pair of them, "
                                 f"got {s!r}")
            object.__setattr__(self, "stage1_stride", pair)

    def stage1_step(self, s2: tuple[int, int]) -> tuple[int, int]:
        """Stage-one step in heat-map cells of the compiled stride ``s2``, at least 1 per axis.

        The stage-one stride is rounded to the nearest multiple of ``s2`` so
        that stage one is a subset of the compiled grid.
        """
        s1 = self.stage1_stride if self.speedup is None else stage1_stride(self.speedup, s2, self.r)
        return tuple(max(1, int(round(a / b))) for a, b in zip(s1, s2))  # type: ignore[return-value]


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


@torch.no_grad()
def run_drill_down(ex: Explainer, image: Tensor, dd: DrillDown, label: Optional[int] = None,
                   batch_size: Optional[int] = None, progress: bool = False) -> OcclusionResult:
    """Two-stage occlusion heat map (section 4.3, fig. 10).

    Stage one runs the explainer on the subset of its grid whose cells are
    multiples of the stage-one step (plus the last row and column), so the
    stage-one stride is the compiled stride times an integer. That coarse map
    is upsampled to the full grid by piecewise-linear (bilinear) interpolation.
    Stage two re-runs, at the compiled stride, the ``ceil(r * cells)`` cells
    with the largest upsampled drop ``base_prob - score``, skipping cells
    stage one already measured. The returned map holds measured values where
    either stage ran and interpolated stage-one values elsewhere; with
    ``r = 1`` every cell is measured and the map is the explainer's exact
    (or tau-approximate) map.

    ``result.stats``: ``expected_speedup`` (eq. 46 at the stage-one stride
    used), ``positions_run`` (both stages), ``achieved_speedup`` (grid
    positions / ``positions_run``), ``stage1_stride`` (pixels),
    ``stage1_positions``, ``stage2_positions``, ``r``.

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
    """
    if not isinstance(dd, DrillDown):
        raise TypeError(f"drill_down must be a krypton_fx.DrillDown, got {type(dd).__name__}")
    start = time.perf_counter()
    hm, wm = ex.grid
    ky, kx = dd.stage1_step(ex.stride)
    logits, stored = ex.prepare(image)
    _check_label(label, logits.shape[-1])
    label = int(logits.argmax(1)) if label is None else label
    base = float(_scores(logits, label, ex.output))

    rows, cols = stage1_grid(hm, ky), stage1_grid(wm, kx)
    stage1 = (rows.view(-1, 1) * wm + cols.view(1, -1)).reshape(-1)
    coarse = ex.run_positions(stage1, stored, label, batch_size, progress).view(len(rows), len(cols))
    upsampled = (upsample_matrix(rows, hm) @ coarse.double() @ upsample_matrix(cols, wm).T).float()

    measured = torch.zeros(hm * wm, dtype=torch.bool)
    measured[stage1] = True
    heat = upsampled.reshape(-1).clone()
    heat[stage1] = coarse.reshape(-1)  # exact copies, not interpolation round-off
    drop = base - heat
    chosen = torch.argsort(drop, descending=True, stable=True)[:math.ceil(dd.r * hm * wm)]
    stage2 = chosen[~measured[chosen]].sort().values
    if len(stage2):
        heat[stage2] = ex.run_positions(stage2, stored, label, batch_size, progress)

    run = len(stage1) + len(stage2)
    s1_px = (ky * ex.stride[0], kx * ex.stride[1])
    stats = {"positions": hm * wm, "positions_run": run, "achieved_speedup": hm * wm / run,
             "expected_speedup": drill_down_speedup(s1_px, ex.stride, dd.r), "stage1_stride": s1_px,
             "stage1_positions": len(stage1), "stage2_positions": len(stage2), "r": dd.r,
             "batch_size": batch_size or ex.batch_size, "seconds": time.perf_counter() - start}
    return OcclusionResult(heat.view(hm, wm), label, base, ex.stride, ex.patch, ex.output, stats)


# --- tuning tau (section 4.4) -------------------------------------------------------------


def heatmap_ssim(exact: Tensor, approx: Tensor, data_range: Optional[float] = 1.0) -> float:
    """SSIM of an approximate heat map against the exact one.

    Args:
        exact: the reference heat map.
        approx: the approximate heat map, same shape.
        data_range: SSIM's ``L``, the range the values can take (Wang et al.,
            2004; skimage's ``data_range``). ``1.0`` for probability maps (the
            default output). ``None``: the exact map's own span, ``max - min``,
            for logit maps, which have no fixed range; on a probability map this
            is the stricter reading, the map as drawn on its own colour scale:
            a nearly flat map (the model barely reacts to any patch) then turns
            tiny absolute errors into large structural ones.

    A constant exact map measured with ``data_range=None`` has no span: it
    scores 1 if the approximation equals it and is measured with the
    approximation's range otherwise. Maps smaller than skimage's default 7x7
    window use the largest odd window that fits.

    Example:
        >>> m = torch.rand(9, 9)
        >>> heatmap_ssim(m, m), heatmap_ssim(m, m, data_range=None)
        (1.0, 1.0)
    """
    from skimage.metrics import structural_similarity

    a = exact.detach().cpu().double().numpy()
    b = approx.detach().cpu().double().numpy()
    if a.shape != b.shape:
        raise ValueError(f"heat maps differ in shape: {a.shape} vs {b.shape}")
    if data_range is not None:
        if not data_range > 0:
            raise ValueError(f"data_range must be > 0 (1.0 for probabilities) or None, got {data_range!r}")
        span = float(data_range)
    else:
        span = float(a.max() - a.min())
        if span <= 1e-12:
            span = float(max(a.max(), b.max()) - min(a.min(), b.min()))
            if span <= 1e-12:
                return 1.0
    win = min(7, *a.shape)
    win -= 1 - win % 2
    if win < 3:
        # A window of one pixel has no variance: compare luminance only.
        return float(structural_similarity(a, b, data_range=span, win_size=1,
                                           use_sample_covariance=False))
    return float(structural_similarity(a, b, data_range=span, win_size=win))


# A drop in probability smaller than this is no evidence of anything (drop_kept).
MIN_PROB_DROP = 0.02


def drop_kept(exact: OcclusionResult, approx: Tensor, min_drop: float = MIN_PROB_DROP) -> float:
    """How much of the exact map's strongest drop the approximate map keeps.

    ``(base - approx[k]) / (base - exact[k])`` at the exact map's minimum
    ``k``: 1 when the approximation shows the same drop there, near 0 when it
    has lost it. SSIM can miss this: a strong drop over a few cells of a
    large, otherwise flat map barely moves a mean over 7x7 windows, yet it is
    the one thing a reader looks for (measured: an InceptionV3-shaped lesion
    model at tau 0.4 keeps SSIM 0.98 while the lesion's drop from 0.99 to
    0.10 shrinks to 0.99 to 0.97).

    Args:
        exact: the exact result (its ``heatmap`` and ``base_prob``).
        approx: the approximate heat map, same shape.
        min_drop: an exact drop smaller than this is no evidence of anything
            (a nearly flat map): the result is NaN.

    Example:
        >>> ex = OcclusionResult(torch.tensor([[0.9, 0.2], [0.9, 0.9]]), 0, 0.9, (1, 1), (1, 1))
        >>> round(drop_kept(ex, torch.tensor([[0.9, 0.55], [0.9, 0.9]])), 3)
        0.5
    """
    flat = exact.heatmap.reshape(-1).double()
    k = int(flat.argmin())
    drop = exact.base_prob - float(flat[k])
    if not drop > min_drop:
        return float("nan")
    return (exact.base_prob - float(approx.reshape(-1)[k])) / drop


def select_tau(taus: Sequence[float], ssims, target: float, resolution: int = 1001
               ) -> tuple[float, np.ndarray]:
    """Fit SSIM against tau with a degree-2 curve and pick the smallest safe tau.

    Args:
        taus: the ``T`` tau values measured.
        ssims: ``(T,)`` or ``(N, T)`` SSIM values (one row per image); every
            point enters the least-squares fit.
        target: required SSIM.
        resolution: grid points searched on ``[min(taus), 1]``.

    Returns:
        ``(tau, coeffs)``: the smallest tau on the grid such that the fitted
        curve stays >= ``target`` from it up to 1 (a dip in between
        disqualifies smaller taus), or 1.0 (exact) if none; ``coeffs`` from
        ``numpy.polyfit``, highest power first.

    Example:
        >>> taus = [0.4, 0.6, 0.8, 1.0]
        >>> tau, _ = select_tau(taus, [1 - 0.5 * (1 - t) ** 2 for t in taus], target=0.9)
        >>> round(tau, 3)
        0.553
    """
    t = np.asarray(taus, dtype=np.float64)
    s = np.asarray(ssims, dtype=np.float64)
    if s.ndim == 1:
        s = s[None]
    if s.shape[-1] != len(t):
        raise ValueError(f"ssims has {s.shape[-1]} columns for {len(t)} taus")
    xs = np.broadcast_to(t, s.shape).reshape(-1)
    ys = s.reshape(-1)
    keep = np.isfinite(ys)
    if len(np.unique(xs[keep])) < 3:
        raise ValueError("a degree-2 fit needs SSIM values at 3 or more distinct taus")
    coeffs = np.polyfit(xs[keep], ys[keep], 2)
    grid = np.linspace(float(t.min()), 1.0, resolution)
    ok = np.polyval(coeffs, grid) >= target
    # Walking down from tau = 1, keep going while the curve stays above target.
    failing = np.nonzero(~ok)[0]
    if len(failing) == 0:
        return float(grid[0]), coeffs
    last_fail = failing[-1]
    if last_fail == len(grid) - 1:
        return 1.0, coeffs
    return float(grid[last_fail + 1]), coeffs


@dataclasses.dataclass
class TuneResult:
    """Outcome of :func:`tune`.

    Attributes:
        tau: the chosen projective-field threshold.
        target_ssim: the SSIM asked for.
        taus: the tau values measured.
        ssims: ``(images, len(taus))`` SSIM of each approximate map to the exact one.
        coeffs: degree-2 fit of SSIM against tau (``numpy.polyfit`` order).
        expected_speedup: ``theoretical_speedup`` at ``tau`` (eqs. 16-20).
        speedups: ``theoretical_speedup`` at each of ``taus``.
        seconds: wall-clock time of the tuning run.
        drop_kept: ``(images, len(taus))`` :func:`drop_kept` of each
            approximate map (NaN where the exact map has no real drop).
        min_drop_kept: the guard asked for (None: SSIM alone, the paper's rule).
        ssim_tau: the tau the SSIM fit alone picks; ``tau`` is larger when the
            ``min_drop_kept`` guard raised it.
    """

    tau: float
    target_ssim: float
    taus: tuple[float, ...]
    ssims: np.ndarray
    coeffs: np.ndarray
    expected_speedup: float
    speedups: tuple[float, ...] = ()
    seconds: float = 0.0
    drop_kept: Optional[np.ndarray] = None
    min_drop_kept: Optional[float] = None
    ssim_tau: Optional[float] = None

    @property
    def fitted_ssim(self) -> float:
        """The fitted curve's SSIM at the chosen tau."""
        return float(np.polyval(self.coeffs, self.tau))

    def __str__(self) -> str:
        guard = f", drop kept >= {self.min_drop_kept:g}" if self.min_drop_kept is not None else ""
        lines = [f"tau tuning: target SSIM {self.target_ssim:g}{guard}, {self.ssims.shape[0]} images",
                 f"{'tau':>5} {'mean SSIM':>10} {'min SSIM':>9} {'fitted':>7} {'drop kept':>10} "
                 f"{'theor. speedup':>15}"]
        for j, tau in enumerate(self.taus):
            col = self.ssims[:, j]
            sp = f"{self.speedups[j]:.2f}x" if self.speedups else "-"
            kept = _nanmean(self.drop_kept, j)
            kept_text = f"{kept:10.3f}" if math.isfinite(kept) else f"{'n/a':>10}"  # flat maps: no drop
            lines.append(f"{tau:5.2f} {np.nanmean(col):10.4f} {np.nanmin(col):9.4f} "
                         f"{np.polyval(self.coeffs, tau):7.4f} {kept_text} {sp:>15}")
        raised = (f"; the SSIM fit alone picks {self.ssim_tau:.3f}"
                  if self.ssim_tau is not None and self.ssim_tau != self.tau else "")
        lines.append(f"chosen tau = {self.tau:.3f} (fitted SSIM {self.fitted_ssim:.4f}), "
                     f"theoretical speedup {self.expected_speedup:.2f}x{raised}")
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Save SSIM against tau, the fitted curve and the chosen tau as an image."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 3.5))
        FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
        ax = fig.add_subplot()
        for row in self.ssims:
            ax.scatter(self.taus, row, s=10, color="tab:blue", alpha=0.4)
        grid = np.linspace(min(self.taus), 1.0, 200)
        ax.plot(grid, np.polyval(self.coeffs, grid), color="tab:orange", label="degree-2 fit")
        ax.axhline(self.target_ssim, color="gray", ls="--", lw=1, label=f"target {self.target_ssim:g}")
        ax.axvline(self.tau, color="tab:red", lw=1, label=f"tau = {self.tau:.2f}")
        ax.set_xlabel("tau")
        ax.set_ylabel("SSIM to exact heat map")
        handles, labels = ax.get_legend_handles_labels()
        if self.drop_kept is not None and np.isfinite(self.drop_kept).any():
            # What SSIM can hide: how much of the strongest drop the maps keep.
            right = ax.twinx()
            kept = [_nanmean(self.drop_kept, j) for j in range(len(self.taus))]
            taus = list(self.taus)
            if 1.0 not in taus:  # the exact map keeps all of it
                taus, kept = taus + [1.0], kept + [1.0]
            taus, kept = zip(*sorted(zip(taus, kept)))
            right.plot(taus, kept, "s--", color="tab:green", ms=4, label="drop kept (mean)")
            right.set_ylabel("drop kept", color="tab:green")
            right.set_ylim(min(0.0, np.nanmin(kept)), 1.05)
            h, lab = right.get_legend_handles_labels()
            handles, labels = handles + h, labels + lab
        ax.legend(handles, labels, loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)


def _nanmean(values: Optional[np.ndarray], column: int) -> float:
    """Mean of a column ignoring NaN; NaN when there is nothing to average."""
    if values is None:
        return float("nan")
    col = values[:, column]
    col = col[np.isfinite(col)]
    return float(col.mean()) if len(col) else float("nan")


def guard_tau(taus: Sequence[float], kept: np.ndarray, tau: float, min_drop_kept: float) -> float:
    """Raise ``tau`` until every measured tau from it up to 1 keeps, on average over
    the images, at least ``min_drop_kept`` of the exact maps' strongest drop.

    Images whose exact map has no real drop (NaN) do not vote; a tau no image
    votes on passes.

    Example:
        >>> guard_tau([0.8, 0.6, 0.4], np.array([[1.0, 0.9, 0.3]]), 0.4, 0.8)
        0.6
    """
    order = sorted(range(len(taus)), key=lambda j: -taus[j])
    chosen = 1.0
    for j in order:  # walking down from the largest tau
        mean = _nanmean(kept, j)
        if np.isfinite(mean) and mean < min_drop_kept:
            break
        chosen = taus[j]
    return max(tau, chosen)


def _images(sample_images) -> list[Tensor]:
    if isinstance(sample_images, Tensor):
        if sample_images.dim() == 3:
            return [sample_images]
        if sample_images.dim() != 4:
            raise ValueError(f"sample_images must be (N, C, H, W) or a list of (C, H, W), "
                             f"got shape {tuple(sample_images.shape)}")
        return list(sample_images)
    images = list(sample_images)
    if not images:
        raise ValueError("tune needs at least one sample image")
    return images


def tune(explainer_or_model: Union[Explainer, nn.Module], sample_images, target_ssim: float = 0.9,
         taus: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4), progress: bool = False,
         min_drop_kept: Optional[float] = None, **compile_kwargs) -> TuneResult:
    """Pick the projective-field threshold tau for a target heat-map SSIM (section 4.4).

    For every sample image, the exact heat map (tau = 1) and one approximate
    map per tau are computed, the latter for the exact map's label; their
    SSIM (:func:`heatmap_ssim`) is fitted with a degree-2 curve in tau, and
    the smallest tau whose fitted SSIM stays >= ``target_ssim`` is chosen
    (:func:`select_tau`). Exact maps at tau = 1 enter the fit with SSIM 1.

    Args:
        explainer_or_model: an :class:`Explainer` (its model and compile
            settings are reused) or a model (then pass ``compile_kwargs``).
        sample_images: ``(N, C, H, W)`` tensor or a list of ``(C, H, W)``
            images from the workload, not the ones to be explained later.
        target_ssim: required SSIM to the exact map.
        taus: values to measure (the paper's defaults); each is compiled
            anew, which is cheap.
        progress: print one line per tau.
        min_drop_kept: also require that every tau from the chosen one up to 1
            keeps, on average, this fraction of the exact maps' strongest drop
            (:func:`drop_kept`; 0.8, say). None (default) is the paper's rule,
            SSIM alone; the fractions are measured and reported either way.
        compile_kwargs: arguments of :func:`krypton_fx.compile`
            (override those of the explainer).

    Example:
        >>> import krypton_fx
        >>> from krypton_fx import lesions
        >>> model = lesions.load_or_train("tiny")
        >>> images = lesions.make_dataset(2, size=64, seed=3)[0]
        >>> ex = krypton_fx.compile(model, patch=8, stride=4, image_size=(64, 64))
        >>> tuned = krypton_fx.tune(ex, images, taus=(0.8, 0.6, 0.4))
        >>> 0.4 <= tuned.tau <= 1.0
        True
    """
    start = time.perf_counter()
    taus = tuple(float(t) for t in taus)
    if not taus or not all(0.0 < t <= 1.0 for t in taus):
        raise ValueError(f"taus must be values in (0, 1], got {taus!r}")
    if not 0.0 < target_ssim <= 1.0:
        raise ValueError(f"target_ssim must be in (0, 1], got {target_ssim!r}")
    if min_drop_kept is not None and not 0.0 < min_drop_kept <= 1.0:
        raise ValueError(f"min_drop_kept must be in (0, 1] or None, got {min_drop_kept!r}")
    if isinstance(explainer_or_model, Explainer):
        ex = explainer_or_model
        settings = {"patch": ex.patch, "stride": ex.stride, "color": ex.color.cpu().tolist(),
                    "image_size": ex.image_chw[1:], "channels": ex.image_chw[0],
                    "batch_size": ex.batch_size, "device": ex.device, "backend": ex.backend,
                    "output": ex.output}
        model = ex.model
    elif isinstance(explainer_or_model, nn.Module):
        ex, settings, model = None, {}, explainer_or_model
    else:
        raise TypeError(f"tune needs an Explainer or an nn.Module, got {type(explainer_or_model).__name__}")
    settings.update(compile_kwargs)
    settings.pop("tau", None)
    images = _images(sample_images)
    if "image_size" not in settings:
        settings["image_size"] = tuple(images[0].shape[-2:])

    # Probabilities take values in [0, 1]; logits have no fixed range (heatmap_ssim)
    # and no scale on which a drop is too small to count (drop_kept).
    prob = settings.get("output", "prob") == "prob"
    data_range, min_drop = (1.0, MIN_PROB_DROP) if prob else (None, 0.0)
    exact_ex = ex if ex is not None and ex.tau == 1.0 and not compile_kwargs else \
        compile_explainer(model, tau=1.0, **settings)
    exact = [exact_ex(img) for img in images]
    ssims = np.full((len(images), len(taus)), np.nan)
    kept = np.full((len(images), len(taus)), np.nan)
    for j, tau in enumerate(taus):
        approx_ex = exact_ex if tau == 1.0 else compile_explainer(model, tau=tau, **settings)
        for i, (img, ref) in enumerate(zip(images, exact)):
            approx = approx_ex(img, label=ref.label)
            ssims[i, j] = heatmap_ssim(ref.heatmap, approx.heatmap, data_range)
            kept[i, j] = drop_kept(ref, approx.heatmap, min_drop)
        if progress:
            print(f"[tune] tau {tau:.2f}: mean SSIM {np.nanmean(ssims[:, j]):.4f}", flush=True)

    fit_taus = taus if 1.0 in taus else taus + (1.0,)
    fit_ssims = ssims if 1.0 in taus else np.concatenate([ssims, np.ones((len(images), 1))], 1)
    ssim_tau, coeffs = select_tau(fit_taus, fit_ssims, target_ssim)
    tau = ssim_tau if min_drop_kept is None else guard_tau(taus, kept, ssim_tau, min_drop_kept)
    size, patch = settings["image_size"], settings.get("patch", 16)
    channels = settings.get("channels", 3)
    speedups = tuple(theoretical_speedup(model, size, patch, tau=t, channels=channels) for t in taus)
    chosen = theoretical_speedup(model, size, patch, tau=tau, channels=channels)
    return TuneResult(tau, float(target_ssim), taus, ssims, coeffs, chosen, speedups,
                      time.perf_counter() - start, kept, min_drop_kept, ssim_tau)
