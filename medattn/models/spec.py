"""``ModelSpec``: everything needed to rebuild a model and pre-process its input.

Saved next to the weights in every bundle (``model_spec.json``), so a served or evaluated model
is rebuilt exactly as it was trained, without the training data or a weights file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from medattn.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ModelSpec:
    backbone: str
    attention: str
    num_classes: int
    image_size: int
    class_names: tuple[str, ...] = ()
    in_channels: int = 3
    K: int = 32
    # channels the pixel CNN reads: NC of seed 001 (training images x channels), or the rank R
    # of the compressed pixel representation when pixel_rank > 0
    n_pixel_channels: int = 0
    # 0: seed 001's P as is; R > 0: P's coordinates in its top-R channel subspace (see global_attention)
    pixel_rank: int = 0
    # the backbone carries ImageNet weights (GoogLeNet then expects torchvision's input transform);
    # kept here because a bundle is rebuilt without the weights file
    imagenet_pretrained: bool = False
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelSpec":
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in raw.items() if k in known}
        for key in ("class_names", "mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)
