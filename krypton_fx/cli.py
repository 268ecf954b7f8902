"""The ``krypton-fx`` command line: ``explain``, ``demo``, ``speedup`` and ``bench``.

Every user error ends the same way: exit status 2 and one line on stderr,
``krypton-fx: error: <what is wrong>; <how to fix it>`` -- never a traceback
(set ``KRYPTON_FX_DEBUG=1`` to get one). Output paths are checked for
writability before the long work starts, and files are written to a
temporary file next to the target and renamed into place only once
everything succeeded, so a failed run leaves no output file behind.

Examples:
    $ krypton-fx explain cat.jpg --model resnet18 --weights DEFAULT --out cat-heat.png
    $ krypton-fx explain scan.png --model mypkg.nets:build --weights run3.ckpt --size 128
    $ krypton-fx demo                       # offline: a small lesion model, trained once
    $ krypton-fx speedup --model vgg16
    $ python -m krypton_fx bench --models resnet18,squeezenet1_0 --size 64 --positions 8
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import gc
import importlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, Union

__all__ = ["main", "build_parser", "CLIError", "load_model", "LoadedModel", "read_image",
           "Preprocessing", "preprocessing_for"]

PROG = "krypton-fx"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEBUG_ENV = "KRYPTON_FX_DEBUG"
# Suffixes that make a --model/--weights argument a file name rather than a name.
_FILE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".tar", ".pkl", ".pickle"}
# Checkpoint keys under which training scripts commonly keep the state dict.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "model_state", "net", "weights")


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block), raised not exited."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not the ``None`` of options whose help says what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or action.help is None:
            return action.help
        return super()._get_help_string(action)


# --- argument types -----------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _int_or_pair(text: str) -> Union[int, tuple[int, int]]:
    """``16`` or ``16x8`` / ``16,8`` (height, width), every value >= 1."""
    parts = re.split(r"[x,]", text.strip().lower())
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    values = tuple(_positive_int(p) for p in parts)
    return values[0] if len(values) == 1 else values  # type: ignore[return-value]


def _fraction(text: str, note: str = "") -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1]{note}, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]{note}, got {value}")
    return value


_tau = functools.partial(_fraction, note=" (1 is exact)")


def _drill_down(r: Optional[float], stage1: Optional[int], stride: tuple[int, int]):
    """The DrillDown of --drill-down / --stage1-stride, or None."""
    if r is None:
        if stage1 is not None:
            raise CLIError("--stage1-stride needs --drill-down R (the fraction of cells to refine)")
        return None
    from .approx import DrillDown
    if stage1 is None:
        stage1 = (2 * stride[0], 2 * stride[1])
    elif stage1 < max(stride):
        raise CLIError(f"--stage1-stride {stage1} is finer than --stride {stride[0]}x{stride[1]}; "
                       "give a coarser stage-one stride")
    return DrillDown(r=r, stage1_stride=stage1)


def _color(text: str) -> Union[str, float]:
    name = text.strip().lower()
    if name in ("black", "gray", "grey", "mean"):
        return "gray" if name == "grey" else name
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected black, gray, mean or a number in the model's input space, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` parse as floats but are no use)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _positions(text: str) -> Optional[int]:
    return None if text.strip().lower() == "all" else _positive_int(text)


def _pair(value: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


# --- files --------------------------------------------------------------------------


def _probe_writable(directory: Path, what: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".krypton-fx-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"cannot write {what}: {e.strerror or e} in {directory}; "
                       "choose a writable location") from None


def _output_file(text: str, option: str, formats: Optional[Sequence[str]] = None,
                 inputs: Sequence[str] = (), example: str = "heat.png") -> Path:
    """Check, before any long work, that ``text`` can be written as a file.

    A symbolic link is written through (the link stays, its target gets the
    new content); a path that is one of ``inputs`` is refused.
    """
    path = Path(text).expanduser()
    if path.is_dir():
        raise CLIError(f"{option} {text} is a directory; give a file name such as {path / example}")
    for name in inputs:
        if Path(os.path.realpath(path)) == Path(os.path.realpath(Path(name).expanduser())):
            raise CLIError(f"{option} {text} is the input {name}; krypton-fx never overwrites an input: "
                           "give another output name")
    if formats is not None and path.suffix.lower().lstrip(".") not in formats:
        raise CLIError(f"{option} {text}: unknown picture format {path.suffix or '(none)'!r}; "
                       f"use a name ending in .png (or one of {', '.join(formats)})")
    parent = Path(os.path.realpath(path)).parent
    if not parent.is_dir():
        raise CLIError(f"cannot write {option} {text}: directory {parent} does not exist; "
                       "create it first or choose another path")
    _probe_writable(parent, f"{option} {text}")
    return path


@contextlib.contextmanager
def _output_dir(text: str, option: str) -> Iterator[Path]:
    """A writable output directory; one this run created is removed again if the run fails empty."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {text} exists and is not a directory; choose another path")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create {option} directory {text}: {e.strerror or e}; "
                       "choose a writable location") from None
    try:
        _probe_writable(path, f"{option} {text}")
        yield path
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if still empty
        raise


