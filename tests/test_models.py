"""Exactness over torchvision's whole classifier zoo: incremental == naive.

Random-initialised models (no weights can be downloaded) with non-trivial
BatchNorm statistics, small images to fit CI; every model that traces must be
exact to float32 rounding. Transformers (ViT, Swin, MaxViT) save little or
nothing but must stay exact.
"""

import os

import pytest
import torch
import zoo

import krypton_fx

# KRYPTON_TEST_DEVICE=cuda runs the zoo on a GPU (bench/gpu_check.sh), with
# TF32 off so that float32 exactness is meaningful there.
DEVICE = os.environ.get("KRYPTON_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda"):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("name", zoo.classifier_names())
def test_zoo_model_is_exact(name):
    model = zoo.build(name).to(DEVICE)
    size, patch, stride = zoo.setting(name)
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ex = krypton_fx.compile(model, patch=patch, stride=stride, image_size=(size, size), color=0.3)
    got = ex(image)
    want = krypton_fx.naive_occlusion(model, image, patch=patch, stride=stride, color=0.3)
    assert got.label == want.label
    assert got.heatmap.shape == want.heatmap.shape
    assert float((got.heatmap - want.heatmap).abs().max()) <= 1e-4
