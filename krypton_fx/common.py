"""Argument checks and small helpers shared by every layer (a leaf module: imports torch only).

Each check raises one ``ValueError`` or ``TypeError`` that names the problem
and the fix; the public API, the CLI, the Captum and MONAI drop-ins all go
through these, so the same mistake gets the same message everywhere.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional, TypeVar, Union

import torch
from torch import Tensor, nn

__all__ = ["IntOrTuple", "int_tuple", "spatial_size", "pair", "color_values", "output_kind", "batch_size",
           "image_batch", "scores", "label_index", "default_batch_size", "resolve_device",
           "model_dtype", "progress", "progress_bar", "first_line", "is_out_of_memory"]

IntOrTuple = Union[int, Sequence[int]]
T = TypeVar("T")


def int_tuple(value: IntOrTuple, n: int, name: str, minimum: int = 1) -> tuple[int, ...]:
    """An int (the same on every axis) or ``n`` ints, each ``>= minimum``.

    Example:
        >>> int_tuple(16, 3, "patch"), int_tuple((8, 4), 2, "stride")
        ((16, 16, 16), (8, 4))
    """
    axes = {1: "(length,)", 2: "(height, width)", 3: "(depth, height, width)"}.get(n, f"{n}-tuple")
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, Sequence)) or isinstance(value, str):
        raise TypeError(f"{name} must be an int or a {axes} tuple of ints, got {value!r}")
    values = (value,) * n if isinstance(value, numbers.Integral) else tuple(value)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be an int or a {axes} tuple of ints, got {value!r}")
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values but the images have {n} spatial axes: "
                         f"give one int or a {axes} tuple")
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in values)


def spatial_size(image_size: IntOrTuple) -> tuple[int, ...]:
    """An image size as a tuple: ``(H, W)`` (an int means a square), ``(D, H, W)`` or ``(L,)``.

    The number of entries is the number of spatial axes of the model's inputs.

    Example:
        >>> spatial_size(64), spatial_size((32, 48, 40)), spatial_size((5000,))
        ((64, 64), (32, 48, 40), (5000,))
    """
    nd = len(image_size) if isinstance(image_size, Sequence) and not isinstance(image_size, str) else 2
    if nd not in (1, 2, 3):
        raise ValueError(f"image_size {image_size!r} has {nd} axes; give 1 (signals), 2 (images) or 3 "
                         "(volumes)")
    return int_tuple(image_size, nd, "image_size")


def pair(value: IntOrTuple, name: str) -> tuple[int, int]:
    """``int_tuple`` for two axes."""
    return int_tuple(value, 2, name)  # type: ignore[return-value]


def color_values(color: Union[float, Sequence[float], Tensor], channels: int, dtype: torch.dtype) -> Tensor:
    """The patch colour, one value per channel, in ``dtype`` (checked finite there).

    Example:
        >>> color_values(0.5, 3, torch.float32).tolist()
        [0.5, 0.5, 0.5]
    """
    t = torch.as_tensor(color, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"color has {t.numel()} values but the image has {channels} channels: "
                         "give one float or one value per channel")
    if not torch.isfinite(t).all():
        raise ValueError("color must be finite")
    converted = t.to(dtype)
    if not torch.isfinite(converted).all():  # 1e300 is finite in float64, not in float32
        raise ValueError(f"color {color!r} is out of range for the model's {str(dtype)[6:]}: "
                         "give a value the model's dtype can hold")
    return converted


def output_kind(output: str) -> str:
    """``"prob"`` or ``"logit"``."""
    if output not in ("prob", "logit"):
        raise ValueError(f"output must be 'prob' or 'logit', got {output!r}")
    return output


def batch_size(value, name: str = "batch_size") -> Optional[int]:
    """A positive int, or None (choose from memory)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)


