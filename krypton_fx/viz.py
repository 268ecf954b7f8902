"""Pictures of occlusion heat maps and benchmark results (matplotlib, Agg).

Figures are built on :class:`matplotlib.figure.Figure` directly, not through
``pyplot``: no global figure state, no display needed, safe in scripts and
threads. Writing files is the caller's business (``fig.savefig``), so the CLI
can write to a temporary file and rename it into place.

Colours: a heat map cell holds ``P(label)`` with the patch there, so the
pictures show the *drop* ``base_prob - heatmap``: red where occluding lowers
the prediction (evidence for the label), blue where it raises it, white where
it does not matter.
"""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = ["target_label", "upsample_heatmap", "upsample_heatmap_nd", "heatmap_figure", "volume_figure", "drop_limit",
           "display_scale", "overlay_alpha", "bench_figure", "DROP_CMAP", "mark_approximate", "approximate_pixels"]

#: The colour map of drops: red where occluding lowers the score, white where it does not matter.
DROP_CMAP = "RdBu_r"
_BOX_COLOR = "#39ff14"


def target_label(target, mask) -> str:
    """A segmentation target's label in a picture title: how it reduces, over how many mask
    pixels (``mask``: the result's mask, weights)."""
    return f"{target.reduce} over {int((mask > 0).sum())} mask pixels"


