"""What one compile is made of: the checked :class:`Settings` it was given,
the :class:`Build` it produces from the model as it is at one moment, and the
checks around them (the backend, the traced graph against the model)."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import Tensor, fx, nn

from . import common
from .ops import BACKENDS
from .passes.norms import NORM_STATS
from .passes.patch_prop import PatchProp, State
from .passes.rewrite import NO_FILL, IncrementalProgram, PatchFill
from .targets import SegmentationTarget, select_output
from .tiered import KernelTier

__all__ = ["Settings", "Build", "CompileCache", "make_settings", "check_same_output", "bytes_per_position",
           "check_backend", "check_target"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What :func:`compile` was given, checked and normalised.

    Attributes:
        patch: occlusion patch, one int per spatial axis (``(h, w)`` for images).
        stride: between positions, one int per spatial axis.
        color: patch colour in the model's input space: one float, or one per channel.
        image_size: spatial size of the images the explainer takes: ``(H, W)``,
            ``(D, H, W)`` for volumes, ``(L,)`` for signals.
        channels: image channels, or None: from the model's first layer (else the colour,
            else the first image; :attr:`Explainer.channels`).
        tau: projective-field threshold; 1.0 is exact.
        batch_size: positions per batch, or None to size batches from memory.
        device: where the graphs run.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the gather nodes.
        output: ``"prob"`` or ``"logit"``.
        cuda_graphs: replay batches from CUDA graphs.
        leaf_modules: module types kept opaque when tracing.
        autowrap_functions: functions kept opaque when tracing.
        axis_starts: explicit patch starts per axis (their product is the grid),
            instead of multiples of ``stride``; None: multiples of ``stride``.
        fill: what the patch holds beyond a colour (MONAI's occlusion modes).
        target: a dense output's target (segmentation), or None: class scores.
        norm_stats: ``"exact"`` or ``"frozen"`` (instance/group/layer norms use the unoccluded
            image's statistics: approximate, incremental).
    """

    patch: tuple[int, ...]
    stride: tuple[int, ...]
    color: tuple[float, ...]
    image_size: tuple[int, ...]
    channels: Optional[int]
    tau: float
    batch_size: Optional[int]
    device: torch.device
    backend: str
    output: str
    cuda_graphs: bool
    leaf_modules: tuple[type, ...] = ()
    autowrap_functions: tuple[Callable, ...] = ()
    axis_starts: Optional[tuple[tuple[int, ...], ...]] = None
    fill: PatchFill = NO_FILL
    target: Optional[SegmentationTarget] = None
    norm_stats: str = "exact"


@dataclasses.dataclass
class Build:
    """Everything compiled from the model as it was at one moment."""

    graph_module: fx.GraphModule
    program: IncrementalProgram
    dtype: torch.dtype
    color: Tensor
    bytes_per_position: int
    signature: tuple
    tier: KernelTier  # whether its batches run on the Triton kernels yet
    spatial: dict[str, tuple[int, ...]]  # spatial shape of each stored node's map
    verified: bool = False
    packed: Optional[IncrementalProgram] = None  # for several images a batch (packing.py), made once needed
    # More programs over the same graph, by key, made once needed (segment buckets: ablation.py).
    programs: dict = dataclasses.field(default_factory=dict)
    # Pack sizes (images) compared with one call so far, and whether the bits were the same.
    packs_checked: dict[int, bool] = dataclasses.field(default_factory=dict)

    @property
    def pack_failed(self) -> bool:
        """Whether a pack of this build gave other bits than one call (then images go one at a time)."""
        return not all(self.packs_checked.values())


def check_same_output(model: nn.Module, image: Tensor, traced: Tensor, key: Optional[str] = None) -> None:
    """Raise if the traced graph's output differs from the model's own on ``image`` (``key``: the
    entry of a dict output that ``traced`` is)."""
    eager = model(image.clone())
    if key is not None:
        eager = select_output(eager, key)
    if not isinstance(eager, Tensor) or eager.shape != traced.shape:
        raise ValueError(f"the traced graph of {type(model).__name__} returns {tuple(traced.shape)} but the "
                         f"model returns {tuple(getattr(eager, 'shape', ()))}; krypton_fx cannot explain it")
    eps = torch.finfo(eager.dtype).eps
    scale = max(1.0, float(eager.abs().max()))
    diff = float((eager.float() - traced.float()).abs().max())
    if diff > 64 * eps * scale:
        raise ValueError(
            f"the traced graph of {type(model).__name__} does not reproduce the model's output "
            f"(they differ by {diff:.3g}): its forward has effects that torch.fx cannot record, such "
            "as an in-place update (y += ...) of a tensor that is read again later, Python-side state or "
            "randomness. Hint: write such updates out of place (y = y + ...)")