def image_batch(image: Tensor, expect: Optional[tuple[int, ...]] = None,
                dtype: Optional[torch.dtype] = None, spatial_dims: Optional[int] = None) -> Tensor:
    """One model-ready image as a batch of one: ``(C, *spatial)`` or ``(1, C, *spatial)``.

    Args:
        image: the image.
        expect: ``(C, *spatial)`` it must have (a compiled explainer's size).
        dtype: the model's dtype, which the image must have.
        spatial_dims: spatial axes (default: from ``expect``, else 2).
    """
    n = len(expect) - 1 if expect is not None else (spatial_dims or 2)
    shape = "(C, " + ", ".join("DHW"[3 - n:] if n <= 3 else ["S"] * n) + ")"
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor {shape} or (1, ...{shape[1:]}, got {type(image).__name__}")
    if image.dim() == n + 1:
        image = image.unsqueeze(0)
    if image.dim() != n + 2 or image.shape[0] != 1:
        raise ValueError(f"image must have shape {shape} or (1, {shape[1:]} for this explainer "
                         f"({n} spatial axes), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating-point tensor (model-ready), got {image.dtype}")
    if dtype is not None and image.dtype != dtype:
        raise TypeError(f"image is {str(image.dtype)[6:]} but the model computes in {str(dtype)[6:]}; "
                        f"convert it first: image.to(torch.{str(dtype)[6:]})")
    if expect is not None and tuple(image.shape[2:]) == tuple(expect[1:]) and image.shape[1] != expect[0]:
        raise ValueError(f"image has {image.shape[1]} channel{'s' * (image.shape[1] != 1)} but the explainer "
                         f"was compiled for {expect[0]}; compile with channels={image.shape[1]} if the model "
                         f"takes {image.shape[1]}, or give the image {expect[0]} channels")
    if expect is not None and tuple(image.shape[1:]) != tuple(expect):
        raise ValueError(f"image has shape {tuple(image.shape[1:])} but the explainer was compiled for "
                         f"{tuple(expect)}; resize the image or compile with image_size={tuple(expect[1:])}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values; clean or re-normalise it first")
    return image


def scores(logits: Tensor, label: Union[int, Tensor, list[int]], output: str) -> Tensor:
    """What a heat map records for ``label``: its softmax probability or its logit (float32).
    ``label`` is one class (``(N,)`` values), a ``(N,)`` tensor of one class per row (on
    ``logits``' device), or a list of ``K`` classes (``(N, K)``, the same bits per class)."""
    if logits.dim() != 2:
        raise ValueError(f"the model must return class scores of shape (N, classes), got {tuple(logits.shape)}")
    values = torch.softmax(logits.float(), dim=1) if output == "prob" else logits
    if isinstance(label, Tensor):
        return values.gather(1, label[:, None])[:, 0].float()
    return values[:, label].float()


def label_index(label, classes: int) -> Optional[int]:
    """``label`` as an int class index (numpy and one-element integer tensors too), or None.

    Example:
        >>> label_index(torch.tensor(3), 10), label_index(None, 10)
        (3, None)
    """
    if label is None:
        return None
    if isinstance(label, Tensor):
        if label.numel() != 1 or label.dtype.is_floating_point or label.dtype.is_complex \
                or label.dtype == torch.bool:
            raise TypeError(f"label must be an integer class index, got a {str(label.dtype)[6:]} tensor "
                            f"of shape {tuple(label.shape)}")
        label = int(label.item())
    elif isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise TypeError(f"label must be an integer class index, got {type(label).__name__} {label!r}")
    label = int(label)
    if not 0 <= label < classes:
        raise ValueError(f"label {label} is out of range: the model has {classes} classes (0..{classes - 1})")
    return label


# On the CPU a batch has a fixed cost (a few microseconds of dispatch per op of the graph)
# and a cost per row; 64 rows repay it for models of about a megabyte a position, while
# rows of small ones (a lesion model on 64 x 64 images: 136 KiB) are cheap enough that
# up to 256 rows pay (measured on one thread: 0.18 ms a position at 64 rows, 0.12 at 256,
# 0.15 at 512; ResNet18 and MobileNetV3 at 64-224 px: within noise from 32 to 512).
_CPU_ROWS = (64, 256)
_CPU_BATCH_BYTES = 32 << 20


def default_batch_size(device: torch.device, bytes_per_position: int) -> int:
    """Positions per batch that fit in a third of the device's free memory, at most 512 on a
    GPU; on the CPU 64, or up to 256 while a batch stays under 32 MiB, and at most 2 GiB
    (a fixed budget wherever memory allows, so that the batches do not change with what
    else the machine runs)."""
    per_position = max(1, bytes_per_position)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget, cap = free // 3, 512
    else:
        budget = min(2 << 30, _available_host_memory() // 3)
        cap = min(_CPU_ROWS[1], max(_CPU_ROWS[0], _CPU_BATCH_BYTES // per_position))
    return int(max(1, min(cap, budget // per_position)))


def _available_host_memory() -> int:
    """Bytes of host memory available to a new allocation (Linux: MemAvailable), else 6 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in getattr(os, "sysconf_names", {}):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 6 << 30


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed for want of memory (CUDA or host)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def resolve_device(device, model: Optional[nn.Module] = None) -> torch.device:
    """``device`` as a usable ``torch.device``; None means the model's (else the CPU)."""
    if device is None:
        p = next(model.parameters(), None) if model is not None else None
        return p.device if p is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device torch knows; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but CUDA is not available; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s); use cuda:0")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device='mps' was requested but Apple's MPS is not available here; use 'cpu'")
    elif device.type != "cpu":
        raise ValueError(f"device type {device.type!r} is not supported; use 'cpu', 'cuda' or 'mps'")
    return device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (its first floating parameter's; float32 without one)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def progress(items: Iterable[T], enabled: bool, desc: str, unit: str = "batch",
             total: Optional[int] = None) -> Iterable[T]:
    """``items`` behind a tqdm progress bar when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit=unit, total=total)


class _NoBar:
    """What :func:`progress_bar` yields when it is off: counts, shows nothing."""

    def __init__(self, total: int):
        self.n, self.total = 0, total

    def update(self, n: int = 1) -> None:
        self.n += n


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool, desc: str, unit: str) -> Iterator:
    """A tqdm bar over ``total`` units that the caller advances with ``update(n)`` and may
    re-total (``bar.total = ...``); an object that only counts when not ``enabled``."""
    if not enabled:
        yield _NoBar(total)
        return
    from tqdm.auto import tqdm
    with tqdm(total=total, desc=desc, unit=unit) as bar:
        yield bar
