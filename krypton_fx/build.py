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

from .ops import BACKENDS
from .passes.patch_prop import PatchProp, State
from .passes.rewrite import NO_FILL, IncrementalProgram, PatchFill
from .tiered import KernelTier

__all__ = ["Settings", "Build", "CompileCache", "check_same_output", "bytes_per_position", "check_backend"]


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


def check_same_output(model: nn.Module, image: Tensor, traced: Tensor) -> None:
    """Raise if the traced graph's output differs from the model's own on ``image``."""
    eager = model(image.clone())
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
