"""The public API: ``compile``, the :class:`Explainer` it returns, and the
``naive_occlusion`` baseline (eqs. 1-6) that is also the exactness oracle."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from . import geometry as geo
from .ops import BACKENDS, occlude_window
from .passes.patch_prop import DENSE, META_KEY, PATCHED, PatchInfo, PatchProp
from .passes.rewrite import IncrementalProgram, rewrite
from .tracing import eval_mode, trace

__all__ = ["OcclusionResult", "Explainer", "compile", "naive_occlusion"]

IntPair = Union[int, Sequence[int]]


@dataclasses.dataclass
class OcclusionResult:
    """An occlusion heat map.

    Attributes:
        heatmap: float32 CPU tensor ``(H_M, W_M)``; cell ``(i, j)`` is the
            probability (or logit) of ``label`` with the patch's top-left
            corner at ``(i * Sy, j * Sx)``.
        label: the explained class.
        base_prob: probability (or logit) of ``label`` without occlusion.
        stride: ``(Sy, Sx)`` between heat-map cells, in image pixels.
        patch: ``(h, w)`` occlusion patch.
        output: ``"prob"`` or ``"logit"``.
        stats: timings and counts of the run (positions, batches, seconds).
    """

    heatmap: Tensor
    label: int
    base_prob: float
    stride: tuple[int, int]
    patch: tuple[int, int]
    output: str = "prob"
    stats: dict = dataclasses.field(default_factory=dict)


# --- argument checking -------------------------------------------------------


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)) or isinstance(value, str):
        raise TypeError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return pair  # type: ignore[return-value]


def _color(color: Union[float, Sequence[float], Tensor], channels: int, dtype) -> Tensor:
    t = torch.as_tensor(color, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"color has {t.numel()} values but the image has {channels} channels: "
                         "give one float or one value per channel")
    if not torch.isfinite(t).all():
        raise ValueError("color must be finite")
    return t.to(dtype)


def _output_kind(output: str) -> str:
    if output not in ("prob", "logit"):
        raise ValueError(f"output must be 'prob' or 'logit', got {output!r}")
    return output


def _image_batch(image: Tensor, expect_chw: Optional[tuple[int, int, int]] = None) -> Tensor:
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor (C, H, W) or (1, C, H, W), got {type(image).__name__}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must have shape (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating-point tensor (model-ready), got {image.dtype}")
    if expect_chw is not None and tuple(image.shape[1:]) != expect_chw:
        raise ValueError(f"image has shape {tuple(image.shape[1:])} but the explainer was compiled for "
                         f"{expect_chw}; resize the image or compile with image_size={expect_chw[1:]}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values; clean or re-normalise it first")
    return image


def _scores(logits: Tensor, label: int, output: str) -> Tensor:
    if logits.dim() != 2:
        raise ValueError(f"the model must return class scores of shape (N, classes), got {tuple(logits.shape)}")
    if output == "prob":
        return torch.softmax(logits.float(), dim=1)[:, label]
    return logits[:, label].float()


def _check_label(label: Optional[int], classes: int) -> None:
    if label is not None and not (isinstance(label, int) and 0 <= label < classes):
        raise ValueError(f"label {label!r} is out of range: the model has {classes} classes (0..{classes - 1})")


def _default_batch_size(device: torch.device, bytes_per_position: int) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget, cap = free // 3, 512
    else:
        budget, cap = 2 << 30, 64
    return int(max(1, min(cap, budget // max(1, bytes_per_position))))


def _resolve_device(device, model: nn.Module) -> torch.device:
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use device='cpu'")
    return device


# --- naive baseline ---------------------------------------------------------------


@torch.no_grad()
def naive_occlusion(model: nn.Module, image: Tensor, patch: IntPair = 16, stride: IntPair = 4,
                    color: Union[float, Sequence[float]] = 0.0, label: Optional[int] = None,
                    batch_size: Optional[int] = None, output: str = "prob",
                    progress: bool = False) -> OcclusionResult:
    """Naive occlusion: one full inference per patch position, batched (eqs. 1-6).

    The baseline krypton_fx is measured against, and its exactness oracle.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> res = naive_occlusion(model, torch.rand(3, 64, 64), patch=16, stride=16)
        >>> tuple(res.heatmap.shape)
        (4, 4)
    """
    output = _output_kind(output)
    image = _image_batch(image)
    patch_hw, stride_hw = _pair(patch, "patch"), _pair(stride, "stride")
    h, w = image.shape[-2:]
    if patch_hw[0] > h or patch_hw[1] > w:
        raise ValueError(f"patch {patch_hw} is larger than the image {(h, w)}; use a smaller patch")
    ys, xs, grid = geo.occlusion_grid((h, w), patch_hw, stride_hw)
    device = _resolve_device(None, model)
    image = image.to(device)
    col = _color(color, image.shape[1], image.dtype).to(device)
    with eval_mode(model):
        logits = model(image)
        classes = logits.shape[-1]
        _check_label(label, classes)
        label = int(logits.argmax(1)) if label is None else label
        base = float(_scores(logits, label, output))
        batch = batch_size or _default_batch_size(device, 4 * image[0].numel() * 8)
        out = torch.empty(len(ys), dtype=torch.float32)
        starts = torch.stack([torch.zeros_like(ys), torch.zeros_like(xs), ys, xs], 1).to(device)
        for lo in _progress(range(0, len(ys), batch), progress, "naive occlusion"):
            table = starts[lo:lo + batch]
            occluded = occlude_window(image, col, table, (h, w), patch_hw, backend="torch")
            out[lo:lo + batch] = _scores(model(occluded.contiguous()), label, output).cpu()
    return OcclusionResult(out.view(grid), label, base, stride_hw, patch_hw, output,
                           {"positions": len(ys), "batch_size": batch})


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, unit="batch")


# --- the compiled explainer ------------------------------------------------------------


class Explainer:
    """A model compiled for incremental occlusion at one image size, patch and stride.

    Create with :func:`krypton_fx.compile`; call with an image to get an
    :class:`OcclusionResult`.
    """

    def __init__(self, model: nn.Module, gm: fx.GraphModule, program: IncrementalProgram,
                 image_chw: tuple[int, int, int], patch: tuple[int, int], stride: tuple[int, int],
                 grid: tuple[int, int], tau: float, batch_size: Optional[int], device: torch.device,
                 backend: str, output: str, color: Tensor, bytes_per_position: int,
                 cuda_graphs: Optional[bool] = None):
        self.model = model
        self.graph_module = gm
        self.program = program
        self.image_chw = image_chw
        self.patch = patch
        self.stride = stride
        self.grid = grid
        self.tau = tau
        self.device = device
        self.backend = backend
        self.output = output
        self.color = color
        self.bytes_per_position = bytes_per_position
        self.batch_size = batch_size or _default_batch_size(device, bytes_per_position)
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self._graphs: dict = {}

    @property
    def positions(self) -> int:
        return self.grid[0] * self.grid[1]

    def infos(self) -> list[tuple[fx.Node, PatchInfo]]:
        """Every node of the traced graph with its PatchProp annotation."""
        return [(n, n.meta[META_KEY]) for n in self.graph_module.graph.nodes]

    @torch.no_grad()
    def prepare(self, image: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the unoccluded image once: its output and the stored activations."""
        image = _image_batch(image, self.image_chw).to(self.device)
        self.program.refresh_weights()
        with eval_mode(self.model):
            logits, raw = self.program.capture(image)
        stored = [spec.prepare(v) for spec, v in zip(self.program.stored, raw)]
        return logits, stored

    @torch.no_grad()
    def run_positions(self, positions: Tensor, stored: list[Tensor], label: int,
                      batch_size: Optional[int] = None, progress: bool = False) -> Tensor:
        """Scores of ``label`` for the given occlusion position indices (any subset, any order)."""
        batch = max(1, min(batch_size or self.batch_size, len(positions)))
        positions = positions.to(self.device)
        scores = []
        with eval_mode(self.model):
            run = self._batch_runner(batch, stored) if len(positions) else None
            for lo in _progress(range(0, len(positions), batch), progress, "krypton_fx"):
                logits = run(positions[lo:lo + batch])
                scores.append(_scores(logits, label, self.output))
        # One device-to-host copy at the end: no synchronisation per batch.
        return torch.cat(scores).cpu() if scores else torch.empty(0)

    def _batch_runner(self, batch: int, stored: list[Tensor]) -> Callable[[Tensor], Tensor]:
        """The incremental graph for this batch size: CUDA-graph replay where enabled."""
        if not self.cuda_graphs:
            return lambda pos: self.program.module(pos, *stored)
        from .cuda_graphs import GraphedBatch
        # A graph holds raw pointers: re-capture if parameters were replaced
        # (model.to(...), say) since it was captured.
        key = (batch, tuple(t.data_ptr() for t in self.program.module.state_dict().values()))
        runner = self._graphs.get(key)
        if runner is None:
            self._graphs.clear()
            runner = self._graphs[key] = GraphedBatch(self.program.module, batch, stored)
        runner.load(stored)
        return runner

    def __call__(self, image: Tensor, label: Optional[int] = None, drill_down=None,
                 batch_size: Optional[int] = None, progress: bool = False) -> OcclusionResult:
        """Occlusion heat map of ``image``.

        Args:
            image: ``(C, H, W)`` or ``(1, C, H, W)``, preprocessed for the model.
            label: class to explain; defaults to the unoccluded prediction.
            drill_down: adaptive drill-down settings (approximate), or None.
            batch_size: positions per batch; defaults to the compiled one.
            progress: show a progress bar.
        """
        if drill_down is not None:
            from .approx import run_drill_down
            return run_drill_down(self, image, drill_down, label=label, batch_size=batch_size,
                                  progress=progress)
        logits, stored = self.prepare(image)
        _check_label(label, logits.shape[-1])
        label = int(logits.argmax(1)) if label is None else label
        base = float(_scores(logits, label, self.output))
        scores = self.run_positions(torch.arange(self.positions), stored, label, batch_size, progress)
        return OcclusionResult(scores.view(self.grid), label, base, self.stride, self.patch,
                               self.output, {"positions": self.positions,
                                             "batch_size": batch_size or self.batch_size})

    def report(self) -> str:
        """A per-node table: kind, state, patch size, and where savings stop."""
        from .report import format_report
        return format_report(self)

    def __repr__(self) -> str:
        return (f"Explainer({type(self.model).__name__}, image={self.image_chw}, patch={self.patch}, "
                f"stride={self.stride}, positions={self.positions}, tau={self.tau}, "
                f"backend={self.backend!r}, device={self.device})")