def check_target(target: Optional[SegmentationTarget], output: str, norm_stats: str) -> None:
    """Check compile's ``target=`` (with ``output=``) and ``norm_stats=``."""
    if target is not None:
        if not isinstance(target, SegmentationTarget):
            raise TypeError(f"target must be a krypton_fx.SegmentationTarget or None, got {type(target).__name__}")
        if output != "prob":
            raise ValueError("with target= give the output in the target: SegmentationTarget(..., output=...)")
    if norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")


def bytes_per_position(prop: PatchProp) -> int:
    """Rough peak memory one position needs: a few of the largest activations it touches."""
    sizes = []
    for n, shape in prop.shapes.items():
        info = prop.infos[n]
        maps = len(shape) >= 3  # (N, C, *spatial)
        if info.state is State.PATCHED and maps:
            sizes.append(shape[1] * math.prod(info.box.sizes))
        elif info.state is State.DENSE:
            sizes.append(math.prod(shape[1:]))
        for read in info.reads:
            sizes.append(shape[1] * math.prod(read.window.sizes) if maps else 0)
    sizes.sort(reverse=True)
    return 4 * 2 * sum(sizes[:3]) if sizes else 1 << 20


def check_backend(backend: str, device: torch.device) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs a CUDA device (this explainer runs on {device.type}); "
                         "use backend='auto' or 'torch', or set TRITON_INTERPRET=1 to run the kernels "
                         "slowly on the CPU (for tests)")


class CompileCache:
    """The explainers of the last ``size`` compiles, newest last, by model (identity) and
    :class:`Settings`: one compile per model and settings, whoever asks."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: nn.Module, settings: Settings, make: Callable):
        """The cached explainer of ``model`` and ``settings``, else ``make(model, settings)``, cached."""
        key = (id(model), settings)
        with self._lock:
            ex = self._entries.get(key)
            if ex is not None and ex.model is model:  # (not a new model at a dead one's address)
                self._entries.move_to_end(key)
                return ex
        ex = make(model, settings)
        with self._lock:
            self._entries[key] = ex
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return ex

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def make_settings(model: nn.Module, patch, stride, color, image_size, tau, batch_size, device, backend: str,
                  output: str, channels, leaf_modules, autowrap_functions, cuda_graphs, axis_starts, fill,
                  target, norm_stats) -> Settings:
    """:func:`krypton_fx.compile`'s arguments checked and normalised (one clear error for each bad one);
    moves ``model`` to the device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = common.spatial_size(image_size)
    nd = len(size)
    patch_t, stride_t = common.int_tuple(patch, nd, "patch"), common.int_tuple(stride, nd, "stride")
    if any(p > n for p, n in zip(patch_t, size)):
        raise ValueError(f"patch {patch_t} is larger than the image {size}; use a smaller patch "
                         "or a larger image_size")
    if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and 0.0 < tau <= 1.0):
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    check_target(target, output, norm_stats)
    output = common.output_kind(output)
    batch_size = common.batch_size(batch_size)
    dev = common.resolve_device(device, model)
    check_backend(backend, dev)
    if cuda_graphs and dev.type != "cuda":
        raise ValueError("cuda_graphs=True needs a CUDA device; leave it None on the CPU")
    if channels is not None:
        channels = common.batch_size(channels, "channels")
    # One value, or one per channel (checked against the channels when they are known).
    given = channels or max(1, torch.as_tensor(color, dtype=torch.float64).numel())
    color_values = tuple(float(v) for v in common.color_values(color, given, torch.float64))
    common.color_values(color, given, common.model_dtype(model))  # fails now, not at the first call
    model.to(dev)
    starts = None
    if axis_starts is not None:
        starts = tuple(tuple(int(v) for v in axis) for axis in axis_starts)
        if len(starts) != nd or any(not axis or min(axis) < 0 or max(axis) + p > n
                                    for axis, p, n in zip(starts, patch_t, size)):
            raise ValueError(f"axis_starts must give {nd} non-empty lists of starts at which the patch "
                             f"{patch_t} fits inside {size}")
    return Settings(patch_t, stride_t, color_values, size, channels, float(tau), batch_size,
                    dev, backend, output, dev.type == "cuda" if cuda_graphs is None else bool(cuda_graphs),
                    tuple(leaf_modules), tuple(autowrap_functions), starts, fill or NO_FILL, target, norm_stats)
