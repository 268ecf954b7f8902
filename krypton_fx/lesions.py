"""Synthetic "lesion" scans and small CNNs trained on them.

Pretrained weights cannot be downloaded here, yet tuning (SSIM of approximate
against exact heat maps) and demos need a model whose prediction depends on a
small region, as in the paper's medical use case. This module generates
fundus-like scans on the fly (smooth texture, vessel-like bands, a circular
field of view); class 1 carries a small bright blob (the lesion) that decides
the class, and any image may carry a dark elongated bar (a distractor of a
different shape). It trains narrow models with the layer geometry of
torchvision's VGG16, ResNet18 and InceptionV3 (same kernels, strides, pools and
padding; fewer channels) on them, and caches the weights outside the repo.

Seeds: training draws batches from ``make_dataset`` seeds >= ``TRAIN_SEED``
and measures accuracy on ``TEST_SEED``; seeds below 1000 are never used for
training or testing, so callers can use them for held-out images.

Example:
    >>> from krypton_fx import lesions
    >>> images, labels, boxes = lesions.make_dataset(4, size=64, seed=0)
    >>> tuple(images.shape), labels.dtype, tuple(boxes.shape)
    ((4, 3, 64, 64), torch.int64, (4, 4))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import common

__all__ = ["make_dataset", "build_model", "load_or_train", "evaluate", "accuracy", "recalibrate_batch_norm",
           "checkpoint_path", "training_info", "ARCHS", "DEFAULT_SIZE"]

logger = logging.getLogger(__name__)

#: Architectures :func:`build_model` knows, with the image size each is trained at.
DEFAULT_SIZE = {"tiny": 64, "vgg16": 224, "resnet18": 224, "inception_v3": 299}
ARCHS = tuple(DEFAULT_SIZE)

#: Channel-width divisor per architecture: narrow enough to train on a CPU in minutes.
WIDTH_DIVISOR = {"vgg16": 8, "resnet18": 4, "inception_v3": 8}

TRAIN_SEED = 1_000_000
TEST_SEED = 999_999

# Fundus-like tint of the background (orange-red) and of the lesion (pale yellow).
_TINT = torch.tensor([0.85, 0.45, 0.25])
_LESION = torch.tensor([0.55, 0.55, 0.30])


def _lesion_radius_range(size: int) -> tuple[float, float]:
    # 9-13 px diameter at 224 (about 12), scaled with the image but never below
    # 3 px radius, so that a lesion stays learnable at the 64 px the tiny model
    # uses. Small enough that a 16 px patch can hide it completely.
    lo, hi = 4.5 * size / 224, 6.5 * size / 224
    return max(lo, 3.0), max(hi, 4.5)


def make_dataset(n: int, size: int = 224, seed: int = 0, masks: bool = False) -> tuple[Tensor, ...]:
    """Generate ``n`` synthetic scans, half of them with a lesion.

    Args:
        n: number of images.
        size: image height and width in pixels.
        seed: generator seed; the same seed gives the same images.

    Returns:
        ``(images, labels, lesion_boxes)``: float32 ``(n, 3, size, size)`` in
        ``[0, 1]``; int64 ``(n,)``, 1 where a lesion is present; int64
        ``(n, 4)`` lesion bounding boxes ``(y, x, h, w)`` in pixels, all -1 for
        images without a lesion. With ``masks=True`` a fourth: bool ``(n, size, size)``,
        the lesion's pixels (its soft edge at one half), for segmentation.

    Example:
        >>> images, labels, boxes = make_dataset(8, size=64, seed=1)
        >>> bool(((labels == 1) == (boxes[:, 0] >= 0)).all())
        True
    """
    if n < 0 or size < 16:
        raise ValueError(f"need n >= 0 and size >= 16, got n={n}, size={size}")
    g = torch.Generator().manual_seed(int(seed))
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)

    # Smooth texture: coarse noise upsampled bicubically.
    cells = max(4, size // 24)
    texture = F.interpolate(u(n, 1, cells, cells), size=(size, size), mode="bicubic",
                            align_corners=False)[:, 0]
    warp = F.interpolate(u(n, 1, 4, 4), size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    # Vessel-like bands: a warped sinusoid at a random angle and frequency.
    theta = u(n, 1, 1) * math.pi
    freq = 3.0 + 4.0 * u(n, 1, 1)
    phase = u(n, 1, 1) * 2 * math.pi
    along = torch.cos(theta) * xx + torch.sin(theta) * yy
    bands = torch.sin(2 * math.pi * freq * along + 3.0 * warp + phase) ** 8

    # Circular field of view: dark outside, like a fundus photograph.
    cy, cx = 0.5 + 0.04 * (u(n, 1, 1) - 0.5), 0.5 + 0.04 * (u(n, 1, 1) - 0.5)
    dist = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    fov = torch.sigmoid((0.47 - dist) * size / 3.0)
    brightness = 0.75 + 0.3 * u(n, 1, 1)
    lum = brightness * (0.55 + 0.3 * texture - 0.25 * bands) * (1.1 - 0.5 * dist)

    # Distractor: a dark elongated bar, in either class with probability 1/2.
    has_bar = u(n, 1, 1) < 0.5
    by, bx = 0.3 + 0.4 * u(n, 1, 1), 0.3 + 0.4 * u(n, 1, 1)
    bt = u(n, 1, 1) * math.pi
    half_len = (20.0 + 15.0 * u(n, 1, 1)) / 224
    half_wid = max(1.5 / size, 2.5 / 224)
    dy, dx = yy - by, xx - bx
    par = torch.cos(bt) * dx + torch.sin(bt) * dy
    perp = -torch.sin(bt) * dx + torch.cos(bt) * dy
    bar = torch.sigmoid((half_len - par.abs()) * size) * torch.sigmoid((half_wid - perp.abs()) * size * 2)
    lum = lum * (1 - 0.6 * bar * has_bar)

    images = _TINT.view(1, 3, 1, 1) * lum.unsqueeze(1)

    # Lesion: a bright soft-edged blob inside the field of view, class 1 only.
    labels = (u(n) < 0.5).long()
    r_lo, r_hi = _lesion_radius_range(size)
    radius = r_lo + (r_hi - r_lo) * u(n)
    ang, rad = u(n) * 2 * math.pi, 0.33 * torch.sqrt(u(n))
    ly = (cy.view(n) + rad * torch.sin(ang)) * size
    lx = (cx.view(n) + rad * torch.cos(ang)) * size
    pix = torch.arange(size, dtype=torch.float32) + 0.5
    d2 = (pix.view(1, size, 1) - ly.view(n, 1, 1)) ** 2 + (pix.view(1, 1, size) - lx.view(n, 1, 1)) ** 2
    blob = torch.sigmoid((radius.view(n, 1, 1) - d2.sqrt()) * 1.5) * labels.view(n, 1, 1)
    images = images + _LESION.view(1, 3, 1, 1) * blob.unsqueeze(1)

    images = images * fov.unsqueeze(1) + 0.02 * torch.randn(images.shape, generator=g)
    images = images.clamp_(0.0, 1.0).contiguous()

    top = (ly - radius).floor().clamp(0, size - 1)
    left = (lx - radius).floor().clamp(0, size - 1)
    extent = (2 * radius).ceil()
    boxes = torch.stack([top, left, extent.clamp(max=size - top), extent.clamp(max=size - left)], 1).long()
    boxes[labels == 0] = -1
    if masks:
        return images, labels, boxes, blob > 0.5
    return images, labels, boxes


# --- models -----------------------------------------------------------------------


class TinyLesionNet(nn.Module):
    """Three conv layers and a global max pool: trains in seconds at 64 px."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        )
        # Max, not mean: a small lesion anywhere should decide the class.
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _narrow(model: nn.Module, divisor: int, image_channels: int = 3) -> nn.Module:
    """Divide every conv and batch-norm width by ``divisor``, keeping kernels, strides and padding.

    Uniform division keeps channel concatenations (Inception) and residual
    adds (ResNet) consistent; the image's channel count is kept.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d):
            cin = child.in_channels if child.in_channels == image_channels else child.in_channels // divisor
            new = nn.Conv2d(cin, child.out_channels // divisor, child.kernel_size, child.stride,
                            child.padding, child.dilation, child.groups, child.bias is not None,
                            child.padding_mode)
        elif isinstance(child, nn.BatchNorm2d):
            new = nn.BatchNorm2d(child.num_features // divisor, child.eps, child.momentum)
        else:
            _narrow(child, divisor, image_channels)
            continue
        setattr(model, name, new)
    return model


def build_model(arch: str, num_classes: int = 2) -> nn.Module:
    """A randomly initialised lesion classifier.

    Args:
        arch: ``"tiny"``, or ``"vgg16"`` / ``"resnet18"`` / ``"inception_v3"``:
            torchvision's layer geometry (kernels, strides, pools, padding,
            VGG16 with batch norm, InceptionV3 without the auxiliary head) with
            channel widths divided by ``WIDTH_DIVISOR[arch]`` and a small head.
        num_classes: output classes.

    Example:
        >>> model = build_model("resnet18")
        >>> tuple(model(torch.rand(1, 3, 64, 64)).shape)
        (1, 2)
    """
    import torchvision.models as tvm

    if arch == "tiny":
        return TinyLesionNet(num_classes)
    if arch not in WIDTH_DIVISOR:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    d = WIDTH_DIVISOR[arch]
    if arch == "vgg16":
        model = _narrow(tvm.vgg16_bn(weights=None), d)
        width = 512 // d
        # torchvision's 4096-wide head would dominate a narrow model; conv geometry is unchanged.
        model.classifier = nn.Sequential(nn.Linear(width * 7 * 7, 128), nn.ReLU(inplace=True),
                                         nn.Dropout(0.3), nn.Linear(128, num_classes))
    elif arch == "resnet18":
        model = _narrow(tvm.resnet18(weights=None), d)
        model.fc = nn.Linear(512 // d, num_classes)
    else:
        model = _narrow(tvm.inception_v3(weights=None, aux_logits=False, init_weights=False), d)
        model.fc = nn.Linear(2048 // d, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


# --- training and caching ------------------------------------------------------------------

# (images per step, most steps, learning rate) per architecture. The task is easy, so
# training stops early once the recent loss is low: a few CPU minutes per model.
_SCHEDULE = {"tiny": (32, 60, 3e-3), "vgg16": (16, 300, 1e-3), "resnet18": (16, 300, 1e-3),
             "inception_v3": (16, 300, 1e-3)}
_LABEL_SMOOTHING = 0.1


def checkpoint_path(arch: str, size: int, cache_dir: Optional[str] = None) -> Path:
    """Where :func:`load_or_train` keeps the weights: ``$KRYPTON_CACHE`` or ``~/.cache/krypton_fx``."""
    root = cache_dir or os.environ.get("KRYPTON_CACHE") or Path.home() / ".cache" / "krypton_fx"
    return Path(root) / f"lesion-{arch}-{size}.pt"


@torch.no_grad()
def evaluate(model: nn.Module, size: int, n: int = 256, seed: int = TEST_SEED, batch: int = 32) -> float:
    """Accuracy of ``model`` on ``n`` generated images (held out from training by seed)."""
    return accuracy(model, make_dataset, size, n, seed, batch)


@torch.no_grad()
def accuracy(model: nn.Module, generate: Callable[..., tuple], size: int, n: int, seed: int,
             batch: int = 32) -> float:
    """Accuracy of ``model`` on ``n`` inputs of ``generate(count, size, seed=...)`` (which returns
    ``(inputs, labels, boxes)``), made ``batch`` at a time; the model's mode is left as it was.
    Shared by the 2-D lesion data and the 3-D one (:mod:`krypton_fx.lesions3d`)."""
    was_training = model.training
    model.eval()
    correct = 0
    for lo in range(0, n, batch):
        inputs, labels, _ = generate(min(batch, n - lo), size, seed=seed * 1000 + lo)
        correct += int((model(inputs).argmax(1) == labels).sum())
    model.train(was_training)
    return correct / max(1, n)


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, generate: Callable[..., tuple], size: int, batches: int = 8,
                           batch: int = 16) -> None:
    """Recompute batch-norm running statistics as plain averages over fresh batches of
    ``generate(count, size, seed=...)``; leaves the model in eval mode.

    Training stops after a few dozen steps, when the exponential running
    averages still lag the fast-moving weights: eval-mode predictions can then
    collapse to one class although train-mode ones are perfect.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i in range(batches):
        model(generate(batch, size, seed=TRAIN_SEED - 1 - i)[0])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When :func:`train_classifier` stops: once the mean loss of the last ``window`` steps is below
    ``loss`` (after at least ``min_steps``) and the recalibrated model classifies held-out
    validation images with at least ``accuracy``; or after the last step."""

    loss: float
    window: int
    min_steps: int
    accuracy: float


# Loss floor with label smoothing 0.1 over 2 classes is about 0.199.
_STOP = StopRule(loss=0.23, window=20, min_steps=40, accuracy=0.97)


def train_classifier(model: nn.Module, make_batch: Callable[[int], tuple[Tensor, Tensor]],
                     recalibrate: Callable[[nn.Module], None], validate: Callable[[nn.Module], float],
                     max_steps: int, lr: float, stop: StopRule, name: str, progress: bool = False,
                     postfix_every: int = 25) -> int:
    """Seeded AdamW training with a short warm-up and label smoothing; returns the steps taken.

    ``make_batch(step)`` gives ``(inputs, labels)``; ``recalibrate`` resets BatchNorm
    statistics for eval mode before each validation (``validate`` returns an accuracy).
    Shared by the 2-D lesion models and the 3-D one (:mod:`krypton_fx.lesions3d`).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10)
    losses: list[float] = []
    steps = common.progress(range(max_steps), progress, f"training lesions {name}", unit="step")
    for step in steps:
        model.train()
        inputs, labels = make_batch(step)
        # Label smoothing keeps probabilities off 1.0: a saturated softmax would
        # hide partial occlusions and flatten the heat maps.
        loss = F.cross_entropy(model(inputs), labels, label_smoothing=_LABEL_SMOOTHING)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        warmup.step()
        losses.append(loss.item())
        recent = sum(losses[-stop.window:]) / len(losses[-stop.window:])
        if progress and step % postfix_every == 0:
            steps.set_postfix(loss=f"{recent:.3f}")
        low_loss = step + 1 >= stop.min_steps and recent < stop.loss and len(losses) % 10 == 0
        if low_loss or step == max_steps - 1:
            # Stop only once eval mode (what explainers run) is accurate too.
            recalibrate(model)
            accuracy = validate(model)
            logger.info("lesions %s step %d: loss %.3f, validation accuracy %.3f", name, step + 1, recent,
                        accuracy)
            if accuracy >= stop.accuracy:
                break
    return len(losses)


