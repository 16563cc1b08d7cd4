"""Image CNNs ("image CNN" in seed 001) behind one table.

Each entry builds a classifier ``nn.Module`` mapping (B, C, H, W) images to (B, num_classes)
logits. torchvision architectures are built without weights; when a local weights file is
given it is loaded into the ImageNet-shaped network *before* the head is replaced, so
torchvision's own published ``*.pth`` files (e.g. from ``~/.cache/torch/hub/checkpoints``)
work as is, in their published key layout: DenseNet's old ``norm.1`` / ``conv.1`` names,
GoogLeNet's auxiliary classifiers, ``{"state_dict": ...}`` wrappers and DataParallel
``module.`` prefixes. Nothing is ever downloaded.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn
from torchvision import models as tvm

from medattn.errors import ModelError, first_line


class SmallCNN(nn.Module):
    """Fast default image CNN for CPU demos: four conv stages, global average + max pooling.

    One 3x3 convolution per stage keeps a training epoch of a few hundred 96 px images to
    seconds on two CPU cores. Max pooling next to average pooling matters for lesion grading:
    a few small lesions change the max response strongly while barely moving the average.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, dropout: float = 0.2):
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 8]
        stages: list[nn.Module] = []
        for i in range(4):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i > 0 else []
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            stages.append(nn.Sequential(*layers))
        # named stages so multi-level attention (MLDAM) can hook features.1 .. features.3
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * chans[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


StateDict = dict[str, torch.Tensor]


def _keys_as_published(state: StateDict) -> StateDict:
    return state


# torchvision/models/densenet.py::_load_state_dict: the published DenseNet files predate the ban
# on '.' in module names and still say 'denselayer1.norm.1.weight' for today's 'norm1.weight'.
_DENSENET_DOTTED_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _densenet_keys(state: StateDict) -> StateDict:
    return OrderedDict((_DENSENET_DOTTED_KEY.sub(r"\1\2", key), value) for key, value in state.items())


def _googlenet_keys(state: StateDict) -> StateDict:
    # The published file keeps the auxiliary ImageNet-training classifiers; a fine-tuned
    # GoogLeNet here is built without them (as torchvision does after loading).
    return OrderedDict((key, value) for key, value in state.items() if not key.startswith(("aux1.", "aux2.")))


@dataclass(frozen=True)
class BackboneEntry:
    # ImageNet-shaped network (1000 classes); the flag says it will carry ImageNet weights
    build: Callable[[bool], nn.Module]
    replace_head: Callable[[nn.Module, int], None]
    # published key layout -> the key layout of the network `build` returns
    adapt_published_keys: Callable[[StateDict], StateDict] = _keys_as_published


def _fc_head(net: nn.Module, num_classes: int) -> None:
    net.fc = nn.Linear(net.fc.in_features, num_classes)


def _densenet_head(net: nn.Module, num_classes: int) -> None:
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)


def _vgg_head(net: nn.Module, num_classes: int) -> None:
    net.classifier[6] = nn.Linear(net.classifier[6].in_features, num_classes)


def _googlenet(imagenet_pretrained: bool) -> nn.Module:
    # torchvision's ImageNet GoogLeNet was trained on inputs scaled to [-1, 1]; transform_input
    # maps ImageNet-normalised images (what medattn feeds) onto that scale, exactly as
    # torchvision.models.googlenet(weights=...) does. init_weights=False skips a slow scipy init.
    return tvm.googlenet(weights=None, aux_logits=False, transform_input=imagenet_pretrained, init_weights=False)


_TORCHVISION: dict[str, BackboneEntry] = {
    # VGG's own init is a waste when ImageNet weights overwrite every parameter anyway
    "vgg16": BackboneEntry(lambda imagenet: tvm.vgg16(weights=None, init_weights=not imagenet), _vgg_head),
    "resnet50": BackboneEntry(lambda imagenet: tvm.resnet50(weights=None), _fc_head),
    "resnet152": BackboneEntry(lambda imagenet: tvm.resnet152(weights=None), _fc_head),
    "densenet121": BackboneEntry(lambda imagenet: tvm.densenet121(weights=None), _densenet_head, _densenet_keys),
    "densenet161": BackboneEntry(lambda imagenet: tvm.densenet161(weights=None), _densenet_head, _densenet_keys),
    "googlenet": BackboneEntry(_googlenet, _fc_head, _googlenet_keys),
}

