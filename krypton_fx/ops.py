"""Backend dispatch for the incremental graph's gather nodes.

The rewritten graph calls these functions; each picks the Triton kernel or
the torch implementation from the static ``backend`` argument the rewrite
baked into the node and the device of the data:

- ``"torch"``: always torch ops;
- ``"triton"``: always the Triton kernel (on the CPU only under
  ``TRITON_INTERPRET=1``);
- ``"auto"``: Triton for CUDA tensors, torch otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, fx
from torch.profiler import record_function

from .triton_kernels.gather import gather_window_torch
from .triton_kernels.occlusion import occlude_window_torch
from .triton_kernels.projection import project_to_full_torch

__all__ = ["BACKENDS", "gather_window", "project_to_full", "occlude_window", "use_triton"]

BACKENDS = ("auto", "torch", "triton")


def use_triton(backend: str, tensor: Tensor) -> bool:
    """Whether ``backend`` runs Triton kernels for data on ``tensor``'s device."""
    if backend == "triton":
        return True
    return backend == "auto" and tensor.is_cuda


@fx.wrap
def gather_window(stored: Tensor, patch: Optional[Tensor], table: Tensor, window: tuple[int, int],
                  backend: str = "auto") -> Tensor:
    """Gather with superimposition; see :mod:`krypton_fx.triton_kernels.gather`."""
    with record_function("krypton::gather"):
        if use_triton(backend, stored):
            from .triton_kernels.gather import gather_window_triton
            return gather_window_triton(stored, patch, table, window)
        return gather_window_torch(stored, patch, table, window)


@fx.wrap
def project_to_full(stored: Tensor, patch: Tensor, starts: Tensor, backend: str = "auto") -> Tensor:
    """Projection to full size; see :mod:`krypton_fx.triton_kernels.projection`."""
    with record_function("krypton::projection"):
        if use_triton(backend, stored):
            from .triton_kernels.projection import project_to_full_triton
            return project_to_full_triton(stored, patch, starts)
        return project_to_full_torch(stored, patch, starts)


@fx.wrap
def occlude_window(image: Tensor, color: Tensor, table: Tensor, window: tuple[int, int],
                   patch_hw: tuple[int, int], backend: str = "auto") -> Tensor:
    """Input occlusion; see :mod:`krypton_fx.triton_kernels.occlusion`."""
    with record_function("krypton::occlusion"):
        if use_triton(backend, image):
            from .triton_kernels.occlusion import occlude_window_triton
            return occlude_window_triton(image, color, table, window, patch_hw)
        return occlude_window_torch(image, color, table, window, patch_hw)
