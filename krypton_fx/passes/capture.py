"""The capture graph: the traced model that also returns the activations the incremental
graph reads (docs/design.md, "Pipeline", step 4)."""

from __future__ import annotations

from typing import Optional

from torch import fx

from ..registry import Kind
from ..targets import select_output
from .graph_fns import max_pool_channels_last
from .patch_prop import META_KEY

__all__ = ["build_capture_module"]


def build_capture_module(gm: fx.GraphModule, nodes: list[fx.Node], output_key: Optional[str] = None
                         ) -> fx.GraphModule:
    """A copy of ``gm`` that also returns the values of ``nodes``; its 2-D and 3-D max pools
    run through :func:`max_pool_channels_last` (the same values, faster on the CPU).
    ``output_key``: return that entry of a dict output (a segmentation target's ``key``)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        info = n.meta.get(META_KEY)
        local = info.local if info is not None and info.kind is Kind.LOCAL else None
        if n.op == "output":
            out = fx.map_arg(n.args[0], lambda m: env[m])
            if output_key is not None:
                out = select_output(out, output_key)
            graph.output((out, tuple(env[m] for m in nodes)))
        elif local is not None and local.op == "max" and local.ndim in (2, 3):
            env[n] = graph.call_function(max_pool_channels_last, (env[n.args[0]], local.kernel, local.stride,
                                                                  local.full_pad, local.dilation, local.ceil_mode))
        else:
            env[n] = graph.node_copy(n, lambda m: env[m])
    graph.lint()
    return fx.GraphModule(gm, graph, class_name="KryptonCapture")
