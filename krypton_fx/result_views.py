"""What an :class:`~krypton_fx.results.OcclusionResult` shows: its pictures, in a notebook or a file.

The result's methods (``plot``, ``save``, ``_repr_png_``) are thin; the pictures are
:mod:`krypton_fx.viz`'s, the command line's: an image with the map over it and the map
with its colour bar (:func:`~krypton_fx.viz.heatmap_figure`), a volume as three
orthogonal planes through the strongest drop (:func:`~krypton_fx.viz.volume_figure`,
shown as ``krypton-fx explain scan.npy`` shows it), a signal as a line plot with the
drop under it (:func:`signal_figure`), and without an image a small picture of the map
alone (:func:`map_figure`, Jupyter's rich display).

This module imports matplotlib (through viz); ``results.py`` imports it inside the
methods, so that ``import krypton_fx`` (every command-line call, every Ray worker)
does not pay matplotlib's import. Nothing here imports ``results.py`` at run time.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from PIL import Image

from .atomic import write_atomically
from .viz import (
    DROP_CMAP,
    display_scale,
    drop_limit,
    heatmap_figure,
    overlay_alpha,
    upsample_heatmap_nd,
    volume_figure,
)

if TYPE_CHECKING:
    from .results import OcclusionResult

__all__ = ["result_figure", "map_figure", "signal_figure", "save_figure", "png_bytes", "covered_size",
           "check_input_size"]


def covered_size(grid: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """The least input size with this grid of positions: the last patch ends at the far border.

    Example:
        >>> covered_size((5, 5), (8, 8), (6, 6))
        (32, 32)
    """
    return tuple((int(n) - 1) * int(s) + int(p) for n, p, s in zip(grid, patch, stride))


def check_input_size(size: Sequence[int], grid: Sequence[int], patch: Sequence[int], stride: Sequence[int],
                     what: str = "the input") -> None:
    """Raise a ``ValueError`` unless an input of ``size`` gives this grid (positions per axis
    ``(size - patch) // stride + 1``, as the explainer counts them)."""
    fits = len(size) == len(grid) and all(
        (int(n) - int(p)) // int(s) + 1 == int(g) and int(n) >= int(p)
        for n, g, p, s in zip(size, grid, patch, stride))
    if not fits:
        low = covered_size(grid, patch, stride)
        high = tuple(n + int(s) - 1 for n, s in zip(low, stride))
        span = "x".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(low, high))
        raise ValueError(f"{what} has spatial size {tuple(int(n) for n in size)}, but this map "
                         f"({'x'.join(map(str, grid))} positions, patch {tuple(patch)}, stride {tuple(stride)}) "
                         f"comes from an input of {span}; pass the input the result was computed on")


def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().to(torch.float64).numpy()
    if isinstance(image, Image.Image):
        return np.asarray(image)
    array = np.asarray(image)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"expected an image as a tensor, a numpy array or a PIL image, got {type(image).__name__} "
                        f"of {array.dtype}")
    return array


def _fits(size: Sequence[int], grid, patch, stride) -> bool:
    try:
        check_input_size(size, grid, patch, stride)
    except ValueError:
        return False
    return True


def picture(image: Any, grid, patch, stride) -> np.ndarray:
    """A 2-D input as ``heatmap_figure`` draws it: ``(H, W, 3)`` or ``(H, W)`` in ``[0, 1]``.

    ``image``: the model input, ``(C, H, W)`` or ``(1, C, H, W)`` (a tensor is channels
    first), or a picture, ``(H, W, C)``, ``(H, W)`` or a PIL image. 8-bit values are
    divided by 255; values outside ``[0, 1]`` (a normalised input) are stretched from
    their least to their largest. One channel, or more than 4, shows as grey (the first).
    """
    is_tensor = isinstance(image, torch.Tensor)
    array = _as_array(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        first, last = _fits(array.shape[1:], grid, patch, stride), _fits(array.shape[:2], grid, patch, stride)
        if first and (is_tensor or not last):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            check_input_size(array.shape[1:] if is_tensor else array.shape[:2], grid, patch, stride, "the image")
    elif array.ndim == 2:
        check_input_size(array.shape, grid, patch, stride, "the image")
    else:
        raise ValueError(f"a 2-D map needs an image (C, H, W), (H, W, C) or (H, W), got shape {array.shape}")
    eight_bit = array.dtype == np.uint8
    array = array.astype(np.float64) / (255.0 if eight_bit else 1.0)
    if array.ndim == 3:
        channels = array.shape[-1]
        array = array[..., :3] if channels in (3, 4) else array[..., 0]
    low, high = float(np.min(array)), float(np.max(array))
    if low < 0.0 or high > 1.0:
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return array


def _volume(image: Any, grid, patch, stride) -> np.ndarray:
    array = _as_array(image)
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"a 3-D map needs a volume (C, D, H, W) or (D, H, W), got shape {array.shape}")
    check_input_size(array.shape[1:], grid, patch, stride, "the volume")
    return display_scale(array)


