"""torchvision's published ImageNet checkpoint files load into every torchvision backbone.

Nothing is downloaded: each file is rebuilt in its *published* key layout from torchvision's
own network (random weights, same names and shapes as the real ``*.pth``): DenseNet with the
dotted ``norm.1`` / ``conv.1`` names and without ``num_batches_tracked`` (a LuaTorch port that
predates that buffer), GoogLeNet with its auxiliary classifiers ``aux1.*`` / ``aux2.*``, and
every file in the legacy (pre-zip) ``torch.save`` format the published files use.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from medattn.errors import ModelError
from medattn.models.backbones import BACKBONES, TORCHVISION_BACKBONES, available_backbones, build_backbone
from medattn.models.factory import ModelSpec, create_model

NUM_CLASSES = 3
IMAGE = 64

# The network each published file was saved from (ImageNet head, GoogLeNet with aux heads);
# init_weights=False where torchvision allows it, because its init is slow and irrelevant here.
_PUBLISHED_NETWORK: dict[str, Callable[[], nn.Module]] = {
    "vgg16": lambda: tvm.vgg16(weights=None, init_weights=False),
    "resnet50": lambda: tvm.resnet50(weights=None),
    "resnet152": lambda: tvm.resnet152(weights=None),
    "densenet121": lambda: tvm.densenet121(weights=None),
    "densenet161": lambda: tvm.densenet161(weights=None),
    "googlenet": lambda: tvm.googlenet(weights=None, aux_logits=True, init_weights=False),
}

# today's 'denselayer1.norm1.weight' was 'denselayer1.norm.1.weight' in the published files
_DENSENET_CURRENT_KEY = re.compile(r"(denselayer\d+\.(?:norm|conv))([12])\.")


class PublishedFile(NamedTuple):
    name: str
    path: Path
    source: "OrderedDict[str, torch.Tensor]"  # the network's state dict in today's key layout
    saved_keys: frozenset[str]  # the keys in the file, in the published layout


def _published_layout(name: str, state: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    if not name.startswith("densenet"):
        return OrderedDict(state)
    return OrderedDict(
        (_DENSENET_CURRENT_KEY.sub(r"\1.\2.", key), value)
        for key, value in state.items()
        if not key.endswith(".num_batches_tracked")
    )


def _save_published(name: str, folder: Path) -> PublishedFile:
    source = _PUBLISHED_NETWORK[name]().state_dict()
    published = _published_layout(name, source)
    path = folder / f"{name}-published.pth"
    torch.save(published, path, _use_new_zipfile_serialization=False)
    return PublishedFile(name, path, source, frozenset(published))


def _head_keys(net: nn.Module, source: "OrderedDict[str, torch.Tensor]") -> list[str]:
    """Keys whose tensors differ in shape from the ImageNet network: the replaced head."""
    return [key for key, tensor in net.state_dict().items() if source[key].shape != tensor.shape]


@pytest.fixture(scope="module", params=TORCHVISION_BACKBONES)
def published(request, tmp_path_factory) -> Iterator[PublishedFile]:
    # one file per backbone, shared by its tests; the big ones take seconds to build and save
    file = _save_published(request.param, tmp_path_factory.mktemp(request.param))
    yield file
    file.path.unlink()


@pytest.fixture(scope="module")
def googlenet_file(tmp_path_factory) -> PublishedFile:
    return _save_published("googlenet", tmp_path_factory.mktemp("googlenet"))


def test_published_layout_differs_from_todays_where_torchvision_renames(published: PublishedFile) -> None:
    # guards the fixtures: the loader has something to undo for DenseNet and GoogLeNet
    published_keys = published.saved_keys
    if published.name.startswith("densenet"):
        assert any(".norm.1." in key for key in published_keys)
        assert not any(".norm1." in key for key in published_keys)
    if published.name == "googlenet":
        assert any(key.startswith("aux1.") for key in published_keys)


def test_published_file_loads_every_tensor_and_the_head_is_replaced(published: PublishedFile) -> None:
    net = build_backbone(published.name, NUM_CLASSES, pretrained_weights=str(published.path)).eval()
    loaded = net.state_dict()
    head = _head_keys(net, published.source)
    assert len(head) == 2  # weight and bias of the new classifier, nothing else
    for key, tensor in loaded.items():
        if key not in head:
            assert torch.equal(tensor, published.source[key]), key
    with torch.no_grad():
        logits = net(torch.randn(2, 3, IMAGE, IMAGE))
    assert logits.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda state: {"state_dict": state}, id="state_dict-wrapper"),
        pytest.param(lambda state: {"model": state, "epoch": 90}, id="model-wrapper"),
        pytest.param(lambda state: OrderedDict((f"module.{key}", value) for key, value in state.items()),
                     id="data-parallel-prefix"),
        pytest.param(lambda state: {"state_dict": OrderedDict((f"module.{key}", value) for key, value in state.items()),
                                    "optimizer": {"lr": 0.1}, "epoch": 90}, id="wrapped-data-parallel"),
    ],
)
def test_training_checkpoint_wrappers_and_data_parallel_prefix_load(
    wrap: Callable[[dict], object], googlenet_file: PublishedFile, tmp_path: Path
) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save(wrap(torch.load(googlenet_file.path, weights_only=True)), path)
    net = build_backbone("googlenet", NUM_CLASSES, pretrained_weights=str(path))
    assert torch.equal(net.conv1.conv.weight, googlenet_file.source["conv1.conv.weight"])
    assert torch.equal(net.inception5b.branch4[1].bn.running_var,
                       googlenet_file.source["inception5b.branch4.1.bn.running_var"])


def test_densenet_saved_in_todays_key_layout_loads_too(tmp_path: Path) -> None:
    source = tvm.densenet121(weights=None).state_dict()
    path = tmp_path / "densenet121-today.pth"
    torch.save(source, path)
    net = build_backbone("densenet121", NUM_CLASSES, pretrained_weights=str(path))
    key = "features.denseblock4.denselayer16.conv2.weight"
    assert torch.equal(net.state_dict()[key], source[key])


def test_create_model_passes_the_weights_file_to_the_backbone(googlenet_file: PublishedFile) -> None:
    spec = ModelSpec(backbone="googlenet", attention="none", num_classes=NUM_CLASSES, image_size=IMAGE)
    model = create_model(spec, pretrained_weights=str(googlenet_file.path)).eval()
    weights = googlenet_file.source["inception4c.branch2.1.conv.weight"]
    assert any(torch.equal(tensor, weights) for tensor in model.state_dict().values())
    with torch.no_grad():
        logits, _ = model(torch.randn(2, 3, IMAGE, IMAGE))
    assert logits.shape == (2, NUM_CLASSES)


def test_googlenet_rebuilt_as_imagenet_pretrained_without_the_file_computes_the_same(
    googlenet_file: PublishedFile,
) -> None:
    pretrained = build_backbone("googlenet", NUM_CLASSES, pretrained_weights=str(googlenet_file.path)).eval()
    rebuilt = build_backbone("googlenet", NUM_CLASSES, imagenet_pretrained=True).eval()
    plain = build_backbone("googlenet", NUM_CLASSES).eval()
    assert pretrained.transform_input and rebuilt.transform_input and not plain.transform_input
    rebuilt.load_state_dict(pretrained.state_dict())
    plain.load_state_dict(pretrained.state_dict())
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = pretrained(x)
        assert torch.equal(rebuilt(x), expected)
        # the flag is what makes them equal: the same weights on unscaled input compute otherwise
        assert not torch.allclose(plain(x), expected)


def test_imagenet_pretrained_false_overrides_the_default_for_a_file(googlenet_file: PublishedFile) -> None:
    net = build_backbone("googlenet", NUM_CLASSES, pretrained_weights=str(googlenet_file.path),
                         imagenet_pretrained=False)
    assert not net.transform_input
    assert torch.equal(net.conv1.conv.weight, googlenet_file.source["conv1.conv.weight"])


def test_resnet50_weights_into_densenet121_name_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(tvm.resnet50(weights=None).state_dict(), path)
    densenet_keys = [key for key in tvm.densenet121(weights=None).state_dict()
                     if not key.endswith("num_batches_tracked")]
    with pytest.raises(ModelError) as error:
        build_backbone("densenet121", NUM_CLASSES, pretrained_weights=str(path))
    message = str(error.value)
    assert "\n" not in message
    assert f"{path} do not fit backbone densenet121" in message
    assert f"{len(densenet_keys)} missing keys (features.conv0.weight, " in message
    assert "unexpected keys (conv1.weight, " in message


def test_missing_extra_and_reshaped_keys_are_each_named(googlenet_file: PublishedFile, tmp_path: Path) -> None:
    state = torch.load(googlenet_file.path, weights_only=True)
    del state["inception3a.branch1.conv.weight"]
    state["inception9z.conv.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(5, 1024)  # fine-tuned elsewhere on five classes
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=(
        r"do not fit backbone googlenet: 1 missing keys \(inception3a\.branch1\.conv\.weight\); "
        r"1 unexpected keys \(inception9z\.conv\.weight\); "
        r"1 shape mismatches \(fc\.weight \(5, 1024\) in file vs \(1000, 1024\) in backbone\)$"
    )):
        build_backbone("googlenet", NUM_CLASSES, pretrained_weights=str(path))


def test_truncated_file_is_a_clear_error(googlenet_file: PublishedFile, tmp_path: Path) -> None:
    data = googlenet_file.path.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"cannot read .*truncated\.pth: not a complete torch\.save file"):
        build_backbone("googlenet", NUM_CLASSES, pretrained_weights=str(path))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param({"epoch": 3, "optimizer": {"lr": 0.1}}, r"not a state dict .*found 2 entries that are not "
                     r"named tensors \(epoch, optimizer\)", id="training-metadata"),
        pytest.param([torch.zeros(3)], r"hold a list, not a state dict", id="list-of-tensors"),
        pytest.param({}, r"not a state dict .*found nothing", id="empty"),
    ],
)
def test_a_pickle_that_is_not_a_state_dict_is_a_clear_error(content: object, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "not-weights.pth"
    torch.save(content, path)
    with pytest.raises(ModelError, match=expected):
        build_backbone("googlenet", NUM_CLASSES, pretrained_weights=str(path))


def test_a_whole_pickled_model_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "whole-model.pth"
    torch.save(tvm.googlenet(weights=None, aux_logits=False, init_weights=False), path)
    with pytest.raises(ModelError, match=r"pickles Python objects.*save net\.state_dict\(\)"):
        build_backbone("googlenet", NUM_CLASSES, pretrained_weights=str(path))
    assert isinstance(torch.load(path, weights_only=False), nn.Module)  # the file itself is intact


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found: .*nope.pth"):
        build_backbone("resnet50", NUM_CLASSES, pretrained_weights=str(tmp_path / "nope.pth"))


def test_small_cnn_refuses_imagenet_weights(googlenet_file: PublishedFile) -> None:
    with pytest.raises(ModelError, match="small_cnn"):
        build_backbone("small_cnn", NUM_CLASSES, pretrained_weights=str(googlenet_file.path))
    with pytest.raises(ModelError, match="imagenet_pretrained must be false for small_cnn"):
        build_backbone("small_cnn", NUM_CLASSES, imagenet_pretrained=True)


def test_available_backbones_is_the_table() -> None:
    assert available_backbones() == BACKBONES
    assert set(TORCHVISION_BACKBONES) == set(_PUBLISHED_NETWORK)
    assert BACKBONES == ("small_cnn", *TORCHVISION_BACKBONES)

