"""The public API: ``compile``, the :class:`Explainer` it returns, and the
``naive_occlusion`` baseline (eqs. 1-6) that is also the exactness oracle."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, fx, nn

from . import common, packing, peak
from . import geometry as geo
from .build import Build, CompileCache, Settings, bytes_per_position, check_backend, check_same_output
from .common import IntOrTuple
from .naive import naive_occlusion
from .passes.functionalize import functionalize
from .passes.patch_prop import META_KEY, PatchInfo, annotate
from .passes.rewrite import NO_FILL, PatchFill, rewrite
from .report import format_report
from .results import OcclusionResult, RunStats
from .tiered import KernelTier
from .tracing import describe_change, eval_mode, model_signature, trace

__all__ = ["OcclusionResult", "RunStats", "Explainer", "Settings", "compile", "naive_occlusion",
           "clear_cache"]

logger = logging.getLogger(__name__)


# --- the compiled explainer ------------------------------------------------------------


# Batches of one size a process runs before the explainer captures a CUDA graph for it:
# a capture costs about two eager batches, a replay saves most of one.
CAPTURE_AFTER = 4


class Explainer:
    """A model compiled for incremental occlusion at one image size, patch and stride.

    Create with :func:`krypton_fx.compile`; call with an image to get an
    :class:`OcclusionResult`. Every call uses the model as it is at call time:
    in-place edits of its weights are read directly, and a replaced
    parameter, buffer or submodule (or a change of dtype or device) makes the
    explainer compile itself again. Calls from several threads are safe (they
    run one at a time) and leave the model's train/eval modes as they were.
    """

    def __init__(self, model: nn.Module, settings: Settings):
        self.model = model
        self.settings = settings
        if settings.axis_starts is not None:
            *starts, self.grid = geo.grid_from_starts(settings.axis_starts)
        else:
            *starts, self.grid = geo.occlusion_grid(settings.image_size, settings.patch, settings.stride)
        self._starts = tuple(starts)
        self._lock = threading.RLock()
        self._graphs: dict = {}
        self._graph_uses: dict = {}  # batches run per (program, batch size), until captured
        self._batch_cap: Optional[int] = None  # the largest batch that fitted after running out of memory
        # Tracing fails fast, here; the rest of the compile (PatchProp, rewrite) runs on the
        # first image, whose run through the traced graph then also yields that image's
        # stored activations (see _compile).
        self._traced = self._trace()
        self._build: Optional[Build] = None
        self._checking = self._checked = False  # see _checked_once

    # Settings, by their old names.
    patch = property(lambda self: self.settings.patch)
    stride = property(lambda self: self.settings.stride)
    tau = property(lambda self: self.settings.tau)
    device = property(lambda self: self.settings.device)
    backend = property(lambda self: self.settings.backend)
    output = property(lambda self: self.settings.output)
    cuda_graphs = property(lambda self: self.settings.cuda_graphs)
    image_chw = property(lambda self: (self.settings.channels, *self.settings.image_size))
    # What the current build holds.
    graph_module = property(lambda self: self._current().graph_module)
    program = property(lambda self: self._current().program)
    color = property(lambda self: self._current().color)
    bytes_per_position = property(lambda self: self._current().bytes_per_position)

    @property
    def batch_size(self) -> int:
        """Positions per batch: the compiled ``batch_size`` or what fits in memory (at most the
        largest batch that fitted, once a batch has run out of memory)."""
        batch = self.settings.batch_size or common.default_batch_size(self.device, self.bytes_per_position)
        return min(batch, self._batch_cap or batch)

    def _batch_for(self, batch_size: Optional[int]) -> int:
        """The batch a call with ``batch_size`` (None: the default) runs: never above one that
        has run out of memory."""
        batch = common.batch_size(batch_size) or self.batch_size
        return min(batch, self._batch_cap or batch)

    @property
    def positions(self) -> int:
        """Cells of the heat map: positions of the patch."""
        return math.prod(self.grid)

    @property
    def spatial_dims(self) -> int:
        """Spatial axes of the images (1, 2 or 3)."""
        return len(self.settings.image_size)

    def _trace(self) -> tuple[tuple, fx.GraphModule]:
        """The model's signature and its traced graph (not yet functional)."""
        s = self.settings
        return model_signature(self.model), trace(self.model, s.leaf_modules, s.autowrap_functions)

    def _compile(self, image: Optional[Tensor] = None) -> tuple[Build, Optional[tuple[Tensor, list[Tensor]]]]:
        """Functionalize, annotate and rewrite the traced model.

        PatchProp runs the traced graph once; on ``image`` (the first image
        to explain) that run is also the image's unoccluded pass, so its
        output and stored activations are returned with the build and the
        first call costs no extra forward for compiling. Without an image a
        zero image of the compiled size is used (geometry depends only on
        shapes).
        """
        s, model = self.settings, self.model
        signature, gm = self._traced
        dtype = common.model_dtype(model)
        color = common.color_values(s.color, s.channels, dtype).to(s.device)
        example = image if image is not None else torch.zeros(1, s.channels, *s.image_size, dtype=dtype,
                                                              device=s.device)
        with eval_mode(model):
            gm = functionalize(gm, example)
            prop = annotate(gm, example, s.patch, self._starts, tau=s.tau, what=type(model).__name__)
        program = rewrite(gm, backend=s.backend, color=color, fill=s.fill)
        program.module.to(s.device)
        self._graphs.clear()
        self._graph_uses.clear()
        spatial = {n.name: tuple(prop.shapes[n][2:]) for n in prop.stored}
        build = Build(gm, program, dtype, color, bytes_per_position(prop), signature,
                      KernelTier(s.backend, s.device), spatial)
        if image is None:
            return build, None
        by_name = {n.name: v for n, v in prop.stored.items()}
        stored = [spec.prepare(by_name[spec.node]) for spec in program.stored]
        return build, (prop.result, stored)

    def _current(self, image: Optional[Tensor] = None) -> Build:
        """The build for the model as it is now: compiled (again) if there is none yet or
        anything was replaced since."""
        with self._lock:
            build, _ = self._current_and_first(image)
            return build

    def _current_and_first(self, image: Optional[Tensor]):
        if not (self._build is not None and self._checked):
            signature = model_signature(self.model)
            if self._traced[0] != signature:
                logger.info("%s changed since it was compiled (%s): compiling again",
                            type(self.model).__name__, describe_change(self._traced[0], signature))
                self._traced = self._trace()
                self._build = None
            self._checked = self._checking
        if self._build is not None:
            return self._build, None
        self._build, first = self._compile(image)
        return self._build, first

    @contextlib.contextmanager
    def _checked_once(self) -> Iterator[None]:
        """Hold the lock, and check the model for replaced parts (a walk over its modules) at the
        first use of the build only: nothing else can replace them until this returns."""
        with self._lock:
            outer, self._checking = self._checking, True
            try:
                yield
            finally:
                self._checking = outer
                if not outer:
                    self._checked = False

    def infos(self) -> list[tuple[fx.Node, PatchInfo]]:
        """Every node of the traced graph with its PatchProp annotation."""
        return [(n, n.meta[META_KEY]) for n in self.graph_module.graph.nodes]

    @torch.no_grad()
    def prepare(self, image: Tensor, scale: Optional[Tensor] = None,
                color: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor]]:
        """Run the unoccluded image once: its output and the incremental graph's inputs for it
        (the stored activations, then this image's ``scale`` and ``color`` where the
        compiled ``fill`` asks for them).

        The first image of each build is also run through the model itself:
        a traced graph that does not reproduce the model (Python-side state
        that tracing cannot see) raises instead of giving a wrong map.

        Args:
            image: the image.
            scale: ``(positions,)`` per-position factors (``fill.scaled``).
            color: ``(C,)`` this image's patch colour (``fill.image_color``).
        """
        fill = self.settings.fill
        if fill.scaled != (scale is not None) or fill.image_color != (color is not None):
            raise ValueError("prepare() takes scale= exactly when compiled with fill.scaled and color= "
                             "exactly when compiled with fill.image_color")
        extra = []
        if scale is not None:
            extra.append(torch.as_tensor(scale).reshape(-1).to(self.device, torch.float32))
            if extra[-1].numel() != self.positions:
                raise ValueError(f"scale has {extra[-1].numel()} values for {self.positions} positions")
        if color is not None:
            extra.append(common.color_values(color, self.settings.channels,
                                             common.model_dtype(self.model)).to(self.device))
        logits, stored = self._prepare(image)
        return logits, stored + extra

    def _prepare(self, image: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self._prepare_all([image])[0]

    def _prepare_all(self, images: Sequence[Tensor]) -> list[tuple[Tensor, list[Tensor]]]:
        """Each image's unoccluded pass, one at a time (a batched pass would round each image
        depending on its neighbours), with the checks of the model's state made once."""
        with self._lock:
            dtype = common.model_dtype(self.model)
            batches = [common.image_batch(image, self.image_chw, dtype).to(self.device) for image in images]
            if not batches:
                return []
            build, first = self._current_and_first(batches[0])
            build.program.refresh_weights()
            prepared = []
            with eval_mode(self.model):
                for image in batches:
                    if first is not None:
                        logits, stored = first
                        first = None
                    else:
                        logits, raw = build.program.capture(image)
                        stored = [spec.prepare(v) for spec, v in zip(build.program.stored, raw)]
                    if not build.verified:
                        check_same_output(self.model, image, logits)
                        build.verified = True
                    prepared.append((logits, stored))
            return prepared

    @torch.no_grad()
    def run_positions(self, positions: Tensor, stored: list[Tensor], label: int,
                      batch_size: Optional[int] = None, progress: bool = False) -> Tensor:
        """Scores of ``label`` for the given occlusion position indices (any subset, any order)."""
        return self._run(positions, stored, batch_size, progress,
                         lambda logits, _: common.scores(logits, label, self.output))

    def _run(self, positions: Tensor, stored: list[Tensor], batch_size: Optional[int], progress: bool,
             keep: Callable[[Tensor, Tensor], Tensor], module: Optional[fx.GraphModule] = None) -> Tensor:
        """``keep(output, positions)`` of every batch of ``positions`` through ``module`` (the
        incremental graph by default), concatenated on the CPU."""
        with self._checked_once(), eval_mode(self.model):
            build = self._current()
            module = module if module is not None else build.program.module
            batch = self._batch_for(batch_size)
            if not self.cuda_graphs:
                batch = min(batch, len(positions))  # a CUDA graph pads a short batch to its own size
            return self._run_batches(positions.to(self.device), stored, max(1, batch), progress, keep, module,
                                     build.tier)

    def _run_batches(self, positions: Tensor, stored: list[Tensor], batch: int, progress: bool,
                     keep: Callable[[Tensor, Tensor], Tensor], module: fx.GraphModule, tier: KernelTier) -> Tensor:
        scores = []
        with common.progress_bar(-(-len(positions) // batch), progress, "krypton_fx", unit="batch") as bar:
            run, lo = None, 0
            ready = tier.ready
            while lo < len(positions):
                if not ready and tier.ready:  # the kernels compiled: on to them (and graphs)
                    run, ready = None, True
                try:
                    if run is None:  # (capturing a CUDA graph allocates too)
                        run = self._batch_runner(batch, stored, -(-(len(positions) - lo) // batch), module,
                                                 None if ready else tier)
                    chunk = positions[lo:lo + batch]
                    scores.append(keep(run(chunk), chunk))
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not common.is_out_of_memory(e) or batch == 1:
                        raise
                    batch, run = self._shrink_batch(batch, e), None
                    bar.total = bar.n + -(-(len(positions) - lo) // batch)
                    continue
                bar.update(1)
                lo += batch
        # One device-to-host copy at the end: no synchronisation per batch.
        return torch.cat(scores).cpu() if scores else torch.empty(0)

    def _shrink_batch(self, batch: int, error: BaseException) -> int:
        """Halve the batch after it ran out of memory; later calls start from the smaller one."""
        smaller = batch // 2
        logger.warning("a batch of %d positions ran out of memory on %s (%s): going on with %d",
                       batch, self.device, common.first_line(error), smaller)
        self._batch_cap = smaller
        self._graphs.clear()  # their memory is what a smaller batch needs
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return smaller

    @torch.no_grad()
    def run_outputs(self, positions: Tensor, stored: list[Tensor], batch_size: Optional[int] = None,
                    progress: bool = False) -> Tensor:
        """The model's whole output (every class, before any softmax) for the given positions,
        float32 on the CPU: what MONAI's occlusion sensitivity averages."""
        return self._run(positions, stored, batch_size, progress, lambda logits, _: logits.float())

    def _batch_runner(self, batch: int, stored: list[Tensor], batches: int, module: fx.GraphModule,
                      compiling: Optional[KernelTier] = None) -> Callable[[Tensor], Tensor]:
        """The incremental graph for this batch size: CUDA-graph replay where it pays.

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

    def __call__(self, image: Tensor, label: Optional[int] = None, drill_down=None,
                 batch_size: Optional[int] = None, progress: bool = False) -> OcclusionResult:
        """Occlusion heat map of ``image``.

        Args:
            image: ``(C, H, W)`` or ``(1, C, H, W)``, preprocessed for the model.
            label: class to explain (an int, a numpy integer or a 0-d integer
                tensor); defaults to the unoccluded prediction.
            drill_down: adaptive drill-down settings (approximate), or None (tau < 1: peak.keep_peak).
            batch_size: positions per batch; defaults to the compiled one.
            progress: show a progress bar.
        """
        batch_size = common.batch_size(batch_size)
        if drill_down is not None:  # an approximate mode that runs itself on this explainer
            if not callable(getattr(drill_down, "run", None)):
                raise TypeError(f"drill_down must be a krypton_fx.DrillDown, got {type(drill_down).__name__}")
            return drill_down.run(self, image, label=label, batch_size=batch_size, progress=progress)
        if self.tau < 1.0:  # approximate: the cells that decide the reading recomputed at tau = 1
            return peak.keep_peak(self, compile, image, label, batch_size, progress)
        start = time.perf_counter()
        with self._checked_once(), eval_mode(self.model):
            logits, stored = self.prepare(image)
            label = common.label_index(label, logits.shape[-1])
            label = int(logits.argmax(1)) if label is None else label
            base = float(common.scores(logits, label, self.output))
            scores = self.run_positions(torch.arange(self.positions), stored, label, batch_size, progress)
            batch = min(self._batch_for(batch_size), self.positions)
        return OcclusionResult(scores.view(self.grid), label, base, self.stride, self.patch, self.output,
                               RunStats(self.positions, batch, seconds=time.perf_counter() - start))

    @torch.no_grad()
    def run_many(self, images: Tensor, labels: Optional[Sequence[Optional[int]]] = None,
                 batch_size: Optional[int] = None, pack: Optional[bool] = None) -> list[OcclusionResult]:
        """Heat maps of several images of the compiled size, in order.

        Each map equals one call per image bit for bit (``pack=True`` aside): the unoccluded pass of
        each image runs on its own, because a batched pass rounds each image
        differently depending on its neighbours, and a map must not depend on
        which other images came with it (a resumed or distributed run writes
        the same files as one uninterrupted process). Images with fewer positions
        than a batch share batches of one fixed size (:mod:`krypton_fx.packing`).

        Args:
            images: ``(N, C, *spatial)``.
            labels: one class (or None: the prediction) per image.
            batch_size: positions per batch.
            pack: None: share batches where the maps stay one call's bit for bit
                (checked on the first pack of a build); True: wherever images are
                small enough, the unoccluded passes batched too, the maps equal to
                one call's up to float rounding; False: never.
        """
        batch_size = common.batch_size(batch_size)
        if pack not in (None, True, False):
            raise ValueError(f"pack must be None, True or False, got {pack!r}")
        if not isinstance(images, Tensor) or images.dim() != len(self.image_chw) + 1:
            raise ValueError(f"images must be a tensor (N, {', '.join(map(str, self.image_chw))}), got "
                             f"{tuple(getattr(images, 'shape', ()))}")
        labels = list(labels) if labels is not None else [None] * len(images)
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images: give one per image (or None)")
        with self._checked_once(), eval_mode(self.model):  # the model checked once for all images
            batch = packing.pack_batch(self, len(images), batch_size, pack) if self.tau == 1.0 else None
            if batch is not None:
                return packing.run_packed(self, images, labels, batch, pack is None, batch_size)
            return [self(x, label=label, batch_size=batch_size) for x, label in zip(images, labels)]

    def report(self) -> str:
        """A per-node table: kind, state, patch size, and where savings stop."""
        return format_report(self.graph_module)

    def __repr__(self) -> str:
        return (f"Explainer({type(self.model).__name__}, image={self.image_chw}, patch={self.patch}, "
                f"stride={self.stride}, positions={self.positions}, tau={self.tau}, "
                f"backend={self.backend!r}, device={self.device})")


# Explainers of recent compiles: compile() with the same model and settings returns the
# same explainer (it follows the model's later changes by itself).
_CACHE = CompileCache(size=16)


def clear_cache() -> None:
    """Forget every cached explainer (and the references it holds to models and device memory).

    Example:
        >>> clear_cache()
    """
    _CACHE.clear()


def compile(model: nn.Module, patch: IntOrTuple = 16, stride: IntOrTuple = 4,
            color: Union[float, Sequence[float]] = 0.0, image_size: IntOrTuple = (224, 224),
            tau: float = 1.0, batch_size: Optional[int] = None, device=None, backend: str = "auto",
            output: str = "prob", channels: int = 3, leaf_modules: Iterable[type] = (),
            autowrap_functions: Iterable[Callable] = (), cuda_graphs: Optional[bool] = None,
            cache: bool = True, axis_starts: Optional[Sequence[Sequence[int]]] = None,
            fill: Optional[PatchFill] = None) -> Explainer:
    """Compile ``model`` into an incremental occlusion explainer.

    Args:
        model: a CNN classifier taking ``(N, C, *spatial)`` inputs (images,
            volumes or signals), returning ``(N, classes)``.
        patch: occlusion patch size: an int (the same on every axis) or one
            int per spatial axis.
        stride: patch stride: an int or one per spatial axis.
        color: patch colour in the model's input space: a float or one per channel.
        image_size: spatial size of the inputs: ``(H, W)`` for images (an int
            means a square), ``(D, H, W)`` for volumes, ``(L,)`` for signals;
            the number of spatial axes comes from here.
        tau: projective-field threshold (eqs. 39-45); 1.0 is exact.
        batch_size: positions per batch; None picks one that fits in memory.
        device: where to run; defaults to the model's device.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"`` or ``"triton"``.
        output: ``"prob"`` (softmax probability of the label) or ``"logit"``.
        channels: image channels.
        leaf_modules: module types to keep opaque when tracing.
        autowrap_functions: functions to keep opaque when tracing.
        cuda_graphs: replay each batch from a CUDA graph (default: on for CUDA).
        axis_starts: explicit patch starts, one sequence per spatial axis (the grid
            is their product, row-major), instead of the multiples of ``stride``
            (MONAI's windows end flush with the image).
        fill: what the occluded patch holds beyond ``color``
            (:class:`krypton_fx.passes.PatchFill`: MONAI's gaussian, mean_patch
            and mean_img modes).
        cache: return the explainer of an earlier compile of the same model with the same
            settings (the last 16 are kept; :func:`clear_cache` forgets
            them). Safe: an explainer uses the model as it is at each call.

    The model is traced here (a model that does not trace fails here); the
    rest of the compile runs on the first image, so that the first call
    costs one extra forward at most (the check that the traced graph
    reproduces the model).

    Example:
        >>> import torchvision, krypton_fx
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> ex = krypton_fx.compile(model, patch=16, stride=16, image_size=(64, 64))
        >>> image = torch.rand(3, 64, 64)
        >>> res = ex(image)
        >>> ref = krypton_fx.naive_occlusion(model, image, patch=16, stride=16)
        >>> bool(torch.allclose(res.heatmap, ref.heatmap, atol=1e-5))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = common.spatial_size(image_size)
    nd = len(size)
    patch_t, stride_t = common.int_tuple(patch, nd, "patch"), common.int_tuple(stride, nd, "stride")
    if any(p > n for p, n in zip(patch_t, size)):
        raise ValueError(f"patch {patch_t} is larger than the image {size}; use a smaller patch "
                         "or a larger image_size")
    if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and 0.0 < tau <= 1.0):
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    output = common.output_kind(output)
    batch_size = common.batch_size(batch_size)
    dev = common.resolve_device(device, model)
    check_backend(backend, dev)
    if cuda_graphs and dev.type != "cuda":
        raise ValueError("cuda_graphs=True needs a CUDA device; leave it None on the CPU")
    color_values = tuple(float(v) for v in common.color_values(color, channels, torch.float64))
    common.color_values(color, channels, common.model_dtype(model))  # fails now, not at the first call
    model.to(dev)
    starts = None
    if axis_starts is not None:
        starts = tuple(tuple(int(v) for v in axis) for axis in axis_starts)
        if len(starts) != nd or any(not axis or min(axis) < 0 or max(axis) + p > n
                                    for axis, p, n in zip(starts, patch_t, size)):
            raise ValueError(f"axis_starts must give {nd} non-empty lists of starts at which the patch "
                             f"{patch_t} fits inside {size}")
    settings = Settings(patch_t, stride_t, color_values, size, int(channels), float(tau), batch_size,
                        dev, backend, output, dev.type == "cuda" if cuda_graphs is None else bool(cuda_graphs),
                        tuple(leaf_modules), tuple(autowrap_functions), starts, fill or NO_FILL)
    return _CACHE.get(model, settings, Explainer) if cache else Explainer(model, settings)
