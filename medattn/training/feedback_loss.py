"""The feedback loss: experts' ROIs turned into loss terms that move a model's attention (seed 002).

An exported feedback mask (``medattn feedback export``, ``masks/<id>.png``) holds 255 where the
expert marked a region *relevant*, 0 where *irrelevant*, 128 where they drew nothing. It defines
the **adjusted target map** :func:`adjusted_target`: the model's own map with relevant regions
raised to 1 and irrelevant ones suppressed to 0, the rest left as the model had it. Because the
untouched rest equals the model's map, the distance between map and target is non-zero only
where the expert drew — so the loss is computed there only (``drawn``), and γ means the same
whatever share of the image the expert covered.

Three mechanisms, picked from the model contract (:func:`mechanism_for`), never by class:

``per_image_map``   a per-image map that gates the input (seed 002's input attention):
                    γ · distance(A(x), target) on each feedback image, where drawn.
``global_map``      one map for every image (seed 001): the targets of all feedback images are
                    combined into one — per pixel, the share of experts' marks that said
                    relevant (:func:`combined_global_target`) — and γ · distance(M, combined)
                    is taken where anyone drew.
``input_gradient``  any other model ("right for the right reasons", Ross et al. 2017): the
                    squared input gradient of the summed log-probabilities, as a share of its
                    whole-image total, inside the irrelevant regions, times γ. The share (rather
                    than Ross's raw sum) keeps γ on the same 0..1 scale as the map distances.

**Saturation.** A map is a sigmoid of scores, and a shortcut model drives it to exactly 0 or 1
in float32 (seed 001's M on the decoy was 1.0): there σ'(S) = 0, so any distance taken on the
map alone passes no gradient back and the experts' marks cannot move it. Where the model exposes
its scores (``attention_logits``, the model contract) the distance is taken from them:
``bce`` is BCE-with-logits (gradient σ(S) - target, never zero on the wrong side); ``l2`` and
``l1`` keep their value on the map, but their backward pass replaces the sigmoid's slope by its
maximum 1/4 (:func:`_map_from_scores`), so their gradient is at least the true one and never
vanishes. Models without scores fall back to the distance on the map itself.

**Counterfactuals.** A map term alone does not undo a shortcut that ROIs cover on a few images:
a soft map only *scales* the irrelevant region down, and the cross-entropy on the many training
images nobody annotated keeps rewarding the image CNN for reading what is left of it (measured:
decoy mass down 49x, every stamped image still called top grade). The expert's mark also says
something about the label: *this region does not decide the class*. So each feedback image with
an irrelevant region is shown again with that region's pixels taken from another image of the
current training batch (same place; Teso & Kersting's counter-examples), under the image's own
label: the region's content no longer goes with the label, on exactly the images the experts
chose. ``counterfactual=False`` turns this off.

Next to the attention term, feedback images the training split does not hold get their
cross-entropy under the expert's label (a corrected label replaces the image's label; images
without any known label add no CE; one with an irrelevant region gets it on its counterfactual
instead); counterfactuals get theirs whenever the label is known, training images included.
:class:`FeedbackLoss` is an ``extra_loss`` for :func:`medattn.training.fit.fit`: it runs the
model on a rotating mini-batch of the feedback images at every training step and returns the
named terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from medattn.errors import ParamError
from medattn.feedback.schema import IRRELEVANT, RELEVANT

PER_IMAGE_MAP = "per_image_map"
GLOBAL_MAP = "global_map"
INPUT_GRADIENT = "input_gradient"
MECHANISMS = (PER_IMAGE_MAP, GLOBAL_MAP, INPUT_GRADIENT)
DISTANCES = ("l2", "l1", "bce")
NO_LABEL = -1
_EPS = 1e-8


@dataclass(frozen=True)
class FeedbackTargets:
    """Feedback images with what the experts said about them, at the model's input size."""

    ids: list[str]
    images: torch.Tensor  # float (F, C, H, W), normalised like the training images
    masks: torch.Tensor  # uint8 (F, 1, H, W): 255 relevant, 0 irrelevant, 128 untouched
    labels: torch.Tensor  # int64 (F,): the label to train CE with, NO_LABEL when none is known
    # bool (F,): images the training split holds (their plain CE is fit's own); None = none of them
    in_training: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (self.images.shape[0] == self.masks.shape[0] == self.labels.shape[0] == n):
            raise ValueError("FeedbackTargets: ids, images, masks and labels must have one entry per image")
        if self.in_training is not None and self.in_training.shape != (n,):
            raise ValueError("FeedbackTargets: in_training must have one flag per image")
        if self.masks.shape[-2:] != self.images.shape[-2:]:
            raise ValueError(f"FeedbackTargets: masks {tuple(self.masks.shape[-2:])} and images "
                             f"{tuple(self.images.shape[-2:])} differ in size")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: torch.Tensor | list[int]) -> "FeedbackTargets":
        index = torch.as_tensor(index, dtype=torch.long)
        return FeedbackTargets([self.ids[i] for i in index.tolist()], self.images[index], self.masks[index],
                               self.labels[index], None if self.in_training is None else self.in_training[index])

    def trained(self) -> torch.Tensor:
        """bool (F,): which images fit already trains on (plain CE)."""
        if self.in_training is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.in_training.to(torch.bool)