TORCHVISION_BACKBONES: tuple[str, ...] = tuple(_TORCHVISION)
BACKBONES: tuple[str, ...] = ("small_cnn", *TORCHVISION_BACKBONES)


def available_backbones() -> tuple[str, ...]:
    """Every backbone name ``build_backbone`` accepts (the table config validation checks against)."""
    return BACKBONES


# Training scripts save {"state_dict": ...}, {"model": ...} or {"model_state_dict": ...} next to
# optimizer state and epoch counters; the weights are the one mapping under those keys.
_CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_DATA_PARALLEL_PREFIX = "module."


def _few(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _unwrap_state_dict(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ModelError(f"pretrained weights {path} hold a {type(obj).__name__}, not a state dict "
                         "(a mapping of parameter names to tensors, as saved by torch.save(net.state_dict()))")
    not_tensors = [str(key) for key, value in obj.items() if not (isinstance(key, str) and torch.is_tensor(value))]
    if not obj or not_tensors:
        found = f"{len(not_tensors)} entries that are not named tensors ({_few(not_tensors)})" if obj else "nothing"
        raise ModelError(f"pretrained weights {path} are not a state dict (a mapping of parameter names to "
                         f"tensors): found {found}")
    state: StateDict = OrderedDict(obj)
    if all(key.startswith(_DATA_PARALLEL_PREFIX) for key in state):
        state = OrderedDict((key[len(_DATA_PARALLEL_PREFIX):], value) for key, value in state.items())
    return state


def _misfit(net: nn.Module, state: StateDict) -> list[str]:
    """What keeps ``state`` from loading into ``net``, as short phrases (empty: it fits)."""
    expected = net.state_dict()
    # BatchNorm fills in num_batches_tracked for files saved before PyTorch 0.4.1 (the
    # LuaTorch-era ImageNet files), so its absence is no misfit.
    missing = [key for key in expected if key not in state and not key.endswith(".num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    mismatched = [f"{key} {tuple(state[key].shape)} in file vs {tuple(tensor.shape)} in backbone"
                  for key, tensor in expected.items() if key in state and state[key].shape != tensor.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_few(mismatched, 2)})")
    return problems


def _load_local_weights(net: nn.Module, name: str, path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"pretrained weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"cannot read pretrained weights {path}: it pickles Python objects, not only tensors "
                         "(save net.state_dict() rather than the whole model)") from exc
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise ModelError(f"cannot read pretrained weights {path}: not a complete torch.save file "
                         f"({exc.__class__.__name__}: {first_line(exc)})") from exc
    state = _TORCHVISION[name].adapt_published_keys(_unwrap_state_dict(obj, path))
    problems = _misfit(net, state)
    if problems:
        raise ModelError(f"pretrained weights {path} do not fit backbone {name}: {'; '.join(problems)}")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"pretrained weights {path} do not fit backbone {name}: {first_line(exc)}") from exc


def build_backbone(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    pretrained_weights: Optional[str] = None,
    *,
    imagenet_pretrained: Optional[bool] = None,
) -> nn.Module:
    """Build image CNN ``name`` with a ``num_classes`` head (weights only from a local file).

    ``imagenet_pretrained`` says the network carries ImageNet-pretrained weights (default: a
    weights file is given). It changes the network itself (GoogLeNet then rescales its input as
    its ImageNet weights expect), so a model rebuilt without the file, e.g. from a saved bundle
    whose weights are loaded afterwards, must pass it to get the same network back.
    """
    weights_path = Path(pretrained_weights) if pretrained_weights else None
    if imagenet_pretrained is None:
        imagenet_pretrained = weights_path is not None
    if name == "small_cnn":
        if weights_path is not None:
            raise ModelError("model.pretrained_weights is not supported for small_cnn (it has no ImageNet weights)")
        if imagenet_pretrained:
            raise ModelError("imagenet_pretrained must be false for small_cnn (it has no ImageNet weights)")
        return SmallCNN(num_classes, in_channels)
    if name not in _TORCHVISION:
        raise ModelError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
    if in_channels != 3:
        raise ModelError(f"backbone {name} expects 3-channel images, got {in_channels}")
    entry = _TORCHVISION[name]
    net = entry.build(imagenet_pretrained)
    if weights_path is not None:
        _load_local_weights(net, name, weights_path)
    entry.replace_head(net, num_classes)
    return net
