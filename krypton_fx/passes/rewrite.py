"""Emit the incremental graph from a PatchProp-annotated graph.

The incremental ``fx.GraphModule`` takes a batch of occlusion position
indices and the stored activations of the unoccluded image, and returns the
model output for each occluded image of the batch::

    forward(positions, stored_0, stored_1, ...) -> output  # (B, ...)

- a patched node's value is its patch, ``(B, C, h, w)``;
- a local op reads its input through a gather-with-superimposition node
  (Algorithm 1) and runs with zero padding on the gathered window;
- a merge gathers each input onto the union box (eqs. 35-38);
- the first dense node's patched inputs are projected to full size
  (Algorithm 2); from there on the graph is the model itself, batched;
- with a dense-output target (``target=``, segmentation) the graph ends in one
  reduction node instead: ``forward(positions, *stored, target_maps, target_totals)
  -> (B, 1)`` (docs/design.md, "Target"); frozen norm statistics are stored inputs.

Per-position geometry lives in int64 tables (one row per occlusion position)
that the graph indexes with ``positions``: no Python loop over positions and
no host synchronisation. A *packed* program (``packing=``) runs the positions
of several images per batch: the stored maps of the images are stacked along
the first spatial axis and each row's window start moves to its own image.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..ops import gather_window, occlude_window, project_to_full
from ..registry import Kind
from ..targets import SegmentationTarget, reduce_dense, reduce_patched, select_output
from .capture import build_capture_module
from .graph_fns import (
    channels_last,
    color_patch,
    full_size_stand_in,
    is_pointwise_3d,
    offset_first_axis,
    pointwise_conv,
    whole_map_table,
)
from .patch_prop import CLEAN, DENSE, META_KEY, PATCHED, PatchInfo, Read
from .program_inputs import NO_FILL, PatchFill, StoredSpec
from .reinplace import reinplace_activations
from .windowed import WindowedOps

__all__ = ["StoredSpec", "PatchFill", "Packing", "IncrementalProgram", "rewrite", "build_capture_module"]




@dataclasses.dataclass
class IncrementalProgram:
    """The rewrite's result.

    Attributes:
        module: the incremental graph, ``forward(positions, *stored)``.
        stored: what to pass as ``*stored``, in order.
        capture: the traced model with the stored nodes as extra outputs:
            ``capture(image) -> (output, *raw_stored)``.
        weights: ``(buffer name, model parameter)`` of the channels-last conv
            weight copies the incremental graph uses.
        fill: what the patch holds; with ``fill.scaled`` / ``fill.image_color``
            the graph takes the per-image ``occlusion_scale`` / ``occlusion_color``
            after ``*stored``, and the segment inputs with ``fill.segments``.
        inputs: the per-image inputs after ``*stored``, in order
            (:meth:`PatchFill.per_image_inputs`).
    """

    module: fx.GraphModule
    stored: list[StoredSpec]
    capture: fx.GraphModule
    weights: list[tuple[str, Tensor]] = dataclasses.field(default_factory=list)
    fill: PatchFill = NO_FILL
    inputs: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """Copy the model's current conv weights into the graph's channels-last copies.

        In place, so CUDA graphs captured earlier stay valid.
        """
        tables = self.module.krypton_tables
        for name, param in self.weights:
            getattr(tables, name).copy_(param)


@dataclasses.dataclass(frozen=True)
class Packing:
    """A program over the positions of several images at once (see ``rewrite``'s ``packing``).

    Attributes:
        positions: positions per image, P: row ``r`` of a batch is position
            ``r % P`` of image ``r // P``.
        spatial: spatial shape of each stored node's map for one image, by node name.
    """

    positions: int
    spatial: dict[str, tuple[int, ...]]


_VIEW_TO_RESHAPE = {"view": "reshape", "view_as": "reshape_as"}
_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_POOL_3D = (nn.AvgPool3d, nn.MaxPool3d, F.avg_pool3d, F.max_pool3d)


def _reads_own_box(read: Read) -> bool:
    """The window is exactly the input's patch box (a 1x1 conv, say): no gather needed."""
    info: PatchInfo = read.node.meta[META_KEY]
    if info.state is not PATCHED or info.kind is Kind.SOURCE:
        return False
    return read.window.same_as(info.box)


def _pad_for(read: Read) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` per axis so that every position's window lies inside the padded map."""
    w = read.window
    return tuple((max(0, -int(s.min())), max(0, int(s.max()) + n - f))
                 for s, n, f in zip(w.starts, w.sizes, w.full))


class _Emitter(WindowedOps):
    """Builds the incremental graph node by node (env-dict style, as in fx's own transforms)."""

    def __init__(self, gm: fx.GraphModule, backend: str, color: Tensor, fill: PatchFill,
                 packing: Optional[Packing] = None, target: Optional[SegmentationTarget] = None,
                 shared_weights: Optional[nn.Module] = None):
        self.gm = gm
        self.target = target
        self.shared_weights = shared_weights
        self.cut: Optional[fx.Node] = None
        self.backend = backend
        self.fill = fill
        self.packing = packing
        self.graph = fx.Graph()
        self.tables = nn.Module()
        self.tables.register_buffer("color", color.detach().clone())
        if fill.weight is not None:
            self.tables.register_buffer("patch_weight", fill.weight.detach().to(color.dtype).clone())
        self._fill_inputs: dict[str, fx.Node] = {}
        self.env: dict[fx.Node, Any] = {}
        self.source: Optional[fx.Node] = None
        self.stored: list[StoredSpec] = []
        self.stored_nodes: list[fx.Node] = []
        self.weights: list[tuple[str, Tensor]] = []
        self._stored_index: dict[tuple[fx.Node, float], int] = {}
        self._stored_ph: list[fx.Node] = []
        self._n_tables = 0
        self._reads: dict[tuple, list[tuple[Tensor, Tensor, fx.Node]]] = {}

    # --- set-up --------------------------------------------------------------

    def plan_stored(self) -> None:
        """One stored input per (node, fill), padded for the widest read of it."""
        pads: dict[tuple[fx.Node, float], tuple[tuple[int, int], ...]] = {}
        for n in self.gm.graph.nodes:
            for read in n.meta[META_KEY].reads:
                if _reads_own_box(read):
                    continue
                key = (read.node, float(read.fill))
                pad = _pad_for(read)
                old = pads.setdefault(key, pad)
                pads[key] = tuple((max(a, c), max(b, d)) for (a, b), (c, d) in zip(old, pad))
        if self.fill.reads_image:
            # The patch's values come from the image under it: store the image (unpadded at least).
            source = next(n for n in self.gm.graph.nodes if n.op == "placeholder")
            box = source.meta[META_KEY].box
            pads.setdefault((source, 0.0), ((0, 0),) * box.ndim)
        ndim = next(n for n in self.gm.graph.nodes if n.op == "placeholder").meta[META_KEY].box.ndim
        for n in self.gm.graph.nodes:
            if n.meta[META_KEY].frozen:  # frozen statistics: passed as they are
                pads.setdefault((n, 0.0), ((0, 0),) * ndim)
        for key, pad in pads.items():
            self._stored_index[key] = len(self.stored)
            self.stored.append(StoredSpec(key[0].name, pad, key[1]))
            self.stored_nodes.append(key[0])
        self.positions = self.graph.placeholder("positions")
        self._stored_ph = [self.graph.placeholder(f"stored_{i}_{s.node}") for i, s in enumerate(self.stored)]
        source = next(n for n in self.gm.graph.nodes if n.op == "placeholder")
        self.inputs = self.fill.per_image_inputs(self.stored, source.name)
        per_image = {(name, i): self.graph.placeholder(name if i < 0 else f"{name}_{i}")
                     for name, i in self.inputs}
        # A row's position in the per-position tables, and (packed) its image.
        self._index, self._image = self.positions, None
        if self.packing is not None:
            count = self.packing.positions
            self._image = self.graph.call_function(operator.floordiv, (self.positions, count))
            self._index = self.graph.call_function(operator.mod, (self.positions, count))
        if self.fill.segments:
            # A row is a segment at a grid position (two segments may share one): the
            # row's number is segment * P + position, as a packed row's is image * P + position.
            count = source.meta[META_KEY].box.starts[0].numel()
            self._fill_inputs["segment"] = self.graph.call_function(operator.floordiv, (self.positions, count))
            self._index = self.graph.call_function(operator.mod, (self.positions, count))
            for (name, i), node in per_image.items():
                if i >= 0:
                    self._fill_inputs[f"{name}_{i}"] = node
        if self.fill.scaled:
            scale = per_image["occlusion_scale", -1]
            self._fill_inputs["scale"] = self.graph.call_function(operator.getitem, (scale, self._index))
        if self.fill.image_color:
            self._fill_inputs["color"] = per_image["occlusion_color", -1]
        if self.target is not None:  # the target's per-image inputs (targets.SegmentationTarget.resolve)
            self._target_inputs = (self.graph.placeholder("target_maps"), self.graph.placeholder("target_totals"))

    def _color(self) -> fx.Node:
        """The patch colour: the compiled one, or this image's (``fill.image_color``)."""
        if "color" in self._fill_inputs:
            return self._fill_inputs["color"]
        return self.graph.get_attr("krypton_tables.color")

    def _occlude(self, index: int, table: fx.Node, window: tuple[int, ...],
                 patch: tuple[int, ...]) -> fx.Node:
        """Input occlusion of ``window`` of stored input ``index`` (the image) with the patch
        filled as ``self.fill`` says."""
        kwargs: dict[str, Any] = {"backend": self.backend}
        if self.fill.weight is not None:
            kwargs["weight"] = self.graph.get_attr("krypton_tables.patch_weight")
        if "scale" in self._fill_inputs:
            kwargs["scale"] = self._fill_inputs["scale"]
        if self.fill.segments:
            kwargs["ids"] = self._fill_inputs[f"segment_ids_{index}"]
            kwargs["segment"] = self._fill_inputs["segment"]
            if self.fill.baseline_image:
                kwargs["baseline"] = self._fill_inputs[f"occlusion_baseline_{index}"]
        return self.graph.call_function(occlude_window, (self._stored_ph[index], self._color(), table, window,
                                                         patch), kwargs)

    def _table(self, values: Tensor, stored: Optional[int] = None) -> fx.Node:
        """Register a per-position int64 table and index it with this batch's positions; a
        packed program moves the window of a read of stored input ``stored`` to the row's image."""
        name = f"table_{self._n_tables}"
        self._n_tables += 1
        self.tables.register_buffer(name, values.contiguous())
        attr = self.graph.get_attr(f"krypton_tables.{name}")
        table = self.graph.call_function(operator.getitem, (attr, self._index))
        if self._image is None or stored is None:
            return table
        return self.graph.call_function(offset_first_axis, (table, self._image, self._extent(stored)))

    def _extent(self, stored: int) -> int:
        """First spatial extent of one image's (padded) map of stored input ``stored``."""
        spec = self.stored[stored]
        before, after = spec.pad[0]
        return self.packing.spatial[spec.node][0] + before + after

    # --- reads ---------------------------------------------------------------

    def read(self, read: Read) -> fx.Node:
        """The node that delivers ``read``'s window: the input's own patch when the
        window is its box, else a gather (or projection) node, emitted once per
        distinct window (Inception's branches read the same window of one input)."""
        if _reads_own_box(read):
            return self.env[read.node]
        w = read.window
        key = (read.node, float(read.fill), w.sizes)
        for window, node in self._reads.setdefault(key, []):
            if window.same_as(w):
                return node
        node = self._emit_read(read)
        self._reads[key].append((w, node))
        return node

    def _emit_read(self, read: Read) -> fx.Node:
        key = (read.node, float(read.fill))
        index = self._stored_index[key]
        spec = self.stored[index]
        stored = self._stored_ph[index]
        w = read.window
        info: PatchInfo = read.node.meta[META_KEY]
        patched = info.state is PATCHED
        if patched:
            offsets = [b - s for b, s in zip(info.box.starts, w.starts)]
        else:
            offsets = [torch.zeros_like(s) for s in w.starts]
        # Window starts in the padded stored map, then the patch's offset inside the window.
        starts = [s + before for s, (before, _) in zip(w.starts, spec.pad)]
        window = w.sizes
        if read.node is self.source:
            table = self._table(torch.stack(starts + offsets, 1), index)
            return self._occlude(index, table, window, info.box.sizes)
        if patched and read.is_projection and not any(a or b for a, b in spec.pad):
            table = self._table(torch.stack(offsets, 1))
            if self._image is not None:  # each row's own image's whole map, with its patch
                table = self.graph.call_function(whole_map_table, (table, self._image, self._extent(index)))
                return self.graph.call_function(
                    gather_window, (stored, self.env[read.node], table, self.packing.spatial[spec.node]),
                    {"backend": self.backend})
            return self.graph.call_function(project_to_full, (stored, self.env[read.node], table),
                                            {"backend": self.backend})
        table = self._table(torch.stack(starts + offsets, 1), index)
        patch = self.env[read.node] if patched else None
        return self.graph.call_function(gather_window, (stored, patch, table, window),
                                        {"backend": self.backend})

    # --- nodes -----------------------------------------------------------------

    def emit(self, n: fx.Node) -> None:
        info: PatchInfo = n.meta[META_KEY]
        if n.op == "placeholder":
            self.source = n
            if info.state is PATCHED and self.fill.reads_image:
                # The patch itself: the image under it, weighted (a window equal to the patch).
                index = self._stored_index[(n, 0.0)]
                pad = self.stored[index].pad
                starts = [s + before for s, (before, _) in zip(info.box.starts, pad)]
                table = self._table(torch.stack(starts + [torch.zeros_like(s) for s in starts], 1), index)
                self.env[n] = self._occlude(index, table, info.box.sizes, info.box.sizes)
            elif info.state is PATCHED:
                self.env[n] = self.graph.call_function(color_patch, (self._color(), self.positions,
                                                                     info.box.sizes))
            return
        if info.frozen:
            self.env[n] = self._stored_ph[self._stored_index[(n, 0.0)]]
            return
        mapped = {r.node: self.read(r) for r in info.reads}
        if info.state is CLEAN:  # a shape query (x.shape) of a patched map: the whole map's shape
            mapped = {m: self.graph.call_function(full_size_stand_in, (self.env[m], m.meta[META_KEY].box.full))
                      for m in n.all_input_nodes if m.meta[META_KEY].state is PATCHED}
        lookup = lambda m: mapped[m] if m in mapped else self.env[m]  # noqa: E731
        if n.op == "output" and self.target is not None:
            self.graph.output(self._reduction(n, info, lookup))
            return
        if n.op == "output":
            self.graph.output(self.env[self.cut] if self.cut is not None else fx.map_arg(n.args[0], lookup))
            return
        if info.state is PATCHED and info.kind is Kind.LOCAL:
            self.env[n] = self._windowed_local(n, info, mapped[n.args[0]])
            return
        mod = self.gm.get_submodule(n.target) if n.op == "call_module" else None
        if info.state is DENSE and type(mod) in _CONV and mod.padding_mode == "zeros":
            # Batched conv, but on the channels-last weight copy (see _conv_params).
            weight, bias = self._conv_params(n)
            args = fx.map_arg(n.args, lookup)
            if is_pointwise_3d(mod.weight.shape, mod.stride, mod.padding, mod.dilation, mod.groups):
                self.env[n] = self.graph.call_function(pointwise_conv, (args[0], weight, bias, mod.stride))
            else:
                self.env[n] = self.graph.call_function(
                    _CONV[type(mod)], (args[0], weight, bias, mod.stride, mod.padding, mod.dilation, mod.groups))
            return
        # clean, point, merge and dense nodes run as written, on their new inputs.
        self.env[n] = new = self.graph.node_copy(n, lookup)
        if info.state is DENSE and (type(mod) in _POOL_3D or n.target in _POOL_3D):
            # as for windowed 3-D pools (see _windowed_local): keep the maps channels-last
            self.env[n] = self.graph.call_method("contiguous", (new,),
                                                 {"memory_format": torch.channels_last_3d})
        if info.state is DENSE and new.op == "call_method" and new.target in _VIEW_TO_RESHAPE:
            # A projected map is channels-last, which .view() refuses (x.view(x.size(0), -1)
            # after a conv); the graph is functional, so reshape gives the same values.
            new.target = _VIEW_TO_RESHAPE[new.target]

    def _reduction(self, n: fx.Node, info: PatchInfo, lookup) -> fx.Node:
        """The target's reduction of the output: over the output's patch (the unoccluded
        total, the box's old contribution gathered from the target's maps, its new one),
        or over the whole map where the output is dense."""
        t = self.target
        maps, totals = self._target_inputs
        src = select_output(n.args[0], t.key)
        if info.state is PATCHED:
            box = info.box
            table = self._table(torch.stack(list(box.starts) + [torch.zeros_like(s) for s in box.starts], 1))
            old = self.graph.call_function(gather_window, (maps, None, table, box.sizes), {"backend": self.backend})
            return self.graph.call_function(reduce_patched, (self.env[src], old, totals, t.category, t.output))
        return self.graph.call_function(reduce_dense, (lookup(src), maps, totals, t.category, t.output))

    def _conv_params(self, n: fx.Node) -> tuple[fx.Node, Optional[fx.Node]]:
        """Weight and bias nodes of a Conv2d module, the weight as a channels-last copy.

        The incremental graph's activations are channels-last; a conv whose
        weight is not converts the weight on every call (measured: a tenth of
        ResNet18's time on the CPU). The copy is refreshed from the model by
        :meth:`IncrementalProgram.refresh_weights` before every image.
        """
        mod = self.gm.get_submodule(n.target)
        name = "weight_" + n.target.replace(".", "_")
        if not hasattr(self.tables, name):
            shared = getattr(self.shared_weights, name, None)
            if shared is None:  # (another program's copy is refreshed with that program)
                shared = mod.weight.detach().clone(memory_format=channels_last(mod.weight.dim() - 2))
                self.weights.append((name, mod.weight))
            self.tables.register_buffer(name, shared)
        weight = self.graph.get_attr(f"krypton_tables.{name}")
        bias = self.graph.get_attr(f"{n.target}.bias") if mod.bias is not None else None
        return weight, bias


def rewrite(gm: fx.GraphModule, backend: str = "auto", color: Optional[Tensor] = None,
            fill: Optional[PatchFill] = None, packing: Optional[Packing] = None,
            target: Optional[SegmentationTarget] = None, shared_weights: Optional[IncrementalProgram] = None,
            cut: Optional[str] = None) -> IncrementalProgram:
    """Emit the incremental program of a PatchProp-annotated graph.

    Args:
        gm: traced model whose nodes carry ``meta["krypton_patch"]``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the gather nodes.
        color: ``(C,)`` occlusion colour in the model's input space.
        fill: what the patch holds beyond a colour (:class:`PatchFill`).
        packing: emit a program over several images at once: its ``positions`` are
            ``image * P + position``, and each stored input holds the images' maps
            stacked along the first spatial axis (``torch.cat(maps, 2)``). Each row
            reads its own image's windows; the values are those of one image's program.
            Not with per-image fill inputs (``fill.scaled``, ``fill.image_color``, ``fill.segments``).
        target: a dense output's target (annotated with ``dense_output``): the graph
            returns its ``(B, 1)`` values, taking its per-image inputs after the rest.
        shared_weights: another program of the same model whose channels-last conv weight
            copies this one uses too (no copy of its own; they are refreshed with that
            program's :meth:`IncrementalProgram.refresh_weights`).
        cut: the name of a dense node whose value the program returns instead of the
            model's output (the rest of the model then runs as a batch of its own: the
            segment buckets share their classifier head). Not with ``target``.

    Returns:
        An :class:`IncrementalProgram`.
    """
    if color is None:
        raise ValueError("rewrite needs the occlusion colour")
    fill = fill or NO_FILL
    if packing is not None and (fill.scaled or fill.image_color or fill.segments):
        raise ValueError("a packed program takes no per-image fill inputs (fill.scaled, fill.image_color, "
                         "fill.segments)")
    if packing is not None and target is not None:
        raise ValueError("a packed program takes no per-image target inputs")
    if cut is not None and target is not None:
        raise ValueError("a program cut before the output returns no target's values")
    if fill.baseline_image and not fill.segments:
        raise ValueError("fill.baseline_image is the baseline of segments: set fill.segments too")
    if fill.segments and (fill.weight is not None or fill.scaled):
        raise ValueError("a segment's fill takes no weight or scale")
    shared = shared_weights.module.krypton_tables if shared_weights is not None else None
    emitter = _Emitter(gm, backend, color, fill, packing, target, shared)
    if cut is not None:
        emitter.cut = next(n for n in gm.graph.nodes if n.name == cut)
    emitter.plan_stored()
    for n in gm.graph.nodes:
        emitter.emit(n)
    root = nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, child)
    for name, buf in gm.named_buffers(recurse=False):
        root.register_buffer(name, buf)
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for name, v in vars(gm).items():
        if isinstance(v, Tensor) and not hasattr(root, name):
            setattr(root, name, v)
    root.add_module("krypton_tables", emitter.tables)
    module = fx.GraphModule(root, emitter.graph, class_name="KryptonIncremental")
    module.graph.eliminate_dead_code()
    reinplace_activations(module.graph, module)
    module.graph.lint()
    module.recompile()
    capture = build_capture_module(gm, emitter.stored_nodes, target.key if target is not None else None)
    return IncrementalProgram(module, emitter.stored, capture, emitter.weights, fill, emitter.inputs)
