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
from typing import Any, Optional

import torch
from torch import Tensor, fx

from .. import geometry as geo
from ..geometry import AxisSpec, Box
from ..registry import Kind, LocalOp, lookup

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
        return w.h == w.H and w.w == w.W and not bool(w.y.any() or w.x.any())


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


def _is_tensor4d(v: Any) -> bool:
    return isinstance(v, Tensor) and v.dim() == 4


def _broadcasts_spatially(v: Any) -> bool:
    """A clean value that is the same at every spatial location (scalar, per-channel)."""
    if not isinstance(v, Tensor) or v.dim() == 0:
        return True
    if v.dim() == 1:
        return v.shape[-1] == 1
    return v.shape[-1] == 1 and v.shape[-2] == 1


def _same_box(a: Box, b: Box) -> bool:
    return a.h == b.h and a.w == b.w and torch.equal(a.y, b.y) and torch.equal(a.x, b.x)


def _target_name(n: fx.Node) -> str:
    t = n.target
    return getattr(t, "__name__", str(t)) if n.op == "call_function" else str(t)


def _inv_divisor(local: LocalOp, in_hw: tuple[int, int]) -> Any:
    """Reciprocal avg-pool divisor per output element, as the full op sees it.

    ``count_include_pad=False`` and ``ceil_mode`` windows that hang past the
    border divide by fewer elements; a window of the incremental graph is
    pooled with divisor 1 and scaled by this map.
    """
    if local.divisor_override:
        return 1.0 / local.divisor_override
    ones = torch.ones(1, 1, *in_hw, dtype=torch.float64)
    kw = dict(kernel_size=local.kernel, stride=local.stride, padding=local.full_pad,
              ceil_mode=local.ceil_mode, count_include_pad=local.count_include_pad)
    avg = torch.nn.functional.avg_pool2d(ones, **kw)
    total = torch.nn.functional.avg_pool2d(ones, **kw, divisor_override=1)
    inv = avg / total
    if torch.all(inv == inv.flatten()[0]):
        return float(inv.flatten()[0])
    return inv.float()


