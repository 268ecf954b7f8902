"""Image files as the model's input: read, convert, resize, crop and normalise.

Examples:
    >>> prep = preprocessing_for(None, size=64, mean=None, std=None, channels=3)
    >>> x = prep.transform(read_image("scan.png").convert("RGB"))  # doctest: +SKIP
    >>> tuple(x.shape)                                             # doctest: +SKIP
    (3, 64, 64)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ..scale import imagefiles
from .errors import CLIError

__all__ = ["read_image", "to_model_mode", "Preprocessing", "preprocessing_for", "patch_color", "ImageReader",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_image(text: str):
    """Open an image file with PIL and decode it fully (so corrupt files fail here).

    Raises:
        CLIError: missing, unreadable, not an image, or corrupt.
    """
    try:
        return imagefiles.read_image(text)
    except imagefiles.ImageFileError as e:
        raise CLIError(str(e)) from None


def to_model_mode(img, channels: int):
    """Convert a PIL image to what the model takes: RGB for 3 channels, L for 1."""
    try:
        return imagefiles.to_model_mode(img, channels)
    except ValueError as e:
        raise CLIError(str(e)) from None


@dataclasses.dataclass
class Preprocessing:
    """How an image file becomes the model's input.

    Attributes:
        transform: PIL image -> float tensor ``(C, H, W)``, normalised.
        mean: per-channel mean subtracted by ``transform``.
        std: per-channel std divided by ``transform``.
        description: one line for the user.
        resize: the shorter side's length after resizing, and
        crop: the centre crop's side (what :meth:`labels` repeats on a label map).
    """

    transform: Callable
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    resize: Optional[int] = None
    crop: Optional[int] = None

    def labels(self, labels):
        """A label map of the image file's size ``(H, W)`` resized (nearest) and cropped as
        :attr:`transform` does the image: int64 ``(crop, crop)``."""
        import torch
        from torchvision.transforms import functional as TF

        x = torch.as_tensor(labels).double()[None]
        x = TF.resize(x, [self.resize], interpolation=TF.InterpolationMode.NEAREST, antialias=False)
        return TF.center_crop(x, [self.crop])[0].round().long()

    def display(self, x) -> "object":
        """The model input as an ``(H, W, 3)`` / ``(H, W)`` array in ``[0, 1]``: undo the normalisation."""
        import torch

        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        img = (x.detach().cpu() * std + mean).clamp(0, 1)
        return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def _per_channel(values: Optional[Sequence[float]], default: Sequence[float], channels: int,
                 option: str) -> tuple[float, ...]:
    if values is None:
        if channels == len(default):
            return tuple(default)
        return (sum(default) / len(default),) * channels  # ImageNet's gray level for 1 channel
    if len(values) == 1:
        values = list(values) * channels
    if len(values) != channels:
        raise CLIError(f"{option} has {len(values)} values but the model takes {channels} channels; "
                       f"give one value or {channels}")
    return tuple(float(v) for v in values)


def preprocessing_for(weights, size: Optional[int], mean: Optional[Sequence[float]],
                      std: Optional[Sequence[float]], channels: int) -> Preprocessing:
    """The weights' own transforms for a torchvision weights enum, else resize, crop and normalise.

    Without weights: resize the shorter side to ``size`` (bilinear, antialiased),
    centre-crop ``size x size``, scale to ``[0, 1]``, normalise with ``mean``/``std``
    (ImageNet's by default), as torchvision's classification presets do.
    """
    import torch
    from torchvision import transforms as T

    if std is not None and any(s == 0 for s in std):
        raise CLIError("--std values must be non-zero")
    if weights is not None:
        preset = weights.transforms()
        overrides = {}
        if size is not None:
            crop, resize = preset.crop_size[0], preset.resize_size[0]
            overrides.update(crop_size=size, resize_size=max(size, round(size * resize / crop)))
        if mean is not None:
            overrides["mean"] = _per_channel(mean, preset.mean, channels, "--mean")
        if std is not None:
            overrides["std"] = _per_channel(std, preset.std, channels, "--std")
        preset = weights.transforms(**overrides) if overrides else preset
        return Preprocessing(preset, tuple(preset.mean), tuple(preset.std),
                             f"{weights}.transforms(): resize {preset.resize_size[0]}, "
                             f"crop {preset.crop_size[0]}", preset.resize_size[0], preset.crop_size[0])
    size = size or 224
    mean_c = _per_channel(mean, IMAGENET_MEAN, channels, "--mean")
    std_c = _per_channel(std, IMAGENET_STD, channels, "--std")
    transform = T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(size),
        T.PILToTensor(),
        T.ConvertImageDtype(torch.float32),
        T.Normalize(mean_c, std_c),
    ])
    return Preprocessing(transform, mean_c, std_c, f"resize {size}, crop {size}, normalise", size, size)


def patch_color(spec: Union[str, float], x, mean: Sequence[float], std: Sequence[float]):
    """``--color`` in the model's input space (what ``compile(color=...)`` takes)."""
    if spec == "black":
        return [(0.0 - m) / s for m, s in zip(mean, std)]
    if spec == "gray":
        return [(0.5 - m) / s for m, s in zip(mean, std)]
    if spec == "mean":
        return [float(v) for v in x.mean(dim=(1, 2))]
    return float(spec)


@dataclasses.dataclass(frozen=True)
class ImageReader:
    """Image file -> ``(model input, picture to draw under the map, patch colour)``.

    What a worker (a thread, or a Ray actor on another machine) needs to read
    an image exactly as the command line does; it pickles.
    """

    prep: Preprocessing
    channels: int
    color: Union[str, float]

    def __call__(self, path: Union[str, Path]):
        x = self.prep.transform(imagefiles.to_model_mode(imagefiles.read_image(path), self.channels))
        return x, self.prep.display(x), patch_color(self.color, x, self.prep.mean, self.prep.std)
