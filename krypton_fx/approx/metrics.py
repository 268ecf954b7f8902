"""How close an approximate heat map is to the exact one: SSIM (section 3.3) and the drop kept."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..results import OcclusionResult

__all__ = ["heatmap_ssim", "drop_kept", "peak_kept", "MIN_PROB_DROP"]


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




def peak_kept(exact: OcclusionResult, approx: Tensor, min_drop: float = MIN_PROB_DROP) -> float:
    """1.0 where the approximate map's strongest drop is the exact map's cell, else 0.0.

    NaN where the exact map has no real drop (as :func:`drop_kept`): a nearly
    flat map has no peak to keep.

    Example:
        >>> ex = OcclusionResult(torch.tensor([[0.9, 0.2], [0.9, 0.9]]), 0, 0.9, (1, 1), (1, 1))
        >>> peak_kept(ex, torch.tensor([[0.9, 0.3], [0.9, 0.9]])), peak_kept(ex, torch.tensor([[0.1, 0.3], [0.9, 0.9]]))
        (1.0, 0.0)
    """
    flat = exact.heatmap.reshape(-1)
    if not exact.base_prob - float(flat.min()) > min_drop:
        return float("nan")
    return float(int(approx.reshape(-1).argmin()) == int(flat.argmin()))
