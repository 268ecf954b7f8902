"""Symbolic tracing of models for krypton_fx.

A thin layer over :class:`torch.fx.Tracer` in the spirit of
``torchvision.models.feature_extraction``: the model is traced in eval mode
(its mode is restored afterwards), users may name extra leaf modules and
functions to keep opaque, and a model that does not trace fails with one
clear error saying why and what to do.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from . import common
from .registry import Kind, LocalOp, Rule, register_function

__all__ = ["trace", "eval_mode", "TraceError", "model_signature", "describe_change", "input_channels",
           "register_traceable", "pad_to_match"]


class TraceError(ValueError):
    """The model cannot be traced symbolically."""


class _KryptonTracer(fx.Tracer):
    def __init__(self, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Callable] = ()):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._leaf_types = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args, kwargs):
        cls = type(m)
        traceable = _TRACEABLE.get(f"{cls.__module__}.{cls.__qualname__}")
        if traceable is not None and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = functools.partial(traceable, m)
        return super().call_module(m, forward, args, kwargs)


# Forwards to trace instead of a module type's own, where that one does not trace (keyed by
# the type's qualified name, so that the library it comes from need not be imported).
_TRACEABLE: dict[str, Callable] = {}


def register_traceable(qualified_name: str, forward: Callable) -> None:
    """Trace ``forward(module, *args)`` instead of the ``forward`` of the module type named
    ``qualified_name`` (``"package.module.Class"``): the same computation, written so that
    torch.fx can record it (no tests of tensor types or shapes in Python)."""
    _TRACEABLE[qualified_name] = forward


@torch.fx.wrap
def pad_to_match(x: Tensor, like_shape) -> Tensor:
    """``x`` padded at the far end of each spatial axis (replicating the border) to the spatial
    size ``like_shape[2:]``: MONAI's UpCat after a 2x upsampling of an odd size. The identity
    where the sizes agree (a padding by 0 then, for the registry: see :func:`_pad_when_sizes_agree`)."""
    pad = []
    for axis in range(x.dim() - 1, 1, -1):  # F.pad: last axis first
        pad += [0, int(like_shape[axis]) - x.shape[axis]]
    return F.pad(x, pad, "replicate") if any(pad) else x


def _monai_upcat_forward(self, x: Tensor, x_e: Optional[Tensor]) -> Tensor:
    """``monai.networks.nets.basic_unet.UpCat.forward`` without its ``torch.jit.isinstance`` test
    and shape comparisons (which a symbolic trace gets wrong: it drops the skip concat)."""
    x_0 = self.upsample(x)
    if x_e is None:
        return self.convs(x_0)
    if self.is_pad:
        x_0 = pad_to_match(x_0, x_e.shape)
    return self.convs(torch.cat([x_e, x_0], dim=1))


def _pad_when_sizes_agree(_, args, kwargs) -> Optional[LocalOp]:
    """:func:`pad_to_match` as a local op: a padding by 0 (the identity on the patch, whose
    size the graph keeps) where the sizes agree; else None (a replicate pad: global)."""
    x, like = args[0], args[1]
    if tuple(x.shape[2:]) != tuple(like[2:]):
        return None
    n = x.dim() - 2
    return LocalOp("pad", (1,) * n, (1,) * n, (0,) * n, (1,) * n, 0.0, full_pad=(0,) * n)


register_traceable("monai.networks.nets.basic_unet.UpCat", _monai_upcat_forward)
register_function(pad_to_match, Rule(Kind.LOCAL, extract=_pad_when_sizes_agree))


# Calls from several threads may overlap on one model: the first to enter
# saves every submodule's mode and switches to eval, the last to leave
# restores them. (A save/restore per call would let one thread restore
# train mode under another that is still running.)
_MODES_LOCK = threading.Lock()
_MODES: dict[int, tuple[int, list]] = {}  # id(model) -> (calls inside, saved modes)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` and all submodules in eval mode, restoring each one's mode after.

    Safe when calls from several threads overlap: the model stays in eval mode
    until the last of them leaves, then every submodule gets its own mode back.
    """
    key = id(model)
    with _MODES_LOCK:
        depth, modes = _MODES.get(key, (0, []))
        if depth == 0:
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
        _MODES[key] = (depth + 1, modes)
    try:
        yield model
    finally:
        with _MODES_LOCK:
            depth, modes = _MODES.pop(key)
            if depth > 1:
                _MODES[key] = (depth - 1, modes)
            else:
                for m, training in modes:
                    m.training = training


