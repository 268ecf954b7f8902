"""Tuning the approximate modes for what a reader needs (section 4.4, and the peak).

:func:`tune` picks the projective-field threshold tau from a degree-2 fit of
SSIM against tau (the paper's rule), raised until every sample image keeps
its strongest drop where the exact map has it and at least ``min_drop_kept``
of its value; and a covering drill-down (:mod:`.tune_drill`) that keeps every
sample image's peak at the least cost. SSIM is measured and reported either way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from torch import Tensor, nn

from .. import common
from ..explainer import Explainer
from ..explainer import compile as compile_explainer
from ..report import theoretical_speedup
from .drilldown import DrillDown
from .metrics import MIN_PROB_DROP, drop_kept, heatmap_ssim, peak_kept
from .tune_drill import DrillDownTrial, choose_drill_down

__all__ = ["select_tau", "guard_tau", "TuneResult", "tune"]

logger = logging.getLogger(__name__)


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
            guard raised it.
        peaks: ``(images, len(taus))`` :func:`peak_kept` of each approximate map.
        drill_down: the covering drill-down chosen for the exact explainer
            (``ex(image, drill_down=tuned.drill_down)``), None if none kept
            every peak or none was tuned.
        drill_down_trials: every drill-down setting measured (:class:`DrillDownTrial`).
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
    peaks: Optional[np.ndarray] = None
    drill_down: Optional[DrillDown] = None
    drill_down_trials: tuple[DrillDownTrial, ...] = ()

    @property
    def fitted_ssim(self) -> float:
        """The fitted curve's SSIM at the chosen tau."""
        return float(np.polyval(self.coeffs, self.tau))

    def __str__(self) -> str:
        lines = []
        if self.taus:
            guard = (f", drop kept >= {self.min_drop_kept:g} and the peak's cell on every image"
                     if self.min_drop_kept is not None else "")
            lines += [f"tau tuning: target SSIM {self.target_ssim:g}{guard}, {self.ssims.shape[0]} images",
                      f"{'tau':>5} {'mean SSIM':>10} {'min SSIM':>9} {'fitted':>7} {'drop kept':>10} {'min':>5} "
                      f"{'peaks':>6} {'theor. speedup':>15}"]
            for j, tau in enumerate(self.taus):
                col = self.ssims[:, j]
                sp = f"{self.speedups[j]:.2f}x" if self.speedups else "-"
                kept, least = _nanmean(self.drop_kept, j), _nanmin(self.drop_kept, j)
                kept_text = f"{kept:10.3f} {least:5.2f}" if math.isfinite(kept) else f"{'n/a':>10} {'':>5}"  # no drop
                peaks = _nanmean(self.peaks, j)
                peak_text = f"{peaks:6.0%}" if math.isfinite(peaks) else f"{'n/a':>6}"
                lines.append(f"{tau:5.2f} {np.nanmean(col):10.4f} {np.nanmin(col):9.4f} "
                             f"{np.polyval(self.coeffs, tau):7.4f} {kept_text} {peak_text} {sp:>15}")
            raised = (f"; the SSIM fit alone picks {self.ssim_tau:.3f}"
                      if self.ssim_tau is not None and self.ssim_tau != self.tau else "")
            lines.append(f"chosen tau = {self.tau:.3f} (fitted SSIM {self.fitted_ssim:.4f}), "
                         f"theoretical speedup {self.expected_speedup:.2f}x{raised}")
        else:
            lines.append(f"tau: not tuned (1.0); {self.ssims.shape[0]} images")
        if self.drill_down_trials:
            lines += ["covering drill-down (stage two and the peak rule replayed on the exact maps):",
                      DrillDownTrial.HEADER] + [t.row() for t in self.drill_down_trials]
            dd = self.drill_down
            lines.append("chosen drill-down: none keeps every peak (use exact maps)" if dd is None else
                         f"chosen drill-down: r={dd.r:g}, stage1_stride={dd.stage1_stride}, margin={dd.margin:g}")
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Save SSIM against tau, the fitted curve, the chosen tau and the drop kept as an image."""
        from ..viz import tune_figure

        kept = None
        if self.drop_kept is not None:
            kept = [_nanmean(self.drop_kept, j) for j in range(len(self.taus))]
        tune_figure(self.taus, self.ssims, self.coeffs, self.target_ssim, self.tau, kept).savefig(path, dpi=120)


def _column_stat(values: Optional[np.ndarray], column: int, stat: Callable[[np.ndarray], Any]) -> float:
    """``stat`` of a column's finite values; NaN when there is nothing (or no ``values``)."""
    if values is None:
        return float("nan")
    col = values[:, column]
    col = col[np.isfinite(col)]
    return float(stat(col)) if len(col) else float("nan")