class PatchProp(fx.Interpreter):
    """Annotate ``gm``'s nodes with their patch geometry.

    Args:
        gm: a traced model (see :func:`krypton_fx.tracing.trace`).
        patch_hw: occlusion patch ``(h, w)``.
        starts_y: int64 ``(P,)`` patch top row per occlusion position.
        starts_x: int64 ``(P,)`` patch left column per occlusion position.
        tau: projective-field threshold (eqs. 39-45); 1.0 is exact.

    Example:
        >>> import torchvision, krypton_fx
        >>> gm = krypton_fx.tracing.trace(torchvision.models.resnet18())
        >>> ys, xs, _ = krypton_fx.geometry.occlusion_grid((64, 64), (16, 16), (16, 16))
        >>> _ = PatchProp(gm, (16, 16), ys, xs).run(torch.zeros(1, 3, 64, 64))
        >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["krypton_patch"].box
        Box(11x11 of 32x32)
    """

    def __init__(self, gm: fx.GraphModule, patch_hw: tuple[int, int], starts_y: Tensor,
                 starts_x: Tensor, tau: float = 1.0):
        super().__init__(gm)
        self.patch_hw = patch_hw
        self.starts_y = starts_y
        self.starts_x = starts_x
        self.tau = tau
        self.modules = dict(gm.named_modules())
        self.infos: dict[fx.Node, PatchInfo] = {}
        self.stored: dict[fx.Node, Tensor] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
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
        deps = [m for m in n.all_input_nodes if self.infos[m].state is not CLEAN]
        if not deps:
            return PatchInfo(Kind.GLOBAL, CLEAN)
        if n.op == "output":
            return self._dense(n, Kind.GLOBAL, deps, "", result)
        if any(self.infos[m].state is DENSE for m in deps):
            return self._dense(n, Kind.GLOBAL, deps, "", result)
        rule, module = lookup(n, self.modules)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if rule.kind is Kind.LOCAL:
            local = rule.extract(module, args, kwargs)
            if local is not None and deps == [n.args[0]] and _is_tensor4d(result):
                return self._local(n, local, result, module, args)
            return self._dense(n, Kind.GLOBAL, deps, f"{_target_name(n)}: unsupported configuration", result)
        if rule.kind is Kind.POINT and (rule.check is None or rule.check(module, args, kwargs)):
            return self._pointwise(n, deps, result)
        return self._dense(n, Kind.GLOBAL, deps, f"global op {_target_name(n)}", result)

    def _source(self, n: fx.Node, result: Any) -> PatchInfo:
        if self._seen_source:
            raise ValueError(f"model takes more than one input ({n.name}); krypton_fx explains "
                             "single-image models. Hint: wrap the model so that it takes one image tensor.")
        self._seen_source = True
        if not _is_tensor4d(result):
            raise ValueError("the model input must be an image batch (N, C, H, W)")
        # Even a patch as large as the image stays "patched" here: its
        # consumers then project it (the occluded image itself) like any other.
        box = Box(self.starts_y, self.starts_x, self.patch_hw[0], self.patch_hw[1],
                  result.shape[-2], result.shape[-1])
        return PatchInfo(Kind.SOURCE, PATCHED, box)

    def _dense(self, n: fx.Node, kind: Kind, deps: list[fx.Node], reason: str, result: Any) -> PatchInfo:
        """Everything after here runs batched; patched inputs are projected (Algorithm 2)."""
        reads = []
        for m in deps:
            box = self.infos[m].box
            if self.infos[m].state is PATCHED:
                zeros = torch.zeros_like(box.y)
                reads.append(Read(m, Box(zeros, zeros, box.H, box.W, box.H, box.W)))
        if reads and not reason:
            reason = f"global op {_target_name(n)}"
        macs = self._conv_macs(n, result)
        return PatchInfo(kind, DENSE, reads=tuple(reads), macs_full=macs, macs_inc=macs,
                         reason=reason if reads else "")

    def _conv_macs(self, n: fx.Node, out: Any) -> int:
        """Multiply-adds of one full inference of a conv node (eq. 16), else 0."""
        if n.op == "call_module" and type(self.modules[n.target]) is torch.nn.Conv2d:
            weight = self.modules[n.target].weight
        elif n.op == "call_function" and n.target in (torch.nn.functional.conv2d, torch.conv2d):
            weight = self.fetch_args_kwargs_from_env(n)[0][1]
        else:
            return 0
        if not isinstance(out, Tensor):
            return 0
        return int(weight[0].numel()) * int(out[0].numel())

    def _local(self, n: fx.Node, local: LocalOp, result: Tensor, module, args) -> PatchInfo:
        src = n.args[0]
        in_box = self.infos[src].box
        (kh, kw), (sh, sw), (ph, pw) = local.effective_kernel, local.stride, local.pad
        out_h, out_w = result.shape[-2:]
        spec_y = AxisSpec(kh, sh, ph, in_box.H, out_h)
        spec_x = AxisSpec(kw, sw, pw, in_box.W, out_w)
        oy, oh = geo.local_box(in_box.y, in_box.h, spec_y, self.tau)
        ox, ow = geo.local_box(in_box.x, in_box.w, spec_x, self.tau)
        out_box = Box(oy, ox, oh, ow, out_h, out_w)
        inv_div = _inv_divisor(local, (in_box.H, in_box.W)) if local.op == "avg" else None
        if out_box.is_full:
            return self._dense(n, Kind.LOCAL, [src], f"{_target_name(n)}: patch covers the whole map", result)
        ry, rh = geo.read_window(oy, oh, spec_y)
        rx, rw = geo.read_window(ox, ow, spec_x)
        read = Read(src, Box(ry, rx, rh, rw, in_box.H, in_box.W), local.fill)
        macs_full = self._conv_macs(n, result)
        macs_inc = macs_full * oh * ow // (out_h * out_w) if local.op == "conv" else 0
        return PatchInfo(Kind.LOCAL, PATCHED, out_box, (read,), local, macs_full, macs_inc,
                         inv_divisor=inv_div)

    def _pointwise(self, n: fx.Node, deps: list[fx.Node], result: Any) -> PatchInfo:
        """Point ops keep the box; with several feature maps they merge (eqs. 35-38)."""
        if not _is_tensor4d(result):
            return self._dense(n, Kind.GLOBAL, deps, f"{_target_name(n)}: output is not a feature map", result)
        hw = tuple(result.shape[-2:])
        spatial_clean = []
        for m in n.all_input_nodes:
            info = self.infos[m]
            if info.state is PATCHED:
                if (info.box.H, info.box.W) != hw:
                    return self._dense(n, Kind.GLOBAL, deps, f"{_target_name(n)}: changes the map size", result)
            elif not _broadcasts_spatially(self.env[m]):
                if _is_tensor4d(self.env[m]) and tuple(self.env[m].shape[-2:]) == hw:
                    spatial_clean.append(m)
                else:
                    return self._dense(n, Kind.GLOBAL, deps, f"{_target_name(n)}: unsupported broadcast", result)
        boxes = [self.infos[m].box for m in deps]
        if len(deps) == 1 and not spatial_clean and not boxes[0].is_full:
            return PatchInfo(Kind.POINT, PATCHED, boxes[0])
        # Approximate mode: the union is no larger than its largest input box,
        # so the tau cap also holds across merges (smaller tau never costs more).
        approx = self.tau < 1.0
        uy, uh = geo.union_box([b.y for b in boxes], [b.h for b in boxes], hw[0],
                               cap=max(b.h for b in boxes) if approx else None)
        ux, uw = geo.union_box([b.x for b in boxes], [b.w for b in boxes], hw[1],
                               cap=max(b.w for b in boxes) if approx else None)
        union = Box(uy, ux, uh, uw, *hw)
        if union.is_full:
            return self._dense(n, Kind.MERGE, deps, f"{_target_name(n)}: union covers the whole map", result)
        reads = tuple(Read(m, union) for m in list(deps) + spatial_clean
                      if self.infos[m].state is not PATCHED or not _same_box(self.infos[m].box, union))
        return PatchInfo(Kind.MERGE, PATCHED, union, reads)


def annotate(gm: fx.GraphModule, example: Tensor, patch: tuple[int, ...], starts_y: Tensor,
             starts_x: Tensor, tau: float = 1.0, what: str = "the model") -> PatchProp:
    """Run :class:`PatchProp` on ``gm`` with ``example``; a model that cannot run on it is a ValueError.

    Shared by :func:`krypton_fx.compile` and :func:`krypton_fx.theoretical_speedup`
    so that both fail the same way.
    """
    prop = PatchProp(gm, patch, starts_y, starts_x, tau=tau)
    with torch.no_grad():
        try:
            out = prop.run(example)
        except RuntimeError as e:
            cause = e.__cause__ or e
            detail = " ".join(str(cause).split()) or type(cause).__name__
            raise ValueError(f"{what} cannot run on a {tuple(example.shape)} input: {type(cause).__name__}: "
                             f"{detail}. Hint: check image_size and channels.") from e
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ValueError("the model must return class scores of shape (N, classes); got "
                         f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    return prop
