"""Functionalize: make a traced graph free of in-place ops before PatchProp.

Symbolic tracing records an in-place call (``y.relu_()``, ``F.relu(y,
inplace=True)``, ``torch.sigmoid_(y)``, an ``nn.ReLU(inplace=True)``) as a node
of its own, but the later readers of ``y`` still point at the node that made
``y``: in eager mode they see the mutated tensor, in the graph they see the
old node. The incremental graph runs every op on a gathered copy, so it would
see the value *before* the mutation: a plausible, wrong heat map.

This pass rewrites every in-place op into its out-of-place form and points
every reader that comes after it at the new node -- the readers of the
mutated node itself and of every node that is the same tensor (an
``nn.Identity`` or an eval-mode dropout passes its input through). When the
graph leaves any doubt about which nodes share the mutated tensor (a view, an
unknown op), the graph is run once on an example input and storages are
compared; a reader of a *different view* of a mutated tensor cannot be
rewritten exactly and raises a clear error.
"""

from __future__ import annotations

import copy
import inspect
import operator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["functionalize", "inplace_target"]

# ``a op= b`` on a Proxy traces as the out-of-place operator (a Proxy has no
# __iadd__), but an explicit ``operator.iadd`` call (or a wrapped function)
# can still appear in a graph.
_OUT_OF_PLACE_OPERATOR = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod, operator.ipow: operator.pow, operator.iand: operator.and_,
    operator.ior: operator.or_, operator.ixor: operator.xor, operator.ilshift: operator.lshift,
    operator.irshift: operator.rshift, operator.imatmul: operator.matmul,
}

# Methods ending in "_" that do not change values.
_NOT_MUTATING = frozenset({"requires_grad_", "share_memory_", "retain_grad"})

# Ops that always return a new tensor (never an alias of an input). A reader
# of an in-place op's input through anything else makes the pass check
# storages on a real run.
_FRESH_MODULES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.Bilinear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
    nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.PixelShuffle, nn.Softmax,
    nn.LogSoftmax, nn.Sigmoid, nn.Tanh, nn.GELU, nn.PReLU, nn.Softplus, nn.Embedding,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad2d,
)
_FRESH_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.matmul, torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.concat,
    torch.stack, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.mean, torch.sum,
    torch.softmax, torch.conv1d, torch.conv2d, torch.conv3d, torch.matmul, torch.where,
    F.conv1d, F.conv2d, F.conv3d, F.linear, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool2d, F.interpolate, F.batch_norm, F.layer_norm,
    F.group_norm, F.softmax, F.log_softmax, F.gelu, F.sigmoid, F.tanh, F.pad,
})
_FRESH_METHODS = frozenset({
    "add", "sub", "mul", "div", "neg", "pow", "relu", "sigmoid", "tanh", "exp", "mean", "sum",
    "softmax", "clone", "matmul", "abs", "sqrt", "rsqrt", "log", "clamp", "clamp_min", "amax",
    "amin", "max_pool2d",
})
# The same tensor passed through (eval mode): a reader after the mutation sees it.
_PASS_THROUGH_MODULES: tuple[type, ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_PASS_THROUGH_METHODS = frozenset({"detach"})
_DROPOUT_FUNCTIONS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                F.feature_alpha_dropout})
# Producers of Python numbers (shape arithmetic), for ``operator.i*`` on non-tensors.
_SCALAR_METHODS = frozenset({"size", "dim", "numel", "item", "nelement", "stride",
                             "storage_offset", "element_size", "__len__", "tolist"})


def _clone_then(method: str) -> Callable[..., Any]:
    """An out-of-place version of an in-place method that has no out-of-place twin."""

    def apply(self: Tensor, *args, **kwargs):
        out = self.clone()
        getattr(out, method)(*args, **kwargs)
        return out

    apply.__name__ = f"out_of_place_{method}"
    return apply


_CLONE_THEN: dict[str, Callable[..., Any]] = {}


def _out_of_place_method(name: str) -> Optional[Callable[..., Any]]:
    """A module-level function for an in-place method without an out-of-place twin.

    Cached per name so that the graph's code can refer to one function object.
    """
    if name not in _CLONE_THEN:
        _CLONE_THEN[name] = _clone_then(name)
    return _CLONE_THEN[name]


def _bound_inplace(fn: Callable, args: tuple, kwargs: dict) -> Optional[inspect.BoundArguments]:
    """The call's arguments bound to ``fn``'s signature, when ``fn`` takes ``inplace``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    if "inplace" not in sig.parameters:
        return None
    try:
        return sig.bind(*args, **kwargs)
    except TypeError:
        return None


def inplace_target(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[fx.Node]:
    """The node whose tensor ``node`` mutates in place, or None.

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.relu_() + 1)
        >>> [n.name for n in gm.graph.nodes if inplace_target(n, {}) is not None]
        ['relu_']
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    first = node.args[0]
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING:
            return first
        return None
    if node.op == "call_module":
        mod = modules.get(node.target)
        return first if getattr(mod, "inplace", False) is True else None
    if node.op == "call_function":
        if node.target in _OUT_OF_PLACE_OPERATOR:
            return first
        if _out_of_place_function(node.target) is not None:
            return first
        bound = _bound_inplace(node.target, node.args, node.kwargs)
        if bound is not None and bound.arguments.get("inplace") is True:
            return first
    return None