def _write_files(writers: dict[Path, Callable[[BinaryIO], None]]) -> None:
    """Write every file to a temporary name in its directory, then rename all into place.

    A path that is a symbolic link is written through: its target is replaced,
    the link stays.
    """
    temps: list[tuple[str, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for link, write in writers.items():
            path = Path(os.path.realpath(link))
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs are ordinary files
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # only the ones not renamed: after a failure


def _save_figure(fig, fmt: str, f: BinaryIO) -> None:
    fig.savefig(f, format=fmt)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- images -------------------------------------------------------------------------


def read_image(text: str):
    """Open an image file with PIL and decode it fully (so corrupt files fail here).

    Raises:
        CLIError: missing, unreadable, not an image, or corrupt.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(text).expanduser()
    if not path.exists():
        raise CLIError(f"image {text} does not exist; check the path")
    if path.is_dir():
        raise CLIError(f"image {text} is a directory; give an image file (PNG, JPEG, TIFF)")
    try:
        with Image.open(path) as img:
            img.load()
            with contextlib.suppress(Exception):  # a broken EXIF block is not worth failing on
                img = ImageOps.exif_transpose(img)
            return img.copy()
    except PermissionError:
        raise CLIError(f"cannot read image {text}: permission denied; check its permissions") from None
    except UnidentifiedImageError:
        raise CLIError(f"{text} is not an image file PIL can read; give a PNG, JPEG or TIFF") from None
    except Image.DecompressionBombError as e:
        raise CLIError(f"image {text} is too large to open safely ({_first_line(e)}); "
                       "downscale it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise CLIError(f"image {text} is corrupt or truncated ({_first_line(e)}); "
                       "re-save it as PNG or JPEG") from None


def _to_model_mode(img, channels: int):
    """Convert a PIL image to what the model takes: RGB for 3 channels, L for 1."""
    import numpy as np
    from PIL import Image

    if channels not in (1, 3):
        raise CLIError(f"the model takes {channels}-channel images; image files give 1 (gray) or 3 (RGB) "
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


@dataclasses.dataclass
class Preprocessing:
    """How an image file becomes the model's input.

    Attributes:
        transform: PIL image -> float tensor ``(C, H, W)``, normalised.
        mean: per-channel mean subtracted by ``transform``.
        std: per-channel std divided by ``transform``.
        description: one line for the user.
    """

    transform: Callable
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str

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
                             f"crop {preset.crop_size[0]}")
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
    return Preprocessing(transform, mean_c, std_c, f"resize {size}, crop {size}, normalise")


def _patch_color(spec: Union[str, float], x, mean: Sequence[float], std: Sequence[float]):
    """``--color`` in the model's input space (what ``compile(color=...)`` takes)."""
    if spec == "black":
        return [(0.0 - m) / s for m, s in zip(mean, std)]
    if spec == "gray":
        return [(0.5 - m) / s for m, s in zip(mean, std)]
    if spec == "mean":
        return [float(v) for v in x.mean(dim=(1, 2))]
    return float(spec)


# --- models -------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    """A model ready to explain.

    Attributes:
        model: the module, in eval mode, on the CPU.
        name: what the user called it (for messages and titles).
        weights: the torchvision weights enum used, if any (gives the preprocessing
            and the class names).
        categories: class names, if known.
        warning: something the user should read (random weights, say), or None.
    """

    model: object
    name: str
    weights: object = None
    categories: Optional[list] = None
    warning: Optional[str] = None


@contextlib.contextmanager
def _download_errors(what: str, filename: Optional[str]) -> Iterator[None]:
    """Turn a failed weights download into one actionable line (no internet here, usually)."""
    import torch

    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # torch.hub prints "Downloading: ..." before it tries
            yield
    except (OSError, RuntimeError) as e:
        reason = _first_line(e)
        where = Path(torch.hub.get_dir()) / "checkpoints"
        copy = f"copy {filename} into {where}, " if filename else ""
        raise CLIError(f"cannot get {what}: download failed ({reason}); without internet, {copy}"
                       "pass a local state-dict file with --weights FILE, or --weights none "
                       "(random weights: the heat map is then meaningless)") from None
    sys.stdout.write(said.getvalue())  # it worked: now the message is news, not noise


def _is_file_name(text: str) -> bool:
    return Path(text).suffix.lower() in _FILE_SUFFIXES or os.sep in text or "/" in text


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _weights_enum(text: str, model_name: Optional[str]):
    """A torchvision weights enum: ``ResNet18_Weights.IMAGENET1K_V1``, or ``DEFAULT`` for a named model."""
    import torchvision

    if "." in text:
        try:
            return torchvision.models.get_weight(text)
        except (ValueError, KeyError, AttributeError):
            pass
    elif model_name is not None:
        members = torchvision.models.get_model_weights(model_name).__members__
        key = text.upper()
        if key in members:
            return members[key]
    if model_name is not None:
        enum = torchvision.models.get_model_weights(model_name)
        choices = ", ".join(f"{enum.__name__}.{m}" for m in enum.__members__)
        raise CLIError(f"unknown weights {text!r} for {model_name}: use one of {choices}, "
                       "a state-dict file, or none")
    raise CLIError(f"unknown weights {text!r}: use a torchvision weights name such as "
                   "ResNet18_Weights.IMAGENET1K_V1, a state-dict file, or none")


def _load_error(e: BaseException) -> str:
    """torch.load's reason in one short line (its messages run over many lines)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    text = " ".join((detail.group(1) if detail else text).split()) or type(e).__name__
    if isinstance(e, KeyError) or not detail and len(text) < 8:
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= 160 else text[:157].rsplit(" ", 1)[0] + " ..."


def _read_state_dict(path: Path) -> dict:
    """A state dict from a file: a bare state dict or a training checkpoint.

    Loaded with ``weights_only=True`` always: a weights file never runs code.
    """
    import pickle

    import torch
    from torch import nn

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise CLIError(f"cannot read weights file {path}: permission denied") from None
    except pickle.UnpicklingError as e:
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        if refused:
            raise CLIError(f"weights file {path} holds a pickled {refused.group(1)}; krypton-fx reads weights "
                           "with weights_only=True and never runs code from a weights file: save the "
                           "weights alone with torch.save(model.state_dict(), path), or pass a whole "
                           f"model from a source you trust as --model {path}") from None
        raise CLIError(f"{path} is not a PyTorch weights file ({_load_error(e)}); save one with "
                       "torch.save(model.state_dict(), path)") from None
    except Exception as e:  # torch.load raises RuntimeError, KeyError, EOFError, ...
        raise CLIError(f"{path} is not a PyTorch weights file ({_load_error(e)}); save one with "
                       "torch.save(model.state_dict(), path)") from None
    for _ in range(3):  # unwrap {"state_dict": {"model": ...}} and the like
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _CHECKPOINT_KEYS
                          if isinstance(obj.get(k), (dict, nn.Module))), None)
            if inner is not None:
                obj = inner
                continue
            keys = ", ".join(map(str, list(obj)[:6]))
            raise CLIError(f"weights file {path} holds no state dict (top-level keys: {keys}); "
                           "save one with torch.save(model.state_dict(), path)")
        break
    raise CLIError(f"weights file {path} holds a {type(obj).__name__}, not a state dict; "
                   "save one with torch.save(model.state_dict(), path)")


