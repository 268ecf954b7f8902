"""``krypton_fx.models``: the public loader behind ``--model``/``--weights``."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from krypton_fx.models import ModelLoadError, input_channels, load_model, load_weights, read_state_dict


def net(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_checkpoints_and_prefixes_unwrap(tmp_path):
    model = net()
    state = model.state_dict()
    torch.save({"epoch": 4, "optimizer": {}, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "ckpt.pt")
    loaded = read_state_dict(tmp_path / "ckpt.pt")
    other = net()
    load_weights(other, loaded, "ckpt.pt", "net")  # the DataParallel prefix is dropped
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values()))
    assert input_channels(other) == 1


def test_errors_are_one_line_with_the_fix(tmp_path):
    torch.save({"state_dict": _Payload(tmp_path / "PWNED")}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="never runs code"):
        read_state_dict(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(ModelLoadError, match="the file has 2 classes: build the model with 2 outputs"):
        load_weights(net(3), net(2).state_dict(), "two.pt", "net")
    import torchvision
    torch.save(torchvision.models.get_model("squeezenet1_1", num_classes=2).state_dict(), tmp_path / "two.pt")
    with pytest.raises(ModelLoadError, match="add --num-classes 2"):
        load_model("squeezenet1_1", str(tmp_path / "two.pt"))
    with pytest.raises(ModelLoadError, match="did you mean resnet18"):
        load_model("resnet19", "none")
    assert isinstance(ModelLoadError("x"), ValueError)


def test_torchvision_names_and_callables(tmp_path, monkeypatch):
    loaded = load_model("resnet18", "none", num_classes=2, seed=3)
    again = load_model("resnet18", "none", num_classes=2, seed=3)
    assert not loaded.model.training and loaded.warning
    assert torch.equal(loaded.model.fc.weight, again.model.fc.weight)  # the seed makes it repeatable
    (tmp_path / "mynets.py").write_text("import torch\n\ndef build():\n    return torch.nn.Sequential("
                                        "torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    built = load_model("mynets:build")
    assert built.name == "mynets:build" and isinstance(built.model, nn.Sequential)
