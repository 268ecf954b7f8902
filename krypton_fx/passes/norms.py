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

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..registry import Kind, Rule, register_function

__all__ = ["norm_statistics", "frozen_norm", "frozen_norm_", "layer_norm_scale", "layer_norm_shift",
           "FROZEN_STATISTICS", "freeze_norms", "spatial_norm", "NORM_STATS"]

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


def layer_norm_scale(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """``(N, *x.shape[1:])``: ``rstd * weight`` of a layer norm over every axis of ``x`` but the
    batch, with the statistics of ``x`` (``F.layer_norm``'s: population variance)."""
    var, mean = torch.var_mean(x.float().flatten(1), dim=1, unbiased=False)
    rstd = torch.rsqrt(var + eps).view(-1, *(1,) * (x.dim() - 1))
    return (rstd * weight.float() if weight is not None else rstd.expand(x.shape).contiguous()).to(x.dtype)


def layer_norm_shift(x: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``(N, *x.shape[1:])``: ``bias - mean * scale`` of the layer norm whose ``scale`` is
    :func:`layer_norm_scale`'s."""
    mean = x.float().flatten(1).mean(1).view(-1, *(1,) * (x.dim() - 1))
    shift = -mean * scale.float()
    return (shift + bias.float() if bias is not None else shift).to(x.dtype)


# The functions whose value PatchProp takes from the unoccluded image (frozen).
FROZEN_STATISTICS = (norm_statistics, layer_norm_scale, layer_norm_shift)


def _layer_norm_eps(node: fx.Node, modules: dict[str, nn.Module], spatial_dims: Optional[int]) -> Optional[float]:
    """``eps`` of a layer norm whose normalized shape is every axis of an ``(N, C, *spatial)``
    map but the batch (``spatial_dims + 1`` axes, whatever the layout), else None. A layer
    norm over fewer trailing axes is left alone: without shapes, the last axis of a
    channels-last map (ConvNeXt's ``(N, H, W, C)``) is not told apart from a spatial one."""
    if spatial_dims is None:
        return None
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.LayerNorm and len(m.normalized_shape) == spatial_dims + 1:
            return m.eps
    elif node.op == "call_function" and node.target is F.layer_norm:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        if isinstance(shape, (tuple, list)) and len(shape) == spatial_dims + 1 \
                and not any(isinstance(v, fx.Node) for v in shape):
            return node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
    return None


def spatial_norm(node: fx.Node, modules: dict[str, nn.Module],
                 spatial_dims: Optional[int] = None) -> Optional[tuple[int, float, str]]:
    """``(groups, eps, name)`` of a norm whose statistics span the spatial axes (``groups``:
    None for an instance norm, one group per channel; 0 for a layer norm over every axis but
    the batch, known with ``spatial_dims``), else None.

    Instance norms that use running statistics (``track_running_stats`` in eval mode) are
    point ops already and not spatial norms here.
    """
    eps = _layer_norm_eps(node, modules, spatial_dims)
    if eps is not None:
        return 0, eps, "layer norm"
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
    # F.group_norm and F.layer_norm: (input, groups or shape, weight, bias, eps)
    return (args[2] if len(args) > 2 else kwargs.get("weight"), args[3] if len(args) > 3 else kwargs.get("bias"))


def freeze_norms(gm: fx.GraphModule, spatial_dims: Optional[int] = None) -> int:
    """Rewrite ``gm``'s spatial norms (in place) to use per-image frozen statistics; returns
    how many. Run on a functionalized graph, before PatchProp. With ``spatial_dims``, layer
    norms over every axis but the batch too: their scale and shift vary over the map, so
    they become ``x * scale + shift`` with two frozen maps (merges, which read the maps'
    windows), not a point op."""
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        spec = spatial_norm(node, modules, spatial_dims)
        if spec is None:
            continue
        groups, eps, _ = spec
        x = node.args[0] if node.args else node.kwargs["input"]
        with gm.graph.inserting_before(node):
            weight, bias = _affine(gm.graph, node, modules)
            if groups == 0:  # a layer norm
                scale = gm.graph.call_function(layer_norm_scale, (x, weight, float(eps)))
                shift = gm.graph.call_function(layer_norm_shift, (x, scale, bias))
                frozen = gm.graph.call_function(operator.add, (gm.graph.call_function(operator.mul, (x, scale)),
                                                               shift))
            else:
                stats = gm.graph.call_function(norm_statistics, (x, weight, bias,
                                                                 groups if groups is not None else -1, float(eps)))
                frozen = gm.graph.call_function(frozen_norm, (x, stats))
        frozen.meta = dict(node.meta)
        node.replace_all_uses_with(frozen)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