def _strip_prefix(state: dict, own_keys: set) -> dict:
    # DataParallel saves "module.x", Lightning "model.x": drop a prefix every key shares.
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state) and not any(k in own_keys for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_weights(model, state: dict, source: str, model_name: str, can_set_classes: bool) -> None:
    """``load_state_dict`` (strict), with one line saying what does not fit and how to fix it."""
    own = model.state_dict()
    state = _strip_prefix(state, set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and hasattr(state[k], "shape")
                  and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state)
        return

    def listed(keys: list) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    problems = []
    if mismatched:
        k, theirs, ours = mismatched[0]
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        problems.append(f"shape of {k} is {list(theirs)} in the file but {list(ours)} in the model{more}")
    if missing:
        problems.append(f"{len(missing)} parameters missing from the file ({listed(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown parameters in the file ({listed(unexpected)})")
    hint = "pass the architecture these weights were trained with"
    last = list(own)[-2:]  # the classifier head's weight and bias
    if mismatched and all(k in last for k, _, _ in mismatched) and not (missing or unexpected):
        classes = mismatched[0][1][0]
        hint = (f"the file has {classes} classes: add --num-classes {classes}" if can_set_classes
                else f"the file has {classes} classes: build the model with {classes} outputs")
    raise CLIError(f"weights {source} do not fit {model_name}: {'; '.join(problems)}. Hint: {hint}")


def _model_from_file(path: Path):
    import torch
    from torch import nn

    if not path.is_file():
        raise CLIError(f"model file {path} does not exist; check the path, or give a torchvision "
                       "model name or package.module:callable")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
        raise CLIError(f"cannot unpickle the model in {path} ({_first_line(e)}): the module that defines "
                       "its class must be importable (run from its project or set PYTHONPATH)") from None
    except PermissionError:
        raise CLIError(f"cannot read model file {path}: permission denied") from None
    except Exception as e:
        raise CLIError(f"cannot read model file {path} ({_first_line(e)}); save the whole model with "
                       "torch.save(model, path)") from None
    if isinstance(obj, dict):
        raise CLIError(f"{path} holds a state dict or checkpoint, not a whole model: pass the architecture "
                       f"as --model NAME or package.module:callable and this file as --weights {path}")
    if not isinstance(obj, nn.Module):
        raise CLIError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module; "
                       "save the model with torch.save(model, path)")
    return obj


def _model_from_callable(spec: str):
    from torch import nn

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CLIError(f"--model {spec}: expected package.module:callable")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to the user are importable
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise CLIError(f"cannot import {module_name} for --model {spec} ({_first_line(e)}); "
                       "check the name and PYTHONPATH") from None
    except Exception as e:
        raise CLIError(f"importing {module_name} failed: {type(e).__name__}: {_first_line(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{module_name} has no attribute {attr!r} (--model {spec}); check the name")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CLIError(f"--model {spec} is a {type(obj).__name__}, not a callable returning a model")
    try:
        model = obj()
    except Exception as e:
        raise CLIError(f"calling {spec}() failed: {type(e).__name__}: {_first_line(e)}; "
                       "the callable must take no arguments and return an nn.Module") from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_model(name: str, weights: Optional[str], num_classes: Optional[int]) -> LoadedModel:
    import torchvision

    names = _torchvision_names()
    if name not in names:
        lowered = {n.lower(): n for n in names}
        if name.lower() not in lowered:
            close = difflib.get_close_matches(name.lower(), names, n=3)
            suggestion = f"did you mean {' or '.join(close)}? " if close else ""
            raise CLIError(f"unknown model {name!r}: {suggestion}give a torchvision classification model "
                           "name (torchvision.models.list_models()), package.module:callable, or a .pt "
                           "file holding a whole model")
        name = lowered[name.lower()]
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    spec = "DEFAULT" if weights is None else weights
    if spec.lower() == "none":
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        return LoadedModel(model, name, warning=(
            f"--weights none: {name} has random weights, so its prediction and this heat map are "
            "meaningless (fine for testing)"))
    if Path(spec).expanduser().is_file():
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        _load_weights(model, _read_state_dict(Path(spec).expanduser()), spec, name, can_set_classes=True)
        return LoadedModel(model, name)
    if _is_file_name(spec):
        raise CLIError(f"weights file {spec} does not exist; check the path")
    enum = _weights_enum(spec, name)
    if enum not in torchvision.models.get_model_weights(name):
        allowed = torchvision.models.get_model_weights(name)
        raise CLIError(f"weights {enum} do not fit {name}: they are for another architecture; use "
                       f"{allowed.__name__}.DEFAULT or one of {', '.join(allowed.__members__)}")
    categories = enum.meta.get("categories")
    if num_classes is not None and categories and num_classes != len(categories):
        raise CLIError(f"--num-classes {num_classes} does not fit {enum}, which has {len(categories)} "
                       "classes; drop --num-classes")
    with _download_errors(f"weights {enum}", Path(enum.url).name):
        model = torchvision.models.get_model(name, weights=enum)
    return LoadedModel(model, name, weights=enum, categories=categories)


