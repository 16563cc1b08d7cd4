"""The attention-model contract and its registry.

Every method is an :class:`AttentionModel`: ``forward(x) -> (logits, attention)`` with
``attention`` a (B, 1, H, W) map in [0, 1] at input resolution (a global map is broadcast
over B). The one training loop (:func:`medattn.training.fit.fit`) never asks what a model is;
it calls the hooks below, which a method overrides where it has something to do:

==================  ==========================================================================
``configure_spec``  before the model is built: fill in what the training data decides (seed 001:
                    NC, the channels of the pixel representation)
``before_training`` once, given the training images (seed 001: build P from them)
``on_epoch_start``  at the start of every epoch (seed 001: freeze the pixel CNN after E)
``loss_terms``      the method's own loss terms next to cross-entropy (seed 001: λ·mean(M))
``before_saving``   after training, before the weights are saved (seed 001: keep M, drop P)
``epoch_metrics``   method-specific figures for the epoch's history row (seed 001: frozen or not)
==================  ==========================================================================

``global_attention()`` returns the one (H, W) map of a global method (None for per-image
methods), so consumers (evaluation, figures, serving) keep one map instead of B copies.
``attention_logits(x)`` returns the map's pre-sigmoid scores where the method has them (None
otherwise): the feedback loss takes its distance there, because a sigmoid saturated at 0 or 1
in float32 passes no gradient back (``medattn.training.feedback_loss``).

A method registers itself where it is defined (timm's ``register_model`` spirit)::

    @register_attention("global_pixel")
    class GlobalPixelAttention(AttentionModel): ...

and is found by name from then on: ``params.yaml`` validation, the factory, the contract
test. Every module of ``medattn.models`` is imported on first lookup, so adding a method is
adding one module.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, TypeVar

import torch
from torch import nn

from medattn.errors import ModelError

if TYPE_CHECKING:
    from medattn.models.spec import ModelSpec


@dataclass(frozen=True)
class LossSettings:
    """What the methods' own loss terms may depend on (from ``train.*``)."""

    lambda_l1: float = 0.0


@dataclass(frozen=True)
class EpochSchedule:
    """Where training stands when an epoch starts."""

    epoch: int  # 1-based
    epochs: int
    cutoff_epoch: int  # E of Algorithm 1 (seed 001)


class AttentionModel(nn.Module):
    """Base of every registered method; subclasses set ``image_cnn`` and implement ``forward``."""

    #: registry name, set by :func:`register_attention`
    attention_name: ClassVar[str] = ""
    #: one map for every image (seed 001): consumers may keep one (H, W) map instead of B copies
    attention_is_global: ClassVar[bool] = False

    image_cnn: nn.Module

    @classmethod
    def build(cls, spec: "ModelSpec", image_cnn: nn.Module) -> "AttentionModel":
        """Build the method around an image CNN (the factory has already made the backbone)."""
        raise NotImplementedError

    @classmethod
    def configure_spec(cls, spec: "ModelSpec", train_images: torch.Tensor) -> "ModelSpec":
        """The spec completed with what the training images decide; default: unchanged."""
        return spec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def before_training(self, train_images: torch.Tensor) -> None:
        """Called once before the first epoch with the (normalised, CPU) training images."""

    def on_epoch_start(self, schedule: EpochSchedule) -> None:
        """Called at the start of every epoch, before the optimiser steps."""

    def loss_terms(self, attention: torch.Tensor, settings: LossSettings) -> dict[str, torch.Tensor]:
        """Named loss terms added to cross-entropy (already weighted); default: none."""
        return {}

    def before_saving(self) -> None:
        """Called once when training ends (after the best epoch's weights are restored)."""

    def epoch_metrics(self) -> dict[str, float]:
        """Extra columns of the epoch's history row; default: none."""
        return {}

    def global_attention(self) -> torch.Tensor | None:
        """The (H, W) map shared by every image, for global methods; None for per-image ones."""
        return None

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Scores S with ``forward(x)[1] == sigmoid(S)`` (broadcast), differentiable; None if there are none.

        (B, 1, H, W) for per-image maps, (1, 1, H, W) for a global one. None also where the map
        cannot learn (a frozen global map is a buffer): there is nothing for a gradient to move.
        """
        return None

    def forward_with_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(*forward(x), attention_logits(x))``: what the feedback loss needs from one step.

        Models whose map is a sigmoid of scores override it to compute the scores once (the
        default runs the attention network twice: once in ``forward``, once for the scores).
        """
        logits, attention = self(x)
        return logits, attention, self.attention_logits(x)


ModelT = TypeVar("ModelT", bound=type[AttentionModel])

_ATTENTIONS: dict[str, type[AttentionModel]] = {}
_discovered = False


def register_attention(name: str) -> Callable[[ModelT], ModelT]:
    """Class decorator: make an :class:`AttentionModel` available as ``model.attention: name``."""

    def decorate(cls: ModelT) -> ModelT:
        if not (isinstance(cls, type) and issubclass(cls, AttentionModel)):
            raise TypeError(f"@register_attention({name!r}) needs an AttentionModel subclass, got {cls!r}")
        existing = _ATTENTIONS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"attention {name!r} is registered twice ({existing.__module__}, {cls.__module__})")
        cls.attention_name = name
        _ATTENTIONS[name] = cls
        return cls

    return decorate


def _discover_methods() -> None:
    """Import every module of ``medattn.models`` once, so each method's decorator has run."""
    global _discovered
    if _discovered:
        return
    import medattn.models as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


def available_attentions() -> tuple[str, ...]:
    _discover_methods()
    return tuple(sorted(_ATTENTIONS))


def attention_class(name: str) -> type[AttentionModel]:
    _discover_methods()
    if name not in _ATTENTIONS:
        raise ModelError(f"unknown attention {name!r} (choose from {', '.join(sorted(_ATTENTIONS))})")
    return _ATTENTIONS[name]
