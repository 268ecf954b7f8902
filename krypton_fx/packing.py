"""Several images' positions in one batch (``Explainer.run_many``).

An image with fewer positions than a batch (a small image, a strided map) fills
only part of one; on a GPU the rest of the device idles, and every batch pays
the graph's fixed cost. A *packed* program (``rewrite(..., packing=)``) runs
the positions of G images together: row ``r`` of a batch is position ``r % P``
of image ``r // P``, and each stored activation holds the G images' maps
stacked along the first spatial axis, so every gather reads its own image's
window by adding ``image * extent`` to the window's start. The kernels do not
change.

Exact, and by default the same bits as one call per image (``pack=True``
trades that for throughput where batches have no fixed size, below): each
image's unoccluded pass still runs alone (a batched one rounds differently),
and with CUDA graphs every batch has the graph's size (short ones padded,
captured or not), so a row's result depends only on that row's inputs, never
on which rows share its batch.
Without graphs a short batch keeps its own size, and the libraries pick their
algorithms by batch size (on the CPU, oneDNN's convolutions round batches of
fewer than 16 rows differently, and a small matrix product such as a 10-to-5
linear head rounds 17 rows differently from 30): there, and with per-image fill
inputs (MONAI's ``mean_patch`` and ``mean_img``), ``run_many`` runs one image at
a time. That a row's result does not depend on its batch at one fixed size is
what the libraries do, not what they promise, so the first pack of each build
also runs its first image alone and compares the bits; where they differ, the
build goes one image at a time from then on. ``pack=True`` packs anyway, on the
CPU too: its maps equal one call's up to float rounding. ``tests/test_packing.py``
checks the packed maps bit for bit.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor

from . import common
from .passes.rewrite import IncrementalProgram, Packing, channels_last, rewrite
from .results import OcclusionResult, RunStats

if TYPE_CHECKING:
    from .explainer import Explainer

__all__ = ["pack_batch", "run_packed"]

logger = logging.getLogger(__name__)

# Memory for the stacked stored activations of one pack.
_CPU_BUDGET = 512 << 20
_CUDA_BUDGET = 4 << 30


def pack_batch(ex: Explainer, images: int, batch_size: Optional[int], pack: Optional[bool] = None) -> Optional[int]:
    """The batch ``images`` images share, or None where they run one at a time.

    ``pack=None`` packs where a row's bits do not depend on its batch: with
    batches of one fixed size (CUDA graphs; see the module's docstring) and no
    earlier pack of this build that differed from one call. ``pack=True``
    packs on any device (maps equal to one call's up to float rounding);
    ``False`` never. Images pack when there are several, with no per-image fill
    inputs, and fewer positions an image than a batch. The cheap conditions
    come first: the batch needs the build (a compile on a blank image where
    there is none yet).
    """
    fill = ex.settings.fill
    if pack is False or images < 2 or fill.scaled or fill.image_color:
        return None
    if pack is None and (not ex.cuda_graphs or (ex._build is not None and ex._build.pack_checked is False)):
        return None
    batch = ex._batch_for(batch_size)
    return batch if ex.positions < batch else None


def _images_per_pack(ex: Explainer, images: int, batch: int, stored: Sequence[Tensor]) -> int:
    """Enough images to fill ``batch`` rows with positions (at most ``batch``), within the
    memory budget of their stacked stored activations (``stored``: one image's)."""
    per_image = sum(t.numel() * t.element_size() for t in stored)
    budget = _CPU_BUDGET
    if ex.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(ex.device)
        budget = min(_CUDA_BUDGET, free // 8)
    return max(1, min(images, batch, budget // max(1, per_image)))


def packed_program(ex: Explainer) -> IncrementalProgram:
    """The explainer's packed program for its current build (made once)."""
    build = ex._current()
    if build.packed is None:
        s = ex.settings
        build.packed = rewrite(build.graph_module, backend=s.backend, color=build.color, fill=s.fill,
                               packing=Packing(ex.positions, build.spatial))
        build.packed.module.to(s.device)
    return build.packed


def run_packed(ex: Explainer, images: Tensor, labels: Sequence[Optional[int]],
               batch: int, check: bool = True) -> list[OcclusionResult]:
    """Heat maps of ``images`` (``(N, C, *spatial)``), several images per batch; with
    ``check``, the first pack of a build is checked against one call, bit for bit."""
    start = time.perf_counter()
    first = ex._prepare_all(images[:1])
    group = _images_per_pack(ex, len(images), batch, first[0][1])
    results: list[OcclusionResult] = []
    for lo in range(0, len(images), group):
        if lo:
            start = time.perf_counter()
        prepared = first + ex._prepare_all(images[1:group]) if lo == 0 else ex._prepare_all(images[lo:lo + group])
        results += _run_pack(ex, prepared, labels[lo:lo + group], batch, group, start, check)
    return results


def _run_pack(ex: Explainer, prepared: list, labels: Sequence[Optional[int]], batch: int, group: int,
              start: float, check: bool) -> list[OcclusionResult]:
    picked, bases = [], []
    for (logits, _), label in zip(prepared, labels):
        label = common.label_index(label, logits.shape[-1])
        picked.append(int(logits.argmax(1)) if label is None else label)
        bases.append(float(common.scores(logits, picked[-1], ex.output)))
    # Each stored map stacked along the first spatial axis; a short pack is padded to
    # `group` images (the same shapes for every pack: a CUDA graph is captured once).
    stacks = []
    for i in range(len(prepared[0][1])):
        maps = [stored[i] for _, stored in prepared]
        maps += [maps[-1]] * (group - len(maps))
        stacks.append(torch.cat(maps, 2).contiguous(memory_format=channels_last(maps[0].dim() - 2)))
    count = ex.positions
    row_labels = torch.tensor(picked).repeat_interleave(count).to(ex.device)
    program = packed_program(ex)
    program.refresh_weights()
    scores = ex._run(torch.arange(len(prepared) * count), stacks, batch, False,
                     lambda logits, rows: common.scores(logits, row_labels[rows], ex.output),
                     module=program.module)
    build = ex._build
    if check and build.pack_checked is None:
        # A row's bits not depending on its batch is what the libraries do (measured; see the
        # module's docstring), not what they promise: the first pack of a build checks it on
        # its first image, and where it fails, images go one at a time from here on.
        alone = ex.run_positions(torch.arange(count), prepared[0][1], picked[0], batch)
        build.pack_checked = torch.equal(alone, scores[:count])
        if not build.pack_checked:
            logger.warning("a packed batch gave %s's map other bits than one call (max difference %.3g) on %s: "
                           "explaining one image at a time", type(ex.model).__name__,
                           float((alone - scores[:count]).abs().max()), ex.device)
            scores = torch.cat([alone] + [ex.run_positions(torch.arange(count), stored, label, batch)
                                          for (_, stored), label in zip(prepared[1:], picked[1:])])
    seconds = (time.perf_counter() - start) / len(prepared)
    return [OcclusionResult(scores[k * count:(k + 1) * count].view(ex.grid), label, base, ex.stride, ex.patch,
                            ex.output, RunStats(count, batch, seconds=seconds))
            for k, (label, base) in enumerate(zip(picked, bases))]