def load_model(spec: str, weights: Optional[str] = None, num_classes: Optional[int] = None,
               seed: int = 0) -> LoadedModel:
    """Build the model ``--model``/``--weights`` name.

    Args:
        spec: a torchvision classification model name (``resnet18``), a
            ``package.module:callable`` returning an ``nn.Module``, or a ``.pt``
            file holding a whole pickled module.
        weights: a torchvision weights name (``ResNet18_Weights.IMAGENET1K_V1``,
            or ``DEFAULT``/``IMAGENET1K_V1`` for a torchvision model), a
            state-dict or checkpoint file, or ``"none"``. ``None``: ``DEFAULT``
            for torchvision models, the model as built for the others.
        num_classes: output classes of a torchvision model built without
            weights names (to load a fine-tuned state dict).
        seed: seeds the random initialisation, so ``--weights none`` is repeatable.

    Raises:
        CLIError: unknown model, weights that do not fit, failed download.

    Example:
        >>> loaded = load_model("resnet18", "none")
        >>> type(loaded.model).__name__, loaded.warning is not None
        ('ResNet', True)
    """
    import torch

    torch.manual_seed(seed)
    path = Path(spec).expanduser()
    if path.suffix.lower() in _FILE_SUFFIXES or path.is_file():
        loaded = LoadedModel(_model_from_file(path), path.name)
    elif ":" in spec:
        loaded = LoadedModel(_model_from_callable(spec), spec)
    else:
        loaded = _torchvision_model(spec, weights, num_classes)
        loaded.model.eval()
        return loaded
    if num_classes is not None:
        raise CLIError("--num-classes applies to torchvision model names only; "
                       "build the model with the right number of outputs")
    if weights is not None and weights.lower() != "none":
        if Path(weights).expanduser().is_file():
            _load_weights(loaded.model, _read_state_dict(Path(weights).expanduser()), weights,
                          loaded.name, can_set_classes=False)
        elif _is_file_name(weights):
            raise CLIError(f"weights file {weights} does not exist; check the path")
        else:
            enum = _weights_enum(weights, None)
            with _download_errors(f"weights {enum}", Path(enum.url).name):
                state = enum.get_state_dict(progress=False)
            _load_weights(loaded.model, state, str(enum), loaded.name, can_set_classes=False)
            loaded.weights, loaded.categories = enum, enum.meta.get("categories")
    loaded.model.eval()
    return loaded


def _input_channels(model) -> int:
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def _resolve_device(text: Optional[str]):
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device must be cpu or cuda (or cuda:N), got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be cpu or cuda (or cuda:N), got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda was requested but CUDA is not available on this machine; "
                           "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                           "use cuda:0")
    return device


def _check_patch(patch: tuple[int, int], size_hw: Sequence[int], size_option: str = "--size") -> None:
    if patch[0] > size_hw[0] or patch[1] > size_hw[1]:
        raise CLIError(f"--patch {patch[0]}x{patch[1]} is larger than the {size_hw[0]}x{size_hw[1]} model "
                       f"input; use a smaller --patch or a larger {size_option}")


# --- explain ------------------------------------------------------------------------------


# Formats every matplotlib Agg install writes (listed, not asked for: importing
# matplotlib before the cheap checks would slow down every failing call).
_PICTURE_FORMATS = ("png", "jpg", "jpeg", "tif", "tiff", "webp", "pdf", "svg", "eps")


