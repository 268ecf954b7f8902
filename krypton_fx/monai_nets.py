"""MONAI's classification networks by name: ``monai:NAME`` on the command line.

Each network family takes the input's channels and the number of classes under
keyword names of its own (ResNet: ``n_input_channels``/``num_classes``;
DenseNet: ``in_channels``/``out_channels``; ...). :data:`CLASSIFIERS` says
which, as data; any other public network of ``monai.networks.nets`` is built
with the keywords its signature has. Nothing is downloaded: ``pretrained`` is
always off (weights come from a state-dict file).

MONAI is an optional extra (``pip install 'krypton_fx[monai]'``); it is
imported only when a network is built.

Example:
    >>> model, name = build("resnet18", spatial_dims=3, in_channels=1, num_classes=2)  # doctest: +SKIP
    >>> name, type(model).__name__                                                     # doctest: +SKIP
    ('resnet18', 'ResNet')
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Mapping, Optional

from torch import nn

__all__ = ["CLASSIFIERS", "MonaiNetError", "build", "PREFIX", "is_monai_spec"]

PREFIX = "monai:"
INSTALL_HINT = "pip install 'krypton_fx[monai]'"


class MonaiNetError(ValueError):
    """A MONAI network cannot be built; the message is one line with the fix."""


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """How to build one MONAI classifier.

    Attributes:
        builder: the name of the constructor in ``monai.networks.nets``.
        channels_kw: its keyword for the input's channels.
        classes_kw: its keyword for the number of classes.
        fixed: further keyword arguments (EfficientNet's variant).
    """

    builder: str
    channels_kw: str
    classes_kw: str
    fixed: tuple[tuple[str, object], ...] = ()


_EFFICIENTNETS = [f"b{i}" for i in range(9)] + ["l2"]

#: The CNN classifiers of ``monai.networks.nets``, by the name ``monai:NAME`` takes.
CLASSIFIERS: dict[str, NetSpec] = {
    **{f"resnet{n}": NetSpec(f"resnet{n}", "n_input_channels", "num_classes")
       for n in (10, 18, 34, 50, 101, 152, 200)},
    **{f"DenseNet{n}": NetSpec(f"DenseNet{n}", "in_channels", "out_channels") for n in (121, 169, 201, 264)},
    **{name: NetSpec(name, "in_channels", "num_classes")
       for name in ("SEResNet50", "SEResNet101", "SEResNet152", "SEResNeXt50", "SEResNeXt101", "SENet154")},
    **{f"efficientnet-{v}": NetSpec("EfficientNetBN", "in_channels", "num_classes",
                                    (("model_name", f"efficientnet-{v}"),)) for v in _EFFICIENTNETS},
}

# Segmentation networks whose constructors have no default for their levels: MONAI's
# tutorials' (channels 16-256, four strides of 2, two residual units a level).
_SEGMENTER_DEFAULTS: dict[str, dict] = {
    "UNet": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2},
    "AttentionUnet": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2)},
}

# Keyword names other networks use for the input's channels and for the classes.
_CHANNEL_KWS = ("in_channels", "n_input_channels", "in_chns", "num_channels")
_CLASS_KWS = ("num_classes", "out_channels", "classes", "n_classes", "out_chns")


def is_monai_spec(spec: str) -> bool:
    """Whether a ``--model`` argument names a MONAI network (``monai:NAME``)."""
    return spec.lower().startswith(PREFIX)


def _import_nets():
    try:
        import monai.networks.nets as nets
    except ImportError as e:
        raise MonaiNetError(f"monai: models need MONAI, which is not installed ({e}): {INSTALL_HINT}") from None
    return nets


def _resolve(name: str, nets) -> tuple[str, NetSpec]:
    """The canonical name and build spec of ``name``: the table's (any case, ``_`` for ``-``),
    else a public network of ``monai.networks.nets`` with the keywords its signature has."""
    key = name.strip()
    folded = {k.lower(): k for k in CLASSIFIERS}
    canonical = folded.get(key.lower().replace("_", "-")) or folded.get(key.lower())
    if canonical is not None:
        return canonical, CLASSIFIERS[canonical]
    builder = getattr(nets, key, None) if key and not key.startswith("_") else None
    if builder is None or not callable(builder):
        # The table's names first; MONAI's other networks once each (it has aliases in several cases).
        by_lower = {k.lower(): k for k in CLASSIFIERS}
        for n in dir(nets):
            obj = getattr(nets, n)
            if not n.startswith("_") and inspect.isclass(obj) and issubclass(obj, nn.Module):
                by_lower.setdefault(n.lower(), n)
        close = [by_lower[c] for c in difflib.get_close_matches(key.lower(), list(by_lower), n=3, cutoff=0.6)]
        hint = f"did you mean {' or '.join(PREFIX + c for c in close)}? " if close else ""
        raise MonaiNetError(f"unknown MONAI network {name!r}: {hint}MONAI's classifiers are "
                            f"{PREFIX}resnet18 (10..200), {PREFIX}DenseNet121 (169, 201, 264), "
                            f"{PREFIX}SEResNet50 (101, 152, SEResNeXt50, ...), {PREFIX}efficientnet-b0 (..b8, l2)")
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        params = {}
    channels_kw = next((k for k in _CHANNEL_KWS if k in params), "in_channels")
    classes_kw = next((k for k in _CLASS_KWS if k in params), "num_classes")
    return key, NetSpec(key, channels_kw, classes_kw)


def build(name: str, spatial_dims: int, in_channels: int, num_classes: Optional[int]) -> tuple[nn.Module, str]:
    """Build ``monai.networks.nets`` network ``name`` with random weights.

    Args:
        name: ``resnet18``, ``DenseNet121``, ``SEResNet50``, ``efficientnet-b0``
            (any case), or another public network of ``monai.networks.nets``.
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: channels of the input.
        num_classes: outputs; None keeps the network's default, where it has one.

    Returns:
        ``(model, name)``: the network (not yet in eval mode) and its canonical name.

    Raises:
        MonaiNetError: MONAI missing, unknown name (with close matches), or the
            network cannot be built with these arguments.
    """
    nets = _import_nets()
    canonical, spec = _resolve(name, nets)
    builder = getattr(nets, spec.builder)
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict = dict(spec.fixed)
    kwargs.update(_SEGMENTER_DEFAULTS.get(spec.builder, {}))
    kwargs.update({"spatial_dims": spatial_dims, spec.channels_kw: in_channels})
    if num_classes is not None:
        kwargs[spec.classes_kw] = num_classes
    elif spec.classes_kw in params and params[spec.classes_kw].default is inspect.Parameter.empty:
        raise MonaiNetError(f"{PREFIX}{canonical} has no default number of classes: give --num-classes N")
    if "pretrained" in params or takes_kwargs and canonical in CLASSIFIERS:
        kwargs["pretrained"] = False  # never download: weights come from --weights FILE
    unknown = [k for k in kwargs if k not in params] if params and not takes_kwargs else []
    if unknown:
        raise MonaiNetError(f"{PREFIX}{canonical} takes no {', '.join(unknown)}; it is not a classifier of "
                            "images or volumes that krypton-fx can build by name: pass it as "
                            "--model package.module:callable")
    try:
        model = builder(**kwargs)
    except Exception as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise MonaiNetError(f"building {PREFIX}{canonical}(spatial_dims={spatial_dims}, {spec.channels_kw}="
                            f"{in_channels}, ...) failed: {type(e).__name__}: {text[:160]}") from None
    if not isinstance(model, nn.Module):
        raise MonaiNetError(f"{PREFIX}{canonical} returned a {type(model).__name__}, not a torch.nn.Module")
    return model, canonical
