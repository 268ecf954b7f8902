"""PatchProp: annotate every node with its patch geometry.

An :class:`torch.fx.Interpreter` that runs the graph once on an example image
(the unoccluded image, or any image of the compiled size: geometry depends
only on shapes) and stores a :class:`PatchInfo` in ``node.meta["krypton_patch"]``.
It also keeps the activations that the incremental graph's gather nodes read
(``PatchProp.stored``), so a caller that runs it on the real image gets them
for free.

Each node ends up in one of three states:

- ``clean``: does not depend on the image (parameters, constants);
- ``patched``: a feature map that differs from the unoccluded one only inside
  ``box`` (static size, a start per occlusion position);
- ``dense``: depends on the occlusion everywhere: it runs as ordinary batched
  inference.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .. import geometry as geo
from ..geometry import AxisSpec, AxisTaps, Box, TransposedSpec
from ..registry import TRANSPOSED_OPS, Kind, LocalOp, lookup
from ..resampling import resample_taps
from ..targets import select_output
from .norms import FROZEN_STATISTICS, spatial_norm

__all__ = ["PatchInfo", "PatchProp", "Read", "State", "META_KEY", "annotate"]

META_KEY = "krypton_patch"

class State(str, enum.Enum):
    """What a node's value is, compared with the unoccluded image's (docs/design.md).

    A ``str`` enum: ``State.PATCHED == "patched"``.
    """

    CLEAN = "clean"      # does not depend on the image (parameters, constants)
    PATCHED = "patched"  # differs from the unoccluded value only inside its box
    DENSE = "dense"      # depends on the occlusion everywhere: runs as batched inference


# Module-level aliases, for code that reads better with bare names.
CLEAN, PATCHED, DENSE = State.CLEAN, State.PATCHED, State.DENSE


@dataclasses.dataclass(frozen=True)
class Read:
    """One input that an incremental op reads through a gather node.

    Attributes:
        node: the input node.
        window: the read-in window in the input map's coordinates (eqs.
            25-28); it may start before 0 or end past the map, where ``fill``
            is read.
        fill: value outside the map: the op's own padding value.
    """

    node: fx.Node
    window: Box
    fill: float = 0.0

    @property
    def is_projection(self) -> bool:
        """A window covering exactly the whole map: Algorithm 2."""
        w = self.window
        return w.sizes == w.full and not any(bool(s.any()) for s in w.starts)


@dataclasses.dataclass(frozen=True)
class PatchInfo:
    """What PatchProp knows about one node.

    Attributes:
        kind: the registry kind (SOURCE, POINT, LOCAL, MERGE, GLOBAL).
        state: :class:`State`: clean, patched or dense.
        box: output patch of a ``patched`` node (None otherwise).
        reads: inputs this node reads through gather/projection nodes.
        local: window parameters when the node runs incrementally as a local op.
        macs_full: conv multiply-adds of one unoccluded inference of this node.
        macs_inc: conv multiply-adds this node executes per occlusion position.
        reason: for the node where incremental savings stop, why.
        inv_divisor: avg-pool only: the reciprocal divisor, a float when it is
            the same everywhere, else a ``(1, 1, Ho, Wo)`` map.
        crop: transposed ops only: where the box starts, per axis, in the op's
            result on the read window (the same for every position).
        taps: resampling only: each axis's source taps (the box's outputs read
            ``first[o] + t`` of the map, the window's ``first[o] + t - start``).
        frozen: a value taken from the unoccluded image and passed to the incremental
            graph like a stored activation (the statistics of a frozen norm); its state
            is ``clean``: the same for every position.
    """

    kind: Kind
    state: State
    box: Optional[Box] = None
    reads: tuple[Read, ...] = ()
    local: Optional[LocalOp] = None
    macs_full: int = 0
    macs_inc: int = 0
    reason: str = ""
    inv_divisor: Any = None
    crop: tuple[int, ...] = ()
    taps: tuple[AxisTaps, ...] = ()
    frozen: bool = False


def _is_map(v: Any, ndim: int) -> bool:
    """A feature-map batch ``(N, C, *spatial)`` with ``ndim`` spatial axes."""
    return isinstance(v, Tensor) and v.dim() == ndim + 2


def _broadcasts_spatially(v: Any, ndim: int) -> bool:
    """A clean value that is the same at every spatial location (scalar, per-channel).

    Broadcasting aligns trailing axes, so the value's last ``ndim`` axes (as
    many as it has) must all be 1.
    """
    if not isinstance(v, Tensor) or v.dim() == 0:
        return True
    return all(n == 1 for n in v.shape[-ndim:])


def _is_shape_query(n: fx.Node) -> bool:
    """``x.shape``, ``x.ndim``, ``x.size(...)``, ``x.dim()``: the same for every occlusion
    (torchvision's heads interpolate to ``x.shape[-2:]``)."""
    if n.op == "call_function" and n.target is getattr:
        return len(n.args) == 2 and n.args[1] in ("shape", "ndim")
    return n.op == "call_method" and n.target in ("size", "dim")


def _target_name(n: fx.Node) -> str:
    t = n.target
    return getattr(t, "__name__", str(t)) if n.op == "call_function" else str(t)


def _inv_divisor(local: LocalOp, in_size: tuple[int, ...]) -> Any:
    """Reciprocal avg-pool divisor per output element, as the full op sees it.

    ``count_include_pad=False`` and ``ceil_mode`` windows that hang past the
    border divide by fewer elements; a window of the incremental graph is
    pooled with divisor 1 and scaled by this map (``(1, 1, *out)``).
    """
    if local.divisor_override:
        return 1.0 / local.divisor_override
    # avg_pool1d has no divisor_override: a 1-D map is a 2-D map one row high.
    lift = 1 if local.ndim == 1 else 0
    pool = F.avg_pool3d if local.ndim == 3 else F.avg_pool2d
    ones = torch.ones(1, 1, *(1,) * lift, *in_size, dtype=torch.float64)
    kw = dict(kernel_size=(1,) * lift + local.kernel, stride=(1,) * lift + local.stride,
              padding=(0,) * lift + local.full_pad, ceil_mode=local.ceil_mode,
              count_include_pad=local.count_include_pad)
    avg = pool(ones, **kw)
    total = pool(ones, **kw, divisor_override=1)
    inv = avg / total
    if lift:
        inv = inv.squeeze(2)
    if torch.all(inv == inv.flatten()[0]):
        return float(inv.flatten()[0])
    return inv.float()


class PatchProp(fx.Interpreter):
    """Annotate ``gm``'s nodes with their patch geometry.

    Args:
        gm: a traced model (see :func:`krypton_fx.tracing.trace`).
        patch: occlusion patch size, one int per spatial axis (1, 2 or 3).
        starts: one int64 ``(P,)`` tensor per spatial axis: the patch's start
            at every occlusion position (:func:`krypton_fx.geometry.occlusion_grid`).
        tau: projective-field threshold (eqs. 39-45); 1.0 is exact.
        dense_output: the output is a dense map reduced by a target (segmentation): it
            stays patched where its input is, instead of being projected to full size.
        output_key: with ``dense_output``, the entry of a dict output that is explained.

    Example:
        >>> import torchvision, krypton_fx
        >>> gm = krypton_fx.tracing.trace(torchvision.models.resnet18())
        >>> ys, xs, _ = krypton_fx.geometry.occlusion_grid((64, 64), (16, 16), (16, 16))
        >>> _ = PatchProp(gm, (16, 16), (ys, xs)).run(torch.zeros(1, 3, 64, 64))
        >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["krypton_patch"].box
        Box(11x11 of 32x32)
    """

    def __init__(self, gm: fx.GraphModule, patch: tuple[int, ...], starts: tuple[Tensor, ...],
                 tau: float = 1.0, dense_output: bool = False, output_key: Optional[str] = None):
        super().__init__(gm)
        if len(patch) != len(starts):
            raise ValueError(f"patch {tuple(patch)} and starts give different numbers of axes")
        self.patch = tuple(patch)
        self.starts = tuple(starts)
        self.ndim = len(self.patch)
        self.tau = tau
        self.dense_output = dense_output
        self.output_key = output_key
        self.modules = dict(gm.named_modules())
        self.infos: dict[fx.Node, PatchInfo] = {}
        self.stored: dict[fx.Node, Tensor] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.result: Any = None  # what the graph returned (set by annotate)
        self._seen_source = False

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
            info = self._propagate(n, result)
        except ValueError:
            raise
        except Exception as e:
            raise RuntimeError(f"PatchProp failed at {n.format_node()}") from e
        n.meta[META_KEY] = info
        self.infos[n] = info
        if isinstance(result, Tensor):
            self.shapes[n] = tuple(result.shape)
        for read in info.reads:
            self.stored[read.node] = self.env[read.node]
        return result

    # --- propagation -------------------------------------------------------

    def _propagate(self, n: fx.Node, result: Any) -> PatchInfo:
        if n.op == "placeholder":
            return self._source(n, result)
        if n.op == "get_attr":
            return PatchInfo(Kind.GLOBAL, CLEAN)
        if n.op == "call_function" and n.target in FROZEN_STATISTICS:
            self.stored[n] = result  # the unoccluded image's statistics, for every position
            return PatchInfo(Kind.GLOBAL, CLEAN, frozen=True)
        if n.op == "output" and self.dense_output:
            return self._dense_output(n, result)
        deps = [m for m in n.all_input_nodes if self.infos[m].state is not CLEAN]
        if not deps or _is_shape_query(n):
            return PatchInfo(Kind.GLOBAL, CLEAN)
        if n.op == "output":
            return self._dense(n, Kind.GLOBAL, deps, "", result)
        if any(self.infos[m].state is DENSE for m in deps):
            return self._dense(n, Kind.GLOBAL, deps, "", result)
        rule, module = lookup(n, self.modules)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if rule.kind is Kind.LOCAL:
            local = rule.extract(module, args, kwargs)
            if local is not None and local.ndim == self.ndim and deps == [n.args[0]] \
                    and _is_map(result, self.ndim):
                return self._local(n, local, result)
            return self._dense(n, Kind.GLOBAL, deps, f"{_target_name(n)}: unsupported configuration", result)
        if rule.kind is Kind.POINT and (rule.check is None or rule.check(module, args, kwargs)):
            return self._pointwise(n, deps, result)
        norm = spatial_norm(n, self.modules, self.ndim)
        if norm is not None:
            return self._dense(n, Kind.GLOBAL, deps, f"{norm[2]}: statistics over the whole map (exact; "
                               "norm_stats='frozen' makes it a point op, approximate)", result)
        return self._dense(n, Kind.GLOBAL, deps, f"global op {_target_name(n)}", result)

    def _dense_output(self, n: fx.Node, result: Any) -> PatchInfo:
        """A dense output reduced by a target: patched where the map it returns is."""
        src = select_output(n.args[0], self.output_key)
        if not isinstance(src, fx.Node) or self.infos[src].state is CLEAN:
            return PatchInfo(Kind.GLOBAL, CLEAN)
        info = self.infos[src]
        if info.state is PATCHED:
            return PatchInfo(Kind.GLOBAL, PATCHED, info.box)
        return self._dense(n, Kind.GLOBAL, [src], "", result)

    def _source(self, n: fx.Node, result: Any) -> PatchInfo:
        if self._seen_source:
            raise ValueError(f"model takes more than one input ({n.name}); krypton_fx explains "
                             "single-image models. Hint: wrap the model so that it takes one image tensor.")
        self._seen_source = True
        if not _is_map(result, self.ndim):
            raise ValueError(f"the model input must be a batch (N, C, ...) with {self.ndim} spatial axes, "
                             f"got {tuple(getattr(result, 'shape', ()))}")
        # Even a patch as large as the image stays "patched" here: its
        # consumers then project it (the occluded image itself) like any other.
        box = Box(self.starts, self.patch, tuple(result.shape[2:]))
        return PatchInfo(Kind.SOURCE, PATCHED, box)

    def _dense(self, n: fx.Node, kind: Kind, deps: list[fx.Node], reason: str, result: Any) -> PatchInfo:
        """Everything after here runs batched; patched inputs are projected (Algorithm 2)."""
        reads = []
        for m in deps:
            box = self.infos[m].box
            if self.infos[m].state is PATCHED:
                zeros = tuple(torch.zeros_like(s) for s in box.starts)
                reads.append(Read(m, Box(zeros, box.full, box.full)))
        if reads and not reason:
            reason = f"global op {_target_name(n)}"
        macs = self._conv_macs(n, result)
        return PatchInfo(kind, DENSE, reads=tuple(reads), macs_full=macs, macs_inc=macs,
                         reason=reason if reads else "")

    def _conv_macs(self, n: fx.Node, out: Any, window: Optional[tuple[int, ...]] = None) -> int:
        """Multiply-adds of one inference of a conv node (eq. 16), else 0; with ``window``,
        of a transposed conv run on an input window of that size.

        A conv's are ``C_in/g * prod(K)`` per output element; a transposed conv's
        ``C_out/g * prod(K)`` per *input* element (its weight is ``(C_in, C_out/g, *K)``):
        it scatters each input over the outputs it reaches.
        """
        if n.op == "call_module" and type(self.modules[n.target]) in _CONV_MODULES + _CONV_T_MODULES:
            weight, transposed = self.modules[n.target].weight, type(self.modules[n.target]) in _CONV_T_MODULES
        elif n.op == "call_function" and n.target in _CONV_FUNCTIONS + _CONV_T_FUNCTIONS:
            weight, transposed = self.fetch_args_kwargs_from_env(n)[0][1], n.target in _CONV_T_FUNCTIONS
        else:
            return 0
        if not isinstance(out, Tensor):
            return 0
        if transposed:
            return int(weight.numel()) * math.prod(window or self.env[n.args[0]].shape[2:])
        return int(weight[0].numel()) * int(out[0].numel())

    def _local(self, n: fx.Node, local: LocalOp, result: Tensor) -> PatchInfo:
        src = n.args[0]
        in_box = self.infos[src].box
        out_full = tuple(result.shape[2:])
        # Padding only shifts the box: tau (a cap on the projective field's growth) does not apply.
        tau = 1.0 if local.op == "pad" else self.tau
        crop, taps = (), ()
        if local.op in TRANSPOSED_OPS:
            axes = [_transposed_axis(start, size, spec, tau) for start, size, spec in
                    zip(in_box.starts, in_box.sizes, _transposed_specs(local, in_box.full, out_full))]
            crop = tuple(a[2] for a in axes)
        elif local.op == "resample":
            try:
                # the kernels weigh half-precision maps in float32 (their opmath) and round once
                dtype = torch.float64 if result.dtype == torch.float64 else torch.float32
                taps = resample_taps(local, in_box.full, out_full, dtype, result.device)
            except ValueError as e:
                return self._dense(n, Kind.GLOBAL, [src], f"{_target_name(n)}: {e}", result)
            axes = [_resample_axis(start, size, t, tau) for start, size, t in zip(in_box.starts, in_box.sizes, taps)]
        else:
            specs = [AxisSpec(k, s, p, i, o) for k, s, p, i, o in
                     zip(local.effective_kernel, local.stride, local.pad, in_box.full, out_full)]
            axes = [(*geo.local_box(start, size, spec, tau), None) for start, size, spec in
                    zip(in_box.starts, in_box.sizes, specs)]
            axes = [(start, size, *geo.read_window(start, size, spec)) for (start, size, _), spec in zip(axes, specs)]
        out_box = Box(tuple(a[0] for a in axes), tuple(a[1] for a in axes), out_full)
        inv_div = _inv_divisor(local, in_box.full) if local.op == "avg" else None
        if out_box.is_full:
            return self._dense(n, Kind.LOCAL, [src], f"{_target_name(n)}: patch covers the whole map", result)
        window = Box(tuple(a[-2] for a in axes), tuple(a[-1] for a in axes), in_box.full)
        read = Read(src, window, local.fill)
        macs_full = self._conv_macs(n, result)
        if local.op == "conv":
            macs_inc = macs_full * math.prod(out_box.sizes) // math.prod(out_full)
        else:
            macs_inc = self._conv_macs(n, result, window.sizes) if local.op == "conv_transpose" else 0
        return PatchInfo(Kind.LOCAL, PATCHED, out_box, (read,), local, macs_full, macs_inc,
                         inv_divisor=inv_div, crop=crop, taps=taps)

    def _pointwise(self, n: fx.Node, deps: list[fx.Node], result: Any) -> PatchInfo:
        """Point ops keep the box; with several feature maps they merge (eqs. 35-38)."""
        if not _is_map(result, self.ndim):
            return self._dense(n, Kind.GLOBAL, deps, f"{_target_name(n)}: output is not a feature map", result)
        full = tuple(result.shape[2:])
        spatial_clean = []
        for m in n.all_input_nodes:
            info = self.infos[m]
            if info.state is PATCHED:
                if info.box.full != full:
                    return self._dense(n, Kind.GLOBAL, deps, f"{_target_name(n)}: changes the map size", result)
            elif not _broadcasts_spatially(self.env[m], self.ndim):
                if _is_map(self.env[m], self.ndim) and tuple(self.env[m].shape[2:]) == full:
                    spatial_clean.append(m)
                else:
                    return self._dense(n, Kind.GLOBAL, deps, f"{_target_name(n)}: unsupported broadcast", result)
        boxes = [self.infos[m].box for m in deps]
        if len(deps) == 1 and not spatial_clean and not boxes[0].is_full:
            return PatchInfo(Kind.POINT, PATCHED, boxes[0])
        # Approximate mode: the union is no larger than its largest input box,
        # so the tau cap also holds across merges (smaller tau never costs more).
        approx = self.tau < 1.0
        axes = [geo.union_box([b.starts[a] for b in boxes], [b.sizes[a] for b in boxes], full[a],
                              cap=max(b.sizes[a] for b in boxes) if approx else None)
                for a in range(self.ndim)]
        union = Box(tuple(a[0] for a in axes), tuple(a[1] for a in axes), full)
        if union.is_full:
            return self._dense(n, Kind.MERGE, deps, f"{_target_name(n)}: union covers the whole map", result)
        reads = tuple(Read(m, union) for m in list(deps) + spatial_clean
                      if self.infos[m].state is not PATCHED or not self.infos[m].box.same_as(union))
        return PatchInfo(Kind.MERGE, PATCHED, union, reads)


_CONV_MODULES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
_CONV_T_MODULES = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_CONV_T_FUNCTIONS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _transposed_specs(local: LocalOp, in_full: tuple[int, ...], out_full: tuple[int, ...]) -> list[TransposedSpec]:
    return [TransposedSpec(k, s, p, i, o) for k, s, p, i, o in
            zip(local.effective_kernel, local.stride, local.pad, in_full, out_full)]


def _transposed_axis(start: Tensor, size: int, spec: TransposedSpec, tau: float):
    """``(box start, box size, crop, window start, window size)`` of a transposed op on one
    axis: the reached outputs, aligned to the stride so that one static crop takes them
    out of every position's result (docs/design.md, "Geometry")."""
    out_start, out_size = geo.align_box(*geo.transposed_box(start, size, spec, tau), spec.out_size, spec.stride)
    win_start, win_size, crop = geo.transposed_window(out_start, out_size, spec)
    return out_start, out_size, crop, win_start, win_size


def _resample_axis(start: Tensor, size: int, taps: AxisTaps, tau: float):
    """``(box start, box size, window start, window size)`` of a resampling op on one axis."""
    out_start, out_size = geo.resample_box(start, size, taps, tau)
    return (out_start, out_size, *geo.resample_window(out_start, out_size, taps))


def annotate(gm: fx.GraphModule, example: Tensor, patch: tuple[int, ...], starts: tuple[Tensor, ...],
             tau: float = 1.0, what: str = "the model", dense_output: bool = False,
             output_key: Optional[str] = None) -> PatchProp:
    """Run :class:`PatchProp` on ``gm`` with ``example``; a model that cannot run on it is a ValueError.

    Shared by :func:`krypton_fx.compile` and :func:`krypton_fx.theoretical_speedup`
    so that both fail the same way. ``dense_output``: the model returns a dense map
    (``(N, classes, *spatial)``, or a dict holding one at ``output_key``) that a
    target reduces (segmentation); else class scores ``(N, classes)``.
    """
    prop = PatchProp(gm, patch, starts, tau=tau, dense_output=dense_output, output_key=output_key)
    with torch.no_grad():
        try:
            out = prop.run(example)
        except RuntimeError as e:
            cause = e.__cause__ or e
            detail = " ".join(str(cause).split()) or type(cause).__name__
            raise ValueError(f"{what} cannot run on a {tuple(example.shape)} input: {type(cause).__name__}: "
                             f"{detail}. Hint: check image_size and channels.") from e
    if dense_output:
        out = select_output(out, output_key)
        if not _is_map(out, prop.ndim):
            raise ValueError(f"a SegmentationTarget needs a dense output (N, classes, *spatial) with the image's "
                             f"{prop.ndim} spatial axes; {what} returns {type(out).__name__} "
                             f"{tuple(getattr(out, 'shape', ()))}")
    elif not isinstance(out, Tensor) or out.dim() != 2:
        hint = (" Hint: for a segmentation model pass target=krypton_fx.SegmentationTarget(category)"
                if isinstance(out, dict) or _is_map(out, prop.ndim) else "")
        raise ValueError("the model must return class scores of shape (N, classes); got "
                         f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}.{hint}")
    prop.result = out
    return prop
