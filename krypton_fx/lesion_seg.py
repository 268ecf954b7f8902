"""A small U-Net that segments the lesion of the synthetic scans (:mod:`krypton_fx.lesions`),
trained once on the CPU and cached outside the repo, for ``krypton-fx demo --segmentation``
and the frozen-norm measurements (batch norm by default; instance norm to measure
``norm_stats="frozen"`` against exact occlusion).

Example:
    >>> from krypton_fx import lesion_seg
    >>> model = lesion_seg.build_unet("batch")
    >>> tuple(model(torch.zeros(1, 3, 64, 64)).shape)
    (1, 2, 64, 64)
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import common
from .lesions import TEST_SEED, TRAIN_SEED, make_dataset

__all__ = ["LesionUNet", "build_unet", "load_or_train", "dice", "checkpoint_path", "training_info", "SIZE",
           "NORMS"]

logger = logging.getLogger(__name__)

#: Image size the U-Net is trained and explained at.
SIZE = 96
NORMS = ("batch", "instance")
_STEPS, _BATCH, _LR = 300, 8, 3e-3
_STOP_DICE = 0.8  # held-out Dice at which training stops early


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.InstanceNorm2d(channels, affine=True)


def _block(kind: str, cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(kind, cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(kind, cout), nn.ReLU())


class LesionUNet(nn.Module):
    """Two downsamplings (max pool), two transposed-conv upsamplings with skip concats, two
    3x3 convs a level with batch or instance norm, a 1x1 head to two classes (background,
    lesion)."""

    def __init__(self, norm: str = "batch", width: int = 8):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.bottom = _block(norm, 3, w), _block(norm, w, 2 * w), _block(norm, 2 * w, 4 * w)
        self.pool = nn.MaxPool2d(2)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), _block(norm, 4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, 2), _block(norm, 2 * w, w)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([e2, self.up2(b)], 1))
        d1 = self.dec1(torch.cat([e1, self.up1(d2)], 1))
        return self.head(d1)


def build_unet(norm: str = "batch") -> LesionUNet:
    """An untrained :class:`LesionUNet` (seeded)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    torch.manual_seed(0)
    return LesionUNet(norm)


def checkpoint_path(norm: str = "batch", cache_dir: Optional[str] = None) -> Path:
    """Where :func:`load_or_train` keeps the weights: ``$KRYPTON_CACHE`` or ``~/.cache/krypton_fx``."""
    root = cache_dir or os.environ.get("KRYPTON_CACHE") or Path.home() / ".cache" / "krypton_fx"
    return Path(root) / f"lesion-seg-unet-{norm}-{SIZE}.pt"


def _batch(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` scans and their lesion masks (int64 class maps); every scan carries a lesion."""
    images, labels, _, masks = make_dataset(2 * n + 8, SIZE, seed=seed, masks=True)
    keep = (labels == 1).nonzero()[:n, 0]
    return images[keep], masks[keep].long()


@torch.no_grad()
def dice(model: nn.Module, n: int = 32, seed: int = TEST_SEED) -> float:
    """Mean Dice of the predicted lesion on ``n`` held-out lesion scans."""
    was = model.training
    model.eval()
    images, masks = _batch(n, seed)
    pred = model(images).argmax(1)
    inter = ((pred == 1) & (masks == 1)).flatten(1).sum(1).float()
    total = ((pred == 1).flatten(1).sum(1) + (masks == 1).flatten(1).sum(1)).float()
    model.train(was)
    return float((2 * inter / total.clamp(min=1)).mean())


def _train(norm: str, progress: bool) -> tuple[nn.Module, dict]:
    model = build_unet(norm)
    opt = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=1e-4)
    start = time.perf_counter()
    weight = torch.tensor([1.0, 10.0])  # lesion pixels are rare
    steps = common.progress(range(_STEPS), progress, f"training lesion U-Net ({norm} norm)", unit="step")
    score, step = 0.0, 0
    for step in steps:
        model.train()
        images, masks = _batch(_BATCH, TRAIN_SEED + step)
        logits = model(images)
        prob = torch.softmax(logits, 1)[:, 1]
        soft_dice = 1 - (2 * (prob * masks).sum() + 1) / (prob.sum() + masks.sum() + 1)
        loss = F.cross_entropy(logits, masks, weight=weight) + soft_dice
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            score = dice(model, 16, TEST_SEED - 1)
            logger.info("lesion U-Net (%s) step %d: loss %.3f, validation Dice %.3f", norm, step + 1, loss.item(),
                        score)
            if score >= _STOP_DICE:
                break
    info = {"norm": norm, "size": SIZE, "dice": dice(model), "steps": step + 1, "batch": _BATCH,
            "train_seconds": time.perf_counter() - start}
    logger.info("lesion U-Net (%s) held-out Dice %.3f (%.0f s)", norm, info["dice"], info["train_seconds"])
    return model.eval(), info


def training_info(norm: str = "batch", cache_dir: Optional[str] = None) -> dict:
    """The cached U-Net's training record (Dice, steps, seconds), or ``{}`` if not trained yet."""
    path = checkpoint_path(norm, cache_dir)
    return torch.load(path, map_location="cpu", weights_only=True)["info"] if path.exists() else {}


def load_or_train(norm: str = "batch", cache_dir: Optional[str] = None, progress: bool = False) -> nn.Module:
    """The lesion U-Net in eval mode: loaded from the cache, or trained (seeded) and cached."""
    path = checkpoint_path(norm, cache_dir)
    model = build_unet(norm)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        return model.eval()
    model, info = _train(norm, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return model.eval()
