"""Explain image files into an output folder: :class:`FileJob` (what to do) and
:class:`FileWorker` (one worker on one device that compiles once and reuses its explainers).

The same worker runs in the main process, in one thread per device
(:mod:`.devices`) and in Ray actors (:mod:`.cluster`); a job pickles, so it
travels to any of them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from .imagefiles import load_image
from .many import DEFAULT_CHUNK, ExplainerCache, iter_results, no_tracing
from .outputs import OutputFolder, Task, error_row, result_row
from .sources import Item

__all__ = ["FileJob", "FileWorker", "default_reader", "array_input"]

logger = logging.getLogger(__name__)


def default_reader(path: str, channels: int = 3):
    """File -> ``(model input in [0, 1] at the file's size, picture, colour None)``."""
    x = load_image(path, channels)
    picture = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
    return x, picture, None


def array_input(a) -> torch.Tensor:
    """An image array as a model input: ``(H, W[, C])`` uint8 (as image readers give) to ``(C, H, W)``
    in ``[0, 1]``; any other array is taken as ``(C, H, W)`` as it is."""
    t = torch.as_tensor(np.asarray(a))
    if t.dtype == torch.uint8:
        t = (t[:, :, None] if t.dim() == 2 else t).permute(2, 0, 1).float().div_(255.0)
    return t.float() if not t.is_floating_point() else t


@dataclasses.dataclass
class FileJob:
    """Everything a worker needs to explain image files into ``out_dir``; it pickles.

    Attributes:
        model: the model, on the CPU (each worker moves its own copy to its device).
        out_dir: the output folder, or None to return the maps without writing them.
        compile_kwargs: ``krypton_fx.compile`` arguments but ``image_size``, ``color``
            and ``device`` (patch, stride, tau, batch_size, backend, output, channels).
        reader: path -> ``(model input (C, H, W), picture in [0, 1] (H, W[, 3]) or None,
            patch colour or None for compile_kwargs' colour)``; default: :func:`default_reader`.
        color: the patch colour when the reader gives none.
        label: the class to explain in every image (None: the prediction).
        drill_down: a DrillDown for every image, or None.
        fingerprint: the settings that make a map, kept with each output (see :class:`OutputFolder`).
        model_name: for picture titles.
        categories: class names, if known.
        chunk: images that may share one packed run.
        pack: whether images share batches (see :meth:`krypton_fx.Explainer.run_many`).
        segments: feature ablation instead of occlusion: ``(model input, picture, path) ->
            (H, W)`` int64 consecutive segment ids; each image's map (``.npy``) is then its
            per-segment scores (:meth:`krypton_fx.Explainer.ablate`, the colour as baseline).
        describe_segments: how the segments were made, for picture titles.
    """

    model: nn.Module
    out_dir: Optional[str]
    compile_kwargs: dict = dataclasses.field(default_factory=dict)
    reader: Optional[Callable[[str], tuple]] = None
    color: Any = 0.0
    label: Optional[int] = None
    drill_down: Any = None
    fingerprint: dict = dataclasses.field(default_factory=dict)
    model_name: str = "model"
    categories: Optional[list] = None
    chunk: int = DEFAULT_CHUNK
    pack: Optional[bool] = None
    segments: Optional[Callable] = None
    describe_segments: str = ""


def _picture_writer(job: FileJob, task: Task, res, picture, image_hw) -> Callable:
    from ..viz import heatmap_figure, target_label

    heat = res.heatmap.numpy()
    cats = job.categories
    label_name = cats[res.label] if cats and res.label < len(cats) else None
    target = job.compile_kwargs.get("target")
    if target is not None:  # a segmentation target: the class is an output channel
        label_name = target_label(target, res.mask)
    tau = job.compile_kwargs.get("tau", 1.0)
    approx = [f"tau={tau:g}"] if tau < 1.0 else []
    if job.compile_kwargs.get("norm_stats") == "frozen":
        approx.append("frozen norm statistics")
    if job.drill_down is not None:
        approx.append(f"drill-down r={job.drill_down.r:g}")
    exact = ", ".join(approx + ["approximate"]) if approx else "exact"
    if picture is None:
        picture = np.full(tuple(image_hw), 0.5)
    fig = heatmap_figure(picture, heat, res.patch, res.stride, res.label, res.base_prob,
                         label_name=label_name, output=res.output, exact_cells=res.stats.get("exact_cells"),
                         subtitle=(f"{job.model_name}, {Path(task.path).name}: patch {res.patch[0]}x{res.patch[1]}, "
                                   f"stride {res.stride[0]}x{res.stride[1]}, {heat.shape[0]}x{heat.shape[1]} "
                                   f"positions ({exact})"))
    return functools.partial(fig.savefig, format="png")


class FileWorker:
    """Explains files of a :class:`FileJob` on one device; compiles once per image size and colour.

    Args:
        job: what to do.
        device: where to run.
        copy_model: give this worker its own copy of the model (several workers in one process).
    """

    def __init__(self, job: FileJob, device="cpu", copy_model: bool = False):
        self.job = job
        self.device = torch.device(device)
        with no_tracing():
            model = copy.deepcopy(job.model) if copy_model else job.model
        self.cache = ExplainerCache(model, device=self.device, color=job.color, **job.compile_kwargs)
        self.folder = OutputFolder(job.out_dir, job.fingerprint) if job.out_dir is not None else None
        self.reader = job.reader or functools.partial(default_reader, channels=self.cache.channels)

    def _items(self, tasks: Iterable[Task], pictures: dict, arrays: Optional[dict]) -> Iterator[Item]:
        for task in tasks:
            try:
                if arrays is not None and task.index in arrays:
                    x, picture, color = array_input(arrays.pop(task.index)), None, None
                else:
                    with no_tracing():  # readers may run torchvision transforms: nn.Modules
                        x, picture, color = self.reader(task.path)
            except (ValueError, TypeError, OSError) as e:
                yield Item(task.index, task.path, None, None, Path(task.path), e)
                continue
            pictures[task.index] = picture
            yield Item(task.index, task.path, x, self.job.label, Path(task.path), color=color)

    def run(self, tasks: Iterable[Task], arrays: Optional[dict] = None
            ) -> Iterator[tuple[Task, dict, Optional[np.ndarray]]]:
        """``(task, summary row, map or None)`` per task, in order; a bad image is an error row.

        ``arrays`` (task index -> image array) gives images that are not files.
        """
        by_index = {}
        pictures: dict = {}

        def remember(tasks):
            for t in tasks:
                by_index[t.index] = t
                yield t

        items = self._items(remember(tasks), pictures, arrays)
        if self.job.segments is not None:
            yield from self._ablate(items, by_index, pictures)
            return
        for item, res in iter_results(self.cache, items, drill_down=self.job.drill_down, chunk=self.job.chunk,
                                      pack=self.job.pack):
            task = by_index.pop(item.index)
            picture = pictures.pop(item.index, None)
            if isinstance(res, BaseException):
                yield task, error_row(task, res), None
                continue
            start = time.perf_counter()
            try:
                row = result_row(task, res, res.stats["seconds"], self.job.categories)
                if self.folder is not None:
                    write_picture = _picture_writer(self.job, task, res, picture, item.image.shape[1:])
                    self.folder.write(task, res.heatmap.numpy(), write_picture, row)
            except (OSError, ValueError) as e:
                yield task, error_row(task, e), None
                continue
            logger.debug("%s: written in %.2f s", task.path, time.perf_counter() - start)
            yield task, row, res.heatmap.numpy()

    def _ablate(self, items: Iterable[Item], by_index: dict, pictures: dict
                ) -> Iterator[tuple[Task, dict, Optional[np.ndarray]]]:
        """:meth:`run` for feature ablation: each image's segments, its per-segment scores."""
        from ..viz_segments import segments_figure

        for item in items:
            task = by_index.pop(item.index)
            picture = pictures.pop(item.index, None)
            if item.error is not None:
                yield task, error_row(task, item.error), None
                continue
            start = time.perf_counter()
            try:
                labels = self.job.segments(item.image, picture, task.path)
                size = tuple(item.image.shape[1:])
                ex = self.cache.get(size, item.color)
                color = item.color if item.color is not None else self.job.color
                baseline = torch.tensor(color, dtype=torch.float32).view(-1, *(1,) * len(size)) \
                    if isinstance(color, (list, tuple)) else float(color)
                res = ex.ablate(item.image.to(self.device), labels, baseline=baseline, label=item.label)
                seconds = time.perf_counter() - start
                row = segment_row(task, res, labels, seconds, self.job.categories)
                if self.folder is not None:
                    cats = self.job.categories
                    name = cats[res.label] if cats and res.label < len(cats) else None
                    shown = picture if picture is not None else np.full(size, 0.5)
                    fig = segments_figure(shown, labels.numpy(), res.scores.numpy(), res.label, res.base_prob,
                                          label_name=name, output=res.output,
                                          subtitle=(f"{self.job.model_name}, {Path(task.path).name}: "
                                                    f"{len(res.ids)} segments ({self.job.describe_segments})"))
                    self.folder.write(task, res.scores.numpy(), functools.partial(fig.savefig, format="png"), row)
            except (OSError, ValueError, TypeError) as e:
                yield task, error_row(task, e), None
                continue
            yield task, row, res.scores.numpy()


def segment_row(task: Task, res, labels: torch.Tensor, seconds: float, categories) -> dict:
    """The summary row of an image's feature ablation: the strongest drop's segment, at its centroid."""
    strongest = int(res.drop.argmax())
    where = (labels == res.ids[strongest]).nonzero().float().mean(0).round().long().tolist()
    name = categories[res.label] if categories and res.label < len(categories) else ""
    return {"path": task.path, "output": task.stem, "label": int(res.label), "class": name,
            "probability": f"{res.base_prob:.6g}", "drop": f"{float(res.drop[strongest]):.6g}",
            "drop_y": where[0], "drop_x": where[-1], "seconds": f"{seconds:.3f}", "status": "ok", "error": ""}
