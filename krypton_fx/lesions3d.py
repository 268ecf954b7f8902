"""Synthetic volumes with a small bright lesion, and a small 3-D CNN trained on them.

The 3-D counterpart of :mod:`krypton_fx.lesions` (the ``krypton-fx demo
--volume`` model): an MRI-like volume -- a soft-edged ellipsoidal body with a
smooth texture in a dark background, sometimes crossed by a darker tube (a
distractor of another shape, in either class) -- where class 1 carries a small
bright sphere, the lesion, that decides the class. :class:`Tiny3DNet` (three
Conv3d/BatchNorm/ReLU blocks, two max pools, a global max pool and a linear
layer) learns it on the CPU in well under a minute at ``TRAIN_SIZE`` (24^3);
being fully convolutional with a global pool, and the lesion's size being fixed
in voxels, it classifies volumes of any size (the demo explains 32^3 ones).
The weights are cached next to the 2-D lesion models (``$KRYPTON_CACHE`` or
``~/.cache/krypton_fx``).

Seeds: training draws batches from :func:`make_volumes` seeds >= ``TRAIN_SEED``
and measures accuracy on ``TEST_SEED``; seeds below 1000 are never used for
either, so callers can use them for held-out volumes.

Example:
    >>> from krypton_fx import lesions3d
    >>> volumes, labels, boxes = lesions3d.make_volumes(4, size=24, seed=0)
    >>> tuple(volumes.shape), tuple(boxes.shape)
    ((4, 1, 24, 24, 24), (4, 6))
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lesions import (
    TEST_SEED,
    TRAIN_SEED,
    StopRule,
    accuracy,
    checkpoint_path,
    recalibrate_batch_norm,
    train_classifier,
)

__all__ = ["make_volumes", "Tiny3DNet", "train", "evaluate", "load_or_train", "training_info", "lesion_contains",
           "DEFAULT_SIZE", "TRAIN_SIZE", "ARCH"]

logger = logging.getLogger(__name__)

#: Edge of the cubic volumes the demo explains, in voxels.
DEFAULT_SIZE = 32
#: Edge of the volumes the cached model is trained on (smaller: training takes half as long).
TRAIN_SIZE = 24
#: Name of the model in the cache (``lesion-tiny3d-24.pt``).
ARCH = "tiny3d"


def make_volumes(n: int, size: int = DEFAULT_SIZE, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``n`` synthetic volumes, about half of them with a lesion.

    Args:
        n: number of volumes.
        size: edge of the cube in voxels (>= 16).
        seed: generator seed; the same seed gives the same volumes.

    Returns:
        ``(volumes, labels, boxes)``: float32 ``(n, 1, size, size, size)`` in
        ``[0, 1]``; int64 ``(n,)``, 1 where a lesion is present; int64 ``(n, 6)``
        lesion boxes ``(d, h, w, size_d, size_h, size_w)`` in voxels (every voxel
        the lesion brightens by a quarter of its peak or more lies inside), all
        -1 without a lesion.

    Example:
        >>> volumes, labels, boxes = make_volumes(8, size=24, seed=1)
        >>> bool(((labels == 1) == (boxes[:, 0] >= 0)).all())
        True
    """
    if n < 0 or size < 16:
        raise ValueError(f"need n >= 0 and size >= 16, got n={n}, size={size}")
    g = torch.Generator().manual_seed(int(seed))
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    centre = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # voxel centres in (0, 1)
    zz, yy, xx = centre.view(1, -1, 1, 1), centre.view(1, 1, -1, 1), centre.view(1, 1, 1, -1)

    # Smooth texture: coarse noise upsampled trilinearly.
    cells = max(4, size // 8)
    texture = F.interpolate(u(n, 1, cells, cells, cells), size=(size,) * 3, mode="trilinear",
                            align_corners=False)[:, 0]
    # The body: an ellipsoid with soft edges, a little off centre, in a dark background.
    radii = [0.36 + 0.08 * u(n, 1, 1, 1) for _ in range(3)]
    body_c = [0.5 + 0.04 * (u(n, 1, 1, 1) - 0.5) for _ in range(3)]
    ell = sum(((c - bc) / r) ** 2 for c, bc, r in zip((zz, yy, xx), body_c, radii)).sqrt()
    body = torch.sigmoid((1.0 - ell) * size / 4.0)
    tissue = (0.35 + 0.15 * u(n, 1, 1, 1)) + 0.25 * (texture - 0.5)
    lum = 0.05 + body * tissue

    # Distractor: a dark tube (a segment of a cylinder) in either class with probability 1/2.
    has_tube = (u(n, 1, 1, 1) < 0.5).float()
    direction = F.normalize(torch.randn(n, 3, generator=g), dim=1)
    tube_c = [0.35 + 0.3 * u(n, 1, 1, 1) for _ in range(3)]
    rel = [c - tc for c, tc in zip((zz, yy, xx), tube_c)]
    along = sum(r * direction[:, i].view(n, 1, 1, 1) for i, r in enumerate(rel))
    across = (sum(r * r for r in rel) - along ** 2).clamp_min(0).sqrt()
    tube = torch.sigmoid((0.25 - along.abs()) * size) * torch.sigmoid((1.5 / size - across) * size * 2)
    lum = lum * (1 - 0.6 * tube * has_tube)

    # Lesion: a bright soft-edged sphere inside the body, class 1 only.
    labels = (u(n) < 0.5).long()
    radius = 2.0 + 1.0 * u(n)  # in voxels whatever the size: the trained model runs on larger volumes
    direction = F.normalize(torch.randn(n, 3, generator=g), dim=1)
    offset = 0.22 * u(n).pow(1 / 3)  # uniform in a ball of radius 0.22 around the body's centre
    lesion_c = torch.stack([body_c[i].view(n) + offset * direction[:, i] for i in range(3)], 1) * size
    vox = torch.arange(size, dtype=torch.float32) + 0.5
    d2 = ((vox.view(1, -1, 1, 1) - lesion_c[:, 0].view(n, 1, 1, 1)) ** 2
          + (vox.view(1, 1, -1, 1) - lesion_c[:, 1].view(n, 1, 1, 1)) ** 2
          + (vox.view(1, 1, 1, -1) - lesion_c[:, 2].view(n, 1, 1, 1)) ** 2)
    blob = torch.sigmoid((radius.view(n, 1, 1, 1) - d2.sqrt()) * 1.5) * labels.view(n, 1, 1, 1)
    volumes = lum + (0.45 + 0.1 * u(n, 1, 1, 1)) * blob
    volumes = (volumes + 0.02 * torch.randn(volumes.shape, generator=g)).clamp_(0.0, 1.0)

    # The blob is above a quarter of its peak out to radius + ln(3) / 1.5 (~0.73) voxels.
    reach = radius + math.log(3) / 1.5
    low = (lesion_c - reach.view(n, 1) - 0.5).ceil().clamp(0, size - 1)
    high = (lesion_c + reach.view(n, 1) - 0.5).floor().clamp(0, size - 1)
    boxes = torch.cat([low, high - low + 1], 1).long()
    boxes[labels == 0] = -1
    return volumes.unsqueeze(1).contiguous(), labels, boxes


def lesion_contains(box, voxel) -> bool:
    """Whether ``voxel`` ``(d, h, w)`` lies in ``box`` ``(d, h, w, size_d, size_h, size_w)``.

    Example:
        >>> lesion_contains((4, 4, 4, 3, 3, 3), (6, 4, 5)), lesion_contains((4, 4, 4, 3, 3, 3), (7, 4, 5))
        (True, False)
    """
    box = [int(v) for v in box]
    return box[0] >= 0 and all(box[a] <= int(voxel[a]) < box[a] + box[a + 3] for a in range(3))


class Tiny3DNet(nn.Module):
    """Three Conv3d/BatchNorm/ReLU blocks, two max pools, a global max pool, a linear layer."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
            nn.Conv3d(8, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
            nn.Conv3d(16, 32, 3, padding=1), nn.BatchNorm3d(32), nn.ReLU(inplace=True),
        )
        # Max, not mean: a small lesion anywhere should decide the class.
        self.pool = nn.AdaptiveMaxPool3d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def evaluate(model: nn.Module, size: int = DEFAULT_SIZE, n: int = 128, seed: int = TEST_SEED,
             batch: int = 32) -> float:
    """Accuracy of ``model`` on ``n`` generated volumes (held out from training by seed)."""
    return accuracy(model, make_volumes, size, n, seed, batch)


# Label smoothing (0.1) puts the loss floor over 2 classes at about 0.199.
_STOP = StopRule(loss=0.26, window=10, min_steps=30, accuracy=0.97)


def train(size: int = TRAIN_SIZE, max_steps: int = 120, batch: int = 16, lr: float = 3e-3,
          progress: bool = False) -> tuple[nn.Module, dict]:
    """Train a :class:`Tiny3DNet` (seeded): stops once the recent loss is low and held-out
    validation volumes are classified well, or after ``max_steps``.

    Returns:
        ``(model, info)``: the model in eval mode, and its record (held-out
        accuracy, steps, seconds).
    """
    torch.manual_seed(0)
    model = Tiny3DNet()
    start = time.perf_counter()

    def make_batch(step: int) -> tuple[Tensor, Tensor]:
        return make_volumes(batch, size, seed=TRAIN_SEED + step)[:2]

    steps = train_classifier(model, make_batch, lambda m: recalibrate_batch_norm(m, make_volumes, size, batches=4),
                             lambda m: evaluate(m, size, n=32, seed=TEST_SEED - 1), max_steps, lr, _STOP,
                             f"{ARCH}@{size}", progress, postfix_every=10)
    accuracy = evaluate(model, size)
    info = {"arch": ARCH, "size": size, "accuracy": accuracy, "steps": steps, "batch": batch,
            "train_seconds": time.perf_counter() - start}
    logger.info("lesions %s@%d held-out accuracy %.3f (%.0f s)", ARCH, size, accuracy, info["train_seconds"])
    return model.eval(), info


def training_info(size: int = TRAIN_SIZE, cache_dir: Optional[str] = None) -> dict:
    """The cached model's training record (accuracy, steps, seconds), or ``{}`` if not trained yet."""
    path = checkpoint_path(ARCH, size, cache_dir)
    if not path.exists():
        return {}
    return torch.load(path, map_location="cpu", weights_only=True)["info"]


def load_or_train(size: int = TRAIN_SIZE, cache_dir: Optional[str] = None, progress: bool = False) -> nn.Module:
    """The demo's 3-D lesion classifier in eval mode: loaded from the cache, or trained (seeded,
    well under a minute on a CPU) on ``size``^3 volumes and cached.

    Also a ``--model`` for the command line: ``krypton_fx.lesions3d:load_or_train``.

    Example:
        >>> model = load_or_train()
        >>> volumes, labels, _ = make_volumes(32, seed=5)
        >>> float((model(volumes).argmax(1) == labels).float().mean()) > 0.9
        True
    """
    path = checkpoint_path(ARCH, size, cache_dir)
    model = Tiny3DNet()
    if path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        logger.info("lesions: loaded %s (held-out accuracy %.3f)", path, ckpt["info"]["accuracy"])
        return model.eval()
    model, info = train(size, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
    os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a file
    return model.eval()