def _signal(image: Any, grid, patch, stride) -> np.ndarray:
    array = _as_array(image).astype(np.float64)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"a 1-D map needs a signal (C, L) or (L,), got shape {array.shape}")
    check_input_size(array.shape[1:], grid, patch, stride, "the signal")
    return array


def _title(label: int, base_prob: float, output: str, label_name: Optional[str]) -> str:
    name = f"{label_name} (class {label})" if label_name else f"class {label}"
    return f"{name}: {'P' if output == 'prob' else 'logit'} = {base_prob:.3f}"


def _setting(grid, patch, stride) -> str:
    x = lambda values: "x".join(str(int(v)) for v in values)
    return f"occlusion patch {x(patch)}, stride {x(stride)}, {x(grid)} = {int(np.prod(grid))} positions"


def _bar_label(output: str) -> str:
    return f"drop in {'P' if output == 'prob' else 'logit'}(label) when occluded\n(red: evidence for the label)"


def signal_figure(signal: np.ndarray, heatmap, patch: Sequence[int], stride: Sequence[int], label: int,
                  base_prob: float, label_name: Optional[str] = None, output: str = "prob") -> Figure:
    """A 1-D signal with the drop over it (coloured as the images' overlay), and the drop as a line
    under it: between patch centres as :func:`~krypton_fx.viz.upsample_heatmap_nd` spreads it, each
    position's own drop a dot at its patch's centre.

    Args:
        signal: ``(C, L)`` or ``(L,)``: the model input.
        heatmap: ``(L_M,)`` scores, as in ``OcclusionResult.heatmap``.
        patch: ``(p,)``; stride: ``(s,)``; label, base_prob, label_name, output: as
            :func:`~krypton_fx.viz.heatmap_figure` takes them.

    Example:
        >>> fig = signal_figure(np.zeros((2, 40)), np.linspace(0.2, 0.9, 9), (8,), (4,), 1, 0.9)
        >>> len(fig.axes)
        3
    """
    signal = np.atleast_2d(np.asarray(signal, dtype=np.float64))
    heat = np.asarray(heatmap, dtype=np.float64)
    length = signal.shape[-1]
    drop = base_prob - upsample_heatmap_nd(heat, (length,), patch, stride)
    cells = base_prob - heat
    limit = drop_limit(cells)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)

    fig = Figure(figsize=(11.0, 5.2), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    low, high = float(signal.min()), float(signal.max())
    pad = 0.05 * (high - low) or 0.5
    band = colormaps[DROP_CMAP](norm(drop))[None]
    band[..., 3] = overlay_alpha(drop, limit)
    top.imshow(band, aspect="auto", interpolation="nearest", extent=(-0.5, length - 0.5, low - pad, high + pad))
    for c, row in enumerate(signal):
        top.plot(np.arange(length), row, linewidth=0.8, color="black" if len(signal) == 1 else None,
                 label=f"channel {c}")
    if 1 < len(signal) <= 8:
        top.legend(loc="upper right", fontsize=8, framealpha=0.8)
    top.set_ylim(low - pad, high + pad)
    top.set_title("input (as the model sees it), the occlusion map behind it")

    centres = np.arange(len(heat)) * int(stride[0]) + (int(patch[0]) - 1) / 2
    bottom.axhline(0.0, color="gray", linewidth=0.8)
    bottom.plot(np.arange(length), drop, color="black", linewidth=1.0)
    bottom.fill_between(np.arange(length), drop, 0.0, where=drop > 0, color=colormaps[DROP_CMAP](0.85), alpha=0.5)
    bottom.fill_between(np.arange(length), drop, 0.0, where=drop < 0, color=colormaps[DROP_CMAP](0.15), alpha=0.5)
    bottom.scatter(centres, cells, c=cells, cmap=DROP_CMAP, norm=norm, s=14, edgecolors="black", linewidths=0.4,
                   zorder=3)
    bottom.set_xlabel("sample")
    bottom.set_ylabel("drop")
    bottom.set_title("occlusion map (dots: patch centres)")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=DROP_CMAP), ax=[top, bottom], shrink=0.9)
    bar.set_label(_bar_label(output))
    fig.suptitle(f"{_title(label, base_prob, output, label_name)}\n{_setting(heat.shape, patch, stride)}",
                 fontsize=12)
    return fig


