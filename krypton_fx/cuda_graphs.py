"""CUDA-graph replay of the incremental graph.

The incremental graph has static shapes for a given batch size: its many
small kernels (gathers, convs on small windows, point ops) are cheap on the
GPU, and launching them one by one from Python costs more than running them.
Capturing one batch as a CUDA graph and replaying it removes that overhead.
Positions and stored activations are copied into static buffers; a short
last batch is padded by repeating its last position and cut afterwards.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["GraphedBatch", "padded"]


def padded(run: Callable[[Tensor], Tensor], batch: int) -> Callable[[Tensor], Tensor]:
    """``run`` on positions padded to ``batch`` rows (the last repeated), cut back: every
    batch the size a captured graph runs, so a map's bits do not depend on whether its
    batches ran eagerly or from the graph, nor on the rows beside it."""
    def call(positions: Tensor) -> Tensor:
        n = positions.shape[0]
        if n == batch:
            return run(positions)
        return run(torch.cat([positions, positions[-1:].expand(batch - n)]))[:n]
    return call


class GraphedBatch:
    """``module(positions, *stored)`` for ``len(positions) <= batch``, replayed from a CUDA graph.

    Args:
        module: the incremental graph.
        batch: the static batch size.
        stored: example stored activations (shapes, dtypes and device are
            fixed from here on).
    """

    def __init__(self, module: Callable, batch: int, stored: Sequence[Tensor]):
        device = stored[0].device if stored else torch.device("cuda")
        self.batch = batch
        self.positions = torch.zeros(batch, dtype=torch.int64, device=device)
        self.stored = [s.clone(memory_format=torch.preserve_format) for s in stored]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuDNN picks algorithms
            for _ in range(2):
                module(self.positions, *self.stored)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls meanwhile (a worker on another device, a
        # kernel compiled in the background) neither fail nor break this capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = module(self.positions, *self.stored)

    def load(self, stored: Sequence[Tensor]) -> None:
        """Copy one image's stored activations into the graph's buffers."""
        for dst, src in zip(self.stored, stored):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)

    def __call__(self, positions: Tensor) -> Tensor:
        n = positions.shape[0]
        self.positions[:n].copy_(positions)
        if n < self.batch:
            self.positions[n:].copy_(positions[-1:].expand(self.batch - n))
        self.graph.replay()
        return self.output[:n].clone()  # the next replay overwrites the static output
