"""Tiered execution: a build runs on the torch ops until its Triton kernels are compiled.

On a GPU the first call of a fresh process used to wait for Triton to compile
every kernel specialisation of the incremental graph, one after the other, and
then for a CUDA-graph capture: 2.5 s for a ResNet18 on an H200, against 0.8 s
for the whole naive map. Now a build starts in the lower tier: its first batch
runs the gathers on the torch ops (bit for bit what the kernels compute: the
same copies, the occlusion's arithmetic in the same order without FMA) and
records the launches the kernels would have made; those specialisations then
compile in the background, in parallel
(:func:`krypton_fx.triton_kernels.ahead.compile_ahead`). Batches keep running on
the torch ops, uncaptured, until the compile is done; the next batch, in the
same call or a later one, switches to the kernels, and CUDA graphs are
captured from then on (a module loaded during a capture would break it).

Nothing changes on the CPU, with ``backend="torch"``, or under
``TRITON_INTERPRET=1`` (nothing compiles there). ``KRYPTON_FX_TIERED=0`` turns
tiers off: each kernel then compiles at its first launch, as before
(``bench/cold_start.py`` times both).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, wait
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import ops

__all__ = ["KernelTier", "jit_compiles", "wait_for_kernels"]

_in_flight: set[Future] = set()  # background compiles not yet ended
_in_flight_lock = threading.Lock()


def wait_for_kernels(timeout: Optional[float] = None) -> None:
    """Block until every kernel compile started in the background has ended (or ``timeout``
    seconds). Benchmarks call it before timing warm runs, which should time the kernels,
    not the torch ops that stand in for them meanwhile."""
    with _in_flight_lock:
        pending = list(_in_flight)
    wait(pending, timeout)


def jit_compiles() -> bool:
    """Whether Triton compiles kernels here (not under its interpreter), and tiers are on."""
    return os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("KRYPTON_FX_TIERED", "1") != "0"


class KernelTier:
    """Which tier a build's batches run in, and the compile that moves it up.

    Args:
        backend: the build's backend.
        device: its device.
    """

    def __init__(self, backend: str, device: torch.device):
        self.needed = jit_compiles() and ops.launches_kernels(backend, device)
        if self.needed and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # the compile runs on another thread
        self.device = device
        self.compiling: Optional[Future] = None

    @property
    def ready(self) -> bool:
        """Whether batches run on the kernels: none are needed, or their compile has ended
        (when it failed, the kernels compile on their first launch, as without this)."""
        return not self.needed or (self.compiling is not None and self.compiling.done())

    def run(self, module, positions: Tensor, stored: Sequence[Tensor]) -> Tensor:
        """One batch on the torch ops; the first also records the kernel launches and
        starts compiling them."""
        if self.compiling is not None:
            with ops.torch_ops():
                return module(positions, *stored)
        launches: list = []
        with ops.torch_ops(record=launches):
            out = module(positions, *stored)
        from .triton_kernels import ahead
        self.compiling = ahead.compile_ahead(launches, self.device)
        with _in_flight_lock:
            _in_flight.add(self.compiling)
        self.compiling.add_done_callback(_ended)
        return out


def _ended(future: Future) -> None:
    with _in_flight_lock:
        _in_flight.discard(future)
