"""Theoretical speedup (eqs. 16-20) and the per-node report."""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx, nn

from .common import int_tuple, spatial_size
from .models import input_channels
from .passes.functionalize import functionalize
from .passes.norms import NORM_STATS, freeze_norms, layer_norm_shift
from .passes.patch_prop import CLEAN, META_KEY, PATCHED, PatchInfo, annotate
from .targets import SegmentationTarget
from .tracing import eval_mode, trace

__all__ = ["theoretical_speedup", "conv_macs", "format_report"]


def _annotate_centre(model: nn.Module, image_size: tuple[int, ...], patch: tuple[int, ...],
                     tau: float, channels: int, target: Optional[SegmentationTarget] = None,
                     norm_stats: str = "exact") -> fx.GraphModule:
    gm = trace(model)
    starts = tuple(torch.tensor([(n - p) // 2]) for n, p in zip(image_size, patch))
    p = next(model.parameters(), None)
    example = torch.zeros(1, channels, *image_size, dtype=p.dtype if p is not None else torch.float32,
                          device=p.device if p is not None else "cpu")
    with eval_mode(model):
        gm = functionalize(gm, example)
        if norm_stats == "frozen":
            freeze_norms(gm, len(image_size))
        annotate(gm, example, patch, starts, tau=tau, what=type(model).__name__, dense_output=target is not None,
                 output_key=target.key if target is not None else None)
    return gm


def conv_macs(gm: fx.GraphModule) -> tuple[int, int]:
    """``(Q, Q_inc)``: conv multiply-adds of a full and of an incremental inference (eqs. 17, 19)."""
    full = inc = 0
    for n in gm.graph.nodes:
        info: PatchInfo = n.meta[META_KEY]
        full += info.macs_full
        inc += info.macs_inc
    return full, inc


def theoretical_speedup(model: nn.Module, image_size=(224, 224), patch=16, tau: float = 1.0,
                        channels: Optional[int] = None, target: Optional[SegmentationTarget] = None,
                        norm_stats: str = "exact") -> float:
    """Theoretical speedup ``R = Q / Q_inc`` of incremental inference (eqs. 16-20).

    Counts convolution multiply-adds only (transposed convolutions per input element, on
    the input window they read), with the patch at the image centre.
    ``image_size`` gives the spatial axes: ``(H, W)`` (an int: a square),
    ``(D, H, W)`` for volumes, ``(L,)`` for signals; ``patch`` an int or one
    per axis; ``channels`` defaults to those of the first layer the image meets.
    A dense-output model needs ``target=`` (a :class:`krypton_fx.SegmentationTarget`: its
    output stays patched; the category and mask do not change the count);
    ``norm_stats="frozen"`` counts instance/group/layer norms with frozen statistics, as compiled so.

    Example:
        >>> import torchvision
        >>> round(theoretical_speedup(torchvision.models.vgg16(), (224, 224), 16), 1)
        6.8
    """
    size = spatial_size(image_size)
    patch_t = int_tuple(patch, len(size), "patch")
    if channels is None:  # those of the first layer the image meets, else 3
        channels = input_channels(model)
    if not (0.0 < tau <= 1.0):
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    if any(p > n for p, n in zip(patch_t, size)):
        raise ValueError(f"patch {patch_t} is larger than the image {size}")
    if norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")
    if target is not None and not isinstance(target, SegmentationTarget):
        raise TypeError(f"target must be a krypton_fx.SegmentationTarget or None, got {type(target).__name__}")
    full, inc = conv_macs(_annotate_centre(model, size, patch_t, float(tau), channels, target, norm_stats))
    if full == 0:
        raise ValueError(f"{type(model).__name__} has no convolution layers: the theoretical speedup is "
                         "undefined")
    return full / inc


def _describe(n: fx.Node) -> str:
    if n.op == "call_module":
        return n.target
    if n.op == "call_function":
        return getattr(n.target, "__name__", str(n.target))
    if n.op == "call_method":
        return f".{n.target}()"
    return n.op


def format_report(gm: fx.GraphModule, target: Optional[SegmentationTarget] = None,
                  norm_stats: str = "exact") -> str:
    """Per-node table of an annotated graph: kind, state, patch box, and where savings stop;
    with a segmentation ``target``, how its reduction runs, and how spatial norms are treated."""
    rows = [("node", "op", "kind", "state", "patch / map", "area", "note")]
    stops = []
    for n in gm.graph.nodes:
        info: PatchInfo = n.meta[META_KEY]
        if info.state is CLEAN or n.op in ("get_attr",):
            continue
        if info.state is PATCHED:
            b = info.box
            box = f"{'x'.join(map(str, b.sizes))} / {'x'.join(map(str, b.full))}"
            area = f"{b.area_fraction:6.1%}"
        else:
            box, area = "full", "100.0%"
        note = info.reason
        if note:
            stops.append(f"{n.name}: {note}")
        rows.append((n.name, _describe(n), info.kind.value, info.state.value, box, area, note))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    full, inc = conv_macs(gm)
    lines.append("")
    lines.append(f"conv multiply-adds per position: full {full / 1e6:.1f} M, incremental {inc / 1e6:.1f} M "
                 f"(ratio {full / max(inc, 1):.2f}x)")
    lines.append("incremental savings stop at: " + ("; ".join(stops) if stops else "nowhere"))
    if target is not None:
        out = next(n for n in gm.graph.nodes if n.op == "output").meta[META_KEY]
        how = ("over the output's patch (the unoccluded total, minus the box's old values, plus its new ones)"
               if out.state is PATCHED else "over the whole output map (the output is dense)")
        lines.append(f"target: {target!r}, reduced {how}")
    frozen = sum(1 for n in gm.graph.nodes if n.meta[META_KEY].frozen and n.target is not layer_norm_shift)
    if norm_stats == "frozen":
        lines.append(f"norm statistics: frozen from the unoccluded image ({frozen} instance/group/layer norms run "
                     "as point ops or merges with frozen maps; approximate)")
    return "\n".join(lines)
