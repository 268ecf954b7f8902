"""Argument types and the checks that several commands share (patch, device, drill-down, the model)."""

from __future__ import annotations

import argparse
import functools
import math
import re
import time
from typing import Callable, Optional, Sequence, Union

from .errors import CLIError, first_line, warn

__all__ = ["int_at_least", "positive_int", "non_negative_int", "label_list", "int_or_pair", "int_or_tuple",
           "fraction", "tau", "color", "intensity", "finite_float", "positions", "pair", "sizes", "drill_down",
           "margin", "peak_note", "resolve_device", "check_patch", "check_settings", "probe_model", "DEFAULT_STRIDE"]


def int_at_least(minimum: int) -> Callable[[str], int]:
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


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def label_list(text: str) -> tuple[int, ...]:
    """``3,5``: class indices (>= 0), at least one, none twice."""
    values = tuple(non_negative_int(p) for p in text.split(","))
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a class is given twice in {text!r}")
    return values


def int_or_pair(text: str) -> Union[int, tuple[int, int]]:
    """``16`` or ``16x8`` / ``16,8`` (height, width), every value >= 1."""
    parts = re.split(r"[x,]", text.strip().lower())
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    values = tuple(positive_int(p) for p in parts)
    return values[0] if len(values) == 1 else values  # type: ignore[return-value]


def int_or_tuple(text: str) -> Union[int, tuple[int, ...]]:
    """``16``, ``16x8`` / ``16,8`` (height, width) or ``16x16x8`` (depth, height, width), every value >= 1."""
    parts = re.split(r"[x,]", text.strip().lower())
    if len(parts) > 3:
        raise argparse.ArgumentTypeError(f"expected N, HxW or DxHxW, got {text!r}")
    values = tuple(positive_int(p) for p in parts)
    return values[0] if len(values) == 1 else values


def intensity(text: str):
    """argparse type: ``--intensity`` (:class:`krypton_fx.volumes.Intensity`)."""
    from ..volumes import Intensity

    try:
        return Intensity.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fraction(text: str, note: str = "") -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1]{note}, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]{note}, got {value}")
    return value


tau = functools.partial(fraction, note=" (1 is exact)")


