"""Savings are real: the conv FLOPs the incremental graph executes, counted by
torch's FlopCounterMode while it runs, agree with theoretical_speedup."""

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import krypton_fx
from krypton_fx.report import conv_macs

CONV = torch.ops.aten.convolution


def _conv_flops(fn, *args) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    return int(counter.get_flop_counts()["Global"].get(CONV, 0))


@pytest.mark.parametrize("name,size", [("vgg16", 224), ("resnet18", 224), ("inception_v3", 299),
                                       ("densenet121", 128), ("mobilenet_v2", 160)])
def test_executed_conv_flops_match_theory(name, size):
    kwargs = {"init_weights": False, "aux_logits": False} if name == "inception_v3" else {}
    model = torchvision.models.get_model(name, num_classes=10, **kwargs).eval()
    ex = krypton_fx.compile(model, patch=16, stride=4, image_size=(size, size), batch_size=2)
    image = torch.randn(3, size, size)
    _, stored = ex.prepare(image)
    centre = torch.tensor([ex.positions // 2, ex.positions // 2 + 1])
    executed = _conv_flops(ex.program.module, centre, *stored) / 2
    full = _conv_flops(model, image[None])
    theory = krypton_fx.theoretical_speedup(model, (size, size), 16)
    assert full / executed == pytest.approx(theory, rel=0.05)
    # and the static accounting of the report agrees with the counter
    q, q_inc = conv_macs(ex.graph_module)
    assert 2 * q == full and q_inc * 2 == pytest.approx(executed, rel=1e-9)


def test_smaller_patch_saves_more():
    model = torchvision.models.vgg11(num_classes=10)
    r = [krypton_fx.theoretical_speedup(model, (128, 128), p) for p in (8, 16, 32)]
    assert r[0] > r[1] > r[2] > 1
