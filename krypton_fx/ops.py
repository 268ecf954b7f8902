"""Backend dispatch for the incremental graph's gather nodes.

The rewritten graph calls these functions; each picks the Triton kernel or
the torch implementation from the static ``backend`` argument the rewrite
baked into the node and the device of the data:

- ``"torch"``: always torch ops;
- ``"triton"``: always the Triton kernel (on the CPU only under
  ``TRITON_INTERPRET=1``); an ImportError that says what to do where Triton
  cannot be imported;
- ``"auto"``: Triton for CUDA tensors, torch otherwise, and torch for CUDA
  tensors too where Triton cannot be imported (logged once, at INFO).

Triton is imported on the first call that launches a kernel, never before: the
package imports and runs (on the torch backend) on machines without Triton
(it is Linux-only). Maps have N spatial axes: the torch ops take any N, the
kernels N = 1, 2 or 3.
"""

from __future__ import annotations

import functools
import logging
import threading
from types import ModuleType
from typing import NamedTuple, Optional, Sequence, Union

from torch import Tensor, fx
from torch.profiler import record_function

from .triton_kernels.reference import gather_window_torch, occlude_window_torch, project_to_full_torch

__all__ = ["BACKENDS", "gather_window", "project_to_full", "occlude_window", "use_triton",
           "triton_available"]

BACKENDS = ("auto", "torch", "triton")

logger = logging.getLogger(__name__)


class _Kernels(NamedTuple):
    """The kernel modules, looked up per call (tests replace their launchers)."""

    gather: ModuleType
    projection: ModuleType
    occlusion: ModuleType


@functools.cache
def _import_kernels() -> Union[_Kernels, ImportError]:
    """The kernel modules, or why they cannot be imported (cached: a missing Triton
    stays missing, and a failed import would otherwise search the path every call)."""
    try:
        from .triton_kernels import gather, occlusion, projection
    except ImportError as e:
        return e
    return _Kernels(gather, projection, occlusion)


def triton_available() -> bool:
    """Whether Triton (and so the kernels) can be imported here; imports it if so.

    Example:
        >>> isinstance(triton_available(), bool)
        True
    """
    return isinstance(_import_kernels(), _Kernels)


_fallback_logged = threading.Event()


def use_triton(backend: str, tensor: Tensor) -> bool:
    """Whether ``backend`` runs Triton kernels for data on ``tensor``'s device: always
    for ``"triton"``, for CUDA tensors with ``"auto"`` where Triton can be imported."""
    if backend == "triton":
        return True
    return backend == "auto" and tensor.is_cuda and triton_available()


def _kernels(backend: str, tensor: Tensor) -> Optional[_Kernels]:
    """The kernel modules if this call launches a kernel, None for the torch ops."""
    if backend == "torch" or (backend == "auto" and not tensor.is_cuda):
        return None
    kernels = _import_kernels()
    if isinstance(kernels, _Kernels):
        return kernels
    if backend == "triton":
        raise ImportError(
            f"backend='triton' needs Triton, which cannot be imported here ({kernels}). "
            "Install it (pip install triton; Linux only), or use backend='auto', which "
            "runs the torch ops where Triton is missing, or backend='torch'") from kernels
    if not _fallback_logged.is_set():
        _fallback_logged.set()
        logger.info("Triton cannot be imported (%s): backend='auto' runs the torch ops "
                    "on CUDA tensors too (slower; pip install triton on Linux)", kernels)
    return None


@fx.wrap
def gather_window(stored: Tensor, patch: Optional[Tensor], table: Tensor, window: Sequence[int],
                  backend: str = "auto") -> Tensor:
    """Gather with superimposition, N spatial axes; see
    :func:`krypton_fx.triton_kernels.reference.gather_window_torch`."""
    with record_function("krypton::gather"):
        kernels = _kernels(backend, stored)
        if kernels is not None:
            return kernels.gather.gather_window_triton(stored, patch, table, window)
        return gather_window_torch(stored, patch, table, window)


@fx.wrap
def project_to_full(stored: Tensor, patch: Tensor, starts: Tensor, backend: str = "auto") -> Tensor:
    """Projection to full size, N spatial axes; see
    :func:`krypton_fx.triton_kernels.reference.project_to_full_torch`."""
    with record_function("krypton::projection"):
        kernels = _kernels(backend, stored)
        if kernels is not None:
            return kernels.projection.project_to_full_triton(stored, patch, starts)
        return project_to_full_torch(stored, patch, starts)


@fx.wrap
def occlude_window(image: Tensor, color: Tensor, table: Tensor, window: Sequence[int],
                   patch_size: Sequence[int], backend: str = "auto",
                   weight: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
    """Input occlusion, N spatial axes (plain colour, or ``image * weight * scale + color``
    inside the patch); see :func:`krypton_fx.triton_kernels.reference.occlude_window_torch`."""
    with record_function("krypton::occlusion"):
        kernels = _kernels(backend, image)
        if kernels is not None:
            return kernels.occlusion.occlude_window_triton(image, color, table, window,
                                                           patch_size, weight, scale)
        return occlude_window_torch(image, color, table, window, patch_size, weight, scale)
