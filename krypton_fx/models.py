"""Load a model to explain: torchvision names, ``package.module:callable``, whole-model files,
and weights from torchvision names, state dicts or training checkpoints.

Weights files are always read with ``torch.load(..., weights_only=True)``: a
weights file never runs code. Only a *whole-model* file (``spec`` ending in
``.pt`` and the like) is unpickled in full, because that is the only way to
read one; use those only from sources you trust.

Every failure raises :class:`ModelLoadError` (a ``ValueError``) with one line
that says what is wrong and how to fix it.

Example:
    >>> import torch
    >>> from krypton_fx.models import load_model
    >>> loaded = load_model("resnet18", weights="none", num_classes=2)
    >>> loaded.model.training, loaded.warning is not None
    (False, True)
    >>> torch.save(loaded.model.state_dict(), "/tmp/two_classes.pt")
    >>> again = load_model("resnet18", weights="/tmp/two_classes.pt", num_classes=2)
    >>> bool(torch.equal(again.model.fc.weight, loaded.model.fc.weight))
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import io
import logging
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from . import common, monai_nets, tracing

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "read_state_dict", "load_weights",
           "input_channels", "model_spatial_dims", "torchvision_names", "is_file_name"]

logger = logging.getLogger(__name__)

# Suffixes that make a model or weights argument a file name rather than a name.
FILE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".tar", ".pkl", ".pickle"})
# Checkpoint keys under which training scripts commonly keep the state dict.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "model_state", "net", "weights")


class ModelLoadError(ValueError):
    """A model or its weights cannot be loaded; the message is one line with the fix."""


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

    model: nn.Module
    name: str
    weights: object = None
    categories: Optional[list] = None
    warning: Optional[str] = None


@contextlib.contextmanager
def _download_errors(what: str, filename: Optional[str]) -> Iterator[None]:
    """Turn a failed weights download into one actionable line (no internet here, usually)."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # torch.hub prints "Downloading: ..." before it tries
            yield
    except (OSError, RuntimeError) as e:
        reason = common.first_line(e)
        where = Path(torch.hub.get_dir()) / "checkpoints"
        copy = f"copy {filename} into {where}, " if filename else ""
        raise ModelLoadError(f"cannot get {what}: download failed ({reason}); without internet, {copy}"
                             "pass a local state-dict file with --weights FILE, or --weights none "
                             "(random weights: the heat map is then meaningless)") from None
    if said.getvalue().strip():
        logger.info("%s", said.getvalue().strip())  # it worked: now the message is news, not noise


def is_file_name(text: str) -> bool:
    """Whether a ``--model``/``--weights`` argument names a file (by suffix or a path separator)."""
    return Path(text).suffix.lower() in FILE_SUFFIXES or os.sep in text or "/" in text


def torchvision_names() -> list[str]:
    """torchvision's classification model names."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _first_conv(model: nn.Module) -> Optional[nn.modules.conv._ConvNd]:
    return next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)


def input_channels(model: nn.Module) -> int:
    """Channels of the inputs ``model`` takes: those of the first layer its input meets
    (:func:`krypton_fx.tracing.input_channels`), or where it does not trace its first
    convolution's (1-D, 2-D or 3-D); else 3.

    Example:
        >>> input_channels(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
        1
    """
    try:
        channels = tracing.input_channels(tracing.trace(model))
    except tracing.TraceError:
        first = _first_conv(model)
        channels = first.in_channels if first is not None else None
    return channels or 3


def model_spatial_dims(model: nn.Module) -> Optional[int]:
    """Spatial axes of the inputs ``model`` takes, from its first convolution: 2 for Conv2d
    (images), 3 for Conv3d (volumes), 1 for Conv1d; None if it has none.

    Example:
        >>> model_spatial_dims(nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU()))
        3
    """
    first = _first_conv(model)
    return None if first is None else len(first.kernel_size)


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
        raise ModelLoadError(f"unknown weights {text!r} for {model_name}: use one of {choices}, "
                             "a state-dict file, or none")
    raise ModelLoadError(f"unknown weights {text!r}: use a torchvision weights name such as "
                         "ResNet18_Weights.IMAGENET1K_V1, a state-dict file, or none")


def _load_error(e: BaseException) -> str:
    """torch.load's reason in one short line (its messages run over many lines)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    text = " ".join((detail.group(1) if detail else text).split()) or type(e).__name__
    if isinstance(e, KeyError) or not detail and len(text) < 8:
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= 160 else text[:157].rsplit(" ", 1)[0] + " ..."


