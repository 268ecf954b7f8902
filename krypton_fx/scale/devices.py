"""Every device of the machine: one :class:`~.files.FileWorker` per device over a shared queue.

Workers are threads of this process, each with its own copy of the model on
its own device, each compiling once: the heavy work runs in torch kernels
(and, on CUDA, in replayed CUDA graphs) that release the GIL, so threads
keep several GPUs busy without pickling the model or starting processes.
``cpu,cpu`` (two CPU workers) is allowed, for testing the pool on a
machine without GPUs; it does not make the CPU faster.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .files import FileJob, FileWorker
from .outputs import Task

__all__ = ["parse_devices", "run_on_devices"]


def parse_devices(text: str) -> list[torch.device]:
    """``all`` (every CUDA device, else the CPU), ``cpu``, or a comma-separated list (``cuda:0,cuda:1``).

    Raises:
        ValueError: an unknown or absent device, or a device named twice (``cpu,cpu`` is allowed).

    Example:
        >>> parse_devices("cpu,cpu")
        [device(type='cpu'), device(type='cpu')]
    """
    text = text.strip().lower()
    if text == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(n)] or [torch.device("cpu")]
    devices = []
    for part in (p.strip() for p in text.split(",")):
        try:
            device = torch.device(part)
        except (RuntimeError, ValueError):
            raise ValueError(f"--devices: {part!r} is not a device; use all, cpu, or cuda:0,cuda:1") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--devices: {part!r} is not a device; use all, cpu, or cuda:0,cuda:1")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--devices {text}: CUDA is not available on this machine; use --devices cpu")
            device = torch.device("cuda", device.index or 0)
            if device.index >= torch.cuda.device_count():
                raise ValueError(f"--devices {text}: this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s); use --devices all")
            if device in devices:
                raise ValueError(f"--devices {text} names {device} twice; name each GPU once")
        devices.append(device)
    if not devices:
        raise ValueError("--devices is empty; use all, cpu, or cuda:0,cuda:1")
    return devices


_DONE = object()


def run_on_devices(job: FileJob, tasks: Sequence[Task], devices: Sequence[torch.device],
                   take: Optional[int] = None) -> Iterator[tuple[Task, dict, Optional[np.ndarray]]]:
    """``(task, row, map)`` for every task, as workers finish them (not in order).

    Each worker takes a few tasks at a time from one shared queue (``take``,
    default: enough for a packed run, but never more than its share of what is
    left), so a fast device does more. An exception in a worker (a model that
    does not compile, say) stops every worker and is raised here.
    """
    if len(devices) == 1:
        yield from FileWorker(job, devices[0]).run(tasks)
        return
    todo: "queue.Queue[Task]" = queue.Queue()
    for t in tasks:
        todo.put(t)
    done: "queue.Queue" = queue.Queue()
    stop = threading.Event()
    take = take or job.chunk

    def next_tasks() -> list[Task]:
        share = max(1, min(take, todo.qsize() // (2 * len(devices))))
        got = []
        while len(got) < share and not stop.is_set():
            try:
                got.append(todo.get_nowait())
            except queue.Empty:
                break
        return got

    def work(device: torch.device) -> None:
        try:
            worker = FileWorker(job, device, copy_model=True)
            while not stop.is_set():
                batch = next_tasks()
                if not batch:
                    break
                for out in worker.run(batch):
                    done.put(out)
        except BaseException as e:  # noqa: B036 -- handed to the caller, who re-raises it
            stop.set()
            done.put(e)
        finally:
            done.put(_DONE)

    threads = [threading.Thread(target=work, args=(d,), name=f"krypton-fx-{d}", daemon=True) for d in devices]
    for t in threads:
        t.start()
    running = len(threads)
    error: Optional[BaseException] = None
    try:
        while running:
            out = done.get()
            if out is _DONE:
                running -= 1
            elif isinstance(out, BaseException):
                error = error or out
            else:
                yield out
    finally:
        stop.set()
        for t in threads:
            t.join()
    if error is not None:
        raise error