def color(text: str) -> Union[str, float]:
    """argparse type: black, gray, mean or a finite number."""
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


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` parse as floats but are no use)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positions(text: str) -> Optional[int]:
    return None if text.strip().lower() == "all" else positive_int(text)


def pair(value: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def sizes(values: Sequence[int]) -> str:
    """``16x16`` / ``16x16x16``: a size as the options write it."""
    return "x".join(str(int(v)) for v in values)


#: ``--drill-down`` without a fraction, and the stage-one stride in strides when ``--stage1-stride``
#: is not given: near what ``krypton_fx.tune`` chose for the lesion models of bench/approx.py
#: (r = 0.5 %; a covering stage one of 4 cells a side for the VGG16-shaped model, whose large
#: occluders are the least faithful, 6 for the others: bench/results/approx/).
DRILL_DOWN_R = 0.01
STAGE1_STEP = 4


def margin(text: str) -> Union[float, str]:
    """argparse type: ``--margin``, a number >= 0 or ``"none"`` (no peak rule)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or none, got {text!r}") from None
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 or none, got {text!r}")
    return value


def drill_down(r: Optional[float], stage1: Optional[int], stride: tuple[int, ...], kind: Optional[str] = None,
               peak_margin: Union[float, str, None] = None, tau: float = 1.0):
    """The DrillDown of --drill-down / --stage1-stride / --stage1 / --margin, or None.

    ``tau < 1`` with ``--margin`` alone is every cell at tau, then the peak rule with that margin
    (``r = 1``); without ``--margin`` the explainer's own rule runs (``peak.keep_peak``)."""
    stage1_stride: Union[int, tuple[int, ...]]
    from ..approx import DrillDown
    from ..peak import DEFAULT_MARGIN
    rule = DEFAULT_MARGIN if peak_margin is None else None if peak_margin == "none" else float(peak_margin)
    if r is None:
        if stage1 is not None:
            raise CLIError("--stage1-stride needs --drill-down [R] (the fraction of cells to refine)")
        if kind is not None:
            raise CLIError("--stage1 needs --drill-down [R]")
        if peak_margin is None:
            return None
        if tau >= 1.0:
            raise CLIError("--margin applies to approximate maps: give --tau below 1 or --drill-down")
        return DrillDown(r=1.0, stage1_stride=stride, margin=rule)
    if stage1 is None:
        stage1_stride = tuple(STAGE1_STEP * s for s in stride)
    elif stage1 < max(stride):
        raise CLIError(f"--stage1-stride {stage1} is finer than --stride {sizes(stride)}; "
                       "give a coarser stage-one stride")
    else:
        stage1_stride = stage1
    return DrillDown(r=r, stage1_stride=stage1_stride, stage1=kind or "cover", margin=rule)


def resolve_device(text: Optional[str], option: str = "--device"):
    """A torch.device from ``--device`` (default: cuda if available), checked against the machine."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"{option} must be cpu or cuda (or cuda:N), got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"{option} must be cpu or cuda (or cuda:N), got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"{option} {text} was requested but CUDA is not available on this machine; "
                           f"use {option} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"{option} {text}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                           "use cuda:0")
    return device


def check_patch(patch: tuple[int, ...], size: Sequence[int], size_option: Optional[str] = "--size") -> None:
    if any(p > n for p, n in zip(patch, size)):
        fix = f"a larger {size_option}" if size_option else "an input at least that large"
        raise CLIError(f"--patch {sizes(patch)} is larger than the {sizes(size)} model input; use a smaller "
                       f"--patch or {fix}")


#: ``--stride`` when not given: for images, for volumes (a 4-voxel stride over a volume makes
#: positions by the tens of thousands).
DEFAULT_STRIDE = {2: 4, 3: 8}


def _axes(value: Union[int, tuple[int, ...]], spatial_dims: int, option: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * spatial_dims
    if len(value) != spatial_dims:
        what = {2: "images take N or HxW", 3: "volumes take N or DxHxW"}.get(spatial_dims, "")
        raise CLIError(f"{option} {sizes(value)} has {len(value)} values but the input has {spatial_dims} "
                       f"spatial axes: {what}")
    return tuple(value)


def check_settings(args, spatial_dims: int = 2):
    """The checks every explain run makes before reading anything: ``(patch, stride, drill_down)``,
    one entry per spatial axis."""
    stride_arg = args.stride if args.stride is not None else DEFAULT_STRIDE.get(spatial_dims, 4)
    patch, stride = _axes(args.patch, spatial_dims, "--patch"), _axes(stride_arg, spatial_dims, "--stride")
    if args.size is not None:
        check_patch(patch, (args.size,) * spatial_dims)
    drill = drill_down(args.drill_down, args.stage1_stride, stride, args.stage1, args.margin, args.tau)
    given = [o for o, v in (("--label", args.label), ("--labels", getattr(args, "labels", None)),
                            ("--top-k", getattr(args, "top_k", None))) if v is not None]
    if len(given) > 1:
        raise CLIError(f"{' and '.join(given)} both choose classes; give one of them")
    if drill is not None and given and given[0] != "--label":
        raise CLIError(f"--drill-down explains one class; give --label (or none) instead of {given[0]}")
    if any(s > p for s, p in zip(stride, patch)):
        what = "pixels" if spatial_dims == 2 else "voxels"
        warn(f"--stride {sizes(stride)} is larger than --patch {sizes(patch)}: {what} between "
             "the patches are never occluded, so the map cannot show them")
    return patch, stride, drill


def probe_model(loaded, x, device, label, output, labels: Sequence[int] = ()) -> int:
    """One plain inference: a wrong --label or a model that is no classifier fails here, in a second,
    before compiling and the long run. Returns the number of classes."""
    import torch

    what = "image" if x.dim() == 3 else "volume"
    with torch.no_grad():
        loaded.model.to(device)
        try:
            logits = loaded.model(x[None].to(device))
        except Exception as e:  # RuntimeError from a conv, AssertionError from ViT's size check, ...
            fix = "try another --size" if what == "image" else "check that the model takes such volumes"
            raise CLIError(f"{loaded.name} cannot run on a {sizes(x.shape)} {what} "
                           f"({first_line(e)}); {fix}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise CLIError(f"{loaded.name} does not return class scores of shape (N, classes); "
                       "explain works on classifiers")
    classes = logits.shape[1]
    if classes == 1 and output == "prob":
        warn(f"{loaded.name} has one output: its softmax probability is 1 everywhere, so the map is flat; "
             "use --output logit (or a model with two or more classes)")
    for option, value in [("--label", label)] + [("--labels", v) for v in labels]:
        if value is not None and value >= classes:
            raise CLIError(f"{option} {value} is out of range: {loaded.name} has {classes} classes "
                           f"(0..{classes - 1})")
    return classes


def compile_and_explain(loaded, x, args: argparse.Namespace, patch: tuple[int, ...], stride: tuple[int, ...],
                        color, image_size: tuple[int, ...], channels: int, device, drill):
    """Compile ``loaded.model`` with the command's settings and explain ``x``: ``(explainer,
    result, seconds of the explanation)``; the loader's warning, if any, comes after the
    compile's checks have passed."""
    from ..explainer import compile as compile_explainer

    ex = compile_explainer(loaded.model, patch=patch, stride=stride, color=color, image_size=image_size,
                           tau=args.tau, batch_size=args.batch_size, device=device, channels=channels,
                           output=args.output)
    if loaded.warning:
        warn(loaded.warning)
    start = time.perf_counter()
    labels = list(args.labels) if getattr(args, "labels", None) else None
    res = ex(x, label=args.label, drill_down=drill, progress=True, labels=labels,
             top_k=getattr(args, "top_k", None))
    return ex, res, time.perf_counter() - start


def exactness(args: argparse.Namespace, drill, res) -> str:
    """``"exact"``, or what made the map approximate (tau, drill-down), for picture titles."""
    approx = [f"tau={args.tau:g}"] if args.tau < 1.0 else []
    if drill is not None and drill.r < 1.0:
        approx.append(f"drill-down r={drill.r:g} from stride {sizes(res.stats['stage1_stride'])}")
    exact_cells = res.stats.get("exact_cells")
    if approx and exact_cells is not None:
        approx.append(f"{int(exact_cells.sum())} cells exact, hatched: approximate")
    return ", ".join(approx + ["approximate"]) if approx else "exact"


def peak_note(res) -> Optional[str]:
    """How sure an approximate map's strongest drop is, in one line (None for an exact map)."""
    stats = res.stats
    exact_cells = stats.get("exact_cells")
    if exact_cells is None or bool(exact_cells.all()):
        return None
    cells = f"{int(exact_cells.sum())} of {exact_cells.numel()} cells computed exactly"
    if stats.get("margin") is None:
        return f"{cells}; no peak rule (--margin none): the strongest drop shown may be an approximation"
    if stats.get("peak_bounded"):
        return (f"{cells}; the strongest drop is exact, and the exact map's whenever a larger occluder drops at "
                f"least {1 - stats['margin']:.0%} as much as a smaller one inside it (covering stage one)")
    return f"{cells}; the strongest drop is exact, its place an estimate (no covering stage one at tau 1)"
