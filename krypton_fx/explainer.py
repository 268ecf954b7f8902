"""The public API: ``compile``, the :class:`Explainer` it returns, and the
``naive_occlusion`` baseline (eqs. 1-6) that is also the exactness oracle."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, fx, nn

from . import ablation, common, packing, peak
from . import geometry as geo
from .build import Build, CompileCache, Settings, bytes_per_position, check_same_output, make_settings
from .common import IntOrTuple
from .naive import naive_occlusion
from .passes.functionalize import functionalize
from .passes.norms import freeze_norms
from .passes.patch_prop import META_KEY, PatchInfo, annotate
from .passes.rewrite import IncrementalProgram, PatchFill, rewrite
from .report import format_report
from .results import OcclusionResult, RunStats, SegmentResult
from .runner import BatchRunner, Keep
from .targets import Labels, Resolved, SegmentationTarget, class_target
from .tiered import KernelTier
from .tracing import describe_change, eval_mode, input_channels, model_signature, trace

__all__ = ["OcclusionResult", "RunStats", "SegmentResult", "Explainer", "Settings", "compile", "naive_occlusion",
           "clear_cache"]

logger = logging.getLogger(__name__)


# --- the compiled explainer ------------------------------------------------------------

# One image's unoccluded output and the incremental graph's inputs for it.
Prepared = tuple[Tensor, list[Tensor]]


class Explainer:
    """A model compiled for incremental occlusion at one image size, patch and stride.

    Create with :func:`krypton_fx.compile`; call with an image to get an
    :class:`OcclusionResult`. Every call uses the model as it is at call time:
    in-place edits of its weights are read directly, and a replaced
    parameter, buffer or submodule (or a change of dtype or device) makes the
    explainer compile itself again. Calls from several threads are safe (they
    run one at a time) and leave the model's train/eval modes as they were.

    Besides the public calls, the package's other runners (packing, drill-down, the
    Captum and MONAI drop-ins) use a small documented surface: :meth:`current_build`,
    :meth:`batch_for`, :meth:`prepare_all`, :meth:`run_program`; nothing else.
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
        self.runner = BatchRunner(settings.device, settings.cuda_graphs, settings.batch_size)
        # Tracing fails fast, here; the rest of the compile (PatchProp, rewrite) runs on the
        # first image, whose run through the traced graph then also yields that image's
        # stored activations (see _compile).
        self._traced = self._trace()
        # Image channels: as compiled, else from the first layer the image meets, else from a
        # per-channel colour, else from the first image (see prepare_all).
        self.channels: Optional[int] = (settings.channels or input_channels(self._traced[1])
                                         or (len(settings.color) if len(settings.color) > 1 else None))
        if self.channels is not None:  # a colour of other channels fails here, in compile()
            common.color_values(settings.color, self.channels, torch.float64)
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
    image_chw = property(lambda self: (self.channels, *self.settings.image_size))
    # What the current build holds.
    graph_module = property(lambda self: self.current_build().graph_module)
    program = property(lambda self: self.current_build().program)
    color = property(lambda self: self.current_build().color)
    bytes_per_position = property(lambda self: self.current_build().bytes_per_position)

    @property
    def batch_size(self) -> int:
        """Positions per batch: the compiled ``batch_size`` or what fits in memory (at most the
        largest batch that fitted, once a batch has run out of memory)."""
        return self.runner.default_batch(self.bytes_per_position)

    def batch_for(self, batch_size: Optional[int]) -> int:
        """The batch a call with ``batch_size`` (None: the default) runs: never above one that
        has run out of memory."""
        return self.runner.batch_for(batch_size, self.bytes_per_position)

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
        channels = self.channels or 3  # (no image and no layer says: any count gives the geometry)
        color = common.color_values(s.color, channels, dtype).to(s.device)
        example = image if image is not None else torch.zeros(1, channels, *s.image_size, dtype=dtype,
                                                              device=s.device)
        key = s.target.key if s.target is not None else None
        with eval_mode(model):
            gm = functionalize(gm, example)
            if s.norm_stats == "frozen":
                freeze_norms(gm, len(s.image_size))
            prop = annotate(gm, example, s.patch, self._starts, tau=s.tau, what=type(model).__name__,
                            dense_output=s.target is not None, output_key=key)
        program = rewrite(gm, backend=s.backend, color=color, fill=s.fill, target=s.target)
        program.module.to(s.device)
        self.runner.clear()
        spatial = {n.name: tuple(prop.shapes[n][2:]) for n in prop.stored}
        build = Build(gm, program, dtype, color, bytes_per_position(prop), signature,
                      KernelTier(s.backend, s.device), spatial)
        if image is None:
            return build, None
        by_name = {n.name: v for n, v in prop.stored.items()}
        stored = [spec.prepare(by_name[spec.node]) for spec in program.stored]
        return build, (prop.result, stored)

    def current_build(self, image: Optional[Tensor] = None) -> Build:
        """The build for the model as it is now: compiled (again) if there is none yet or
        anything was replaced since (on ``image``, else on a blank image)."""
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
            extra.append(common.color_values(color, self.channels,
                                             common.model_dtype(self.model)).to(self.device))
        logits, stored = self.prepare_all([image])[0]
        return logits, stored + extra

    def prepare_all(self, images: Sequence[Tensor], together: bool = False) -> list[Prepared]:
        """Each image's unoccluded output and stored activations, with the checks of the
        model's state made once.

        Each image runs alone by default: a batched pass rounds each image depending on its
        neighbours, and a map must not depend on them. ``together=True`` runs the images
        (after the first of a build) as one batch, for throughput (``pack=True``).
        """
        with self._lock:
            dtype = common.model_dtype(self.model)
            if self.channels is None and len(images):  # no layer said: the first image does
                first = common.image_batch(images[0], None, dtype, self.spatial_dims)
                common.color_values(self.settings.color, first.shape[1], dtype)
                self.channels = first.shape[1]
            batches = [common.image_batch(image, self.image_chw, dtype).to(self.device) for image in images]
            if not batches:
                return []
            build, first = self._current_and_first(batches[0])
            build.program.refresh_weights()
            prepared: list[Prepared] = [first] if first is not None else []
            with eval_mode(self.model):
                rest = batches[len(prepared):]
                if together and len(rest) > 1:
                    logits, stored = self._capture(build, torch.cat(rest))
                    prepared += [(logits[k:k + 1], [t[k:k + 1] for t in stored]) for k in range(len(rest))]
                else:
                    prepared += [self._capture(build, image) for image in rest]
                if not build.verified:
                    check_same_output(self.model, batches[0], prepared[0][0],
                                      self.settings.target.key if self.settings.target is not None else None)
                    build.verified = True
            return prepared

    @staticmethod
    def _capture(build: Build, images: Tensor) -> Prepared:
        """The unoccluded pass of a batch of images: output and stored activations, prepared."""
        logits, raw = build.program.capture(images)
        return logits, [spec.prepare(v) for spec, v in zip(build.program.stored, raw)]

    @torch.no_grad()
    def run_positions(self, positions: Tensor, stored: list[Tensor], label: Union[int, Sequence[int]],
                      batch_size: Optional[int] = None, progress: bool = False) -> Tensor:
        """Scores of ``label`` for the given occlusion position indices (any subset, any order):
        ``(P,)`` for one class, ``(P, K)`` for a list of ``K`` classes."""
        if self.settings.target is not None:
            raise ValueError("run_positions scores classes; with a SegmentationTarget use run_program and resolve()")
        label = list(label) if isinstance(label, (list, tuple)) else label
        return self.run_program(positions, stored, lambda logits, _: common.scores(logits, label, self.output),
                                batch_size, progress)

    def target_scores(self, positions: Tensor, stored: list[Tensor], target: Resolved,
                      batch_size: Optional[int] = None, progress: bool = False) -> Tensor:
        """``(P,)`` values of ``target``'s first column (a class, or a segmentation target) for the
        given positions; ``stored`` as :meth:`prepare` gives it (the target's per-image inputs
        are appended here)."""
        return self.run_program(positions, list(stored) + list(target.inputs), lambda out, _: target(out)[:, 0],
                                batch_size, progress)

    @torch.no_grad()
    def run_outputs(self, positions: Tensor, stored: list[Tensor], batch_size: Optional[int] = None,
                    progress: bool = False) -> Tensor:
        """The model's whole output (every class, before any softmax) for the given positions,
        float32 on the CPU: what MONAI's occlusion sensitivity averages."""
        return self.run_program(positions, stored, lambda logits, _: logits.float(), batch_size, progress)

    @torch.no_grad()
    def run_program(self, positions: Tensor, stored: list[Tensor], keep: Keep, batch_size: Optional[int] = None,
                    progress: bool = False, program: Optional[IncrementalProgram] = None) -> Tensor:
        """``keep(output, positions)`` of every batch of ``positions`` through ``program`` (the
        build's incremental program by default; the packed one, say), concatenated on the CPU."""
        with self._checked_once(), eval_mode(self.model):
            build = self.current_build()
            module = (program or build.program).module
            return self.runner.run(module, positions, stored, self.batch_for(batch_size), progress, keep,
                                   build.tier)

    def resolve(self, output: Tensor, label=None, labels: Labels = None, top_k: Optional[int] = None,
                mask: Optional[Tensor] = None) -> Resolved:
        """The target of one image whose unoccluded output is ``output``: the classes asked for
        (``label=``, ``labels=``, ``top_k=``), or the compiled ``SegmentationTarget`` (whose
        per-image ``inputs`` the incremental graph takes after the stored activations)."""
        seg = self.settings.target
        if seg is None:
            if mask is not None:
                raise ValueError("mask= is for an explainer compiled with target=krypton_fx.SegmentationTarget(...)")
            return class_target(label, labels, top_k, self.output).resolve(output)
        if labels is not None or top_k is not None or (label is not None and common.label_index(
                label, 1 << 62) != seg.category):
            raise ValueError(f"this explainer explains category {seg.category} (its SegmentationTarget): give no "
                             "label=/labels=/top_k=, or compile another target")
        return seg.resolve(output, mask)

    def __call__(self, image: Tensor, label: Optional[int] = None, drill_down=None,
                 batch_size: Optional[int] = None, progress: bool = False, labels: Labels = None,
                 top_k: Optional[int] = None, mask: Optional[Tensor] = None) -> OcclusionResult:
        """Occlusion heat map of ``image``, for one class or several at once.

        Args:
            image: ``(C, H, W)`` or ``(1, C, H, W)``, preprocessed for the model.
            label: class to explain (an int, a numpy integer or a 0-d integer
                tensor); defaults to the unoccluded prediction.
            drill_down: adaptive drill-down settings (approximate), or None (tau < 1: peak.keep_peak).
            batch_size: positions per batch; defaults to the compiled one.
            progress: show a progress bar.
            labels: instead of ``label``, several classes (``[3, 5]``) or ``"all"``: one map
                per class from the same occluded forwards (``res.heatmaps``, ``res.labels``;
                each equal to a call with that ``label`` bit for bit).
            top_k: instead, the ``k`` classes the unoccluded image scores highest.
            mask: with a ``SegmentationTarget``, this image's mask (replaces the compiled one).

        Example:
            >>> import torchvision
            >>> ex = compile(torchvision.models.resnet18(num_classes=10), patch=16, stride=16,
            ...              image_size=(32, 32))
            >>> res = ex(torch.rand(3, 32, 32), top_k=3)
            >>> tuple(res.heatmaps.shape), len(res.labels), bool((res.heatmap == res.heatmaps[0]).all())
            ((3, 2, 2), 3, True)
        """
        batch_size = common.batch_size(batch_size)
        if self.settings.target is None:
            class_target(label, labels, top_k, self.output)  # (bad arguments fail before any work)
        if (drill_down is not None or self.tau < 1.0) and (labels is not None or top_k is not None
                                                           or mask is not None):
            raise ValueError("approximate maps (drill_down, tau < 1) explain one class (a target with its "
                             "compiled mask): give label= (or none) instead of labels=/top_k=/mask=")
        if drill_down is not None:  # an approximate mode that runs itself on this explainer
            if not callable(getattr(drill_down, "run", None)):
                raise TypeError(f"drill_down must be a krypton_fx.DrillDown, got {type(drill_down).__name__}")
            return drill_down.run(self, image, label=label, batch_size=batch_size, progress=progress)
        if self.tau < 1.0:  # approximate: the cells that decide the reading recomputed at tau = 1
            return peak.keep_peak(self, compile, image, label, batch_size, progress)
        start = time.perf_counter()
        with self._checked_once(), eval_mode(self.model):
            logits, stored = self.prepare(image)
            resolved = self.resolve(logits, label, labels, top_k, mask)
            scores = self.run_program(torch.arange(self.positions), stored + list(resolved.inputs), resolved,
                                      batch_size, progress)
            batch = min(self.batch_for(batch_size), self.positions)
        maps = scores.T.reshape(len(resolved.labels), *self.grid)
        return OcclusionResult(maps[0], resolved.labels[0], resolved.base[0], self.stride, self.patch,
                               resolved.output, RunStats(self.positions, batch, seconds=time.perf_counter() - start),
                               heatmaps=maps, labels=list(resolved.labels), base_probs=list(resolved.base),
                               mask=getattr(resolved, "mask", None))

    @torch.no_grad()
    def ablate(self, image: Tensor, segments, baseline: Union[float, Tensor] = 0.0, label: Optional[int] = None,
               batch_size: Optional[int] = None, progress: bool = False) -> SegmentResult:
        """Feature ablation: the output with each segment of ``segments`` replaced by ``baseline``,
        exact and incremental; returns a :class:`~krypton_fx.results.SegmentResult` (arguments
        and an example: :func:`krypton_fx.ablation.ablate`)."""
        with self._checked_once(), eval_mode(self.model):
            return ablation.ablate(self, image, segments, baseline, label, batch_size, progress)

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
        return format_report(self.graph_module, self.settings.target, self.settings.norm_stats)

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
            output: str = "prob", channels: Optional[int] = None, leaf_modules: Iterable[type] = (),
            autowrap_functions: Iterable[Callable] = (), cuda_graphs: Optional[bool] = None,
            cache: bool = True, axis_starts: Optional[Sequence[Sequence[int]]] = None,
            fill: Optional[PatchFill] = None, target: Optional[SegmentationTarget] = None,
            norm_stats: str = "exact") -> Explainer:
    """Compile ``model`` into an incremental occlusion explainer.

    Args:
        model: a CNN classifier taking ``(N, C, *spatial)`` inputs (images,
            volumes or signals), returning ``(N, classes)``; or, with ``target=``, a
            dense-output (segmentation) model returning ``(N, classes, *spatial)``.
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
        channels: image channels; None: those of the first layer the image meets (its
            first convolution or batch norm), else as many as ``color`` gives, else the
            first image's.
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
        target: :class:`krypton_fx.SegmentationTarget` for a dense-output model: each cell is the
            reduction over a mask of a category's value in the occluded output, reduced
            incrementally (its ``output`` replaces ``output=``). A mask tensor in it is compared
            by identity for the cache; a call's ``mask=`` gives one per image instead.
        norm_stats: ``"exact"`` (instance/group norms, and layer norms over every axis but the
            batch, see the occluded image: the graph runs dense from the first of them) or
            ``"frozen"`` (they use the unoccluded image's statistics: point ops, the whole net
            incremental; approximate).

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
    settings = make_settings(model, patch, stride, color, image_size, tau, batch_size, device, backend, output,
                             channels, leaf_modules, autowrap_functions, cuda_graphs, axis_starts, fill, target,
                             norm_stats)
    return _CACHE.get(model, settings, Explainer) if cache else Explainer(model, settings)
