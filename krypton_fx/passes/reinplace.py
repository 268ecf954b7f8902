"""Reinplace: run an activation or batch norm in place on a temporary that nothing else reads.

The functionalize pass makes every op out of place so that PatchProp and the rewrite can
reason about values; the incremental graph then allocates a new tensor for every
activation. On the CPU a batch's patches of a decoder are hundreds of MiB, and each new
tensor that large is fresh pages the kernel must fault in: as costly as the activation
itself. This pass turns an activation back to in place, and runs an eval-mode batch norm
(:func:`batch_norm_`, a function of the norm's own tensors) and a frozen norm in place,
where the input is a tensor the graph itself made (a conv, a norm, another activation:
functionalize's "fresh" ops), possibly passed through an eval-mode dropout or identity,
and read by nothing else: no placeholder (a stored activation or a table), no attribute,
no tensor another node still reads. The values are the same; only the allocation goes.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .functionalize import _DROPOUT_FUNCTIONS, _PASS_THROUGH_MODULES, _bound_inplace, _kind
from .norms import frozen_norm, frozen_norm_

__all__ = ["reinplace_activations", "batch_norm_"]

# Point ops of the graph with an in-place twin of the same values.
_INPLACE_FUNCTIONS = {frozen_norm: frozen_norm_}


def _owned_temporary(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s value is a tensor the graph made for its one reader: a fresh op's
    result, through pass-through ops, every link read once."""
    while True:
        if len(node.users) != 1 or node.op in ("placeholder", "get_attr", "output"):
            return False
        in_place = node.op == "call_function" and node.target in _WRITE_OVER_INPUT
        kind = "same" if in_place else _kind(node, modules)
        if kind == "fresh":
            return True
        if kind != "same" or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]


def batch_norm_(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float) -> Tensor:
    """An eval-mode batch norm written over ``x`` on the CPU: the same values as
    ``F.batch_norm(x, ..., training=False)`` (aten's own kernel, ``native_batch_norm.out`` with
    ``out=x``) without a new tensor. Elsewhere (CUDA; grad mode: the incremental graph runs
    without grad) it is ``F.batch_norm`` itself.

    Example:
        >>> norm = nn.BatchNorm2d(3).eval()
        >>> x = torch.randn(2, 3, 4, 4)
        >>> want = norm(x)
        >>> with torch.no_grad():
        ...     out = batch_norm_(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
        >>> out is x, torch.equal(x, want)
        (True, True)
    """
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    empty = x.new_empty(0)
    torch.ops.aten.native_batch_norm.out(x, weight, bias, running_mean, running_var, False, 0.0, eps,
                                         out=x, save_mean=empty, save_invstd=empty)
    return x


# The graph's functions that write over their first argument and return it.
_WRITE_OVER_INPUT = frozenset({frozen_norm_, batch_norm_})


def _batch_norm_in_place(graph: fx.Graph, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Turn ``node``, a call of an eval-mode batch norm with running statistics, into
    :func:`batch_norm_` of its own tensors (get_attr nodes: the module is not registered
    twice, so its parameters keep one name each). Whether it was one."""
    mod = modules.get(node.target) if node.op == "call_module" else None
    if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or mod.training or mod.running_mean is None:
        return False
    with graph.inserting_before(node):
        tensors = [graph.get_attr(f"{node.target}.{name}") if getattr(mod, name) is not None else None
                   for name in ("running_mean", "running_var", "weight", "bias")]
    node.op, node.target = "call_function", batch_norm_
    node.args, node.kwargs = (node.args[0], *tensors, float(mod.eps)), {}
    return True


def _inplace_module(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[nn.Module]:
    """An in-place twin of the activation module that ``node`` calls, or None."""
    if node.op != "call_module":
        return None
    mod = modules.get(node.target)
    if isinstance(mod, _PASS_THROUGH_MODULES) or getattr(mod, "inplace", None) is not False:
        return None
    twin = copy.copy(mod)  # parameter-free activations: nothing shared but config
    twin.inplace = True
    return twin


def reinplace_activations(graph: fx.Graph, root: nn.Module) -> int:
    """Make the activations and eval-mode batch norms of ``graph`` (run on ``root``) in place
    where their input is an owned temporary. An activation module gets an in-place copy
    registered on ``root`` (the user's modules, shared with the capture graph, are left
    alone); a batch norm module becomes :func:`batch_norm_` of its tensors; a function that
    takes ``inplace`` gets ``inplace=True``, a frozen norm its in-place twin. Returns how
    many were changed.

    Example:
        >>> import torch
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.act = nn.Conv2d(1, 1, 1), nn.ReLU()
        ...     def forward(self, x):
        ...         return self.act(self.conv(x)) + x
        >>> gm = fx.symbolic_trace(Net())
        >>> reinplace_activations(gm.graph, gm), gm.get_submodule("act").inplace
        (1, False)
        >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
        ['conv', 'krypton_inplace_act']
    """
    modules = dict(root.named_modules())
    changed = 0
    for node in list(graph.nodes):
        if not node.args or not isinstance(node.args[0], fx.Node) or not _owned_temporary(node.args[0], modules):
            continue
        if _batch_norm_in_place(graph, node, modules):
            changed += 1
            continue
        twin = _inplace_module(node, modules)
        if twin is not None:
            name = "krypton_inplace_" + node.target.replace(".", "_")
            root.add_module(name, twin)
            modules[name] = twin
            node.target = name
            changed += 1
        elif node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
            node.target = _INPLACE_FUNCTIONS[node.target]
            changed += 1
        elif node.op == "call_function":
            if node.target in _DROPOUT_FUNCTIONS:
                continue
            bound = _bound_inplace(node.target, node.args, node.kwargs)
            if bound is None or bound.arguments.get("inplace", False) is not False:
                continue
            bound.arguments["inplace"] = True
            node.args, node.kwargs = tuple(bound.args), dict(bound.kwargs)
            changed += 1
    return changed