def read_state_dict(path: "str | os.PathLike") -> dict:
    """A state dict from a file: a bare state dict or a training checkpoint.

    Loaded with ``weights_only=True`` always: a weights file never runs code.
    Checkpoints keep the state dict under a key such as ``state_dict`` or
    ``model``; those are unwrapped, as is a saved ``nn.Module``'s state.

    Raises:
        ModelLoadError: unreadable, not a PyTorch file, a pickled payload, or no state dict inside.

    Example:
        >>> import torch
        >>> torch.save({"epoch": 3, "state_dict": torch.nn.Linear(2, 1).state_dict()}, "/tmp/ck.pt")
        >>> sorted(read_state_dict("/tmp/ck.pt"))
        ['bias', 'weight']
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise ModelLoadError(f"cannot read weights file {path}: permission denied") from None
    except pickle.UnpicklingError as e:
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        if refused:
            raise ModelLoadError(
                f"weights file {path} holds a pickled {refused.group(1)}; krypton-fx reads weights "
                "with weights_only=True and never runs code from a weights file: save the "
                "weights alone with torch.save(model.state_dict(), path), or pass a whole "
                f"model from a source you trust as --model {path}") from None
        raise ModelLoadError(f"{path} is not a PyTorch weights file ({_load_error(e)}); save one with "
                             "torch.save(model.state_dict(), path)") from None
    except Exception as e:  # torch.load raises RuntimeError, KeyError, EOFError, ...
        raise ModelLoadError(f"{path} is not a PyTorch weights file ({_load_error(e)}); save one with "
                             "torch.save(model.state_dict(), path)") from None
    for _ in range(3):  # unwrap {"state_dict": {"model": ...}} and the like
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in CHECKPOINT_KEYS
                          if isinstance(obj.get(k), (dict, nn.Module))), None)
            if inner is not None:
                obj = inner
                continue
            keys = ", ".join(map(str, list(obj)[:6]))
            raise ModelLoadError(f"weights file {path} holds no state dict (top-level keys: {keys}); "
                                 "save one with torch.save(model.state_dict(), path)")
        break
    raise ModelLoadError(f"weights file {path} holds a {type(obj).__name__}, not a state dict; "
                         "save one with torch.save(model.state_dict(), path)")


def _strip_prefix(state: dict, own_keys: set) -> dict:
    # DataParallel saves "module.x", Lightning "model.x": drop a prefix every key shares.
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state) and not any(k in own_keys for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: dict, source: str, model_name: str,
                 can_set_classes: bool = False) -> None:
    """``load_state_dict`` (strict), with one line saying what does not fit and how to fix it.

    A ``module.`` (DataParallel) or ``model.`` (Lightning) prefix on every key is dropped.

    Args:
        model: the module to load into.
        state: the state dict (see :func:`read_state_dict`).
        source: where ``state`` came from, for the message.
        model_name: the model's name, for the message.
        can_set_classes: whether the caller can rebuild the model with another
            number of classes (the hint then says ``--num-classes N``).

    Raises:
        ModelLoadError: missing, unknown or mis-shaped parameters.
    """
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
    raise ModelLoadError(f"weights {source} do not fit {model_name}: {'; '.join(problems)}. Hint: {hint}")


def _model_from_file(path: Path) -> nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist; check the path, or give a torchvision "
                             "model name or package.module:callable")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
        raise ModelLoadError(f"cannot unpickle the model in {path} ({common.first_line(e)}): the module that "
                             "defines its class must be importable (run from its project or set "
                             "PYTHONPATH)") from None
    except PermissionError:
        raise ModelLoadError(f"cannot read model file {path}: permission denied") from None
    except Exception as e:
        raise ModelLoadError(f"cannot read model file {path} ({common.first_line(e)}); save the whole model "
                             "with torch.save(model, path)") from None
    if isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a state dict or checkpoint, not a whole model: pass the "
                             f"architecture as --model NAME or package.module:callable and this file as "
                             f"--weights {path}")
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module; "
                             "save the model with torch.save(model, path)")
    return obj


def _model_from_callable(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"--model {spec}: expected package.module:callable")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to the user are importable
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import {module_name} for --model {spec} ({common.first_line(e)}); "
                             "check the name and PYTHONPATH") from None
    except Exception as e:
        raise ModelLoadError(f"importing {module_name} failed: {type(e).__name__}: {common.first_line(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"{module_name} has no attribute {attr!r} (--model {spec}); check the name")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelLoadError(f"--model {spec} is a {type(obj).__name__}, not a callable returning a model")
    try:
        model = obj()
    except Exception as e:
        raise ModelLoadError(f"calling {spec}() failed: {type(e).__name__}: {common.first_line(e)}; "
                             "the callable must take no arguments and return an nn.Module") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_model(name: str, weights: Optional[str], num_classes: Optional[int]) -> LoadedModel:
    import torchvision

    names = torchvision_names()
    if name not in names:
        lowered = {n.lower(): n for n in names}
        if name.lower() not in lowered:
            close = difflib.get_close_matches(name.lower(), names, n=3)
            suggestion = f"did you mean {' or '.join(close)}? " if close else ""
            raise ModelLoadError(f"unknown model {name!r}: {suggestion}give a torchvision classification "
                                 "model name (torchvision.models.list_models()), package.module:callable, "
                                 "or a .pt file holding a whole model")
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
        load_weights(model, read_state_dict(Path(spec).expanduser()), spec, name, can_set_classes=True)
        return LoadedModel(model, name)
    if is_file_name(spec):
        raise ModelLoadError(f"weights file {spec} does not exist; check the path")
    enum = _weights_enum(spec, name)
    if enum not in torchvision.models.get_model_weights(name):
        allowed = torchvision.models.get_model_weights(name)
        raise ModelLoadError(f"weights {enum} do not fit {name}: they are for another architecture; use "
                             f"{allowed.__name__}.DEFAULT or one of {', '.join(allowed.__members__)}")
    categories = enum.meta.get("categories")
    if num_classes is not None and categories and num_classes != len(categories):
        raise ModelLoadError(f"--num-classes {num_classes} does not fit {enum}, which has "
                             f"{len(categories)} classes; drop --num-classes")
    with _download_errors(f"weights {enum}", Path(enum.url).name):
        model = torchvision.models.get_model(name, weights=enum)
    return LoadedModel(model, name, weights=enum, categories=categories)


def _monai_model(spec: str, weights: Optional[str], num_classes: Optional[int], spatial_dims: Optional[int],
                 in_channels: Optional[int]) -> LoadedModel:
    try:
        model, name = monai_nets.build(spec[len(monai_nets.PREFIX):], spatial_dims or 2, in_channels or 3,
                                       num_classes)
    except monai_nets.MonaiNetError as e:
        raise ModelLoadError(str(e)) from None
    name = monai_nets.PREFIX + name
    if weights is None or weights.lower() == "none":
        return LoadedModel(model, name, warning=(
            f"{name} has random weights (MONAI networks come without any here; pass --weights FILE), so "
            "its prediction and this heat map are meaningless (fine for testing)"))
    path = Path(weights).expanduser()
    if path.is_file():
        load_weights(model, read_state_dict(path), weights, name, can_set_classes=True)
        return LoadedModel(model, name)
    if is_file_name(weights):
        raise ModelLoadError(f"weights file {weights} does not exist; check the path")
    raise ModelLoadError(f"--weights {weights}: {name} takes a state-dict or checkpoint file, or none")


def load_model(spec: str, weights: Optional[str] = None, num_classes: Optional[int] = None,
               seed: int = 0, spatial_dims: Optional[int] = None,
               in_channels: Optional[int] = None) -> LoadedModel:
    """Build the model that ``spec`` and ``weights`` name (the CLI's ``--model``/``--weights``).

    Args:
        spec: a torchvision classification model name (``resnet18``), a MONAI
            network ``monai:NAME`` (``monai:resnet18``, ``monai:DenseNet121``,
            ``monai:efficientnet-b0``; :mod:`krypton_fx.monai_nets`), a
            ``package.module:callable`` returning an ``nn.Module``, or a ``.pt``
            file holding a whole pickled module (unpickling runs code from the
            file: use only files you trust).
        weights: a torchvision weights name (``ResNet18_Weights.IMAGENET1K_V1``,
            or ``DEFAULT``/``IMAGENET1K_V1`` for a torchvision model), a
            state-dict or checkpoint file (read with ``weights_only=True``), or
            ``"none"``. ``None``: ``DEFAULT`` for torchvision models, the model
            as built for the others.
        num_classes: output classes of a torchvision model built without
            weights names (to load a fine-tuned state dict).
        seed: seeds the random initialisation, so ``weights="none"`` is repeatable.
        spatial_dims: ``monai:NAME`` networks: 2 (images, the default) or 3 (volumes).
        in_channels: ``monai:NAME`` networks: the input's channels (default 3).

    Returns:
        The :class:`LoadedModel`, in eval mode on the CPU.

    Raises:
        ModelLoadError: unknown model, weights that do not fit, failed download.

    Example:
        >>> loaded = load_model("resnet18", "none")
        >>> type(loaded.model).__name__, loaded.warning is not None
        ('ResNet', True)
        >>> load_model("mypkg.nets:build", weights="run3.ckpt")  # doctest: +SKIP
    """
    torch.manual_seed(seed)
    path = Path(spec).expanduser()
    if monai_nets.is_monai_spec(spec):
        loaded = _monai_model(spec, weights, num_classes, spatial_dims, in_channels)
        loaded.model.eval()
        return loaded
    for value, option in ((spatial_dims, "--spatial-dims"), (in_channels, "--in-channels")):
        if value is not None:
            raise ModelLoadError(f"{option} builds monai:NAME models; {spec} has its own: drop {option}")
    if path.suffix.lower() in FILE_SUFFIXES or path.is_file():
        loaded = LoadedModel(_model_from_file(path), path.name)
    elif ":" in spec:
        loaded = LoadedModel(_model_from_callable(spec), spec)
    else:
        loaded = _torchvision_model(spec, weights, num_classes)
        loaded.model.eval()
        return loaded
    if num_classes is not None:
        raise ModelLoadError("--num-classes applies to torchvision and monai:NAME models only; "
                             "build the model with the right number of outputs")
    if weights is not None and weights.lower() != "none":
        if Path(weights).expanduser().is_file():
            load_weights(loaded.model, read_state_dict(Path(weights).expanduser()), weights,
                         loaded.name, can_set_classes=False)
        elif is_file_name(weights):
            raise ModelLoadError(f"weights file {weights} does not exist; check the path")
        else:
            enum = _weights_enum(weights, None)
            with _download_errors(f"weights {enum}", Path(enum.url).name):
                state = enum.get_state_dict(progress=False)
            load_weights(loaded.model, state, str(enum), loaded.name, can_set_classes=False)
            loaded.weights, loaded.categories = enum, enum.meta.get("categories")
    loaded.model.eval()
    return loaded
