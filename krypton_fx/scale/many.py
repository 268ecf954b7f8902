"""Many images per call: :func:`explain_many`.

One compile serves every image of the same size (and patch colour): the
stream is cut into *chunks* of consecutive same-size images, and each chunk
goes through one internal function, :func:`explain_chunk` (compile once per
size, prepare each image, run the positions) through the explainer's
``run_many``, which packs the positions of several small images into shared
batches of one fixed size (so that small images and strided maps still fill the
GPU, and share the CPU's per-batch cost; :mod:`krypton_fx.packing`), and
otherwise runs one image after the other; both bit-for-bit equal to one call
per image.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..explainer import Explainer
from ..explainer import compile as compile_explainer
from ..models import input_channels
from ..packing import MAX_IMAGES
from ..results import OcclusionResult
from .sources import Item, LabelSpec, iter_items

__all__ = ["explain_many", "explain_chunk", "ExplainerCache", "DEFAULT_CHUNK", "no_tracing"]

logger = logging.getLogger(__name__)

class _TraceGuard:
    """torch.fx tracing patches ``torch.nn.Module.__call__`` process-wide while it runs, so no model may
    run in another thread meanwhile: compiles are exclusive, runs are shared (and a waiting compile
    goes first, so that busy workers cannot starve it)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._runs = 0
        self._tracing = False
        self._waiting = 0

    @contextlib.contextmanager
    def run(self):
        with self._cond:
            while self._tracing or self._waiting:
                self._cond.wait()
            self._runs += 1
        try:
            yield
        finally:
            with self._cond:
                self._runs -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def trace(self):
        with self._cond:
            self._waiting += 1
            while self._tracing or self._runs:
                self._cond.wait()
            self._waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


_GUARD = _TraceGuard()


def no_tracing():
    """A context in which no torch.fx trace runs in another thread of this process.

    Wrap any code that calls an ``nn.Module`` (torchvision transforms included)
    or copies one, in a thread that runs beside workers that may compile.
    """
    return _GUARD.run()

_WARM: "weakref.WeakSet[Explainer]" = weakref.WeakSet()

# Images per chunk: one pack (packing.MAX_IMAGES), so that a default chunk runs as one packed
# batch on the CPU (each image of a chunk keeps its stored activations alive).
DEFAULT_CHUNK = MAX_IMAGES


def explain_chunk(explainer: Explainer, images: Sequence[Tensor], labels: Sequence[Optional[int]],
                  batch_size: Optional[int] = None, drill_down=None, pack: Optional[bool] = None
                  ) -> list[OcclusionResult]:
    """Occlusion maps of same-size ``images`` with one explainer, in order.

    The seam for packed execution: an explainer with ``run_many(images,
    labels, batch_size)`` (returning one ``OcclusionResult`` per image) runs
    the positions of several images in shared batches; otherwise each image
    is one ``Explainer.__call__``. Drill-down always runs per image. ``pack``
    goes to ``run_many`` (see :meth:`Explainer.run_many`).
    """
    run_many = getattr(explainer, "run_many", None)
    # An explainer's first run traces and checks the traced graph against the model: alone, as
    # tracing patches torch.nn.Module.__call__ process-wide. (CUDA graphs, captured later, capture
    # in thread_local mode: other threads' GPU work does not disturb them.)
    first = explainer not in _WARM
    with _GUARD.trace() if first else _GUARD.run():
        _WARM.add(explainer)
        if run_many is not None and drill_down is None and len(images) > 1:
            stack = torch.stack([x.reshape(explainer.image_chw) for x in images])
            return list(run_many(stack, list(labels), batch_size, **({} if pack is None else {"pack": pack})))
        return [explainer(x, label=y, drill_down=drill_down, batch_size=batch_size)
                for x, y in zip(images, labels)]


