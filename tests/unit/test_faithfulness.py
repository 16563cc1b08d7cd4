"""Attention faithfulness on constructed maps whose scores are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medattn.errors import DataError, ParamError
from medattn.evaluation.faithfulness import (
    attention_faithfulness,
    attention_mass_inside,
    chance_topk_iou,
    lesion_frequency_map,
    topk_count,
    topk_iou,
    uniform_mass_inside,
)


def _masks() -> np.ndarray:
    """Three 10 x 10 masks of 5 pixels each (= 5% of the image), in different places."""
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, 2, 3:8] = True
    masks[1, 5:10, 7] = True
    masks[2, 0, 0:5] = True
    return masks


def test_map_equal_to_mask_puts_all_mass_inside_and_top5_iou_is_one() -> None:
    masks = _masks()
    attention = masks.astype(float)
    np.testing.assert_allclose(attention_mass_inside(attention, masks), 1.0)
    np.testing.assert_allclose(topk_iou(attention, masks, k_percent=5), 1.0)


def test_uniform_map_scores_the_mask_area_fraction() -> None:
    masks = _masks()
    masks[1, 0, 0:5] = True  # image 1's mask grows to 10 pixels
    uniform = np.full(masks.shape, 0.3)
    expected = np.array([0.05, 0.10, 0.05])
    np.testing.assert_allclose(attention_mass_inside(uniform, masks), expected)
    np.testing.assert_allclose(uniform_mass_inside(masks), expected)


def test_inverted_map_scores_zero() -> None:
    masks = _masks()
    inverted = 1.0 - masks.astype(float)
    np.testing.assert_allclose(attention_mass_inside(inverted, masks), 0.0)
    np.testing.assert_allclose(topk_iou(inverted, masks, k_percent=5), 0.0)


def test_partial_overlap_matches_hand_computation() -> None:
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 0, 0:4] = True  # 4 lesion pixels
    attention = np.zeros((1, 10, 10))
    attention[0, 0, 2:6] = 1.0  # 4 attended pixels, 2 of them on the lesion
    attention[0, 9, 9] = 2.0  # plus one strong pixel elsewhere
    # mass inside = 2 / 6; top 5% = 5 pixels = {(9,9), (0,2..5)} -> 2 shared of 4 + 5 - 2 = 7
    assert attention_mass_inside(attention, mask)[0] == pytest.approx(2 / 6)
    assert topk_iou(attention, mask, k_percent=5)[0] == pytest.approx(2 / 7)


def test_topk_ties_share_the_remaining_places_evenly() -> None:
    # A flat map picks no pixel over another: it scores exactly the chance level, wherever the mask is.
    flat = np.full((1, 10, 10), 0.5)
    first_five = np.zeros((1, 10, 10), dtype=bool)
    first_five[0, 0, 0:5] = True
    last_five = np.zeros((1, 10, 10), dtype=bool)
    last_five[0, 9, 5:10] = True
    chance = chance_topk_iou(first_five, k_percent=5)[0]
    assert topk_iou(flat, first_five, k_percent=5)[0] == pytest.approx(chance)
    assert topk_iou(flat, last_five, k_percent=5)[0] == pytest.approx(chance)
    # A tie at the boundary: 3 clear winners, then 4 equal values competing for 2 places.
    att = np.zeros((1, 10, 10))
    att[0, 5, 0:3] = 1.0
    att[0, 7, [2, 4, 6, 8]] = 0.5
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 5, 0:3] = True
    mask[0, 7, [2, 4]] = True
    # expected hits = 3 winners + 2 tied lesion pixels x 2/4 places = 4; union = 5 + 5 - 4 = 6
    assert topk_iou(att, mask, k_percent=5)[0] == pytest.approx(4 / 6)
    # without ties at the boundary the selection is exact
    att[0, 7, [6, 8]] = 0.25
    assert topk_iou(att, mask, k_percent=5)[0] == pytest.approx(1.0)


def test_global_map_is_broadcast_over_all_images() -> None:
    masks = _masks()
    rng = np.random.default_rng(0)
    global_map = rng.random((10, 10))
    stacked = np.repeat(global_map[None], 3, axis=0)
    for shaped in (global_map, global_map[None], global_map[None, None]):
        np.testing.assert_allclose(
            attention_mass_inside(shaped, masks), attention_mass_inside(stacked, masks)
        )
        np.testing.assert_array_equal(topk_iou(shaped, masks, 5), topk_iou(stacked, masks, 5))
    # The model contract's (N, 1, H, W) shape works as well.
    np.testing.assert_allclose(
        attention_mass_inside(stacked[:, None], masks), attention_mass_inside(stacked, masks)
    )


def test_images_without_a_mask_get_nan_and_are_left_out_of_the_means() -> None:
    masks = _masks()
    masks[2] = False
    attention = _masks().astype(float)  # image 2's map is off its (now missing) lesion
    attention[1] = 1.0 - masks[1]  # image 1 looks away from its lesion
    mass = attention_mass_inside(attention, masks)
    assert mass[0] == 1.0 and mass[1] == 0.0 and math.isnan(mass[2])
    assert math.isnan(uniform_mass_inside(masks)[2])
    assert math.isnan(topk_iou(attention, masks, 5)[2])
    summary = attention_faithfulness(attention, masks, k_percent=5)
    assert summary["n_images_with_mask"] == 2
    assert summary["mass_inside_model"] == pytest.approx(0.5)
    assert summary["mass_inside_uniform"] == pytest.approx(0.05)
    assert summary["mass_inside_ratio"] == pytest.approx(10.0)
    assert summary["topk_iou_model"] == pytest.approx(0.5)


def test_summary_without_any_mask_has_no_means() -> None:
    summary = attention_faithfulness(
        np.ones((2, 4, 4)), np.zeros((2, 4, 4), dtype=bool), k_percent=10
    )
    assert summary["available"] is False
    assert summary["n_images_with_mask"] == 0
    assert summary["mass_inside_model"] is None and summary["topk_iou_ratio"] is None


@pytest.mark.parametrize(
    "attention",
    [np.ones((0, 4, 4)), np.ones((4, 4)), np.ones((1, 4, 4)), np.ones((1, 1, 4, 4))],
    ids=["no-maps", "global-2d", "global-3d", "global-4d"],
)
def test_no_image_at_all_is_reported_absent_not_computed(attention) -> None:
    # what the evaluate stage passes on a dataset without masks: zero masked test images
    no_masks = np.zeros((0, 4, 4), dtype=bool)
    summary = attention_faithfulness(attention, no_masks, k_percent=5, prior=np.ones((4, 4)))
    assert summary["available"] is False and summary["n_images_with_mask"] == 0
    assert all(summary[key] is None for key in ("mass_inside_model", "topk_iou_model", "topk_iou_prior"))
    assert attention_mass_inside(attention, no_masks).shape == (0,)
    assert topk_iou(attention, no_masks, 5).shape == (0,)


@pytest.mark.parametrize("n_images", [1, 2, 7])
def test_a_global_map_is_ranked_once_and_scores_like_its_copies(n_images: int) -> None:
    rng = np.random.default_rng(n_images)
    masks = rng.random((n_images, 10, 10)) > 0.8
    global_map = rng.random((10, 10))
    copies = np.repeat(global_map[None], n_images, axis=0)
    # a read-only broadcast view (stride 0) is a global map too, whatever its strides say
    view = np.broadcast_to(global_map, (n_images, 10, 10))
    expected = topk_iou(copies, masks, 5)
    for shaped in (global_map, global_map[None, None], view):
        np.testing.assert_array_equal(topk_iou(shaped, masks, 5), expected)
        np.testing.assert_allclose(attention_mass_inside(shaped, masks), attention_mass_inside(copies, masks))
    assert attention_faithfulness(global_map, masks, 5) == attention_faithfulness(copies, masks, 5)


def test_masks_without_pixels_raise_data_error() -> None:
    with pytest.raises(DataError, match="no pixels"):
        attention_faithfulness(np.ones((2, 0, 0)), np.ones((2, 0, 0), dtype=bool), k_percent=5)


def test_lesion_frequency_map_is_the_share_of_masks_with_a_lesion_per_pixel() -> None:
    masks = np.zeros((4, 2, 2), dtype=bool)
    masks[:3, 0, 0] = True  # 3 of 4
    masks[0, 1, 1] = True  # 1 of 4
    np.testing.assert_allclose(lesion_frequency_map(masks), [[0.75, 0.0], [0.0, 0.25]])
    with pytest.raises(DataError, match="at least one mask"):
        lesion_frequency_map(np.zeros((0, 2, 2), dtype=bool))


def test_prior_scores_sit_next_to_the_model_and_ratios_compare_them() -> None:
    masks = _masks()
    prior = lesion_frequency_map(masks)  # covers every test lesion, plus the other images' ones
    perfect = masks.astype(float)
    summary = attention_faithfulness(perfect, masks, k_percent=5, prior=prior)
    # each test mask is 5 pixels; the prior spreads its mass over all 15 equally
    assert summary["mass_inside_prior"] == pytest.approx(5 / 15)
    assert summary["mass_inside_model_over_prior"] == pytest.approx(1.0 / (5 / 15))
    # a flat prior: the top 5 are a random 5 of 15 tied pixels -> hits 5/3, IoU (5/3) / (10 - 5/3)
    assert summary["topk_iou_prior"] == pytest.approx((5 / 3) / (10 - 5 / 3))
    assert summary["topk_iou_model_over_prior"] == pytest.approx(1.0 / summary["topk_iou_prior"])
    # the prior itself as the global attention map: exactly as good as the prior
    as_prior = attention_faithfulness(prior, masks, k_percent=5, prior=prior)
    assert as_prior["mass_inside_model_over_prior"] == pytest.approx(1.0)
    assert as_prior["topk_iou_model_over_prior"] == pytest.approx(1.0)
    # without a prior the prior keys are absent, not None
    assert "mass_inside_prior" not in attention_faithfulness(perfect, masks, k_percent=5)


def test_a_prior_of_zeros_scores_as_uniform_and_its_ratio_is_none_only_when_zero() -> None:
    masks = _masks()
    summary = attention_faithfulness(masks.astype(float), masks, 5, prior=np.zeros((10, 10)))
    assert summary["mass_inside_prior"] == pytest.approx(summary["mass_inside_uniform"])
    inverted = attention_faithfulness(masks.astype(float), masks, 5, prior=1.0 - masks.any(axis=0))
    assert inverted["mass_inside_prior"] == 0.0
    assert inverted["mass_inside_model_over_prior"] is None


def test_all_zero_map_is_scored_as_uniform() -> None:
    masks = _masks()
    np.testing.assert_allclose(
        attention_mass_inside(np.zeros((10, 10)), masks), uniform_mass_inside(masks)
    )


def test_chance_topk_iou_is_the_ratio_of_expectations() -> None:
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, :2] = True  # area 20 of 100; k = 5 -> expected hits 1 -> IoU 1 / (5 + 20 - 1)
    assert chance_topk_iou(mask, 5)[0] == pytest.approx(1 / 24)
    summary = attention_faithfulness(mask.astype(float), mask, k_percent=5)
    assert summary["topk_iou_model"] == pytest.approx(5 / 20)
    assert summary["topk_iou_ratio"] == pytest.approx((5 / 20) / (1 / 24))


def test_topk_count_rounds_up_and_ignores_float_noise() -> None:
    assert topk_count(100, 7) == 7
    assert topk_count(9216, 5) == 461
    assert topk_count(100, 0.1) == 1
    assert topk_count(100, 100) == 100


@pytest.mark.parametrize("k_percent", [0, -5, 101, float("nan")])
def test_topk_percent_out_of_range_names_the_param(k_percent: float) -> None:
    with pytest.raises(ParamError, match=r"evaluate\.topk_percent"):
        topk_iou(np.ones((1, 4, 4)), np.ones((1, 4, 4), dtype=bool), k_percent)


@pytest.mark.parametrize(
    ("attention", "masks", "needle"),
    [
        (np.ones((2, 5, 5)), np.ones((2, 4, 4), dtype=bool), "does not match masks"),
        (np.ones((3, 4, 4)), np.ones((2, 4, 4), dtype=bool), "does not match masks"),
        (-np.ones((2, 4, 4)), np.ones((2, 4, 4), dtype=bool), "non-negative"),
        (np.full((2, 4, 4), np.nan), np.ones((2, 4, 4), dtype=bool), "finite"),
        (np.ones((2, 4, 4)), np.ones((4, 4), dtype=bool), "masks must have shape"),
    ],
)
def test_bad_shapes_and_values_raise_data_error(attention, masks, needle) -> None:
    with pytest.raises(DataError) as caught:
        attention_faithfulness(attention, masks, k_percent=5)
    assert needle in str(caught.value)


def test_uint8_png_masks_are_accepted() -> None:
    masks = _masks()
    as_png = masks.astype(np.uint8) * 255
    np.testing.assert_allclose(uniform_mass_inside(as_png), uniform_mass_inside(masks))
