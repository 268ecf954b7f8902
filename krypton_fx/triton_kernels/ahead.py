"""Compiling a graph's kernels before their first launch, in the background.

Triton compiles a kernel the first time it is launched with a new
specialisation (constexprs, dtypes, alignment), one after the other: about
0.13 s each on a fast CPU, plus half a second for the first of a process, and
a ResNet18's incremental graph needs seven. A cold first call waited for all
of them before its first batch could run. Instead (see :mod:`krypton_fx.tiered`),
the first batch of a build runs on the torch ops while :func:`recording` notes
the launches the kernels would have made, and :func:`compile_ahead` compiles
those specialisations in parallel, on daemon threads, through Triton's own
``AsyncCompileMode`` and ``JITFunction.warmup`` (the compiled kernels land in
Triton's caches exactly where a launch looks them up).

The launchers launch through :func:`launch`, which is where a recording
replaces the launch. The recording is per thread (a context variable): other
threads' launches are never touched.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import torch
import triton
from torch import Tensor
from triton.runtime.jit import MockTensor

__all__ = ["Launch", "Pointer", "launch", "recording", "compile_ahead"]

logger = logging.getLogger(__name__)


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **kwargs)``, its tensors replaced by
    :class:`Pointer` (all a compile reads of them, holding no memory)."""

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict


_RECORDING: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("krypton_fx_recording",
                                                                            default=None)


class Pointer(MockTensor):
    """A tensor argument as Triton specialises a kernel on it: its dtype and address
    (alignment), without its memory; Triton's ``MockTensor`` with the real address."""

    def __init__(self, tensor: Tensor):
        super().__init__(tensor.dtype, list(tensor.shape))
        self.address = tensor.data_ptr()

    def data_ptr(self) -> int:  # type: ignore[override]
        return self.address


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or, inside :func:`recording` (in this thread),
    the launch recorded instead of run."""
    recorded = _RECORDING.get()
    if recorded is None:
        kernel[grid](*args, **kwargs)
    else:
        args = tuple(Pointer(a) if isinstance(a, Tensor) else a for a in args)
        recorded.append(Launch(kernel, grid, args, kwargs))


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Record the launches of this thread's launchers instead of running them (their
    outputs stay uninitialised); yields the list they are appended to.

    Example:
        >>> with recording() as launches:  # doctest: +SKIP
        ...     gather_window_triton(stored, None, table, (3, 3))
        >>> launches[0].kwargs["BLOCK_J"]  # doctest: +SKIP
        8
    """
    launches: list[Launch] = []
    token = _RECORDING.set(launches)
    try:
        yield launches
    finally:
        _RECORDING.reset(token)


class _DaemonThreads(Executor):
    """One daemon thread per job, at most ``workers`` at a time: a compile still running
    when the program ends does not hold up its exit (a ThreadPoolExecutor's workers would)."""

    def __init__(self, workers: int):
        self._slots = threading.BoundedSemaphore(workers)

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        future: Future = Future()

        def work() -> None:
            with self._slots:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to whoever waits on the future
                    future.set_exception(e)

        threading.Thread(target=work, name="krypton-fx-compile", daemon=True).start()
        return future


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


def compile_ahead(launches: Sequence[Launch], device: torch.device) -> Future:
    """Compile the kernels of ``launches`` for ``device`` in the background, in parallel.

    Returns a future that is done when every specialisation is compiled (its result:
    the seconds it took), or holds the exception that stopped it; either way a later
    launch is correct, at worst it compiles what is missing itself. Identical
    specialisations compile once.
    """
    done: Future = Future()
    launches = list(launches)

    def work() -> None:
        start = time.perf_counter()
        try:
            with contextlib.ExitStack() as scope:
                if device.type == "cuda":
                    scope.enter_context(torch.cuda.device(device))  # Triton compiles for the current one
                async_mode = getattr(triton, "AsyncCompileMode", None)  # Triton >= 3.4
                if async_mode is not None:  # else one after the other, still in the background
                    scope.enter_context(async_mode(_DaemonThreads(_workers())))
                for item in launches:
                    item.kernel.warmup(*item.args, grid=item.grid, **item.kwargs)
            # (leaving AsyncCompileMode waits for every compile and installs the kernels)
        except BaseException as e:
            logger.info("compiling %d kernel launches ahead failed (%s): they compile when first launched",
                        len(launches), e)
            done.set_exception(e)
            return
        seconds = time.perf_counter() - start
        logger.info("compiled the kernels of %d launches in %.2f s, in the background", len(launches), seconds)
        done.set_result(seconds)

    threading.Thread(target=work, name="krypton-fx-compile-ahead", daemon=True).start()
    return done