class ExplainerCache:
    """Explainers by image size and patch colour, each compiled once.

    Args:
        base: an :class:`Explainer` (others are compiled with its settings and
            model) or an ``nn.Module``.
        compile_kwargs: ``krypton_fx.compile`` arguments for a module (not for an explainer).
    """

    def __init__(self, base: Union[Explainer, nn.Module], **compile_kwargs):
        if isinstance(base, Explainer):
            if compile_kwargs:
                raise TypeError(f"explain_many got an Explainer and compile arguments "
                                f"({', '.join(sorted(compile_kwargs))}); the explainer's settings apply: "
                                "pass the model instead to choose them")
            s = base.settings
            self.model = base.model
            self.kwargs = dict(patch=s.patch, stride=s.stride, tau=s.tau, batch_size=s.batch_size,
                               device=s.device, backend=s.backend, output=s.output, channels=base.channels,
                               leaf_modules=s.leaf_modules, autowrap_functions=s.autowrap_functions,
                               cuda_graphs=s.cuda_graphs, target=s.target, norm_stats=s.norm_stats)
            self.default_color = s.color
        elif isinstance(base, nn.Module):
            if "image_size" in compile_kwargs:
                raise TypeError("explain_many takes the image size from each image; drop image_size")
            self.model = base
            self.kwargs = dict(compile_kwargs)
            self.default_color = self.kwargs.pop("color", 0.0)
        else:
            raise TypeError(f"explain_many takes an Explainer or a torch.nn.Module, got {type(base).__name__}")
        if self.kwargs.get("channels") is None:
            self.kwargs["channels"] = input_channels(self.model)
        self.channels = int(self.kwargs["channels"])
        self._by_key: dict = {}
        if isinstance(base, Explainer):
            self._by_key[self._key(base.settings.image_size, None)] = base
        self.compiles = 0

    def _key(self, size: Sequence[int], color) -> tuple:
        color = self.default_color if color is None else color
        if isinstance(color, Tensor):
            color = color.tolist()
        values = [float(color)] if isinstance(color, (int, float)) else [float(v) for v in color]
        return tuple(int(v) for v in size), tuple(values * self.channels if len(values) == 1 else values)

    def get(self, size: Sequence[int], color=None) -> Explainer:
        """The explainer for images of spatial ``size`` and patch ``color`` (default: the one given)."""
        key = self._key(size, color)
        ex = self._by_key.get(key)
        if ex is None:
            with _GUARD.trace():
                ex = compile_explainer(self.model, image_size=key[0], color=list(key[1]), **self.kwargs)
            self._by_key[key] = ex
            self.compiles += 1
            logger.debug("compiled %s for %s", type(self.model).__name__, key[0])
        return ex


def _chunks(items: Iterator[Item], chunk: int) -> Iterator[list[Item]]:
    """Consecutive items of one size and colour, at most ``chunk`` of them; an unreadable item is a chunk alone."""
    run: list[Item] = []
    for item in items:
        same = (run and item.image is not None and run[0].image is not None
                and tuple(item.image.shape) == tuple(run[0].image.shape) and item.color == run[0].color)
        if run and (not same or len(run) >= chunk):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def iter_results(cache: ExplainerCache, items: Iterator[Item], batch_size: Optional[int] = None,
                 drill_down=None, chunk: int = DEFAULT_CHUNK,
                 on_chunk: Optional[Callable[[int], None]] = None, pack: Optional[bool] = None
                 ) -> Iterator[tuple[Item, Union[OcclusionResult, BaseException]]]:
    """``(item, result or the exception it raised)``, in order; a failure stops nothing.

    A chunk that fails is run again image by image, so that the error is
    the one image's and the others still get their maps.
    """
    for run in _chunks(items, chunk):
        if run[0].image is None:
            yield run[0], run[0].error  # type: ignore[misc]
            continue
        start = time.perf_counter()
        # A compile that fails is the model's or the settings' problem, not one image's: it propagates.
        ex = cache.get(run[0].image.shape[1:], run[0].color)
        try:
            results: list = explain_chunk(ex, [i.image for i in run], [i.label for i in run], batch_size,
                                          drill_down, pack)
        except (ValueError, TypeError, RuntimeError) as e:
            if len(run) == 1:
                results = [e]
            else:
                results = []
                for item in run:
                    try:
                        results += explain_chunk(ex, [item.image], [item.label], batch_size, drill_down)
                    except (ValueError, TypeError, RuntimeError) as e1:
                        results.append(e1)
        seconds = (time.perf_counter() - start) / len(run)
        for item, res in zip(run, results):
            if isinstance(res, OcclusionResult):
                res.stats.update(index=item.index, source=item.name, seconds=seconds)
            yield item, res
        if on_chunk is not None:
            on_chunk(len(run))