def _train(arch: str, size: int, progress: bool) -> tuple[nn.Module, dict]:
    batch, max_steps, lr = _SCHEDULE[arch]
    torch.manual_seed(0)
    model = build_model(arch)
    start = time.perf_counter()

    def make_batch(step: int) -> tuple[Tensor, Tensor]:
        return make_dataset(batch, size, seed=TRAIN_SEED + step)[:2]

    steps = train_classifier(model, make_batch, lambda m: recalibrate_batch_norm(m, make_dataset, size),
                             lambda m: evaluate(m, size, n=64, seed=TEST_SEED - 1), max_steps, lr, _STOP,
                             f"{arch}@{size}", progress)
    accuracy = evaluate(model, size)
    info = {"arch": arch, "size": size, "accuracy": accuracy, "steps": steps, "batch": batch,
            "train_seconds": time.perf_counter() - start}
    logger.info("lesions %s@%d held-out accuracy %.3f (%.0f s)", arch, size, accuracy, info["train_seconds"])
    return model, info


def training_info(arch: str = "tiny", size: Optional[int] = None, cache_dir: Optional[str] = None) -> dict:
    """The cached model's training record (accuracy, steps, seconds), or ``{}`` if not trained yet."""
    path = checkpoint_path(arch, size or DEFAULT_SIZE.get(arch, 224), cache_dir)
    if not path.exists():
        return {}
    return torch.load(path, map_location="cpu", weights_only=True)["info"]


def load_or_train(arch: str = "tiny", size: Optional[int] = None, cache_dir: Optional[str] = None,
                  progress: bool = False) -> nn.Module:
    """A lesion classifier in eval mode: loaded from the cache, or trained (seeded) and cached.

    Args:
        arch: see :func:`build_model`.
        size: training image size; defaults to ``DEFAULT_SIZE[arch]``.
        cache_dir: directory for the weights; defaults to ``$KRYPTON_CACHE``
            or ``~/.cache/krypton_fx``.
        progress: show a progress bar while training (the held-out accuracy is logged).

    Example:
        >>> model = load_or_train("tiny")          # seconds the first time
        >>> images, labels, _ = make_dataset(64, size=64, seed=5)
        >>> float((model(images).argmax(1) == labels).float().mean()) > 0.9
        True
    """
    if arch not in DEFAULT_SIZE:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    size = size or DEFAULT_SIZE[arch]
    path = checkpoint_path(arch, size, cache_dir)
    model = build_model(arch)
    if path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        logger.info("lesions: loaded %s (held-out accuracy %.3f)", path, ckpt["info"]["accuracy"])
        return model.eval()
    model, info = _train(arch, size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
    os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a file
    return model.eval()
