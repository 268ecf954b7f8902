"""Normalisations over spatial axes, and their frozen form (``compile(norm_stats="frozen")``).

Instance and group norms divide by statistics of the whole map, so an occlusion changes
every output element: in exact mode they are global ops and the graph runs dense from
the first of them. With frozen statistics (an approximate mode) each such norm uses the
*unoccluded* image's per-channel mean and reciprocal standard deviation; it is then a
point op (``x * scale + shift``, ``scale = rstd * weight``, ``shift = bias - mean * scale``)
and the whole net stays incremental.

:func:`freeze_norms` rewrites a traced graph: each spatial norm ``y = norm(x)`` becomes
``s = norm_statistics(x, weight, bias, groups, eps)`` and ``y = frozen_norm(x, s)``.
PatchProp marks ``s`` *frozen* (its value is the unoccluded image's, captured once per
image like a stored activation); ``frozen_norm`` is a point op in the registry.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..registry import Kind, Rule, register_function

__all__ = ["norm_statistics", "frozen_norm", "frozen_norm_", "freeze_norms", "spatial_norm", "NORM_STATS"]

NORM_STATS = ("exact", "frozen")

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def norm_statistics(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int,
                    eps: float) -> Tensor:
    """``(N, 2C, 1, ...)``: per channel, the scale then the shift of the norm of ``x`` ``(N, C, *S)``
    with its statistics over the spatial axes and the ``C / groups`` channels of each group
    (``groups = -1``: one per channel, an instance norm), as ``F.group_norm`` computes them,
    and the affine ``weight`` and ``bias`` (``(C,)`` or None)."""
    n, c = x.shape[:2]
    groups = c if groups < 0 else groups
    grouped = x.float().reshape(n, groups, -1)
    var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    mean, rstd = (v.reshape(n, groups, 1).expand(n, groups, c // groups).reshape(n, c) for v in (mean, rstd))
    scale = rstd * weight.float() if weight is not None else rstd
    shift = -mean * scale + (bias.float() if bias is not None else 0.0)
    return torch.cat([scale, shift], 1).reshape(n, 2 * c, *(1,) * (x.dim() - 2)).to(x.dtype)


def frozen_norm(x: Tensor, stats: Tensor) -> Tensor:
    """The norm with given statistics (:func:`norm_statistics`): a point op."""
    scale, shift = stats.chunk(2, 1)
    return x * scale + shift


register_function(frozen_norm, Rule(Kind.POINT))


def frozen_norm_(x: Tensor, stats: Tensor) -> Tensor:
    """:func:`frozen_norm` written over ``x`` (the reinplace pass's form for a temporary read
    once): the same values, no new tensor."""
    scale, shift = stats.chunk(2, 1)
    if torch.broadcast_shapes(x.shape, scale.shape) != x.shape:
        return frozen_norm(x, stats)
    return x.mul_(scale).add_(shift)


def spatial_norm(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[tuple[int, float, str]]:
    """``(groups, eps, name)`` of a norm whose statistics span the spatial axes (``groups``:
    None for an instance norm, one group per channel), else None.

    Instance norms that use running statistics (``track_running_stats`` in eval mode) are
    point ops already and not spatial norms here.
    """
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) in _INSTANCE_NORMS and not (m.track_running_stats and not m.training):
            return None, m.eps, "instance norm"
        if type(m) is nn.GroupNorm:
            return m.num_groups, m.eps, "group norm"
    elif node.op == "call_function":
        args, kwargs = node.args, node.kwargs
        if node.target is F.instance_norm:
            use_input = args[5] if len(args) > 5 else kwargs.get("use_input_stats", True)
            if use_input:
                return None, (args[7] if len(args) > 7 else kwargs.get("eps", 1e-5)), "instance norm"
        if node.target is F.group_norm:
            groups = args[1] if len(args) > 1 else kwargs["num_groups"]
            return groups, (args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)), "group norm"
    return None


def _affine(graph: fx.Graph, node: fx.Node, modules) -> tuple:
    """Weight and bias nodes (or None) of a norm node."""
    if node.op == "call_module":
        m = modules[node.target]
        return tuple(graph.get_attr(f"{node.target}.{name}") if getattr(m, name, None) is not None else None
                     for name in ("weight", "bias"))
    args, kwargs = node.args, node.kwargs
    if node.target is F.instance_norm:
        return (args[3] if len(args) > 3 else kwargs.get("weight"), args[4] if len(args) > 4 else kwargs.get("bias"))
    return (args[2] if len(args) > 2 else kwargs.get("weight"), args[3] if len(args) > 3 else kwargs.get("bias"))


def freeze_norms(gm: fx.GraphModule) -> int:
    """Rewrite ``gm``'s spatial norms (in place) to use per-image frozen statistics; returns
    how many. Run on a functionalized graph, before PatchProp."""
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        spec = spatial_norm(node, modules)
        if spec is None:
            continue
        groups, eps, _ = spec
        x = node.args[0] if node.args else node.kwargs["input"]
        with gm.graph.inserting_before(node):
            weight, bias = _affine(gm.graph, node, modules)
            stats = gm.graph.call_function(norm_statistics, (x, weight, bias, groups if groups is not None else -1,
                                                             float(eps)))
            frozen = gm.graph.call_function(frozen_norm, (x, stats))
        frozen.meta = dict(node.meta)
        node.replace_all_uses_with(frozen)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