def _cmd_explain(args) -> int:
    import numpy as np
    import torch

    from .explainer import compile as compile_explainer

    patch, stride = _pair(args.patch), _pair(args.stride)
    if args.size is not None:
        _check_patch(patch, (args.size, args.size))
    drill = _drill_down(args.drill_down, args.stage1_stride, stride)
    if stride[0] > patch[0] or stride[1] > patch[1]:
        _warn(f"--stride {stride[0]}x{stride[1]} is larger than --patch {patch[0]}x{patch[1]}: pixels between "
              "the patches are never occluded, so the map cannot show them")
    out_png = _output_file(args.out, "--out", _PICTURE_FORMATS, inputs=[args.image])
    out_npy = _output_file(args.npy, "--npy", inputs=[args.image], example="heat.npy") if args.npy else None
    if out_npy is not None and out_npy.resolve() == out_png.resolve():
        raise CLIError("--out and --npy name the same file; give them different names")
    picture = read_image(args.image)
    device = _resolve_device(args.device)
    loaded = load_model(args.model, args.weights, args.num_classes, args.seed)
    model = loaded.model
    channels = _input_channels(model)
    prep = preprocessing_for(loaded.weights, args.size, args.mean, args.std, channels)
    x = prep.transform(_to_model_mode(picture, channels))
    size_hw = tuple(x.shape[-2:])
    _check_patch(patch, size_hw)

    # One plain inference first: a wrong --label or a model that is no classifier
    # fails here, in a second, before compiling and the long run.
    with torch.no_grad():
        model.to(device)
        try:
            logits = model(x[None].to(device))
        except Exception as e:  # RuntimeError from a conv, AssertionError from ViT's size check, ...
            raise CLIError(f"{loaded.name} cannot run on a {channels}x{size_hw[0]}x{size_hw[1]} image "
                           f"({_first_line(e)}); try another --size") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise CLIError(f"{loaded.name} does not return class scores of shape (N, classes); "
                       "explain works on classifiers")
    classes = logits.shape[1]
    if classes == 1 and args.output == "prob":
        _warn(f"{loaded.name} has one output: its softmax probability is 1 everywhere, so the map is flat; "
              "use --output logit (or a model with two or more classes)")
    if args.label is not None and args.label >= classes:
        raise CLIError(f"--label {args.label} is out of range: {loaded.name} has {classes} classes "
                       f"(0..{classes - 1})")

    color = _patch_color(args.color, x, prep.mean, prep.std)
    ex = compile_explainer(model, patch=patch, stride=stride, color=color, image_size=size_hw,
                           tau=args.tau, batch_size=args.batch_size, device=device, channels=channels,
                           output=args.output)
    if loaded.warning:
        _warn(loaded.warning)
    start = time.perf_counter()
    res = ex(x, label=args.label, drill_down=drill, progress=True)
    seconds = time.perf_counter() - start

    from .viz import heatmap_figure

    heat = res.heatmap.numpy()
    cats = loaded.categories
    label_name = cats[res.label] if cats and res.label < len(cats) else None
    approx = [f"tau={args.tau:g}"] if args.tau < 1.0 else []
    if drill is not None:
        s1 = res.stats["stage1_stride"]
        approx.append(f"drill-down r={drill.r:g} from stride {s1[0]}x{s1[1]}")
    exact = ", ".join(approx + ["approximate"]) if approx else "exact"
    fig = heatmap_figure(prep.display(x), heat, res.patch, res.stride, res.label, res.base_prob,
                         label_name=label_name, output=res.output,
                         subtitle=(f"{loaded.name}, {Path(args.image).name}: patch {patch[0]}x{patch[1]}, "
                                   f"stride {stride[0]}x{stride[1]}, {heat.shape[0]}x{heat.shape[1]} "
                                   f"positions ({exact})"))
    fmt = out_png.suffix.lower().lstrip(".")
    writers = {out_png: functools.partial(_save_figure, fig, fmt)}
    if out_npy is not None:
        writers[out_npy] = functools.partial(np.save, arr=heat)
    _write_files(writers)

    name = f" '{label_name}'" if label_name else ""
    print(f"{loaded.name} on {args.image} ({prep.description}): class {res.label}{name}, "
          f"{'P' if args.output == 'prob' else 'logit'} = {res.base_prob:.4f}")
    run = res.stats.get("positions_run", ex.positions)
    ran = f"{run} of {ex.positions} positions run" if run != ex.positions else f"{ex.positions} positions"
    what = "P" if args.output == "prob" else "logit"
    print(f"heat map {heat.shape[0]}x{heat.shape[1]} ({ran}, batch {min(ex.batch_size, run)}) "
          f"in {seconds:.2f} s on {device}; lowest {what} {heat.min():.4f}")
    for path in writers:
        print(f"wrote {path}")
    return 0


# --- demo ---------------------------------------------------------------------------------

_DEMO_PATCH = 12
_DEMO_STRIDE = 2
_DEMO_BATCH = 64
_DEMO_SEED = 7  # make_dataset seeds below 1000 are never used in training: held-out images
_DEMO_CLASSES = ("healthy", "lesion")