def map_figure(heatmap, patch: Sequence[int], stride: Sequence[int], label: int, base_prob: float,
               output: str = "prob", label_name: Optional[str] = None) -> Figure:
    """The map alone, small (no input to draw it over): the cells' drop with its colour bar, in the
    input's coordinates (each cell at its patch's centre); a volume's map as three planes through its
    strongest cell, a signal's as a line.

    Example:
        >>> len(map_figure(np.ones((5, 5)), (8, 8), (6, 6), 1, 1.0).axes)
        2
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    cells = base_prob - heat
    limit = drop_limit(cells)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    centre = lambda axis, n: (int(patch[axis]) - 1) / 2 + int(stride[axis]) * n
    title = f"{_title(label, base_prob, output, label_name)}\n{_setting(heat.shape, patch, stride)}"
    if heat.ndim == 1:
        fig = Figure(figsize=(6.0, 2.8), dpi=80, layout="constrained")
        ax = fig.subplots()
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.plot(centre(0, np.arange(len(heat))), cells, color="black", linewidth=1.0)
        ax.scatter(centre(0, np.arange(len(heat))), cells, c=cells, cmap=DROP_CMAP, norm=norm, s=12, zorder=3)
        ax.set_xlabel("sample (patch centre)")
        ax.set_ylabel("drop")
    elif heat.ndim in (2, 3):
        planes = [cells] if heat.ndim == 2 else []
        axes_of = [(0, 1)] if heat.ndim == 2 else []
        if heat.ndim == 3:
            strongest = np.unravel_index(int(np.argmax(cells)), cells.shape)
            for fixed in range(3):
                planes.append(np.take(cells, strongest[fixed], axis=fixed))
                axes_of.append(tuple(a for a in range(3) if a != fixed))
        fig = Figure(figsize=(4.6 if heat.ndim == 2 else 10.0, 3.8), dpi=80, layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(planes)))
        for ax, plane, (row, col) in zip(axes, planes, axes_of):
            extent = (centre(col, -0.5), centre(col, plane.shape[1] - 0.5), centre(row, plane.shape[0] - 0.5),
                      centre(row, -0.5))
            ax.imshow(plane, cmap=DROP_CMAP, norm=norm, interpolation="nearest", extent=extent)
            if heat.ndim == 3:
                fixed = ({0, 1, 2} - {row, col}).pop()
                ax.set_title(f"axis {fixed} through the strongest cell ({strongest[fixed]})", fontsize=9)
        fig.colorbar(ScalarMappable(norm=norm, cmap=DROP_CMAP), ax=list(axes), shrink=0.9).set_label(
            _bar_label(output))
    else:
        raise ValueError(f"no picture for a map with {heat.ndim} axes; maps have 1, 2 or 3")
    fig.suptitle(title, fontsize=10)
    return fig


def result_figure(result: "OcclusionResult", image: Any = None, label_name: Optional[str] = None) -> Figure:
    """The picture of a one-label result over ``image`` (see ``OcclusionResult.plot``)."""
    heat = result.heatmap.detach().cpu().to(torch.float64).numpy()
    patch, stride, grid = tuple(result.patch), tuple(result.stride), heat.shape
    args = (result.label, float(result.base_prob))
    if image is None:
        return map_figure(heat, patch, stride, *args, output=result.output, label_name=label_name)
    if heat.ndim == 2:
        return heatmap_figure(picture(image, grid, patch, stride), heat, patch, stride, *args,
                              label_name=label_name, output=result.output)
    if heat.ndim == 3:
        volume = _volume(image, grid, patch, stride)
        drop = result.base_prob - upsample_heatmap_nd(heat, volume.shape, patch, stride)
        voxel = np.unravel_index(int(np.argmax(drop)), drop.shape)
        return volume_figure(volume, drop, voxel, *args, limit=drop_limit(result.base_prob - heat),
                             label_name=label_name, output=result.output, subtitle=_setting(grid, patch, stride))
    if heat.ndim == 1:
        return signal_figure(_signal(image, grid, patch, stride), heat, patch, stride, *args,
                             label_name=label_name, output=result.output)
    raise ValueError(f"no picture for a map with {heat.ndim} axes; maps have 1, 2 or 3")


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (what Jupyter shows)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_figure(fig: Figure, path: Union[str, "os.PathLike[str]"]) -> Path:
    """Write ``fig`` to ``path`` in the format its name ends with (``.png``, ``.pdf``, ``.svg``, ...),
    to a temporary name first and renamed into place (:func:`krypton_fx.atomic.write_atomically`):
    a failure leaves no half-written file."""
    path = Path(path).expanduser()
    fmt = path.suffix.lower().lstrip(".")
    formats = fig.canvas.get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(f"cannot write {path}: unknown picture format {path.suffix or '(none)'!r}; use a name "
                         f"ending in .png (or one of {', '.join(sorted(formats))})")
    if not path.resolve().parent.is_dir():
        raise ValueError(f"cannot write {path}: directory {path.resolve().parent} does not exist; create it first")
    write_atomically({path: lambda f: fig.savefig(f, format=fmt)})
    return path
