"""Running positions through an incremental program in batches.

:class:`BatchRunner` owns what a batch needs besides the program: its size
(the compiled one, or what fits in memory, never above one that ran out of
memory), CUDA-graph replay of a batch size that keeps being used, the torch
ops standing in while a build's Triton kernels compile (:mod:`krypton_fx.tiered`),
and the progress bar. It knows nothing of models or images: the explainer
gives it a program, the stored activations and what to keep of each batch's
output.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch
from torch import Tensor, fx

from . import common
from .tiered import KernelTier

__all__ = ["BatchRunner", "CAPTURE_AFTER", "Keep"]

logger = logging.getLogger(__name__)

# Batches of one size a process runs before the runner captures a CUDA graph for it:
# a capture costs about two eager batches, a replay saves most of one.
CAPTURE_AFTER = 4

# What a run keeps of each batch: ``keep(output, positions) -> values`` (rows in batch order).
Keep = Callable[[Tensor, Tensor], Tensor]


class BatchRunner:
    """Batches of positions through incremental programs on one device.

    Args:
        device: where the programs run.
        cuda_graphs: replay batch sizes in use from CUDA graphs.
        batch_size: the compiled batch, or None to size batches from memory.
    """

    def __init__(self, device: torch.device, cuda_graphs: bool, batch_size: Optional[int]):
        self.device = device
        self.cuda_graphs = cuda_graphs
        self.batch_size = batch_size
        self._graphs: dict = {}
        self._graph_uses: dict = {}  # batches run per (program, batch size), until captured
        self._cap: Optional[int] = None  # the largest batch that fitted after running out of memory

    def default_batch(self, bytes_per_position: int) -> int:
        """Positions per batch: the compiled ``batch_size`` or what fits in memory (at most the
        largest batch that fitted, once a batch has run out of memory)."""
        batch = self.batch_size or common.default_batch_size(self.device, bytes_per_position)
        return min(batch, self._cap or batch)

    def batch_for(self, batch_size: Optional[int], bytes_per_position: int) -> int:
        """The batch a call with ``batch_size`` (None: the default) runs: never above one that
        has run out of memory."""
        batch = common.batch_size(batch_size) or self.default_batch(bytes_per_position)
        return min(batch, self._cap or batch)

    def clear(self) -> None:
        """Forget the captured graphs (a new build: their programs are gone)."""
        self._graphs.clear()
        self._graph_uses.clear()

    def run(self, module: fx.GraphModule, positions: Tensor, stored: list[Tensor], batch: int,
            progress: bool, keep: Keep, tier: KernelTier) -> Tensor:
        """``keep(output, positions)`` of every batch of ``positions`` through ``module``,
        concatenated on the CPU; a batch that runs out of memory is halved and the run goes on."""
        if not self.cuda_graphs:
            batch = min(batch, len(positions))  # a CUDA graph pads a short batch to its own size
        batch = max(1, batch)
        positions = positions.to(self.device)
        kept = []
        with common.progress_bar(-(-len(positions) // batch), progress, "krypton_fx", unit="batch") as bar:
            run, lo = None, 0
            ready = tier.ready
            while lo < len(positions):
                if not ready and tier.ready:  # the kernels compiled: on to them (and graphs)
                    run, ready = None, True
                try:
                    if run is None:  # (capturing a CUDA graph allocates too)
                        run = self._runner(batch, stored, -(-(len(positions) - lo) // batch), module,
                                           None if ready else tier)
                    chunk = positions[lo:lo + batch]
                    kept.append(keep(run(chunk), chunk))
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not common.is_out_of_memory(e) or batch == 1:
                        raise
                    batch, run = self._shrink(batch, e), None
                    bar.total = bar.n + -(-(len(positions) - lo) // batch)
                    continue
                bar.update(1)
                lo += batch
        # One device-to-host copy at the end: no synchronisation per batch.
        return torch.cat(kept).cpu() if kept else torch.empty(0)

    def _shrink(self, batch: int, error: BaseException) -> int:
        """Halve the batch after it ran out of memory; later runs start from the smaller one."""
        smaller = batch // 2
        logger.warning("a batch of %d positions ran out of memory on %s (%s): going on with %d",
                       batch, self.device, common.first_line(error), smaller)
        self._cap = smaller
        self._graphs.clear()  # their memory is what a smaller batch needs
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return smaller

    def _runner(self, batch: int, stored: list[Tensor], batches: int, module: fx.GraphModule,
                compiling: Optional[KernelTier] = None) -> Callable[[Tensor], Tensor]:
        """The program for this batch size: CUDA-graph replay where it pays.

        Capturing costs a few eager runs of the graph: a graph is captured
        once this batch size has run :data:`CAPTURE_AFTER` batches in this
        process (this call's included), and then kept, one per batch size in
        use (a short batch is padded to its graph's size, never captured
        anew). Until then batches run eagerly, padded to the same size. While
        the build's kernels still compile (``compiling``: its tier), batches run
        on the torch ops (:mod:`krypton_fx.tiered`) and nothing is captured.
        """
        if compiling is not None:
            eager = functools.partial(compiling.run, module, stored=stored)
        else:
            eager = lambda pos: module(pos, *stored)  # noqa: E731
        if not self.cuda_graphs:
            return eager
        from .cuda_graphs import GraphedBatch, padded
        if compiling is not None:
            return padded(eager, batch)
        # A graph holds raw pointers: capture again if parameters were replaced
        # (model.to(...), say) since it was captured. One set of graphs per program.
        pointers = tuple(t.data_ptr() for t in module.state_dict().values())
        for key in [k for k in self._graphs if k[0] is module and k[2] != pointers]:
            del self._graphs[key]
        runner = self._graphs.get((module, batch, pointers))
        if runner is None:
            uses = self._graph_uses[(module, batch)] = self._graph_uses.get((module, batch), 0) + batches
            if uses < CAPTURE_AFTER:
                return padded(eager, batch)
            runner = self._graphs[(module, batch, pointers)] = GraphedBatch(module, batch, stored)
        runner.load(stored)
        return runner
