"""Several images' positions in one batch (``Explainer.run_many``).

An image with fewer positions than a batch (a small image, a strided map) fills
only part of one; on a GPU the rest of the device idles, and every batch pays
the graph's fixed cost. A *packed* program (``rewrite(..., packing=)``) runs
the positions of G images together: row ``r`` of a batch is position ``r % P``
of image ``r // P``, and each stored activation holds the G images' maps
stacked along the first spatial axis, so every gather reads its own image's
window by adding ``image * extent`` to the window's start. The kernels do not
change.

Exact, and by default the same bits as one call per image: each image's
unoccluded pass still runs alone (a batched one rounds each image depending on
its neighbours), and every row of a packed run goes through a batch whose size
depends only on how many images its pack holds, never on which. With CUDA
graphs every batch has the graph's size (short packs padded, captured or not).
Without them a pack is one batch of up to G images, G the images that fit one;
the libraries pick their algorithms by the batch's size, and a row's bits at
G * P rows equal its bits at P rows for most models (measured on the CPU:
ResNet18, DenseNet121, MobileNetV3, EfficientNet-B0 and the lesion models), not
for all (a small linear head's product rounds 17 rows otherwise than 30). So
the first pack of each size in a build also runs its first and last image alone
and compares the bits; where they differ, the build goes one image at a time
from then on. Per-image fill inputs (MONAI's ``mean_patch`` and ``mean_img``)
never pack.

``pack=True`` trades the bits for throughput: it packs with no check, and runs
a pack's unoccluded passes as one batch; its maps equal one call's up to float
rounding. ``tests/test_packing.py`` checks the packed maps bit for bit.
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
# Without CUDA graphs: the most images a pack holds, and on the CPU, where the explainer's
# default batch is sized for one image's windows, the rows a pack may run as its one batch
# (what packing shares is the per-batch cost, some sixty ops' dispatch and index arithmetic;
# measured with the lesion demo's model at stride 8, 64 images, images a second over a
# per-image loop's: 1.55x within 16 MiB, 1.68x 32, 1.78x 64, 1.87x 128 (16 images, 784 rows)).
MAX_IMAGES = 16
_CPU_PACK_BYTES = 128 << 20


def pack_batch(ex: Explainer, images: int, batch_size: Optional[int], pack: Optional[bool] = None) -> Optional[int]:
    """The batch ``images`` images share, or None where they run one at a time.

    Images pack when there are several, with no per-image fill inputs, and
    fewer positions an image than a batch (without CUDA graphs, at least two
    images' positions in one; on the CPU the default batch of a pack is up to
    :data:`MAX_IMAGES` images within :data:`_CPU_PACK_BYTES`). ``pack=None``
    packs where a row's batch size depends only on its pack's size (see the
    module's docstring): on the CPU, and on a GPU with CUDA graphs; never once
    a pack of this build differed from one call. ``pack=True`` packs on any
    device; ``False`` never. The cheap conditions come first: the batch needs
    the build (a compile on a blank image where there is none yet).

    (The explainer's surface used here and below: ``current_build``, ``batch_for``,
    ``prepare_all``, ``run_program``, ``run_positions`` and its settings.)
    """
    fill = ex.settings.fill
    if pack is False or images < 2 or fill.scaled or fill.image_color or ex.settings.target is not None \
            or ex.settings.norm_stats != "exact":  # (per-image target inputs and statistics)
        return None
    if pack is None and ((ex.device.type != "cpu" and not ex.cuda_graphs) or ex.current_build().pack_failed):
        return None
    batch = ex.batch_for(batch_size)
    if ex.cuda_graphs:
        return batch if ex.positions < batch else None
    if ex.device.type == "cpu" and common.batch_size(batch_size) is None and ex.settings.batch_size is None:
        batch = max(batch, min(MAX_IMAGES * ex.positions, _CPU_PACK_BYTES // max(1, ex.bytes_per_position)))
    return batch if batch // ex.positions >= 2 else None


def _images_per_pack(ex: Explainer, batch: int, stored: Sequence[Tensor]) -> int:
    """Images a pack holds (``stored``: one image's stored activations), within the memory
    budget of their stacked maps: with CUDA graphs enough to fill ``batch`` rows (at most
    ``batch``); without, the images that fit one batch (at most :data:`MAX_IMAGES`), so that
    each pack runs as one batch (and the torch gathers, which read a copy of the stacked rows,
    copy no image that the batch does not read)."""
    per_image = sum(t.numel() * t.element_size() for t in stored)
    budget = _CPU_BUDGET
    if ex.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(ex.device)
        budget = min(_CUDA_BUDGET, free // 8)
    fit = batch if ex.cuda_graphs else min(MAX_IMAGES, batch // ex.positions)
    return max(1, min(fit, budget // max(1, per_image)))


def packed_program(ex: Explainer) -> IncrementalProgram:
    """The explainer's packed program for its current build (made once)."""
    build = ex.current_build()
    if build.packed is None:
        s = ex.settings
        build.packed = rewrite(build.graph_module, backend=s.backend, color=build.color, fill=s.fill,
                               packing=Packing(ex.positions, build.spatial))
        build.packed.module.to(s.device)
    return build.packed


def run_packed(ex: Explainer, images: Tensor, labels: Sequence[Optional[int]],
               batch: int, check: bool = True, batch_size: Optional[int] = None) -> list[OcclusionResult]:
    """Heat maps of ``images`` (``(N, C, *spatial)``), several images per batch.

    With ``check`` (``pack=None``): the same bits as one call per image: each
    unoccluded pass alone, the first pack of each size in a build checked
    against one call, and without CUDA graphs a last pack of one image run as
    one call. Without (``pack=True``): a pack's unoccluded passes in one batch,
    no check. ``batch_size`` is the caller's: what one call (the check's too) runs with."""
    start = time.perf_counter()
    first = ex.prepare_all(images[:1])
    group = _images_per_pack(ex, batch, first[0][1])
    results: list[OcclusionResult] = []
    for lo in range(0, len(images), group):
        if lo:
            start = time.perf_counter()
        last_alone = len(images) - lo == 1 and not ex.cuda_graphs  # (with graphs: padded, as any)
        if check and (last_alone or ex.current_build().pack_failed):  # (or a pack differed)
            results += [ex(x, label=label, batch_size=batch_size) for x, label in zip(images[lo:], labels[lo:])]
            break
        rest = images[1:group] if lo == 0 else images[lo:lo + group]
        prepared = (first if lo == 0 else []) + ex.prepare_all(rest, together=not check)
        results += _run_pack(ex, prepared, labels[lo:lo + group], batch, group, start, check, batch_size)
    return results


def _run_pack(ex: Explainer, prepared: list, labels: Sequence[Optional[int]], batch: int, group: int,
              start: float, check: bool, batch_size: Optional[int] = None) -> list[OcclusionResult]:
    picked, bases = [], []
    for (logits, _), label in zip(prepared, labels):
        label = common.label_index(label, logits.shape[-1])
        picked.append(int(logits.argmax(1)) if label is None else label)
        bases.append(float(common.scores(logits, picked[-1], ex.output)))
    # Each stored map stacked along the first spatial axis; with CUDA graphs a short pack is
    # padded to `group` images (the same shapes for every pack: a graph is captured once).
    stacks = []
    for i in range(len(prepared[0][1])):
        maps = [stored[i] for _, stored in prepared]
        maps += [maps[-1]] * ((group - len(maps)) if ex.cuda_graphs else 0)
        stacks.append(torch.cat(maps, 2).contiguous(memory_format=channels_last(maps[0].dim() - 2)))
    count = ex.positions
    row_labels = torch.tensor(picked).repeat_interleave(count).to(ex.device)
    program = packed_program(ex)
    program.refresh_weights()
    scores = ex.run_program(torch.arange(len(prepared) * count), stacks,
                            lambda logits, rows: common.scores(logits, row_labels[rows], ex.output),
                            batch, program=program)
    build = ex.current_build()
    if check and len(prepared) not in build.packs_checked:
        # A row's bits not depending on its batch is what the libraries do (measured; see the
        # module's docstring), not what they promise: the first pack of each size checks it on
        # its first and last image, and where it fails, images go one at a time from here on.
        probes = sorted({0, len(prepared) - 1})
        alone = {k: ex.run_positions(torch.arange(count), prepared[k][1], picked[k], batch_size) for k in probes}
        same = all(torch.equal(alone[k], scores[k * count:(k + 1) * count]) for k in probes)
        build.packs_checked[len(prepared)] = same
        if not same:
            # Expected on the CPU for some models (see above); a surprise with CUDA graphs.
            differ = max(float((alone[k] - scores[k * count:(k + 1) * count]).abs().max()) for k in probes)
            log = logger.warning if ex.cuda_graphs else logger.info
            log("a packed batch gave %s's map other bits than one call (max difference %.3g) on %s: "
                "explaining one image at a time", type(ex.model).__name__, differ, ex.device)
            scores = torch.cat([alone[k] if k in alone else
                                ex.run_positions(torch.arange(count), stored, label, batch_size)
                                for k, ((_, stored), label) in enumerate(zip(prepared, picked))])
    seconds = (time.perf_counter() - start) / len(prepared)
    return [OcclusionResult(scores[k * count:(k + 1) * count].view(ex.grid), label, base, ex.stride, ex.patch,
                            ex.output, RunStats(count, batch, seconds=seconds))
            for k, (label, base) in enumerate(zip(picked, bases))]
