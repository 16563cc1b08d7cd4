"""The feedback loss moves a model's attention toward a relevant ROI and away from an irrelevant one.

One toy task where two regions predict the class equally well — a "lesion" square (relevant)
and a "marker" square (irrelevant). Each of the three mechanisms (seed 002's per-image input
map, seed 001's global map, the input-gradient penalty for any other model) is fine-tuned twice
from the same weights through the one ``fit``: once without feedback (the control) and once with
the feedback loss; the feedback run must put more of its map inside the relevant ROI and less
inside the irrelevant one than the control, less inside the irrelevant one than at the start,
and a better agreement (relevant minus irrelevant share) than the start. (The input-gradient
penalty, like Ross et al.'s, acts on irrelevant regions only: what it buys on the relevant side
is relative to training without feedback.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from medattn.config import ModelParams, TrainParams
from medattn.errors import ParamError
from medattn.feedback.schema import IRRELEVANT, RELEVANT, UNTOUCHED
from medattn.training.feedback_loss import (
    GLOBAL_MAP,
    INPUT_GRADIENT,
    NO_LABEL,
    PER_IMAGE_MAP,
    FeedbackLoss,
    FeedbackTargets,
    adjusted_target,
    combined_global_target,
    counterfactual_images,
    explanation_maps,
    map_distance,
    mechanism_for,
    region_shares,
    thawed_state,
)
from medattn.training.fit import LabelledImages, fit

SIZE = 24
LESION = (slice(3, 9), slice(3, 9))
MARKER = (slice(15, 21), slice(15, 21))
CLASSES = ["healthy", "sick"]


def toy_split(n: int, seed: int) -> LabelledImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.3
    labels = torch.arange(n) % 2
    for i in range(n):
        if labels[i] == 1:
            images[i, :, LESION[0], LESION[1]] += 1.5  # a bright "lesion"
            images[i, 0, MARKER[0], MARKER[1]] -= 1.5  # a dark-red "marker": just as predictive
    return LabelledImages(images, labels)


def feedback_for(split: LabelledImages, count: int) -> FeedbackTargets:
    masks = torch.full((count, 1, SIZE, SIZE), UNTOUCHED, dtype=torch.uint8)
    masks[:, :, LESION[0], LESION[1]] = RELEVANT
    masks[:, :, MARKER[0], MARKER[1]] = IRRELEVANT
    return FeedbackTargets([f"fb{i}" for i in range(count)], split.images[:count], masks, split.labels[:count])


def shares(model, feedback: FeedbackTargets) -> tuple[float, float]:
    model.eval()
    saliency = explanation_maps(model, feedback.images, mechanism_for(model))
    relevant, irrelevant = region_shares(saliency, feedback.masks)
    return float(relevant.mean()), float(irrelevant.mean())


MECHANISM_OF = {"input_attention": PER_IMAGE_MAP, "global_pixel": GLOBAL_MAP, "none": INPUT_GRADIENT}


@pytest.mark.parametrize("attention", list(MECHANISM_OF))
def test_feedback_moves_attention_toward_relevant_and_away_from_irrelevant(attention: str) -> None:
    train, val = toy_split(32, 0), toy_split(8, 1)
    feedback = feedback_for(train, 8)
    model_params = ModelParams(backbone="small_cnn", attention=attention, K=8)
    base = TrainParams(epochs=1, cutoff_epoch=1, lambda_l1=0.0, lr=0.01, batch_size=8, seed=0, device="cpu")
    start = fit(model_params, base, train, val, class_names=CLASSES, progress=False)
    assert mechanism_for(start.model) == MECHANISM_OF[attention]
    start_state = thawed_state(start.model.state_dict())
    before = shares(start.model, feedback)

    tune = replace(base, epochs=3, cutoff_epoch=3, seed=1)
    control = fit(model_params, tune, train, val, class_names=CLASSES, init_from=start_state, progress=False)
    loss = FeedbackLoss(feedback, gamma=10.0, distance="l2")
    tuned = fit(model_params, tune, train, val, class_names=CLASSES, init_from=start_state, extra_loss=loss,
                progress=False)
    assert "train_feedback_attention" in tuned.history[-1]
    without, with_feedback = shares(control.model, feedback), shares(tuned.model, feedback)
    figures = (before, without, with_feedback)
    # toward the relevant ROI: more of the map there than the same fine-tune without feedback
    assert with_feedback[0] > without[0], figures
    # away from the irrelevant ROI: less there than at the start and than without feedback
    assert with_feedback[1] < min(before[1], without[1]), figures
    # and agreement (relevant minus irrelevant share) better than the start's
    assert with_feedback[0] - with_feedback[1] > before[0] - before[1], figures


def test_adjusted_target_changes_only_where_the_expert_drew() -> None:
    model_map = torch.full((1, 1, 4, 4), 0.4)
    masks = torch.full((1, 1, 4, 4), UNTOUCHED, dtype=torch.uint8)
    masks[0, 0, 0, 0], masks[0, 0, 3, 3] = RELEVANT, IRRELEVANT
    target = adjusted_target(model_map, masks)
    assert target[0, 0, 0, 0] == 1.0 and target[0, 0, 3, 3] == 0.0
    assert torch.equal(target[masks == UNTOUCHED], model_map[masks == UNTOUCHED])
    # the distance to the adjusted target is the distance on the drawn pixels alone
    drawn = masks != UNTOUCHED
    assert torch.isclose(map_distance(model_map, target, drawn, "l2"), torch.tensor((0.6**2 + 0.4**2) / 2))
    assert map_distance(target, target, drawn, "l1") == 0.0


def test_global_target_combines_many_images_into_one() -> None:
    masks = torch.full((3, 1, 2, 2), UNTOUCHED, dtype=torch.uint8)
    masks[0, 0, 0, 0] = RELEVANT
    masks[1, 0, 0, 0] = IRRELEVANT  # the experts disagree at (0, 0)
    masks[2, 0, 1, 1] = IRRELEVANT
    target, drawn = combined_global_target(masks)
    assert target.shape == (1, 1, 2, 2)
    assert target[0, 0, 0, 0] == 0.5 and target[0, 0, 1, 1] == 0.0
    assert drawn[0, 0].tolist() == [[True, False], [False, True]]


def test_feedback_without_labels_adds_no_cross_entropy_and_bad_settings_are_refused() -> None:
    train = toy_split(8, 0)
    feedback = feedback_for(train, 4)
    unlabelled = replace(feedback, labels=torch.full((4,), NO_LABEL))
    model = fit(ModelParams(attention="input_attention", K=4), TrainParams(epochs=1, cutoff_epoch=1, device="cpu"),
                train, train, class_names=CLASSES, progress=False).model.train()
    assert set(FeedbackLoss(unlabelled, gamma=1.0)(model)) == {"feedback_attention"}
    assert set(FeedbackLoss(feedback, gamma=1.0)(model)) == {"feedback_attention", "feedback_ce"}
    with pytest.raises(ParamError, match="distance"):
        FeedbackLoss(feedback, gamma=1.0, distance="cosine")
    with pytest.raises(ParamError, match="gamma"):
        FeedbackLoss(feedback, gamma=-1.0)
    with pytest.raises(ParamError, match="at least one"):
        FeedbackLoss(feedback.subset([]), gamma=1.0)


def _saturated(attention: str, train: LabelledImages) -> torch.nn.Module:
    """A model whose map is exactly 1.0 in float32 everywhere (the shortcut model's M on the decoy)."""
    model_params = ModelParams(backbone="small_cnn", attention=attention, K=8)
    tp = TrainParams(epochs=1, cutoff_epoch=1, lambda_l1=0.0, lr=0.01, batch_size=8, seed=0, device="cpu")
    model = fit(model_params, tp, train, train, class_names=CLASSES, progress=False).model
    model.load_state_dict(thawed_state(model.state_dict()))  # what recalibration fine-tunes
    model.before_training(train.images)  # a thawed global map rebuilds M from P
    score = model.pixel_cnn.score if attention == "global_pixel" else model.gate.score
    with torch.no_grad():
        score.bias.fill_(40.0)
    return model.train()


@pytest.mark.parametrize("distance", ["l2", "bce"])
@pytest.mark.parametrize("attention", ["global_pixel", "input_attention"])
def test_feedback_moves_a_saturated_map_down_on_the_irrelevant_region(attention: str, distance: str) -> None:
    train = toy_split(16, 0)
    feedback = feedback_for(train, 8)
    model = _saturated(attention, train)
    marker = feedback.masks == IRRELEVANT
    start = model(feedback.images)[1].detach()
    assert bool((start[marker] == 1.0).all())  # saturated: sigmoid'(S) is exactly 0 there
    loss = FeedbackLoss(feedback, gamma=1.0, distance=distance, ce_weight=0.0)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(150):
        optimiser.zero_grad()
        sum(loss(model).values()).backward()
        optimiser.step()
    after = model(feedback.images)[1].detach()
    assert float(after[marker].mean()) < 0.5, float(after[marker].mean())
    # the relevant region is not dragged down with it: it stays well above the irrelevant one
    assert float(after[feedback.masks == RELEVANT].mean()) > float(after[marker].mean()) + 0.3


def test_scores_give_the_map_in_one_pass_and_a_frozen_global_map_has_none() -> None:
    train = toy_split(16, 0)
    x = train.images[:4]
    for attention in ("global_pixel", "input_attention"):
        model = _saturated(attention, train).eval()  # no dropout: two passes must agree
        score = model.pixel_cnn.score if attention == "global_pixel" else model.gate.score
        with torch.no_grad():
            score.bias.fill_(0.3)
            scores = model.attention_logits(x)
            logits, maps = model(x)
            # forward_with_scores: the same three in one pass of the attention network
            one_logits, one_maps, one_scores = model.forward_with_scores(x)
        assert torch.allclose(torch.sigmoid(scores).expand_as(maps), maps)
        assert torch.allclose(one_logits, logits, atol=1e-6) and torch.allclose(one_maps, maps, atol=1e-6)
        assert torch.allclose(one_scores, scores, atol=1e-6)
    frozen = _saturated("global_pixel", train)
    frozen.freeze()
    assert frozen.attention_logits(train.images[:2]) is None
    assert frozen.forward_with_scores(train.images[:2])[2] is None


def test_distances_keep_their_value_when_taken_from_scores() -> None:
    scores = torch.tensor([[[[-1.0, 0.5], [2.0, 40.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    drawn = torch.ones_like(target, dtype=torch.bool)
    maps = torch.sigmoid(scores)
    for distance in ("l2", "l1"):
        assert torch.isclose(map_distance(maps, target, drawn, distance, scores=scores),
                             map_distance(maps, target, drawn, distance))
    # BCE from the scores is exact where the clamped BCE on the map is capped
    exact = torch.nn.functional.binary_cross_entropy_with_logits(scores, target)
    assert torch.isclose(map_distance(maps, target, drawn, "bce", scores=scores), exact)


def test_counterfactual_takes_only_irrelevant_pixels_from_a_donor_in_place() -> None:
    images = torch.zeros(3, 3, SIZE, SIZE)
    donors = torch.arange(2, dtype=torch.float32).add(5.0).view(2, 1, 1, 1).expand(2, 3, SIZE, SIZE).clone()
    masks = torch.full((3, 1, SIZE, SIZE), UNTOUCHED, dtype=torch.uint8)
    masks[:, :, MARKER[0], MARKER[1]] = IRRELEVANT
    masks[:, :, LESION[0], LESION[1]] = RELEVANT
    out = counterfactual_images(images, masks, donors, torch.Generator().manual_seed(0))
    inside = (masks == IRRELEVANT).expand_as(out)
    assert bool((out[~inside] == 0).all())  # relevant and untouched pixels are the image's own
    assert set(out[inside].unique().tolist()) <= {5.0, 6.0}  # the region is a donor's, same place
    # donors of another size (or none): the region is set to the normalised mean, 0
    filled = counterfactual_images(images + 1, masks, donors[:, :, :4, :4], torch.Generator().manual_seed(0))
    assert bool((filled[inside] == 0).all()) and bool((filled[~inside] == 1).all())


def test_training_images_with_an_irrelevant_roi_get_a_counterfactual_cross_entropy() -> None:
    train = toy_split(8, 0)
    in_training = replace(feedback_for(train, 4), in_training=torch.ones(4, dtype=torch.bool))
    model = fit(ModelParams(attention="input_attention", K=4), TrainParams(epochs=1, cutoff_epoch=1, device="cpu"),
                train, train, class_names=CLASSES, progress=False).model.train()
    # their plain CE is fit's own: without counterfactuals the loss adds none
    assert set(FeedbackLoss(in_training, gamma=1.0, counterfactual=False)(model)) == {"feedback_attention"}
    terms = FeedbackLoss(in_training, gamma=1.0)(model)
    assert set(terms) == {"feedback_attention", "feedback_ce"} and float(terms["feedback_ce"].detach()) > 0