def _interp_matrix(pixels: int, cells: int, patch: int, stride: int) -> np.ndarray:
    """``(pixels, cells)`` linear-interpolation weights from patch centres to pixel centres."""
    # Cell i is the patch whose top-left pixel is i*stride: its centre is at
    # i*stride + (patch-1)/2. Pixels beyond the first/last centre take the edge value.
    t = (np.arange(pixels, dtype=np.float64) - (patch - 1) / 2) / stride
    t = np.clip(t, 0, cells - 1)
    lo = np.floor(t).astype(np.int64)
    hi = np.minimum(lo + 1, cells - 1)
    frac = t - lo
    m = np.zeros((pixels, cells))
    rows = np.arange(pixels)
    np.add.at(m, (rows, lo), 1 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def upsample_heatmap(heatmap, image_hw: Sequence[int], patch: Sequence[int],
                     stride: Sequence[int]) -> np.ndarray:
    """Bilinearly upsample a heat map to image size, each cell at its patch's centre.

    Args:
        heatmap: ``(H_M, W_M)`` array or tensor; cell ``(i, j)`` belongs to the
            patch whose top-left corner is ``(i * Sy, j * Sx)``.
        image_hw: ``(H, W)`` of the image.
        patch: ``(h, w)`` occlusion patch.
        stride: ``(Sy, Sx)``.

    Returns:
        float64 array ``(H, W)``.

    Example:
        >>> up = upsample_heatmap(np.array([[0.0, 1.0]]), (4, 6), (4, 4), (2, 2))
        >>> up.shape, up[0].round(2).tolist()
        ((4, 6), [0.0, 0.0, 0.25, 0.75, 1.0, 1.0])
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2:
        return upsample_heatmap_nd(heat, image_hw, patch, stride)
    my = _interp_matrix(int(image_hw[0]), heat.shape[0], int(patch[0]), int(stride[0]))
    mx = _interp_matrix(int(image_hw[1]), heat.shape[1], int(patch[1]), int(stride[1]))
    return my @ heat @ mx.T


def upsample_heatmap_nd(heatmap, size: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """Upsample a heat map over any number of axes to the input's grid (trilinear for volumes),
    each cell at its patch's centre: :func:`upsample_heatmap` one axis at a time.

    Args:
        heatmap: ``(D_M, H_M, W_M)`` (or any number of axes); cell ``(i, j, k)``
            belongs to the patch whose first voxel is ``(i * Sd, j * Sh, k * Sw)``.
        size: the input's spatial size, one entry per axis.
        patch: the occlusion patch, one entry per axis.
        stride: the stride, one entry per axis.

    Returns:
        float64 array of shape ``size``.

    Example:
        >>> up = upsample_heatmap_nd(np.array([[[0.0, 1.0]]]), (2, 2, 6), (2, 2, 4), (2, 2, 2))
        >>> up.shape, up[0, 0].round(2).tolist()
        ((2, 2, 6), [0.0, 0.0, 0.25, 0.75, 1.0, 1.0])
    """
    out = np.asarray(heatmap, dtype=np.float64)
    if not len(size) == len(patch) == len(stride) == out.ndim:
        raise ValueError(f"a {out.ndim}-axis map needs {out.ndim} sizes, patches and strides, got "
                         f"{tuple(size)}, {tuple(patch)}, {tuple(stride)}")
    for axis, (n, p, s) in enumerate(zip(size, patch, stride)):
        m = _interp_matrix(int(n), out.shape[axis], int(p), int(s))
        out = np.moveaxis(np.tensordot(m, out, axes=(1, axis)), 0, axis)
    return out


def _symmetric_limit(values: np.ndarray) -> float:
    # A robust limit: one outlier cell should not wash out the rest of the map.
    lim = float(np.percentile(np.abs(values), 99.5)) if values.size else 0.0
    return max(lim, float(np.abs(values).max()) * 0.5, 1e-12)


# Drops below this fraction of the colour scale are fully transparent: the
# diverging map is near-white there, and a faint white tint along every zero
# crossing drew lines over the picture.
_OVERLAY_FLOOR = 0.1


def overlay_alpha(drop: np.ndarray, limit: float) -> np.ndarray:
    """Opacity of the overlay: 0 for small drops (the image shows unchanged), growing to 0.75.

    Example:
        >>> overlay_alpha(np.array([0.0, 0.05, 0.5, 1.0, -2.0]), 1.0).round(2).tolist()
        [0.0, 0.0, 0.39, 0.75, 0.75]
    """
    scaled = (np.abs(drop) / limit - _OVERLAY_FLOOR) / (1.0 - _OVERLAY_FLOOR)
    return 0.75 * np.clip(scaled, 0.0, 1.0) ** 0.8


def _draw_box(ax, box: Sequence[int], label: Optional[str]) -> None:
    y, x, h, w = (int(v) for v in box)
    ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=_BOX_COLOR,
                           linewidth=1.6, label=label))


_APPROX_HATCH = "////"
_APPROX_LABEL = "approximate (not computed exactly)"


def mark_approximate(ax, approximate: np.ndarray, label: Optional[str] = None) -> None:
    """Hatch the pixels where ``approximate`` (a bool array on the panel's grid) is True.

    Example:
        >>> ax = Figure().subplots()
        >>> mark_approximate(ax, np.eye(6, dtype=bool), "approximate")
    """
    region = np.asarray(approximate, dtype=np.float64)
    if not region.any():
        return
    limits = ax.get_xlim(), ax.get_ylim()  # an image's extent (and its upside-down y axis) stay
    hatched = ax.contourf(region, levels=[0.5, 1.5], colors="none", hatches=[_APPROX_HATCH])
    hatched.set_edgecolor((0.25, 0.25, 0.25, 0.55))  # the hatch's colour
    hatched.set_linewidth(0.0)
    ax.set_xlim(limits[0])
    ax.set_ylim(limits[1])
    if label:
        ax.add_patch(Rectangle((0, 0), 0, 0, facecolor="none", edgecolor=(0.25, 0.25, 0.25), hatch=_APPROX_HATCH,
                               label=label))


def approximate_pixels(exact_cells, size: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """The pixels (voxels) nearer approximate cells than exact ones, as the map is upsampled:
    ``exact_cells`` (``res.stats.exact_cells``, True where exact) on the input's grid, negated.

    Example:
        >>> approximate_pixels(np.array([[True, False]]), (4, 8), (4, 4), (4, 4))[0].tolist()
        [False, False, False, False, False, True, True, True]
    """
    exact = np.asarray(exact_cells, dtype=np.float64)
    return upsample_heatmap_nd(exact, size, patch, stride) < 0.5


def heatmap_figure(image: np.ndarray, heatmap, patch: Sequence[int], stride: Sequence[int],
                   label: int, base_prob: float, label_name: Optional[str] = None,
                   output: str = "prob", box: Optional[Sequence[int]] = None,
                   box_label: str = "true region", subtitle: Optional[str] = None,
                   exact_cells=None) -> Figure:
    """The image, the occlusion map over it, and the map alone with a colour bar.

    Args:
        image: ``(H, W, 3)`` or ``(H, W)`` array in ``[0, 1]``: the image as the
            model saw it (after resizing and cropping), before normalisation.
        heatmap: ``(H_M, W_M)`` scores, as in ``OcclusionResult.heatmap``.
        patch: ``(h, w)`` occlusion patch.
        stride: ``(Sy, Sx)``.
        label: explained class index.
        base_prob: score of ``label`` without occlusion.
        label_name: class name for the title, if known.
        output: ``"prob"`` or ``"logit"`` (what the scores are).
        box: ``(y, x, h, w)`` to outline on every panel (a known lesion, say).
        box_label: legend entry for ``box``.
        subtitle: second title line; defaults to the patch, stride and grid.
        exact_cells: an approximate map's ``res.stats.exact_cells`` (``(H_M, W_M)``
            bool, True where computed exactly): the other regions are hatched on
            both map panels. None: nothing is marked (an exact map).

    Example:
        >>> fig = heatmap_figure(np.zeros((32, 32, 3)), np.ones((5, 5)), (8, 8), (6, 6), 1, 1.0)
        >>> len(fig.axes)
        4
    """
    image = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    heat = np.asarray(heatmap, dtype=np.float64)
    h, w = image.shape[:2]
    drop = base_prob - upsample_heatmap(heat, (h, w), patch, stride)
    lim = _symmetric_limit(base_prob - heat)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)

    fig = Figure(figsize=(12.6, 4.7), dpi=110, layout="constrained")
    axes = fig.subplots(1, 3)
    gray = dict(cmap="gray", vmin=0, vmax=1) if image.ndim == 2 else {}

    axes[0].imshow(image, interpolation="nearest", **gray)
    axes[0].set_title("input (as the model sees it)")

    rgba = colormaps[DROP_CMAP](norm(drop))
    rgba[..., 3] = overlay_alpha(drop, lim)
    axes[1].imshow(image, interpolation="nearest", **gray)
    axes[1].imshow(rgba, interpolation="nearest")
    axes[1].set_title("occlusion map over the input")

    shown = axes[2].imshow(drop, cmap=DROP_CMAP, norm=norm, interpolation="nearest")
    axes[2].set_title("occlusion map")
    what = "P" if output == "prob" else "logit"
    bar = fig.colorbar(shown, ax=axes[2], shrink=0.9)
    bar.set_label(f"drop in {what}(label) when occluded\n(red: evidence for the label)")

    if exact_cells is not None and not np.asarray(exact_cells).all():
        approximate = approximate_pixels(exact_cells, (h, w), patch, stride)
        mark_approximate(axes[1], approximate)
        mark_approximate(axes[2], approximate, _APPROX_LABEL)
        axes[2].legend(loc="lower left", fontsize=8, framealpha=0.8)
    if box is not None and min(int(v) for v in box) >= 0:
        for i, ax in enumerate(axes):
            _draw_box(ax, box, box_label if i == 0 else None)
        axes[0].legend(loc="lower left", fontsize=8, framealpha=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])

    name = f"{label_name} (class {label})" if label_name else f"class {label}"
    score = f"P = {base_prob:.3f}" if output == "prob" else f"logit = {base_prob:.3f}"
    if subtitle is None:
        hm, wm = heat.shape
        subtitle = (f"occlusion patch {patch[0]}x{patch[1]}, stride {stride[0]}x{stride[1]}, "
                    f"{hm}x{wm} = {hm * wm} positions")
    fig.suptitle(f"{name}: {score}\n{subtitle}", fontsize=12)
    return fig


def drop_limit(drop) -> float:
    """The colour scale's half-width for drops ``drop`` (as :func:`heatmap_figure` picks it):
    robust, so one outlier cell does not wash out the rest of the map."""
    return _symmetric_limit(np.asarray(drop, dtype=np.float64))


# Planes of a volume picture, per layout: (fixed axis, row axis, column axis, flip rows, flip
# columns). "array": a .npy volume's own axes (d, h, w), rows and columns as numpy prints
# them. "ras": a NIfTI volume turned to RAS+ (x right, y front, z up), shown the radiological
# way: up is anterior / superior, the patient's right on the viewer's left, the face to the left.
_PLANES = {
    "array": (("axis 0", "d", 0, 1, 2, False, False), ("axis 1", "h", 1, 0, 2, False, False),
              ("axis 2", "w", 2, 0, 1, False, False)),
    "ras": (("axial", "z", 2, 1, 0, True, True), ("coronal", "y", 1, 2, 0, True, True),
            ("sagittal", "x", 0, 2, 1, True, True)),
}
# Anatomical ends of each RAS+ axis: (low end, high end).
_RAS_ENDS = (("L", "R"), ("P", "A"), ("I", "S"))
_VOXEL_COLOR = "#ffd400"


def display_scale(volume) -> np.ndarray:
    """A channels-first input ``(C, *spatial)`` (array or tensor) as a ``spatial`` picture in ``[0, 1]``:
    the first channel, its 0.5th to 99.5th percentile stretched over the grey scale (one hot voxel
    cannot darken the rest). What the volume pictures show.

    Example:
        >>> display_scale(np.array([[[[0.0, 2.0, 4.0]]]])).tolist()
        [[[0.0, 0.5, 1.0]]]
    """
    first = volume[0]
    first = (first.detach().cpu().double().numpy() if hasattr(first, "detach")
             else np.asarray(first, dtype=np.float64))
    low, high = np.percentile(first, [0.5, 99.5]) if first.size else (0.0, 1.0)
    if high <= low:
        low, high = float(first.min()), float(first.max())
    return np.clip((first - low) / (high - low), 0, 1) if high > low else np.zeros_like(first)


def _plane(values: np.ndarray, fixed: int, index: int, row: int, col: int, flip_rows: bool,
           flip_cols: bool) -> np.ndarray:
    plane = np.take(values, index, axis=fixed)
    rest = [a for a in range(3) if a != fixed]
    plane = plane if rest.index(row) == 0 else plane.T
    return plane[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]


def _in_plane(position: float, axis_size: int, flip: bool) -> float:
    return axis_size - 1 - position if flip else position


def volume_figure(volume: np.ndarray, drop: np.ndarray, voxel: Sequence[int], label: int, base_prob: float,
                  limit: Optional[float] = None, layout: str = "array",
                  spacing: Sequence[float] = (1.0, 1.0, 1.0), label_name: Optional[str] = None,
                  output: str = "prob", box: Optional[Sequence[int]] = None, box_label: str = "true region",
                  subtitle: Optional[str] = None, voxel_text: Optional[str] = None,
                  plane_text: Optional[Sequence[str]] = None, approximate: Optional[np.ndarray] = None) -> Figure:
    """Three orthogonal slices through ``voxel``: the volume, the occlusion map over it, the map alone.

    The colours are :func:`heatmap_figure`'s: the drop ``base_prob - heatmap``,
    red where occluding lowers the prediction, one colour bar for every panel.

    Args:
        volume: ``(D, H, W)`` in ``[0, 1]``: the volume scaled for display.
        drop: ``(D, H, W)`` drop on the volume's grid (:func:`upsample_heatmap_nd`).
        voxel: the voxel the three planes go through (the strongest drop, say).
        label: explained class index.
        base_prob: score of ``label`` without occlusion.
        limit: colour scale half-width; default :func:`drop_limit` of ``drop``
            (pass ``drop_limit`` of the cells' drops to match a 2-D picture).
        layout: ``"array"`` (planes along the array's axes) or ``"ras"`` (arrays
            in RAS+ order: axial, coronal and sagittal planes, radiological view,
            sides lettered).
        spacing: voxel size per axis, for the panels' aspect ratio.
        label_name: class name for the title, if known.
        output: ``"prob"`` or ``"logit"``.
        box: ``(d, h, w, size_d, size_h, size_w)`` to outline (``"array"`` layout):
            solid where the plane cuts it, dashed where it only projects onto it.
        box_label: legend entry for ``box``.
        subtitle: second title line.
        voxel_text: how the title names ``voxel`` (the file's own indices, say).
        plane_text: per axis of ``volume``, how to name the plane through ``voxel``
            across it (``"i = 7"``: the file's axis and index); default ``"z = 12"``.
        approximate: ``(D, H, W)`` bool, the voxels of an approximate map not computed
            exactly (:func:`approximate_pixels`): hatched on the map panels.

    Example:
        >>> fig = volume_figure(np.zeros((8, 8, 8)), np.ones((8, 8, 8)), (4, 4, 4), 1, 0.9)
        >>> len(fig.axes)
        10
    """
    if layout not in _PLANES:
        raise ValueError(f"layout must be 'array' or 'ras', got {layout!r}")
    volume = np.clip(np.asarray(volume, dtype=np.float64), 0.0, 1.0)
    drop = np.asarray(drop, dtype=np.float64)
    if volume.ndim != 3 or drop.shape != volume.shape:
        raise ValueError(f"need a (D, H, W) volume and a drop of the same shape, got {volume.shape} "
                         f"and {drop.shape}")
    lim = drop_limit(drop) if limit is None else max(float(limit), 1e-12)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    voxel = tuple(int(v) for v in voxel)

    fig = Figure(figsize=(11.0, 11.4), dpi=100, layout="constrained")
    axes = fig.subplots(3, 3)
    shown = None
    for r, (plane_name, coord, fixed, row, col, flip_r, flip_c) in enumerate(_PLANES[layout]):
        args = (fixed, voxel[fixed], row, col, flip_r, flip_c)
        image, dropped = _plane(volume, *args), _plane(drop, *args)
        aspect = float(spacing[row]) / float(spacing[col])
        point_x = _in_plane(voxel[col], volume.shape[col], flip_c)
        point_y = _in_plane(voxel[row], volume.shape[row], flip_r)
        rgba = colormaps[DROP_CMAP](norm(dropped))
        rgba[..., 3] = overlay_alpha(dropped, lim)
        axes[r, 0].imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
        axes[r, 1].imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
        axes[r, 1].imshow(rgba, interpolation="nearest", aspect=aspect)
        shown = axes[r, 2].imshow(dropped, cmap=DROP_CMAP, norm=norm, interpolation="nearest", aspect=aspect)
        if approximate is not None:
            region = _plane(np.asarray(approximate, dtype=np.float64), *args)
            mark_approximate(axes[r, 1], region)
            mark_approximate(axes[r, 2], region, _APPROX_LABEL if r == 0 else None)
            if r == 0 and region.any():
                axes[r, 2].legend(loc="lower left", fontsize=8, framealpha=0.8)
        where = plane_text[fixed] if plane_text is not None else f"{coord} = {voxel[fixed]}"
        axes[r, 0].set_ylabel(f"{plane_name}, {where}", fontsize=11)
        for ax in axes[r]:
            ax.plot([point_x], [point_y], marker="+", markersize=14, markeredgewidth=1.6, color=_VOXEL_COLOR,
                    linestyle="none")
        if layout == "ras":
            _letter_sides(axes[r, 0], row, col, flip_r, flip_c)
        if box is not None and layout == "array" and min(int(v) for v in box) >= 0:
            cuts = box[fixed] <= voxel[fixed] < box[fixed] + box[fixed + 3]
            for c, ax in enumerate(axes[r]):
                ax.add_patch(Rectangle((box[col] - 0.5, box[row] - 0.5), box[col + 3], box[row + 3], fill=False,
                                       edgecolor=_BOX_COLOR, linewidth=1.6, linestyle="-" if cuts else "--",
                                       label=box_label if (r, c) == (0, 0) else None))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("input (as the model sees it)")
    axes[0, 1].set_title("occlusion map over the input")
    axes[0, 2].set_title("occlusion map")
    what = "P" if output == "prob" else "logit"
    bar = fig.colorbar(shown, ax=axes[:, 2], shrink=0.5)
    bar.set_label(f"drop in {what}(label) when occluded\n(red: evidence for the label)")
    if box is not None and layout == "array" and min(int(v) for v in box) >= 0:
        axes[0, 0].legend(loc="lower left", fontsize=8, framealpha=0.8)

    name = f"{label_name} (class {label})" if label_name else f"class {label}"
    score = f"P = {base_prob:.3f}" if output == "prob" else f"logit = {base_prob:.3f}"
    where = voxel_text or f"voxel {voxel}"
    lines = [f"{name}: {score}", f"slices through the strongest drop, {where} (+)"]
    if subtitle:  # long file and model names: wrapped, not cut off at the figure's edge
        lines += textwrap.wrap(subtitle, width=105, break_on_hyphens=False)
    fig.suptitle("\n".join(lines), fontsize=12)
    return fig


def _letter_sides(ax, row: int, col: int, flip_rows: bool, flip_cols: bool) -> None:
    """Anatomical side letters at the panel's edges (R/L, A/P, S/I)."""
    top, bottom = _RAS_ENDS[row][::-1] if flip_rows else _RAS_ENDS[row]
    left, right = _RAS_ENDS[col][::-1] if flip_cols else _RAS_ENDS[col]
    style = dict(transform=ax.transAxes, color="white", fontsize=9, fontweight="bold")
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def bench_figure(names: Sequence[str], theoretical: Sequence[float], measured: Sequence[float],
                 title: str = "") -> Figure:
    """Measured next to theoretical speedup, one pair of bars per model.

    Example:
        >>> fig = bench_figure(["resnet18"], [3.0], [2.0])
        >>> len(fig.axes)
        1
    """
    n = len(names)
    fig = Figure(figsize=(8.0, 1.6 + 0.46 * max(n, 1)), dpi=110, layout="constrained")
    ax = fig.subplots()
    y = np.arange(n)
    label_box = dict(facecolor="white", edgecolor="none", alpha=0.75, pad=0.4)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":", zorder=0)
    theory_bars = ax.barh(y - 0.2, theoretical, height=0.38, color="#b0b8c4",
                          label="theoretical (eqs. 16-20, conv layers)")
    measured_bars = ax.barh(y + 0.2, measured, height=0.38, color="#d62728",
                            label="measured (exact, side by side with naive)")
    for rect, t in zip(theory_bars, theoretical):
        ax.text(rect.get_width(), rect.get_y() + rect.get_height() / 2, f" {t:.2f}x", va="center",
                fontsize=8, color="#4a5566", bbox=label_box)
    for rect, t, m in zip(measured_bars, theoretical, measured):
        share = f" ({m / t:.0%} of theory)" if t else ""
        ax.text(rect.get_width(), rect.get_y() + rect.get_height() / 2, f" {m:.2f}x{share}",
                va="center", fontsize=8, bbox=label_box)
    ax.set_yticks(y, names)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("speedup over naive occlusion (dotted: 1x, no gain)")
    ax.set_xlim(0, max([1.0, *theoretical, *measured]) * 1.35)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def tune_figure(taus: Sequence[float], ssims: np.ndarray, coeffs: np.ndarray, target_ssim: float,
                tau: float, drop_kept: Optional[Sequence[float]] = None) -> Figure:
    """SSIM against tau (one dot per image), the degree-2 fit, the target and the chosen tau;
    with ``drop_kept`` (mean per tau) on a second axis: what SSIM can hide.

    Example:
        >>> fig = tune_figure([0.8, 0.6], np.array([[0.99, 0.95]]), np.array([0.0, 0.2, 0.8]), 0.9, 0.6)
        >>> len(fig.axes)
        1
    """
    fig = Figure(figsize=(5, 3.5), layout="tight")
    ax = fig.add_subplot()
    for row in np.atleast_2d(ssims):
        ax.scatter(taus, row, s=10, color="tab:blue", alpha=0.4)
    grid = np.linspace(min(taus), 1.0, 200)
    ax.plot(grid, np.polyval(coeffs, grid), color="tab:orange", label="degree-2 fit")
    ax.axhline(target_ssim, color="gray", ls="--", lw=1, label=f"target {target_ssim:g}")
    ax.axvline(tau, color="tab:red", lw=1, label=f"tau = {tau:.2f}")
    ax.set_xlabel("tau")
    ax.set_ylabel("SSIM to exact heat map")
    handles, labels = ax.get_legend_handles_labels()
    if drop_kept is not None and np.isfinite(drop_kept).any():
        right = ax.twinx()
        points = sorted(zip(list(taus) + ([1.0] if 1.0 not in taus else []),
                            list(drop_kept) + ([1.0] if 1.0 not in taus else [])))  # exact keeps all
        xs, ys = zip(*points)
        right.plot(xs, ys, "s--", color="tab:green", ms=4, label="drop kept (mean)")
        right.set_ylabel("drop kept", color="tab:green")
        right.set_ylim(min(0.0, float(np.nanmin(ys))), 1.05)
        h, lab = right.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    return fig

