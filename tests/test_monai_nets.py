"""MONAI networks by name (``monai:NAME``: krypton_fx.monai_nets through krypton_fx.models.load_model)."""

from __future__ import annotations

import sys

import pytest
import torch

from krypton_fx.models import ModelLoadError, input_channels, load_model, model_spatial_dims

nets = pytest.importorskip("monai.networks.nets")


@pytest.mark.parametrize("spec, dims, channels, classes, cls", [
    ("monai:resnet18", 3, 1, 2, "ResNet"),        # n_input_channels / num_classes
    ("monai:densenet121", 3, 2, 3, "DenseNet121"),  # in_channels / out_channels, any case
    ("monai:SEResNet50", 2, 1, 2, "SEResNet50"),   # in_channels / num_classes through **kwargs
    ("monai:efficientnet_b0", 2, 3, 4, "EfficientNetBN"),  # the variant as model_name, never pretrained
])
def test_networks_get_dims_channels_and_classes_under_their_own_keywords(spec, dims, channels, classes, cls):
    loaded = load_model(spec, "none", num_classes=classes, spatial_dims=dims, in_channels=channels)
    model = loaded.model
    assert type(model).__name__ == cls and not model.training
    assert model_spatial_dims(model) == dims and input_channels(model) == channels
    assert "random weights" in loaded.warning
    x = torch.rand(1, channels, *(32,) * dims)
    with torch.no_grad():
        assert tuple(model(x).shape) == (1, classes)


def test_the_same_seed_builds_the_same_network_as_monai_does():
    torch.manual_seed(0)
    theirs = nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2)
    ours = load_model("monai:resnet18", "none", num_classes=2, spatial_dims=3, in_channels=1).model
    for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name


def test_weights_files_load_and_misfits_name_num_classes(tmp_path):
    torch.manual_seed(1)
    trained = nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=3)
    torch.save({"epoch": 4, "state_dict": trained.state_dict()}, tmp_path / "run.ckpt")
    loaded = load_model("monai:resnet10", str(tmp_path / "run.ckpt"), num_classes=3, spatial_dims=3, in_channels=1)
    assert loaded.warning is None and torch.equal(loaded.model.fc.weight, trained.fc.weight)
    with pytest.raises(ModelLoadError, match="add --num-classes 3"):
        load_model("monai:resnet10", str(tmp_path / "run.ckpt"), num_classes=2, spatial_dims=3, in_channels=1)
    with pytest.raises(ModelLoadError, match="takes a state-dict or checkpoint file, or none"):
        load_model("monai:resnet10", "DEFAULT", num_classes=3, spatial_dims=3, in_channels=1)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("monai:resnet10", str(tmp_path / "nope.pt"), num_classes=3, spatial_dims=3, in_channels=1)


@pytest.mark.parametrize("spec, words", [
    ("monai:resnet19", "did you mean monai:resnet18"),
    ("monai:densnet121", "did you mean monai:DenseNet121"),
    ("monai:efficientnet-b9", "did you mean monai:efficientnet-b8"),
    ("monai:", "unknown MONAI network ''"),
    ("monai:_private", "unknown MONAI network"),
])
def test_unknown_names_give_close_matches(spec, words):
    with pytest.raises(ModelLoadError) as info:
        load_model(spec, "none", num_classes=2, spatial_dims=3, in_channels=1)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_network_without_default_classes_and_one_that_is_no_classifier():
    with pytest.raises(ModelLoadError, match="give --num-classes N"):
        load_model("monai:DenseNet121", "none", spatial_dims=3, in_channels=1)
    with pytest.raises(ModelLoadError, match="building monai:UNETR"):  # (monai:UNet builds: segmentation)
        load_model("monai:UNETR", "none", num_classes=2, spatial_dims=3, in_channels=1)


def test_dims_and_channels_are_for_monai_networks_only():
    with pytest.raises(ModelLoadError, match="--spatial-dims builds monai:NAME models"):
        load_model("resnet18", "none", spatial_dims=3)
    with pytest.raises(ModelLoadError, match="--in-channels builds monai:NAME models"):
        load_model("resnet18", "none", in_channels=1)


def test_without_monai_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)  # `import monai...` now raises ImportError
    monkeypatch.setitem(sys.modules, "monai.networks", None)
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)
    with pytest.raises(ModelLoadError) as info:
        load_model("monai:resnet18", "none", num_classes=2, spatial_dims=3, in_channels=1)
    assert "pip install 'krypton_fx[monai]'" in str(info.value)
