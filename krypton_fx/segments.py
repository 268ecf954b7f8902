"""Segment label maps for feature ablation (:meth:`krypton_fx.Explainer.ablate`): superpixels
from scikit-image (SLIC, Felzenszwalb), label images and volumes read from files (an atlas,
a segmentation's output), and their outlines for pictures.

Every function returns an int64 tensor of consecutive ids ``0..K-1`` with the image's
spatial shape. ``pip install scikit-image`` for the superpixels.

Why the engine's buckets look as they do is in :mod:`krypton_fx.ablation`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from .volumes import is_volume_path, read_volume

__all__ = ["slic", "felzenszwalb", "consecutive", "read_labels", "outlines", "SegmentFileError"]

ArrayLike = Union[Tensor, np.ndarray]


class SegmentFileError(ValueError):
    """A label file that cannot be read as segments (the command line's one-line error)."""


def _skimage_segmentation():
    try:
        from skimage import segmentation
    except ImportError as e:
        raise ImportError("superpixels need scikit-image: pip install scikit-image") from e
    return segmentation


def _channels_last(image: ArrayLike) -> tuple[np.ndarray, bool]:
    """A ``(C, *spatial)`` tensor (or a ``(*spatial)`` one-channel image) as a float64
    channels-last array for scikit-image, and whether it has a channel axis."""
    if not isinstance(image, Tensor):
        image = torch.as_tensor(np.asarray(image))
    if not image.is_floating_point():
        image = image.double()
    if image.dim() < 2:
        raise ValueError(f"image must be (C, *spatial) with 1 to 3 spatial axes, got shape {tuple(image.shape)}")
    if image.dim() == 2:  # one channel, no channel axis
        return image.detach().cpu().double().numpy(), False
    array = image.detach().cpu().double().movedim(0, -1).numpy()
    if array.shape[-1] == 1:
        return array[..., 0], False
    return array, True


def consecutive(labels: ArrayLike) -> Tensor:
    """Any integer label map as int64 ids ``0..K-1`` (the order of the original ids kept).

    Example:
        >>> consecutive(torch.tensor([[7, 7, -2], [40, 7, -2]])).tolist()
        [[1, 1, 0], [2, 1, 0]]
    """
    array = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise TypeError(f"labels must be integers, got {array.dtype}")
    _, inverse = np.unique(array, return_inverse=True)
    return torch.from_numpy(inverse.reshape(array.shape).astype(np.int64))


def slic(image: ArrayLike, n_segments: int = 100, compactness: float = 10.0, **kwargs) -> Tensor:
    """SLIC superpixels (``skimage.segmentation.slic``) of a ``(C, *spatial)`` image or volume.

    Args:
        image: ``(C, H, W)`` or ``(C, D, H, W)`` (a ``(H, W)`` image: one channel), any scale.
        n_segments: about how many superpixels (SLIC may return fewer or more).
        compactness: colour against space; higher gives squarer superpixels.
        **kwargs: passed to scikit-image (``sigma``, ``max_num_iter``, ...).

    Returns:
        int64 ``(*spatial)`` ids ``0..K-1``.

    Example:
        >>> labels = slic(torch.linspace(0, 1, 32).repeat(3, 32, 1), n_segments=16)
        >>> tuple(labels.shape), int(labels.min()), int(labels.max())
        ((32, 32), 0, 15)
    """
    array, has_channels = _channels_last(image)
    labels = _skimage_segmentation().slic(array, n_segments=n_segments, compactness=compactness,
                                          channel_axis=-1 if has_channels else None, start_label=0, **kwargs)
    return consecutive(labels)


def felzenszwalb(image: ArrayLike, scale: float = 100.0, sigma: float = 0.8, min_size: int = 20) -> Tensor:
    """Felzenszwalb's graph-based segments (``skimage.segmentation.felzenszwalb``) of a
    ``(C, H, W)`` image (2-D only).

    Args:
        image: ``(C, H, W)`` or ``(H, W)``.
        scale: larger gives larger segments.
        sigma: Gaussian smoothing before segmenting.
        min_size: smallest segment, in pixels.

    Returns:
        int64 ``(H, W)`` ids ``0..K-1``.

    Example:
        >>> labels = felzenszwalb(torch.rand(3, 24, 24), scale=50)
        >>> tuple(labels.shape), int(labels.min())
        ((24, 24), 0)
    """
    array, has_channels = _channels_last(image)
    if array.ndim - has_channels != 2:
        raise ValueError(f"felzenszwalb segments 2-D images; got {array.ndim - has_channels} spatial axes "
                         "(use slic for volumes)")
    labels = _skimage_segmentation().felzenszwalb(array, scale=scale, sigma=sigma, min_size=min_size,
                                                  channel_axis=-1 if has_channels else None)
    return consecutive(labels)


def read_labels(path: Union[str, Path]) -> Tensor:
    """A label map from a file: a PNG/TIFF label image (grey values, or each distinct colour
    one segment), or a NIfTI/``.npy`` label volume (an atlas, a segmentation's output).

    Returns:
        int64 ``(H, W)`` or ``(D, H, W)`` ids ``0..K-1``, in the order of the file's labels.

    Raises:
        SegmentFileError: missing or unreadable, or not whole-number labels.
    """
    path = Path(path).expanduser()
    if is_volume_path(path):
        volume = read_volume(path)  # channels first, float32 (VolumeFileError is a ValueError)
        data = volume.data
        if data.shape[0] != 1:
            raise SegmentFileError(f"{path}: a label volume has one channel, this one has {data.shape[0]}")
        data = data[0]
        if not np.array_equal(data, np.round(data)):
            raise SegmentFileError(f"{path}: labels must be whole numbers (a label volume, not an image)")
        return consecutive(data.astype(np.int64))
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise SegmentFileError(f"{path} does not exist; check the path")
    try:
        with Image.open(path) as picture:
            array = np.asarray(picture)
    except (OSError, UnidentifiedImageError) as e:
        raise SegmentFileError(f"cannot read {path} as a label image: {e}") from None
    if array.ndim == 3:  # colours: each distinct colour one segment
        flat = array.reshape(-1, array.shape[-1]).astype(np.int64)
        _, inverse = np.unique(flat, axis=0, return_inverse=True)
        return torch.from_numpy(inverse.reshape(array.shape[:2]).astype(np.int64))
    if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
        raise SegmentFileError(f"{path}: labels must be whole numbers")
    return consecutive(array.astype(np.int64))


def outlines(labels: ArrayLike) -> np.ndarray:
    """Boolean map of the pixels on a segment's border (for drawing outlines).

    Example:
        >>> outlines(torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])).astype(int).tolist()
        [[0, 0, 1, 0], [0, 0, 1, 0]]
    """
    array = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    return _skimage_segmentation().find_boundaries(array, mode="inner")
