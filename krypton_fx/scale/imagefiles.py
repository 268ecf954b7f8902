"""Image files: find them (files, folders, globs), read them fully, and turn them into tensors.

Reading decodes the whole file, so a corrupt or truncated file fails here,
with one line that says why, and not halfway through a run.
"""

from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch

from .. import common

__all__ = ["ImageFileError", "read_image", "to_model_mode", "to_tensor", "load_image", "expand_inputs"]

PathLike = Union[str, "os.PathLike[str]"]
_GLOB_CHARS = set("*?[")


class ImageFileError(ValueError):
    """An image file is missing, unreadable, not an image, or corrupt; the message is one line."""


def read_image(path: PathLike):
    """Open an image file with PIL and decode it fully (so corrupt files fail here).

    EXIF orientation is applied. Returns a PIL image.

    Raises:
        ImageFileError: missing, a directory, unreadable, not an image, or corrupt.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    text = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        raise ImageFileError(f"image {text} does not exist; check the path")
    if path.is_dir():
        raise ImageFileError(f"image {text} is a directory; give an image file (PNG, JPEG, TIFF)")
    try:
        with Image.open(path) as img:
            img.load()
            with contextlib.suppress(Exception):  # a broken EXIF block is not worth failing on
                img = ImageOps.exif_transpose(img)
            return img.copy()
    except PermissionError:
        raise ImageFileError(f"cannot read image {text}: permission denied; check its permissions") from None
    except UnidentifiedImageError:
        raise ImageFileError(f"{text} is not an image file PIL can read; give a PNG, JPEG or TIFF") from None
    except Image.DecompressionBombError as e:
        raise ImageFileError(f"image {text} is too large to open safely ({common.first_line(e)}); "
                             "downscale it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageFileError(f"image {text} is corrupt or truncated ({common.first_line(e)}); "
                             "re-save it as PNG or JPEG") from None


def to_model_mode(img, channels: int):
    """Convert a PIL image to what the model takes: RGB for 3 channels, L for 1.

    16-bit and float scans are scaled to 8 bits by their format's range;
    transparent pixels become white.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels}-channel images; image files give 1 (gray) or 3 (RGB) "
                         "channels: use the Python API (krypton_fx.compile) for other inputs")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16-bit and float scans: scale to 8 bits by the format's range, not by PIL's clipping.
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            top = 65535.0
        elif img.mode == "F" and a.size and a.max() <= 1.0:
            top = 1.0
        else:
            top = 255.0 if a.size == 0 or a.max() <= 255 else 65535.0
        img = Image.fromarray(np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        # Transparent pixels have arbitrary colour values: show them as white paper.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB" if channels == 3 else "L")


def to_tensor(img) -> torch.Tensor:
    """A PIL image as a float32 ``(C, H, W)`` tensor in ``[0, 1]``."""
    a = np.asarray(img, dtype=np.uint8)
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(path: PathLike, channels: int = 3, transform=None) -> torch.Tensor:
    """Read an image file as the model's input: ``transform(PIL image)``, by default
    ``(C, H, W)`` float32 in ``[0, 1]`` at the file's own size.

    Raises:
        ImageFileError: the file cannot be read as an image.
    """
    img = to_model_mode(read_image(path), channels)
    return transform(img) if transform is not None else to_tensor(img)


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_inputs(specs: Iterable[PathLike], exclude: Optional[PathLike] = None) -> tuple[list[Path], list[str]]:
    """Files, folders and globs -> the input files, in order, each once.

    A folder gives every regular file under it (recursively, sorted, hidden
    files and folders left out): a file that is no image becomes an error
    for that file, not a silent omission. A glob (``*``, ``?``, ``[``) that
    the shell did not expand is expanded here (``**`` recurses). A path that
    does not exist is kept, so that it is reported as missing.

    Args:
        specs: what the user named.
        exclude: a folder that folders and globs do not look into (the output folder);
            a file named there explicitly stays an input.

    Returns:
        ``(paths, notes)``: the inputs, and one line for each glob that matched nothing.
    """
    seen: set[str] = set()
    paths: list[Path] = []
    notes: list[str] = []
    skip = os.path.realpath(exclude) if exclude is not None else None

    def inside_excluded(p: Path) -> bool:
        return skip is not None and (os.path.realpath(p) + os.sep).startswith(skip + os.sep)

    def add(p: Path, walked: bool = False) -> None:
        key = os.path.realpath(p)
        if key not in seen and not (walked and inside_excluded(p)):
            seen.add(key)
            paths.append(p)

    for spec in specs:
        text = str(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            if inside_excluded(path):
                continue
            for root, dirs, files in os.walk(path, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and not inside_excluded(Path(root) / d))
                for name in sorted(files):
                    f = Path(root) / name
                    if not _is_hidden(f, path) and not f.is_dir():
                        add(f, walked=True)
        elif not path.exists() and _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            files = [Path(m) for m in matches if not Path(m).is_dir()]
            if not files:
                notes.append(f"{text} matches no file")
            for f in files:
                add(f, walked=True)
        else:
            add(path)
    return paths, notes
