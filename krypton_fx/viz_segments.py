"""Pictures of feature ablation (:meth:`krypton_fx.Explainer.ablate`): an image with its
segments' outlines and each segment's drop (matplotlib; viz.py draws the occlusion maps)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .viz import DROP_CMAP, drop_limit, overlay_alpha

__all__ = ["segments_figure"]


def segments_figure(image: np.ndarray, labels, scores, label: int, base_prob: float,
                    label_name: Optional[str] = None, output: str = "prob",
                    subtitle: Optional[str] = None) -> Figure:
    """The image with its segments' outlines, the per-segment drop over it, and the drop alone.

    Args:
        image: ``(H, W, 3)`` or ``(H, W)`` array in ``[0, 1]`` (as the model saw it).
        labels: ``(H, W)`` consecutive segment ids ``0..K-1``.
        scores: ``(K,)`` score of ``label`` with each segment ablated (``SegmentResult.scores``).
        label: explained class index.
        base_prob: score of ``label`` without ablation.
        label_name: class name for the title, if known.
        output: ``"prob"`` or ``"logit"``.
        subtitle: second title line.

    Example:
        >>> labels = np.arange(4).repeat(8).reshape(4, 8).T.repeat(4, 1)  # 4 bands, 8 x 16
        >>> fig = segments_figure(np.zeros((8, 16, 3)), labels, np.array([1.0, 0.5, 0.9, 1.0]), 1, 1.0)
        >>> len(fig.axes)
        4
    """
    from skimage.segmentation import find_boundaries

    image = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    labels = np.asarray(labels)
    drop_per_segment = base_prob - np.asarray(scores, dtype=np.float64)
    drop = drop_per_segment[labels]
    lim = drop_limit(drop_per_segment)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    edges = find_boundaries(labels, mode="inner")
    outline = np.zeros((*labels.shape, 4))
    outline[edges] = (1.0, 0.9, 0.1, 0.9)

    fig = Figure(figsize=(12.6, 4.7), dpi=110, layout="constrained")
    axes = fig.subplots(1, 3)
    gray = dict(cmap="gray", vmin=0, vmax=1) if image.ndim == 2 else {}
    axes[0].imshow(image, interpolation="nearest", **gray)
    axes[0].imshow(outline, interpolation="nearest")
    axes[0].set_title(f"input and its {len(drop_per_segment)} segments")
    rgba = colormaps[DROP_CMAP](norm(drop))
    rgba[..., 3] = overlay_alpha(drop, lim)
    axes[1].imshow(image, interpolation="nearest", **gray)
    axes[1].imshow(rgba, interpolation="nearest")
    axes[1].imshow(outline * np.array([1, 1, 1, 0.35]), interpolation="nearest")
    axes[1].set_title("segment drop over the input")
    shown = axes[2].imshow(drop, cmap=DROP_CMAP, norm=norm, interpolation="nearest")
    axes[2].imshow(outline * np.array([0, 0, 0, 0.5]), interpolation="nearest")
    axes[2].set_title("segment drop")
    what = "P" if output == "prob" else "logit"
    bar = fig.colorbar(shown, ax=axes[2], shrink=0.9)
    bar.set_label(f"drop in {what}(label) when the segment is ablated\n(red: evidence for the label)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    name = f"{label_name} (class {label})" if label_name else f"class {label}"
    score = f"P = {base_prob:.3f}" if output == "prob" else f"logit = {base_prob:.3f}"
    title = f"Feature ablation of {name}, {score}"
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""))
    return fig