def _cmd_demo(args) -> int:
    import numpy as np
    import torch

    from . import lesions
    from .explainer import compile as compile_explainer
    from .explainer import naive_occlusion
    from .report import theoretical_speedup
    from .viz import heatmap_figure, upsample_heatmap

    with _output_dir(args.out, "--out") as out_dir:
        print(f"{PROG} demo: a small CNN that tells synthetic fundus scans with a bright lesion "
              "from healthy ones (trained once, then cached)")
        model = lesions.load_or_train("tiny", cache_dir=args.cache_dir, progress=True).eval()
        size = lesions.DEFAULT_SIZE["tiny"]
        # Half the scans carry a lesion: 4N + 16 of them hold N lesion scans but for odds of ~1e-5.
        images, labels, boxes = lesions.make_dataset(4 * args.images + 16, size, seed=_DEMO_SEED)
        chosen = [i for i in range(len(labels)) if int(labels[i]) == 1][:args.images]
        patch, stride = (_DEMO_PATCH, _DEMO_PATCH), (_DEMO_STRIDE, _DEMO_STRIDE)
        color = 0.0  # black: the images are in [0, 1] and the model takes them unnormalised
        ex = compile_explainer(model, patch=patch, stride=stride, color=color, image_size=(size, size),
                               batch_size=_DEMO_BATCH, device="cpu")
        theory = theoretical_speedup(model, (size, size), patch)
        print(f"model: lesions tiny (3 conv layers), {size}x{size} images; occlusion patch {_DEMO_PATCH}, "
              f"stride {_DEMO_STRIDE}: {ex.positions} positions per image, batch {_DEMO_BATCH}")
        # Warm both paths up once so that neither pays first-call costs in the timing.
        naive_occlusion(model, images[chosen[0]], patch, stride, color, batch_size=_DEMO_BATCH)
        ex(images[chosen[0]])

        print(f"{'image':<8}{'P(lesion)':>10}{'naive s':>10}{'krypton s':>11}{'speedup':>9}"
              f"{'max |diff|':>12}  hottest point in the lesion box")
        total_naive = total_inc = 0.0
        writers = {}
        for k, i in enumerate(chosen):
            image = images[i]
            t0 = time.perf_counter()
            naive = naive_occlusion(model, image, patch, stride, color, batch_size=_DEMO_BATCH)
            t1 = time.perf_counter()
            res = ex(image)
            t2 = time.perf_counter()
            total_naive += t1 - t0
            total_inc += t2 - t1
            heat = res.heatmap.numpy()
            drop = res.base_prob - upsample_heatmap(heat, (size, size), patch, stride)
            hy, hx = np.unravel_index(int(np.argmax(drop)), drop.shape)
            y, x, h, w = (int(v) for v in boxes[i])
            inside = y <= hy < y + h and x <= hx < x + w
            diff = float((naive.heatmap - res.heatmap).abs().max())
            print(f"{k:<8}{res.base_prob:>10.3f}{t1 - t0:>10.3f}{t2 - t1:>11.3f}"
                  f"{(t1 - t0) / (t2 - t1):>8.2f}x{diff:>12.1e}  "
                  f"{'yes' if inside else 'no'} (hottest at y={hy}, x={hx}; box y={y}..{y + h - 1}, "
                  f"x={x}..{x + w - 1})")
            fig = heatmap_figure(image.permute(1, 2, 0).numpy(), heat, patch, stride, res.label,
                                 res.base_prob, label_name=_DEMO_CLASSES[res.label], box=(y, x, h, w),
                                 box_label="true lesion",
                                 subtitle=(f"synthetic scan {k} (held-out seed {_DEMO_SEED}, #{i}): "
                                           f"patch {_DEMO_PATCH}, stride {_DEMO_STRIDE}, "
                                           f"{ex.positions} positions, exact"))
            writers[out_dir / f"demo-{k}.png"] = functools.partial(_save_figure, fig, "png")
        _write_files(writers)
        print(f"total: naive {total_naive:.3f} s, krypton_fx {total_inc:.3f} s: "
              f"speedup {total_naive / total_inc:.2f}x measured side by side "
              f"(theoretical {theory:.2f}x, conv layers only)")
        print(f"wrote {len(writers)} pictures to {out_dir.resolve()}/")
        for path in writers:
            print(f"  {path}")
    return 0


# --- speedup ------------------------------------------------------------------------------


def _cmd_speedup(args) -> int:
    from .explainer import compile as compile_explainer
    from .report import theoretical_speedup

    patch = _pair(args.patch)
    _check_patch(patch, (args.size, args.size))
    loaded = load_model(args.model, "none" if ":" not in args.model and not _is_file_name(args.model)
                        else None, seed=0)
    channels = _input_channels(loaded.model)
    size_hw = (args.size, args.size)
    ratio = theoretical_speedup(loaded.model, size_hw, patch, tau=args.tau, channels=channels)
    # Patch sizes are the same for every position, so one position per patch width is enough
    # for the report: stride = patch keeps compiling cheap.
    ex = compile_explainer(loaded.model, patch=patch, stride=patch, image_size=size_hw, tau=args.tau,
                           device="cpu", channels=channels)
    print(f"{loaded.name}: {size_hw[0]}x{size_hw[1]} input, patch {patch[0]}x{patch[1]}, tau {args.tau:g}")
    print(f"theoretical speedup: {ratio:.4f}")
    print()
    print(ex.report())
    return 0


# --- bench --------------------------------------------------------------------------------


def _bench_models(text: str) -> list[str]:
    names = _torchvision_names()
    if text.strip().lower() == "all":
        return names
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    if not chosen:
        raise CLIError("--models is empty; give all or a comma-separated list such as resnet18,vgg16")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=3)
        suggestion = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise CLIError(f"unknown model(s) in --models: {', '.join(unknown)}{suggestion}; use names from "
                       "torchvision.models.list_models(module=torchvision.models) or all")
    return chosen


def _mib(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value / (1 << 20):.0f}"