def explain_many(explainer_or_model: Union[Explainer, nn.Module], images: Any, labels: LabelSpec = None, *,
                 transform: Optional[Callable] = None, batch_size: Optional[int] = None, drill_down=None,
                 chunk: int = DEFAULT_CHUNK, progress: bool = False, pack: Optional[bool] = None,
                 **compile_kwargs) -> Iterator[OcclusionResult]:
    """Occlusion maps of many images: one :class:`OcclusionResult` per image, in order.

    One compile serves every image of the same size: give an
    :class:`Explainer` (images of other sizes get one compiled with its
    settings) or a model and ``krypton_fx.compile`` arguments (``patch``,
    ``stride``, ``color``, ``tau``, ``device``, ...; the image size comes
    from each image). Each result's ``stats`` holds ``index``, ``source``
    (the file, or ``images[i]``) and ``seconds``.

    Args:
        explainer_or_model: an :class:`Explainer`, or an ``nn.Module`` to compile.
        images: a sequence of images ``(C, H, W)`` (tensors, arrays, PIL
            images) or file paths; a tensor batch ``(N, C, H, W)``; a
            ``Dataset``/``DataLoader`` of images, ``(image, label)`` pairs or
            ``{"image", "label"}`` dicts; or a folder or glob.
        labels: None (each entry's own label where it has one, else the
            prediction), ``"predicted"``, one int for all, or one per image.
        transform: turns a PIL image (files are read as RGB, or L for
            one-channel models) or other non-tensor entry into the model input;
            default: float32 in ``[0, 1]`` at the file's size.
        batch_size: positions per batch (default: the explainer's).
        drill_down: a :class:`krypton_fx.DrillDown` for every image (approximate).
        chunk: images that may share one packed run.
        progress: a progress bar over images.
        pack: whether images share batches: None where the maps stay one
            call's bit for bit (checked on the first pack), True wherever they
            fit (maps equal to one call's up to float rounding), False never
            (see :meth:`Explainer.run_many`).

    Raises:
        ValueError: an image that cannot be read or explained (the message names it).

    Example:
        >>> import torch, torchvision, krypton_fx
        >>> model = torchvision.models.resnet18(num_classes=3)
        >>> images = torch.rand(5, 3, 64, 64)
        >>> maps = [r.heatmap for r in krypton_fx.explain_many(model, images, patch=16, stride=16)]
        >>> len(maps), tuple(maps[0].shape)
        (5, (4, 4))
    """
    cache = ExplainerCache(explainer_or_model, **compile_kwargs)
    items = iter_items(images, labels, transform, cache.channels)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        counted = getattr(images, "dataset", images)  # a DataLoader's len() counts batches
        bar = tqdm(total=len(counted) if hasattr(counted, "__len__") and not isinstance(counted, (str, os.PathLike))
                   else None, desc="krypton_fx images", unit="image")
    try:
        for item, res in iter_results(cache, items, batch_size, drill_down, chunk,
                                      on_chunk=bar.update if bar is not None else None, pack=pack):
            if isinstance(res, TypeError):
                raise TypeError(f"{item.name}: {res}") from res
            if isinstance(res, BaseException):
                raise ValueError(f"{item.name}: {res}") from res
            yield res
    finally:
        if bar is not None:
            bar.close()
