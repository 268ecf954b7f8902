"""Random-initialised torchvision classifiers for exactness tests."""

from __future__ import annotations

import torch
import torchvision
from strategies import randomize_batchnorm
from torch import nn

# (image size, patch, stride) per model: small images keep the whole zoo
# within CI's budget; every setting leaves several positions per axis.
DEFAULT_SETTING = (64, 16, 24)
SETTINGS = {
    "inception_v3": (80, 16, 32),   # needs >= 75 px
    "maxvit_t": (224, 112, 112),    # window partitioning needs 224
    "vit_h_14": (28, 14, 14),       # patch-embedding stride 14
}
BUILD_KWARGS = {
    "inception_v3": {"init_weights": False, "aux_logits": False},
    "googlenet": {"init_weights": False, "aux_logits": False},
}


def classifier_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def setting(name: str) -> tuple[int, int, int]:
    if name in SETTINGS:
        return SETTINGS[name]
    if name.startswith("vit_"):
        return (32, 16, 16)
    return DEFAULT_SETTING



def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(BUILD_KWARGS.get(name, {}))
    if name.startswith("vit_"):
        kwargs["image_size"] = setting(name)[0]
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    return randomize_batchnorm(model, seed, affine=True).eval()