def _out_of_place_function(fn: Callable) -> Optional[Callable]:
    """``torch.relu_`` -> ``torch.relu``, ``F.elu_`` -> ``F.elu``: the twin without the underscore."""
    name = getattr(fn, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    for namespace in (torch, F, torch.Tensor):
        if getattr(namespace, name, None) is fn:
            twin = getattr(namespace, name[:-1], None)
            if callable(twin):
                return twin
    return None


def _make_out_of_place(node: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Rewrite ``node`` (an in-place op) into its out-of-place form, in place in the graph."""
    if node.op == "call_method":
        name = node.target
        if callable(getattr(torch.Tensor, name[:-1], None)):
            node.target = name[:-1]
        else:  # zero_, fill_, copy_, ...: clone, then the in-place op on the clone
            node.op, node.target = "call_function", _out_of_place_method(name)
        return
    if node.op == "call_module":
        mod = modules[node.target]
        twin = copy.copy(mod)  # parameter-free activations and dropouts: nothing shared but config
        twin.inplace = False
        # The GraphModule owns its module containers (fx copies the path), so
        # this does not touch the user's model.
        gm.set_submodule(node.target, twin)
        modules[node.target] = twin
        return
    if node.target in _OUT_OF_PLACE_OPERATOR:
        node.target = _OUT_OF_PLACE_OPERATOR[node.target]
        return
    twin = _out_of_place_function(node.target)
    if twin is not None:
        node.target = twin
        return
    bound = _bound_inplace(node.target, node.args, node.kwargs)
    bound.arguments["inplace"] = False
    node.args, node.kwargs = tuple(bound.args), dict(bound.kwargs)


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``"fresh"``, ``"same"`` (passes its input through) or ``"unknown"`` (may alias)."""
    if node.op in ("placeholder", "output"):
        return "fresh"
    if node.op == "get_attr":
        return "unknown"  # two get_attr nodes of one parameter are one tensor
    if node.op == "call_module":
        mod = modules.get(node.target)
        if isinstance(mod, _PASS_THROUGH_MODULES):
            return "same"
        if getattr(mod, "inplace", False) is True:
            return "same"
        if isinstance(mod, _FRESH_MODULES) or (hasattr(mod, "inplace") and not mod.inplace
                                                and not isinstance(mod, _PASS_THROUGH_MODULES)):
            return "fresh"
        return "unknown"
    if node.op == "call_method":
        if node.target in _FRESH_METHODS:
            return "fresh"
        if node.target in _PASS_THROUGH_METHODS:
            return "same"
        return "unknown"
    target = node.target
    if target in _FRESH_FUNCTIONS:
        return "fresh"
    bound = _bound_inplace(target, node.args, node.kwargs) if callable(target) else None
    if bound is None:
        return "unknown"
    if bound.arguments.get("inplace") is True:
        return "same"
    if target in _DROPOUT_FUNCTIONS:  # returns its input when not training
        return "fresh" if bound.arguments.get("training", True) else "same"
    return "fresh"


def _is_scalar(node: Any, scalars: set) -> bool:
    if not isinstance(node, fx.Node):
        return not isinstance(node, Tensor)
    return node in scalars


def _scalar_nodes(graph: fx.Graph) -> set:
    """Nodes that hold Python numbers (shape arithmetic), not tensors."""
    scalars: set = set()
    for n in graph.nodes:
        if n.op == "call_method" and n.target in _SCALAR_METHODS:
            scalars.add(n)
        elif n.op == "call_function" and n.target is getattr and len(n.args) > 1 \
                and n.args[1] in ("shape", "ndim"):
            scalars.add(n)
        elif n.op == "call_function" and (n.target in (len, int, float) or (
                isinstance(n.target, type(operator.add)) and n.target.__module__ == "_operator"
                and n.all_input_nodes and all(m in scalars for m in n.all_input_nodes))):
            scalars.add(n)
    return scalars


class _StorageRecorder(fx.Interpreter):
    """Runs the graph once and records which storage and view every tensor node has."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.views: dict[fx.Node, tuple] = {}
        self._alive: list[Tensor] = []  # keep storages alive: a freed one could be reused

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor) and result.layout == torch.strided:
            self._alive.append(result)
            self.views[n] = (result.untyped_storage().data_ptr(), tuple(result.shape),
                             result.stride(), result.storage_offset(), result.dtype)
        return result


def functionalize(gm: fx.GraphModule, example: Optional[Tensor] = None) -> fx.GraphModule:
    """Rewrite every in-place op of ``gm`` into its out-of-place form.

    Every reader that comes after an in-place op and reads the mutated tensor
    (through the node that made it, an earlier in-place op on it, or a node
    that passes it through) reads the out-of-place node instead: the graph
    then computes what eager mode computes, without mutation.

    Args:
        gm: a traced model. It is not modified; a changed copy is returned
            (``gm`` itself when it has no in-place op).
        example: an input the graph can run on. Needed only when an in-place
            op's tensor may be shared with a view or an unknown op: the graph
            then runs once to compare storages.

    Raises:
        ValueError: an in-place op mutates a tensor that a later op reads
            through a different view (``v = y.view(...); y.relu_(); use(v)``),
            or the sharing cannot be decided without ``example``.

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, x):
        ...         y = x * 2
        ...         y.relu_()
        ...         return y + 1
        >>> gm = functionalize(fx.symbolic_trace(Net()))
        >>> [n.target for n in gm.graph.nodes if n.op == "call_method"]
        ['relu']
        >>> x = torch.randn(4)
        >>> bool(torch.equal(gm(x), Net()(x)))
        True
    """
    modules = dict(gm.named_modules())
    scalars = _scalar_nodes(gm.graph)
    mutations = []
    for n in gm.graph.nodes:
        target = inplace_target(n, modules)
        if target is None:
            continue
        if n.op == "call_function" and n.target in _OUT_OF_PLACE_OPERATOR and _is_scalar(target, scalars):
            continue  # `n += 1` on a shape number rebinds; nothing is mutated
        mutations.append(n)
    if not mutations:
        return gm

    # Work on a copy: the caller's graph (and a user's own GraphModule) stays as it was.
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    by_name = {n.name: n for n in new.graph.nodes}
    mutations = [by_name[n.name] for n in mutations]
    modules = dict(new.named_modules())
    order = {n: i for i, n in enumerate(new.graph.nodes)}
    kinds = {n: _kind(n, modules) for n in new.graph.nodes}
    kinds.update({m: "same" for m in mutations})  # an in-place op returns the tensor it mutated

    views = None
    if _needs_storages(mutations, kinds, order):
        if example is None:
            raise ValueError("the model mutates a tensor in place that may be shared with a view; "
                             "functionalize needs an example input to decide which readers see the "
                             "change. Hint: pass example=")
        recorder = _StorageRecorder(gm)
        with torch.no_grad():
            recorder.run(example.clone())  # the model may mutate its input
        views = {by_name[n.name]: v for n, v in recorder.views.items()}

    for m in mutations:
        source = inplace_target(m, modules)
        described = m.format_node()
        _make_out_of_place(m, new, modules)
        if views is None:
            sharers = _static_sharers(m, kinds, order)
        else:
            sharers = _runtime_sharers(m, source, views, order)
        for node, same_view in sharers:
            later = [u for u in node.users if u is not m and order[u] > order[m]]
            if not later:
                continue
            if not same_view:
                raise ValueError(
                    f"{described} mutates in place a tensor that {later[0].name} reads later "
                    f"through another view ({node.name}); krypton_fx cannot make that exact. "
                    "Hint: use the out-of-place form of the op in the model's forward")
            for u in later:
                u.replace_input_with(node, m)
    new.graph.lint()
    new.recompile()
    return new


def _same_tensor_group(maker: fx.Node, kinds: dict) -> set:
    """``maker`` and every node that is statically the same tensor: pass-throughs and in-place ops."""
    group, frontier = {maker}, [maker]
    while frontier:
        for u in frontier.pop().users:
            if kinds[u] == "same" and u.args and u.args[0] in group and u not in group:
                group.add(u)
                frontier.append(u)
    return group


def _maker(node: fx.Node, kinds: dict) -> fx.Node:
    """Follow pass-throughs and in-place ops back to the node that made the tensor."""
    while kinds[node] == "same" and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _needs_storages(mutations: list[fx.Node], kinds: dict, order: dict) -> bool:
    """Whether the graph alone cannot tell which nodes share a mutated tensor."""
    for m in mutations:
        maker = _maker(m, kinds)
        if kinds[maker] == "unknown":
            return True  # it may itself be a view of a tensor read later
        for node in _same_tensor_group(maker, kinds):
            # a view (or an unknown op) of the tensor made before the mutation may be read after it
            if any(kinds[u] == "unknown" and order[u] < order[m] for u in node.users):
                return True
    return False


def _static_sharers(m: fx.Node, kinds: dict, order: dict) -> list[tuple[fx.Node, bool]]:
    """Nodes made before ``m`` that are statically the same tensor as the one ``m`` mutates."""
    group = _same_tensor_group(_maker(m, kinds), kinds)
    return [(n, True) for n in sorted(group, key=order.__getitem__) if order[n] < order[m]]


def _runtime_sharers(m: fx.Node, source: fx.Node, views: dict, order: dict) -> list[tuple[fx.Node, bool]]:
    """Nodes made before ``m`` whose tensor lives in ``source``'s storage, and whether the view is the same."""
    if source not in views:
        return [(source, True)]
    ref = views[source]
    out = []
    for n, v in views.items():
        if order[n] < order[m] and v[0] == ref[0]:
            out.append((n, v == ref))
    return out
