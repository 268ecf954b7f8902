"""Symbolic tracing of models for krypton_fx.

A thin layer over :class:`torch.fx.Tracer` in the spirit of
``torchvision.models.feature_extraction``: the model is traced in eval mode
(its mode is restored afterwards), users may name extra leaf modules and
functions to keep opaque, and a model that does not trace fails with one
clear error saying why and what to do.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import fx, nn

__all__ = ["trace", "eval_mode", "TraceError"]


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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` and all submodules in eval mode, restoring each one's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TraceError(
                f"{type(model).__name__} does not trace symbolically with torch.fx: {first}. "
                "Hint: data-dependent Python control flow cannot be traced; pass the offending "
                "submodule types as leaf_modules=... or functions as autowrap_functions=..., "
                "or rewrite the branch with tensor ops.") from e
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)