def _nanmean(values: Optional[np.ndarray], column: int) -> float:
    """Mean of a column ignoring NaN; NaN when there is nothing to average."""
    return _column_stat(values, column, np.mean)


def _nanmin(values: Optional[np.ndarray], column: int) -> float:
    """Least value of a column ignoring NaN; NaN when there is nothing."""
    return _column_stat(values, column, np.min)


def guard_tau(taus: Sequence[float], kept: np.ndarray, tau: float, min_drop_kept: float,
              peaks: Optional[np.ndarray] = None) -> float:
    """Raise ``tau`` until every measured tau from it up to 1 keeps, on every image, at
    least ``min_drop_kept`` of the exact map's strongest drop (and, given ``peaks``,
    the strongest drop at the exact map's cell).

    Images whose exact map has no real drop (NaN) do not vote; a tau no image
    votes on passes.

    Example:
        >>> guard_tau([0.8, 0.6, 0.4], np.array([[1.0, 0.9, 0.3]]), 0.4, 0.8)
        0.6
        >>> guard_tau([0.8, 0.6, 0.4], np.array([[1.0, 0.9, 0.9]]), 0.4, 0.8, np.array([[1.0, 0.0, 1.0]]))
        0.8
    """
    order = sorted(range(len(taus)), key=lambda j: -taus[j])
    chosen = 1.0
    for j in order:  # walking down from the largest tau
        least = _nanmin(kept, j)
        if (np.isfinite(least) and least < min_drop_kept) or _nanmin(peaks, j) < 1.0:
            break
        chosen = taus[j]
    return max(tau, chosen)


def _images(sample_images, spatial_dims: int = 2) -> list[Tensor]:
    if isinstance(sample_images, Tensor):
        if sample_images.dim() == spatial_dims + 1:
            return [sample_images]
        if sample_images.dim() != spatial_dims + 2:
            axes = {1: "L", 2: "H, W", 3: "D, H, W"}.get(spatial_dims, "...")
            raise ValueError(f"sample_images must be (N, C, {axes}) or a list of (C, {axes}), "
                             f"got shape {tuple(sample_images.shape)}")
        return list(sample_images)
    images = list(sample_images)
    if not images:
        raise ValueError("tune needs at least one sample image")
    return images


def tune(explainer_or_model: Union[Explainer, nn.Module], sample_images, target_ssim: float = 0.9,
         taus: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4), progress: bool = False,
         min_drop_kept: Optional[float] = 0.95, drill_down: bool = True, **compile_kwargs) -> TuneResult:
    """Pick tau, and a covering drill-down, that keep the sample images' peaks (section 4.4).

    For every sample image, the exact heat map (tau = 1) and one approximate
    map per tau are computed, the latter for the exact map's label (a tau map
    keeps its peak by the peak rule, :func:`krypton_fx.peak.keep_peak`). Their
    SSIM (:func:`heatmap_ssim`) is fitted with a degree-2 curve in tau, and the
    smallest tau whose fitted SSIM stays >= ``target_ssim`` is the paper's
    choice (:func:`select_tau`); the guard then raises it until every tau from
    it up to 1 keeps, on every image, the strongest drop at the exact map's
    cell and at least ``min_drop_kept`` of its value (:func:`guard_tau`). Exact
    maps at tau = 1 enter the fit with SSIM 1. With ``drill_down``, the
    cheapest covering drill-down whose maps keep every image's peak and reach
    ``target_ssim`` is chosen too (:func:`krypton_fx.approx.tune_drill.choose_drill_down`).

    Args:
        explainer_or_model: an :class:`Explainer` (its model and compile
            settings are reused) or a model (then pass ``compile_kwargs``).
        sample_images: ``(N, C, H, W)`` tensor or a list of ``(C, H, W)``
            images from the workload, not the ones to be explained later.
        target_ssim: required SSIM to the exact map.
        taus: values to measure (the paper's defaults); each is compiled
            anew, which is cheap. Empty: tune drill-down only (``tau`` = 1).
        progress: show a progress bar over the taus.
        min_drop_kept: the fraction of the exact map's strongest drop every
            image must keep, at its cell (:func:`drop_kept`, :func:`peak_kept`).
            None is the paper's rule, SSIM alone; the fractions are measured
            and reported either way.
        drill_down: also choose a covering drill-down (``tuned.drill_down``).
        compile_kwargs: arguments of :func:`krypton_fx.compile`
            (override those of the explainer).

    Example:
        >>> import krypton_fx
        >>> from krypton_fx import lesions
        >>> model = lesions.load_or_train("tiny")
        >>> images = lesions.make_dataset(2, size=64, seed=3)[0]
        >>> ex = krypton_fx.compile(model, patch=8, stride=4, image_size=(64, 64))
        >>> tuned = krypton_fx.tune(ex, images, taus=(0.8, 0.6, 0.4))
        >>> 0.4 <= tuned.tau <= 1.0, tuned.drill_down is None or tuned.drill_down.stage1 == "cover"
        (True, True)
    """
    start = time.perf_counter()
    taus = tuple(float(t) for t in taus)
    if not all(0.0 < t <= 1.0 for t in taus):
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
    size = settings.get("image_size")
    images = _images(sample_images, 2 if size is None else len(common.spatial_size(size)))
    if "image_size" not in settings:
        settings["image_size"] = tuple(images[0].shape[1:])

    # Probabilities take values in [0, 1]; logits have no fixed range (heatmap_ssim)
    # and no scale on which a drop is too small to count (drop_kept).
    prob = settings.get("output", "prob") == "prob"
    data_range, min_drop = (1.0, MIN_PROB_DROP) if prob else (None, 0.0)
    exact_ex = ex if ex is not None and ex.tau == 1.0 and not compile_kwargs else \
        compile_explainer(model, tau=1.0, **settings)
    exact = [exact_ex(img) for img in images]
    ssims = np.full((len(images), len(taus)), np.nan)
    kept = np.full((len(images), len(taus)), np.nan)
    peaks = np.full((len(images), len(taus)), np.nan)
    for j, tau in enumerate(common.progress(taus, progress, "tune", unit="tau")):
        approx_ex = exact_ex if tau == 1.0 else compile_explainer(model, tau=tau, **settings)
        for i, (img, ref) in enumerate(zip(images, exact)):
            approx = approx_ex(img, label=ref.label)
            ssims[i, j] = heatmap_ssim(ref.heatmap, approx.heatmap, data_range)
            kept[i, j] = drop_kept(ref, approx.heatmap, min_drop)
            peaks[i, j] = peak_kept(ref, approx.heatmap, min_drop)
        logger.info("tune: tau %.2f: mean SSIM %.4f", tau, np.nanmean(ssims[:, j]))

    if taus:
        fit_taus = taus if 1.0 in taus else taus + (1.0,)
        fit_ssims = ssims if 1.0 in taus else np.concatenate([ssims, np.ones((len(images), 1))], 1)
        ssim_tau, coeffs = select_tau(fit_taus, fit_ssims, target_ssim)
    else:  # drill-down only
        ssim_tau, coeffs = 1.0, np.array([0.0, 0.0, 1.0])
    tau = ssim_tau if min_drop_kept is None else guard_tau(taus, kept, ssim_tau, min_drop_kept, peaks)
    size, patch = settings["image_size"], settings.get("patch", 16)
    channels = settings.get("channels", 3)
    speedups = tuple(theoretical_speedup(model, size, patch, tau=t, channels=channels) for t in taus)
    chosen = theoretical_speedup(model, size, patch, tau=tau, channels=channels)
    dd, trials = (choose_drill_down(exact_ex, images, exact, target_ssim, data_range=data_range, min_drop=min_drop,
                                    progress=progress) if drill_down else (None, []))
    return TuneResult(tau, float(target_ssim), taus, ssims, coeffs, chosen, speedups,
                      time.perf_counter() - start, kept, min_drop_kept, ssim_tau, peaks, dd, tuple(trials))