def _bytes_per_position(prop: PatchProp) -> int:
    """Rough peak memory one position needs: a few of the largest activations it touches."""
    sizes = []
    for n, shape in prop.shapes.items():
        info = prop.infos[n]
        if info.state == PATCHED and len(shape) == 4:
            sizes.append(shape[1] * info.box.h * info.box.w)
        elif info.state == DENSE:
            sizes.append(math.prod(shape[1:]))
        for read in info.reads:
            sizes.append(shape[1] * read.window.h * read.window.w if len(shape) == 4 else 0)
    sizes.sort(reverse=True)
    return 4 * 2 * sum(sizes[:3]) if sizes else 1 << 20


def compile(model: nn.Module, patch: IntPair = 16, stride: IntPair = 4,
            color: Union[float, Sequence[float]] = 0.0, image_size: IntPair = (224, 224),
            tau: float = 1.0, batch_size: Optional[int] = None, device=None, backend: str = "auto",
            output: str = "prob", channels: int = 3, leaf_modules: Iterable[type] = (),
            autowrap_functions: Iterable[Callable] = (), cuda_graphs: Optional[bool] = None) -> Explainer:
    """Compile ``model`` into an incremental occlusion explainer.

    Args:
        model: a CNN classifier taking ``(N, C, H, W)`` images, returning ``(N, classes)``.
        patch: occlusion patch size, an int or ``(h, w)``.
        stride: patch stride, an int or ``(sy, sx)``.
        color: patch colour in the model's input space: a float or one per channel.
        image_size: ``(H, W)`` of the images the explainer takes.
        tau: projective-field threshold (eqs. 39-45); 1.0 is exact.
        batch_size: positions per batch; None picks one that fits in memory.
        device: where to run; defaults to the model's device.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"`` or ``"triton"``.
        output: ``"prob"`` (softmax probability of the label) or ``"logit"``.
        channels: image channels.
        leaf_modules: module types to keep opaque when tracing.
        autowrap_functions: functions to keep opaque when tracing.
        cuda_graphs: replay each batch from a CUDA graph (default: on for CUDA).

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
    patch_hw, stride_hw, size_hw = _pair(patch, "patch"), _pair(stride, "stride"), _pair(image_size, "image_size")
    if patch_hw[0] > size_hw[0] or patch_hw[1] > size_hw[1]:
        raise ValueError(f"patch {patch_hw} is larger than the image {size_hw}; use a smaller patch "
                         "or a larger image_size")
    if not (isinstance(tau, (int, float)) and 0.0 < tau <= 1.0):
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    output = _output_kind(output)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    dev = _resolve_device(device, model)
    if cuda_graphs and dev.type != "cuda":
        raise ValueError("cuda_graphs=True needs a CUDA device; leave it None on the CPU")
    model.to(dev)
    gm = trace(model, leaf_modules, autowrap_functions)
    ys, xs, grid = geo.occlusion_grid(size_hw, patch_hw, stride_hw)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    example = torch.zeros(1, channels, *size_hw, dtype=dtype, device=dev)
    prop = PatchProp(gm, patch_hw, ys, xs, tau=float(tau))
    with eval_mode(model), torch.no_grad():
        try:
            example_out = prop.run(example)
        except RuntimeError as e:
            raise ValueError(f"{type(model).__name__} cannot run on a {(1, channels, *size_hw)} image: "
                             f"{e.__cause__ or e}. Hint: check image_size and channels.") from e
    if not isinstance(example_out, Tensor) or example_out.dim() != 2:
        raise ValueError("the model must return class scores of shape (N, classes); got "
                         f"{type(example_out).__name__} {getattr(example_out, 'shape', '')}")
    col = _color(color, channels, dtype).to(dev)
    program = rewrite(gm, backend=backend, color=col)
    program.module.to(dev)
    return Explainer(model, gm, program, (channels, *size_hw), patch_hw, stride_hw, grid, float(tau),
                     batch_size, dev, backend, output, col, _bytes_per_position(prop), cuda_graphs)