def relevant_region(masks: torch.Tensor) -> torch.Tensor:
    return masks == RELEVANT


def irrelevant_region(masks: torch.Tensor) -> torch.Tensor:
    return masks == IRRELEVANT


def adjusted_target(model_map: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The model's map with relevant regions raised to 1, irrelevant ones set to 0, the rest unchanged."""
    target = model_map.detach().clone()
    target[relevant_region(masks).expand_as(target)] = 1.0
    target[irrelevant_region(masks).expand_as(target)] = 0.0
    return target


def combined_global_target(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One target for a global map from many images' masks: (target (1,1,H,W), drawn (1,1,H,W) bool).

    Per pixel the target is the share of marks that said relevant (1 when every expert who drew
    there said relevant, 0 when all said irrelevant, in between when they disagree).
    """
    relevant = relevant_region(masks).float().sum(dim=0, keepdim=True)
    irrelevant = irrelevant_region(masks).float().sum(dim=0, keepdim=True)
    votes = relevant + irrelevant
    return relevant / votes.clamp(min=1.0), votes > 0


#: the sigmoid's largest slope (at 0): the slope the backward pass of l2 / l1 uses at saturation
_SIGMOID_MAX_SLOPE = 0.25


def _map_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """σ(S) in value; in the backward pass d map / d S = 1/4 everywhere (σ'(S) <= 1/4).

    A straight-through sigmoid with the slope pinned at its maximum: the gradient of a distance
    on this map is never smaller than on σ(S) (equal at σ = 0.5) and stays non-zero where σ has
    saturated, which is what lets feedback undo a map the shortcut drove to exactly 0 or 1.
    """
    return torch.sigmoid(scores).detach() + _SIGMOID_MAX_SLOPE * (scores - scores.detach())


def map_distance(attention: torch.Tensor, target: torch.Tensor, drawn: torch.Tensor, distance: str,
                 scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean distance over the drawn pixels of each image, averaged over images that have any.

    ``scores``: the map's pre-sigmoid scores (``attention == sigmoid(scores)``); given, the
    distance keeps a gradient where the sigmoid has saturated (module docstring).
    """
    if scores is not None and distance in ("l2", "l1"):
        attention = _map_from_scores(scores)
    if distance == "l2":
        per_pixel = (attention - target) ** 2
    elif distance == "l1":
        per_pixel = (attention - target).abs()
    elif distance == "bce" and scores is not None:
        per_pixel = F.binary_cross_entropy_with_logits(scores, target.expand_as(scores), reduction="none")
    elif distance == "bce":
        per_pixel = F.binary_cross_entropy(attention.clamp(_EPS, 1 - _EPS), target, reduction="none")
    else:
        raise ParamError(f"recalibrate.distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    weight = drawn.to(per_pixel.dtype).expand_as(per_pixel)
    per_image = (per_pixel * weight).flatten(1).sum(1)
    counts = weight.flatten(1).sum(1)
    has_any = counts > 0
    if not bool(has_any.any()):
        return per_pixel.sum() * 0.0
    return (per_image[has_any] / counts[has_any]).mean()


def _saliency_and_logits(model: nn.Module, images: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.detach().requires_grad_(True)
    logits, _ = model(x)
    log_probs = F.log_softmax(logits, dim=1).sum()
    (grad,) = torch.autograd.grad(log_probs, x, create_graph=create_graph)
    return (grad ** 2).sum(dim=1, keepdim=True), logits


def input_gradient_saliency(model: nn.Module, images: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """(B, 1, H, W): squared gradient of Σ log p w.r.t. the input, summed over channels (Ross et al.)."""
    return _saliency_and_logits(model, images, create_graph)[0]


def counterfactual_images(images: torch.Tensor, masks: torch.Tensor, donors: Optional[torch.Tensor],
                          generator: torch.Generator) -> torch.Tensor:
    """``images`` with each irrelevant region's pixels taken from a random donor image, same place.

    ``donors`` (D, C, H, W), normalised like ``images``: the current training batch. Without donors
    of the same shape the region is set to 0 (the training set's mean, after normalisation).
    """
    irrelevant = irrelevant_region(masks).expand_as(images)
    if donors is None or donors.shape[1:] != images.shape[1:] or donors.shape[0] == 0:
        fill = torch.zeros_like(images)
    else:
        pick = torch.randint(donors.shape[0], (images.shape[0],), generator=generator)
        fill = donors.detach()[pick.to(donors.device)].to(images.dtype)
    return torch.where(irrelevant, fill, images)


def region_shares(saliency: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(share inside relevant, share inside irrelevant) of each image's map mass, shape (B,)."""
    total = saliency.flatten(1).sum(1) + _EPS
    inside = lambda region: (saliency * region.to(saliency.dtype)).flatten(1).sum(1) / total  # noqa: E731
    return inside(relevant_region(masks)), inside(irrelevant_region(masks))


def mechanism_for(model: nn.Module) -> str:
    """Which feedback mechanism fits ``model``, from what its contract class declares."""
    if getattr(type(model), "attention_is_global", False):
        return GLOBAL_MAP
    if getattr(type(model), "attention_gates_input", False):
        return PER_IMAGE_MAP
    return INPUT_GRADIENT


def explanation_maps(model: nn.Module, images: torch.Tensor, mechanism: str) -> torch.Tensor:
    """The map feedback is judged on: the attention map, or the input-gradient saliency (B, 1, H, W)."""
    if mechanism == INPUT_GRADIENT:
        return input_gradient_saliency(model, images, create_graph=False).detach()
    with torch.no_grad():
        return model(images)[1].detach()


def thawed_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved state whose attention can learn again, for fine-tuning with feedback.

    Seed 001's global map is frozen at the cut-off epoch (its ``is_frozen`` buffer; the pixel
    CNN's weights stay in the state): fine-tuned as saved, M could not move however the
    experts drew. Clearing the flag makes the loaded model rebuild M from its pixel CNN over
    the (unchanged) training split's P, so the feedback term trains it; saving freezes it again.
    Why the pixel CNN and not M itself: in seed 001 M *is* the pixel CNN's output over P, and
    seed 002 retrains the model with the feedback in its loss; fine-tuning the pixel CNN keeps
    M that function (Algorithm 1 with E = the recalibration's last epoch), and its scores are
    what the saturation-proof distance needs (``attention_logits``).
    States without the flag are returned unchanged.
    """
    thawed = dict(state)
    for key, value in state.items():
        if key == "is_frozen" or key.endswith(".is_frozen"):
            thawed[key] = torch.zeros_like(value)
    return thawed


class FeedbackLoss:
    """``extra_loss`` for ``fit``: CE on the feedback images + γ · the mechanism's attention term."""

    def __init__(self, feedback: FeedbackTargets, gamma: float, distance: str = "l2",
                 mechanism: Optional[str] = None, batch_size: int = 16, ce_weight: float = 1.0,
                 counterfactual: bool = True, seed: int = 0) -> None:
        if len(feedback) == 0:
            raise ParamError("the feedback loss needs at least one feedback image")
        if gamma < 0:
            raise ParamError(f"recalibrate.gamma must be >= 0, got {gamma}")
        if distance not in DISTANCES:
            raise ParamError(f"recalibrate.distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        if mechanism is not None and mechanism not in MECHANISMS:
            raise ParamError(f"feedback mechanism must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")
        self.feedback, self.gamma, self.distance = feedback, gamma, distance
        self.mechanism, self.batch_size, self.ce_weight = mechanism, max(1, batch_size), ce_weight
        self.counterfactual = counterfactual
        self._next = 0
        self._global_target = combined_global_target(feedback.masks)
        self._donor_picks = torch.Generator().manual_seed(seed)

    def _batch(self) -> torch.Tensor:
        """The next feedback mini-batch, rotating through all images (deterministic)."""
        n = len(self.feedback)
        if n <= self.batch_size:
            return torch.arange(n)
        index = (torch.arange(self.batch_size) + self._next) % n
        self._next = (self._next + self.batch_size) % n
        return index

    def __call__(self, model: nn.Module, step: object = None) -> dict[str, torch.Tensor]:
        mechanism = self.mechanism or mechanism_for(model)
        device = next(model.parameters()).device
        part = self.feedback.subset(self._batch())
        images, masks, labels = part.images.to(device), part.masks.to(device), part.labels.to(device)
        known = labels != NO_LABEL
        # counterfactual copies of the images with an irrelevant region and a known label
        counter = (known & irrelevant_region(masks).flatten(1).any(1)) if self.counterfactual else \
            torch.zeros_like(known)
        n_counter = int(counter.sum())
        if n_counter:
            donors = getattr(step, "images", None)
            extra = counterfactual_images(images[counter], masks[counter], donors, self._donor_picks)
            batch, batch_masks = torch.cat([images, extra]), torch.cat([masks, masks[counter]])
        else:
            batch, batch_masks = images, masks
        terms: dict[str, torch.Tensor] = {}
        if mechanism == INPUT_GRADIENT:
            # counterfactuals included: the region is irrelevant whatever another image put there
            saliency, logits = _saliency_and_logits(model, batch, create_graph=True)
            _, inside_irrelevant = region_shares(saliency, batch_masks)
            has_irrelevant = irrelevant_region(batch_masks).flatten(1).any(1)
            penalty = inside_irrelevant[has_irrelevant].mean() if bool(has_irrelevant.any()) else saliency.sum() * 0
            terms["feedback_attention"] = self.gamma * penalty
        else:
            forward = getattr(model, "forward_with_scores", None)
            logits, attention, scores = forward(batch) if callable(forward) else (*model(batch), None)
            if mechanism == GLOBAL_MAP:
                target, drawn = (t.to(device) for t in self._global_target)
                distance = map_distance(attention[:1], target.to(attention.dtype), drawn, self.distance,
                                        scores=None if scores is None else scores[:1])
            else:
                # counterfactuals too: the region is irrelevant whatever another image put there
                target = relevant_region(batch_masks).to(attention.dtype)
                distance = map_distance(attention, target, batch_masks != 128, self.distance, scores=scores)
            terms["feedback_attention"] = self.gamma * distance
        if self.ce_weight > 0:
            plain = known & ~counter & ~part.trained().to(device)
            ce_logits = torch.cat([logits[:len(images)][plain], logits[len(images):]])
            ce_labels = torch.cat([labels[plain], labels[counter]])
            if ce_labels.numel():
                terms["feedback_ce"] = self.ce_weight * F.cross_entropy(ce_logits, ce_labels)
        return terms


__all__ = [
    "DISTANCES", "FeedbackLoss", "FeedbackTargets", "GLOBAL_MAP", "INPUT_GRADIENT", "MECHANISMS", "NO_LABEL",
    "PER_IMAGE_MAP", "adjusted_target", "combined_global_target", "counterfactual_images",
    "explanation_maps", "input_gradient_saliency",
    "map_distance", "mechanism_for", "region_shares", "thawed_state",
]