def _cmd_bench(args) -> int:
    import platform

    import torch
    import torchvision

    from .benchmark import measure
    from .viz import bench_figure

    names = _bench_models(args.models)
    device = _resolve_device(args.device)
    patch, stride = _pair(args.patch), _pair(args.stride)
    _check_patch(patch, (args.size, args.size))
    with _output_dir(args.out, "--out") as out_dir:
        settings = {"size": args.size, "patch": list(patch), "stride": list(stride), "device": str(device),
                    "batch_size": args.batch_size, "positions": args.positions, "seed": args.seed,
                    "weights": "random init", "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "machine": platform.machine(),
                    "threads": torch.get_num_threads()}
        width = max(len(n) for n in names) + 2
        header = (f"{'model':<{width}}{'theory':>8}{'measured':>10}{'ratio':>7}{'naive s':>9}"
                  f"{'krypton s':>11}{'naive MiB':>11}{'krypton MiB':>13}{'max |diff|':>12}")
        table = [f"krypton-fx bench: {args.size}x{args.size}, patch {patch[0]}, stride {stride[0]}, "
                 f"{device}, batch {args.batch_size}, positions {args.positions or 'all'} "
                 "around the centre, random init; ratio = measured / theory", header, "-" * len(header)]
        for line in table:
            print(line, flush=True)
        results = []
        for name in names:
            model = None
            try:
                torch.manual_seed(args.seed)
                model = torchvision.models.get_model(name, weights=None)
                image = torch.randn(_input_channels(model), args.size, args.size)
                m = measure(model, image, patch=patch, stride=stride, batch_size=args.batch_size,
                            positions=args.positions, device=device)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a model that does not trace or run is a row, not a crash
                reason = re.sub(r"\s+", " ", _first_line(e))
                results.append({"model": name, "status": "skipped", "reason": reason})
                line = f"{name:<{width}}skipped: {reason}"
            else:
                mib = 1 << 20
                results.append({"model": name, "status": "ok", "theoretical": m.theoretical,
                                "speedup": m.speedup, "ratio": m.speedup / m.theoretical,
                                "naive_s": m.naive_s, "incremental_s": m.incremental_s,
                                "executed_ratio": m.executed_ratio, "naive_peak_bytes": m.naive_peak,
                                "incremental_peak_bytes": m.incremental_peak,
                                "max_abs_diff": m.max_abs_diff, "positions": m.positions,
                                "batch_size": m.batch_size})
                line = (f"{name:<{width}}{m.theoretical:>7.2f}x{m.speedup:>9.2f}x"
                        f"{m.speedup / m.theoretical:>7.0%}{m.naive_s:>9.3f}{m.incremental_s:>11.3f}"
                        f"{_mib(m.naive_peak):>11}{_mib(m.incremental_peak):>13}"
                        f"{m.max_abs_diff:>12.1e}")
            finally:
                del model
                gc.collect()
            table.append(line)
            print(line, flush=True)
        if device.type != "cuda":
            table.append("peak memory: not measured on the CPU (the process's resident peak does not fall "
                         "between the two runs, so it would show the same for both)")
            print(table[-1])
        ok = [r for r in results if r["status"] == "ok"]
        skipped = len(results) - len(ok)
        summary = f"{len(ok)} measured, {skipped} skipped"
        if ok:
            geo_mean = math.exp(sum(math.log(r["ratio"]) for r in ok) / len(ok))
            summary += f"; geometric mean of measured / theory: {geo_mean:.0%}"
        table.append(summary)
        print(summary)

        title = (f"{device}, {args.size}x{args.size}, patch {patch[0]}, stride {stride[0]}, "
                 f"batch {args.batch_size}, {args.positions or 'all'} positions")
        if skipped:
            title += f"\n{skipped} model{'s' * (skipped > 1)} skipped: see bench.txt"
        fig = bench_figure([r["model"] for r in ok], [r["theoretical"] for r in ok],
                           [r["speedup"] for r in ok], title=title)
        report = {"settings": settings, "results": results}
        files = {
            out_dir / "bench.json": lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()),
            out_dir / "bench.txt": lambda f: f.write(("\n".join(table) + "\n").encode()),
            out_dir / "bench.png": functools.partial(_save_figure, fig, "png"),
        }
        _write_files(files)
        for path in files:
            print(f"wrote {path}")
    return 0