def model_signature(model: nn.Module) -> tuple:
    """What a compiled graph depends on: every submodule, parameter and buffer object,
    with the dtype, device and shape of the tensors.

    Two signatures compare equal (``==`` compares the objects by identity) when
    nothing was replaced; an in-place edit of a weight keeps the signature
    (the graphs read the tensors themselves). The signature holds references,
    so a replaced object's id cannot be reused by a new one.
    """
    modules, tensors = [], []
    for prefix, module in model.named_modules(remove_duplicate=False):  # one walk: every call checks
        modules.append((prefix, _Same(module)))
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    tensors.append((prefix + "." + name if prefix else name, _Same(t), t.dtype, t.device,
                                    tuple(t.shape)))
    return tuple(modules + tensors)


def describe_change(old: tuple, new: tuple) -> str:
    """The first entry in which two :func:`model_signature` results differ, for messages."""
    old_d, new_d = {e[0]: e for e in old}, {e[0]: e for e in new}
    for name in list(new_d) + list(old_d):
        if old_d.get(name) != new_d.get(name):
            if name not in old_d:
                return f"{name or 'the model'} was added"
            if name not in new_d:
                return f"{name or 'the model'} was removed"
            return f"{name or 'the model'} was replaced or changed dtype, device or shape"
    return "nothing"


class _Same:
    """Compares the wrapped object by identity (and keeps it alive)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def _trace_hint(message: str) -> str:
    """How to fix the usual reasons a forward does not trace."""
    if "does not support item assignment" in message:
        return ("in-place item assignment (y[...] = v) cannot be traced; write it out of place "
                "(torch.where, masked_fill, torch.cat) or pass the submodule that does it as "
                "leaf_modules=...")
    return ("data-dependent Python control flow cannot be traced; pass the offending submodule "
            "types as leaf_modules=... or functions as autowrap_functions=..., or rewrite the "
            "branch with tensor ops.")


def trace(model: nn.Module, leaf_modules: Iterable[type] = (),
          autowrap_functions: Iterable[Callable] = ()) -> fx.GraphModule:
    """Trace ``model`` to an ``fx.GraphModule`` in eval mode.

    Args:
        model: the CNN. A ``GraphModule`` is returned as is.
        leaf_modules: module types to keep as single ``call_module`` nodes
            (they run as global ops unless registered in
            :mod:`krypton_fx.registry`).
        autowrap_functions: functions to keep as single ``call_function`` nodes.

    Raises:
        TraceError: the model does not trace (data-dependent control flow, say).

    Example:
        >>> import torchvision
        >>> gm = trace(torchvision.models.resnet18())
        >>> sum(1 for n in gm.graph.nodes if n.op == "call_module")
        51
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _KryptonTracer(leaf_modules, autowrap_functions)
    with eval_mode(model):
        try:
            graph = tracer.trace(model)
        except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ...
            first = common.first_line(e)
            raise TraceError(
                f"{type(model).__name__} does not trace symbolically with torch.fx: {first}. "
                f"Hint: {_trace_hint(first)}") from e
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


# Layers whose weights fix the channels of their input: (module type, channels of the input it takes).
_CHANNELS_OF_MODULE: tuple[tuple[type, Callable[[nn.Module], int]], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), lambda m: m.in_channels),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), lambda m: m.in_channels),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), lambda m: m.num_features),
    ((nn.GroupNorm,), lambda m: m.num_channels),
)
_CONV_FUNCTIONS = {"conv1d", "conv2d", "conv3d"}


def input_channels(gm: fx.GraphModule) -> Optional[int]:
    """Channels of the image ``gm`` takes, from the first layer the image reaches whose
    weights fix them (a convolution, a batch or group norm), or None where none says.

    The graph is walked from the input through its users in order, so the answer is the
    layer the image meets first, not the first one the model registers.

    Example:
        >>> gm = trace(nn.Sequential(nn.ReLU(), nn.Conv2d(1, 4, 3)))
        >>> input_channels(gm)
        1
    """
    source = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    queue, seen = [source] if source is not None else [], set()
    while queue:
        node = queue.pop(0)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            channels = _channels_taken(gm, user)
            if channels is not None:
                return channels
            queue.append(user)
    return None


def _channels_taken(gm: fx.GraphModule, node: fx.Node) -> Optional[int]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for types, channels in _CHANNELS_OF_MODULE:
            if type(module) in types:
                return int(channels(module))
    if node.op == "call_function" and getattr(node.target, "__name__", "") in _CONV_FUNCTIONS:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            w = _attr(gm, weight.target)
            groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
            if w is not None and isinstance(groups, int):
                return int(w.shape[1]) * groups
    return None


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj
