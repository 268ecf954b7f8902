"""What ``explain_many`` takes, as one stream of :class:`Item`: sequences, tensor batches,
``Dataset``/``DataLoader`` objects and image files.

Nothing is materialised: a DataLoader is iterated batch by batch, a file is
read when its turn comes, and a file that cannot be read becomes an item
with an ``error`` (the caller decides whether that stops the run).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .imagefiles import expand_inputs, load_image

__all__ = ["Item", "iter_items", "LabelSpec"]

# None: each item's own label where it carries one, else the prediction; "predicted": always the
# prediction; an int: that class for every image; a sequence or tensor: one per image.
LabelSpec = Union[None, str, int, Iterable, Tensor]


@dataclasses.dataclass
class Item:
    """One image of the stream.

    Attributes:
        index: position in the stream (0, 1, ...).
        name: what to call it in messages: the file path, or ``images[i]``.
        image: the model input ``(C, *spatial)``, or None if it could not be read.
        label: the class to explain, or None for the prediction.
        path: the file it came from, if any.
        error: why it could not be read, or None.
        color: the patch colour for this image, or None for the explainer's.
    """

    index: int
    name: str
    image: Optional[Tensor]
    label: Optional[int] = None
    path: Optional[Path] = None
    error: Optional[BaseException] = None
    color: Any = None


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _as_image(x: Any) -> Tensor:
    """A tensor image from a tensor, a numpy array (``C, H, W``) or a PIL image."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if hasattr(x, "mode") and hasattr(x, "size") and hasattr(x, "getdata"):  # a PIL image
        from .imagefiles import to_tensor
        return to_tensor(x)
    raise TypeError(f"cannot use a {type(x).__name__} as an image: give tensors (C, H, W), numpy "
                    "arrays, PIL images or file paths (or pass transform= to turn items into tensors)")


def _split(entry: Any) -> tuple[Any, Optional[Any]]:
    """A dataset entry -> (image, its own label or None): ``x``, ``(x, y, ...)`` or ``{"image": x, "label": y}``."""
    if isinstance(entry, dict):
        image = next((entry[k] for k in ("image", "img", "input", "x") if k in entry), None)
        if image is None:
            raise TypeError(f"a dataset entry is a dict without an image key (keys: {', '.join(map(str, entry))}); "
                            "use 'image' (and 'label')")
        label = next((entry[k] for k in ("label", "target", "y") if k in entry), None)
        return image, label
    if isinstance(entry, (tuple, list)) and len(entry) >= 2:
        return entry[0], entry[1]
    return entry, None


def _entries(images: Any) -> Iterator[tuple[Any, Optional[Any]]]:
    """``(image or path, own label)`` pairs, batches unrolled."""
    from torch.utils.data import DataLoader

    if _is_path(images):
        paths, _ = expand_inputs([images])
        for p in paths:
            yield p, None
        return
    if isinstance(images, Tensor):
        if images.dim() < 3:
            raise ValueError(f"a tensor of images is a batch (N, C, H, W); got shape {tuple(images.shape)}")
        for x in images:
            yield x, None
        return
    if isinstance(images, DataLoader):
        for batch in images:
            image, label = _split(batch)
            # A tensor batch, or a list where a collate_fn keeps one.
            own = [None] * len(image) if label is None else list(label)
            yield from zip(image, own)
        return
    if hasattr(images, "__getitem__") and hasattr(images, "__len__") and not isinstance(images, (list, tuple)):
        for i in range(len(images)):  # a map-style Dataset
            yield _split(images[i])
        return
    for entry in images:  # a sequence, an IterableDataset, a generator
        yield _split(entry) if isinstance(entry, (tuple, list, dict)) else (entry, None)


def _label_stream(labels: LabelSpec) -> Callable[[int, Any], Optional[Any]]:
    """index, own label -> the label to explain."""
    if labels is None:
        return lambda i, own: own
    if isinstance(labels, str):
        if labels != "predicted":
            raise ValueError(f"labels must be None, 'predicted', an int, or one label per image; got {labels!r}")
        return lambda i, own: None
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        return lambda i, own: int(labels)
    if isinstance(labels, Tensor):
        if labels.dim() == 0:
            return lambda i, own: int(labels)
        labels = labels.tolist()
    fixed = list(labels)

    def pick(i: int, own: Any) -> Optional[Any]:
        if i >= len(fixed):
            raise ValueError(f"labels has {len(fixed)} entries but there are more images; give one label "
                             "per image")
        return fixed[i]
    return pick


def _label_value(y: Any) -> Optional[int]:
    if y is None:
        return None
    if isinstance(y, Tensor):
        if y.numel() != 1:
            raise ValueError(f"a label must be one class index, got a tensor of shape {tuple(y.shape)}")
        y = y.item()
    if isinstance(y, (bool, float)) or not isinstance(y, numbers.Integral):
        raise TypeError(f"a label must be an integer class index, got {type(y).__name__} {y!r}")
    return int(y)


def iter_items(images: Any, labels: LabelSpec = None, transform: Optional[Callable] = None,
               channels: int = 3) -> Iterator[Item]:
    """The stream of :class:`Item` for ``images``.

    Args:
        images: a sequence of images or paths; a tensor batch ``(N, C, ...)``;
            a ``Dataset`` or ``DataLoader`` whose entries are images,
            ``(image, label)`` pairs or ``{"image": ..., "label": ...}`` dicts;
            a file, folder or glob (a str or Path).
        labels: see :data:`LabelSpec`.
        transform: applied to each image that is not yet a tensor (PIL images
            and files, read as ``channels``-channel PIL images); default: to
            float32 ``(C, H, W)`` in ``[0, 1]``.
        channels: channels of the images the model takes (for files).
    """
    pick = _label_stream(labels)
    for index, (entry, own) in enumerate(_entries(images)):
        name = str(entry) if _is_path(entry) else f"images[{index}]"
        path = Path(entry) if _is_path(entry) else None
        try:
            label = _label_value(pick(index, own))
            if path is not None:
                image = load_image(path, channels, transform)
            elif transform is not None and not isinstance(entry, Tensor):
                image = transform(entry)
            else:
                image = _as_image(entry)
            image = _as_image(image)
        except (ValueError, TypeError, OSError) as e:
            yield Item(index, name, None, None, path, e)
            continue
        yield Item(index, name, image, label, path)