# --- the parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``krypton-fx`` argument parser (subcommands explain, demo, speedup, bench)."""
    parser = _Parser(prog=PROG, description="Fast occlusion heat maps of CNN predictions (krypton_fx).",
                     epilog="Errors exit with status 2 and one line on stderr; set KRYPTON_FX_DEBUG=1 "
                            "for tracebacks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    fmt = _HelpFormatter

    p = sub.add_parser("explain", help="occlusion heat map of one image", formatter_class=fmt,
                       description="Explain a CNN's prediction on IMAGE with an exact occlusion heat map.")
    p.add_argument("image", metavar="IMAGE", help="PNG, JPEG or TIFF file")
    p.add_argument("--model", required=True, metavar="NAME|module:callable|file.pt",
                   help="torchvision model name (resnet18), package.module:callable returning an "
                        "nn.Module, or a .pt file with a whole pickled model (unpickling runs code "
                        "from the file: use only files you trust)")
    p.add_argument("--weights", metavar="ENUM|PATH|none",
                   help="torchvision weights (ResNet18_Weights.IMAGENET1K_V1, DEFAULT), a state-dict or "
                        "checkpoint file (read with weights_only=True: it never runs code), or none "
                        "(random init); default: DEFAULT for torchvision names, the model as built "
                        "otherwise")
    p.add_argument("--num-classes", type=_positive_int, metavar="N",
                   help="outputs of a torchvision model whose --weights file was fine-tuned")
    p.add_argument("--patch", type=_int_or_pair, default=16, metavar="N|HxW", help="occlusion patch size")
    p.add_argument("--stride", type=_int_or_pair, default=4, metavar="N|HxW", help="patch stride")
    p.add_argument("--color", type=_color, default="gray", metavar="black|gray|mean|FLOAT",
                   help="patch colour in the model's input space: black and gray are pixel values 0 "
                        "and 0.5 normalised, mean the image's per-channel mean, a number is used as is")
    p.add_argument("--label", type=_non_negative_int, metavar="N",
                   help="class to explain (default: the predicted class)")
    p.add_argument("--tau", type=_tau, default=1.0, help="projective-field threshold; 1 is exact")
    p.add_argument("--output", choices=("prob", "logit"), default="prob",
                   help="what the map records: the softmax probability of the label, or its raw logit")
    p.add_argument("--drill-down", type=_fraction, metavar="R",
                   help="adaptive drill-down: a coarse pass at --stage1-stride, then --stride only on "
                        "the fraction R of cells with the largest drop (approximate; default off)")
    p.add_argument("--stage1-stride", type=_positive_int, metavar="N",
                   help="coarse stride of --drill-down in pixels (default: 2 x --stride)")
    p.add_argument("--device", metavar="cpu|cuda", help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help="positions per batch (default: what fits in memory)")
    p.add_argument("--size", type=_positive_int, metavar="N",
                   help="model input size: resize the shorter side to N, centre-crop NxN (default 224, "
                        "or the weights' own crop size)")
    p.add_argument("--mean", type=_finite_float, nargs="+", metavar="M",
                   help="per-channel normalisation mean (default ImageNet's, or the weights' own)")
    p.add_argument("--std", type=_finite_float, nargs="+", metavar="S",
                   help="per-channel normalisation std (default ImageNet's, or the weights' own)")
    p.add_argument("--out", default="heat.png", metavar="PNG", help="picture to write")
    p.add_argument("--npy", metavar="NPY", help="also write the raw heat map (numpy .npy)")
    p.add_argument("--seed", type=int, default=0, help="seed of random initialisation (--weights none)")
    p.set_defaults(run=_cmd_explain)

    p = sub.add_parser("demo", help="offline demo on synthetic lesion scans", formatter_class=fmt,
                       description="Explain a small lesion classifier (trained on first run, then cached) "
                                   "on synthetic scans, and time naive vs incremental occlusion.")
    p.add_argument("--out", default="krypton-demo", metavar="DIR", help="folder for the pictures")
    p.add_argument("--images", type=_positive_int, default=3, metavar="N", help="lesion images to explain")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the trained model is kept (default $KRYPTON_CACHE or ~/.cache/krypton_fx)")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("speedup", help="theoretical speedup and per-node report", formatter_class=fmt,
                       description="Print the theoretical speedup (eqs. 16-20) and the per-node table.")
    p.add_argument("--model", required=True, metavar="NAME|module:callable|file.pt",
                   help="as for explain; built with random weights (they do not change the count)")
    p.add_argument("--size", type=_positive_int, default=224, metavar="N", help="input height and width")
    p.add_argument("--patch", type=_int_or_pair, default=16, metavar="N|HxW", help="occlusion patch size")
    p.add_argument("--tau", type=_tau, default=1.0, help="projective-field threshold; 1 is exact")
    p.set_defaults(run=_cmd_speedup)

    p = sub.add_parser("bench", help="measured vs theoretical speedup over torchvision models",
                       formatter_class=fmt,
                       description="Time naive and incremental occlusion side by side (random init).")
    p.add_argument("--models", default="all", metavar="all|NAME,...",
                   help="torchvision classifiers: all, or a comma-separated list")
    p.add_argument("--size", type=_positive_int, default=224, metavar="N", help="input height and width")
    p.add_argument("--patch", type=_int_or_pair, default=16, metavar="N|HxW", help="occlusion patch size")
    p.add_argument("--stride", type=_int_or_pair, default=8, metavar="N|HxW", help="patch stride")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda", help="where both runs happen")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                   help="positions per batch, the same for naive and incremental")
    p.add_argument("--positions", type=_positions, default=64, metavar="N|all",
                   help="positions to time, around the image centre")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and image")
    p.add_argument("--out", default="krypton-bench", metavar="DIR",
                   help="folder for bench.json, bench.txt and bench.png")
    p.set_defaults(run=_cmd_bench)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _report_error(message: str) -> None:
    one_line = re.sub(r"\s*\n\s*", " ", message.strip())
    print(f"{PROG}: error: {one_line}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``krypton-fx`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["speedup", "--model", "resnet18", "--size", "64"])  # doctest: +SKIP
        0
    """
    debug = bool(os.environ.get(_DEBUG_ENV))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise CLIError("choose a command: explain, demo, speedup or bench (see 'krypton-fx --help')")
        with warnings.catch_warnings():
            if not debug:  # library deprecation chatter is not for end users
                warnings.simplefilter("ignore")
            return args.run(args)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except CLIError as e:
        _report_error(str(e))
        return 2
    except (ValueError, TypeError) as e:  # the library's one-line argument errors
        if debug:
            raise
        _report_error(str(e))
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        _report_error(f"{type(e).__name__}: {_first_line(e)} (unexpected; rerun with "
                      f"{_DEBUG_ENV}=1 for the traceback)")
        return 1
