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

Inside :func:`torch_ops` every op runs its torch implementation, whatever the
backend (bit for bit what the kernel computes): a build's first batches run so
while its kernels compile in the background (:mod:`krypton_fx.tiered`), and the
first of them also records the launches it stands in for.

Triton is imported on the first call that launches a kernel, never before: the
package imports and runs (on the torch backend) on machines without Triton
(it is Linux-only). Maps have N spatial axes: the torch ops take any N, the
kernels N = 1, 2 or 3.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
from types import ModuleType
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, fx
from torch.profiler import record_function

from .triton_kernels.reference import gather_window_torch, occlude_window_torch, project_to_full_torch

__all__ = ["BACKENDS", "gather_window", "project_to_full", "occlude_window", "use_triton",
           "launches_kernels", "triton_available", "torch_ops"]

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
    return launches_kernels(backend, tensor.device)


def launches_kernels(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs Triton kernels for data on ``device`` (see :func:`use_triton`)."""
    if backend == "triton":
        return True
    return backend == "auto" and device.type == "cuda" and triton_available()


# Inside torch_ops(): None outside; a list to record the stood-in launches in, or False.
_TORCH_OPS: contextvars.ContextVar[Union[None, bool, list]] = contextvars.ContextVar(
    "krypton_fx_torch_ops", default=None)


@contextlib.contextmanager
def torch_ops(record: Optional[list] = None) -> Iterator[None]:
    """Run the ops' torch implementations (in this thread) even where the backend launches
    Triton kernels; with ``record``, also append to it each launch they stand in for
    (:class:`krypton_fx.triton_kernels.ahead.Launch`: nothing is launched)."""
    token = _TORCH_OPS.set(record if record is not None else False)
    try:
        yield
    finally:
        _TORCH_OPS.reset(token)


def _run(kernels: Optional[_Kernels], launcher: Callable[[_Kernels], Callable], reference: Callable,
         *args) -> Tensor:
    """``launcher(kernels)(*args)``, or ``reference(*args)`` where there are no kernels or
    inside :func:`torch_ops` (recording the launch the kernel would have made)."""
    if kernels is None:
        return reference(*args)
    instead = _TORCH_OPS.get()
    if instead is None:
        return launcher(kernels)(*args)
    if instead is not False:
        from .triton_kernels.ahead import recording
        with recording() as launches:
            launcher(kernels)(*args)
        instead.extend(launches)
    return reference(*args)


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
        return _run(_kernels(backend, stored), lambda k: k.gather.gather_window_triton, gather_window_torch,
                    stored, patch, table, window)


@fx.wrap
def project_to_full(stored: Tensor, patch: Tensor, starts: Tensor, backend: str = "auto") -> Tensor:
    """Projection to full size, N spatial axes; see
    :func:`krypton_fx.triton_kernels.reference.project_to_full_torch`."""
    with record_function("krypton::projection"):
        return _run(_kernels(backend, stored), lambda k: k.projection.project_to_full_triton,
                    project_to_full_torch, stored, patch, starts)


@fx.wrap
def occlude_window(image: Tensor, color: Tensor, table: Tensor, window: Sequence[int],
                   patch_size: Sequence[int], backend: str = "auto",
                   weight: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                   ids: Optional[Tensor] = None, segment: Optional[Tensor] = None,
                   baseline: Optional[Tensor] = None) -> Tensor:
    """Input occlusion, N spatial axes (plain colour, or ``image * weight * scale + color``
    inside the patch, or a segment: where ``ids`` is the row's ``segment``, the ``baseline``
    image or the colour); see :func:`krypton_fx.triton_kernels.reference.occlude_window_torch`."""
    with record_function("krypton::occlusion"):
        return _run(_kernels(backend, image), lambda k: k.occlusion.occlude_window_triton,
                    occlude_window_torch, image, color, table, window, patch_size, weight, scale,
                    ids, segment, baseline)
