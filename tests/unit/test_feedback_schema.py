"""The feedback wire contract: ROI validation messages and ROI rasterisation."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medattn.errors import MedattnError
from medattn.feedback import rasterize
from medattn.feedback.schema import (
    IRRELEVANT,
    MAX_POLYGON_POINTS,
    MAX_ROIS,
    RELEVANT,
    UNTOUCHED,
    FeedbackSubmission,
    InvalidFeedback,
    feedback_map,
    parse_submission,
)

W, H = 20, 10


def body(*rois: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model_name": "medattn-fundus", "model_version": "3", "expert_id": "dr-lee",
            "rois": list(rois), **fields}


def rect(x: float = 2, y: float = 1, width: float = 3, height: float = 2, kind: str = "relevant") -> dict[str, Any]:
    return {"shape": "rectangle", "kind": kind, "x": x, "y": y, "width": width, "height": height}


def poly(points: list[list[float]], kind: str = "relevant") -> dict[str, Any]:
    return {"shape": "polygon", "kind": kind, "points": points}


def png_b64(mask: np.ndarray, mode: str = "L") -> str:
    values = np.where(mask, 255, 0).astype(np.uint8)
    image = Image.fromarray(values)
    if mode == "RGBA":  # a canvas layer: paint in the alpha channel, colour irrelevant
        rgba = np.zeros((*mask.shape, 4), np.uint8)
        rgba[..., 0] = 200
        rgba[..., 3] = values
        image = Image.fromarray(rgba)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def brush_png(mask: np.ndarray, kind: str = "relevant", mode: str = "L") -> dict[str, Any]:
    return {"shape": "brush", "kind": kind, "mask_png_base64": png_b64(mask, mode)}


def brush_rle(mask: np.ndarray, kind: str = "relevant") -> dict[str, Any]:
    height, width = mask.shape
    return {"shape": "brush", "kind": kind,
            "rle": {"width": width, "height": height, "counts": rasterize.encode_rle(mask)}}


def problem_of(raw: dict[str, Any], width: int = W, height: int = H) -> str:
    with pytest.raises(InvalidFeedback) as caught:
        parse_submission(raw).validate_against(width, height)
    assert isinstance(caught.value, MedattnError) and caught.value.status_code == 422
    return str(caught.value)


def test_valid_submission_of_every_shape_parses_from_json() -> None:
    mask = np.zeros((H, W), bool)
    mask[2:4, 5:9] = True
    raw = body(rect(), poly([[1, 1], [8, 1], [4, 6]], kind="irrelevant"), brush_png(mask), brush_rle(mask),
               request_id="req-1", corrected_label="2", comment="lesion missed")
    submission = parse_submission(json.dumps(raw).encode())
    assert submission.validate_against(W, H) is submission
    # a rectangle scaled from screen pixels ends on the edge up to float rounding (20.000000000000004)
    edge = parse_submission(body(rect(x=0.1, y=0, width=19.900000000000002, height=H)))
    assert edge.validate_against(W, H) is edge
    assert [roi.shape for roi in submission.rois] == ["rectangle", "polygon", "brush", "brush"]
    assert np.array_equal(submission.rois[2].mask(), mask)
    assert np.array_equal(submission.rois[3].mask(), mask)


@pytest.mark.parametrize("roi, expected", [
    (rect(width=0), "rois[0] (rectangle): rectangle has zero or negative area"),
    (rect(height=-2), "rois[0] (rectangle): rectangle has zero or negative area"),
    (poly([[1, 1], [5, 5]]), "rois[0] (polygon).points: a polygon needs at least 3 points, got 2"),
    (poly([[1, 1], [1, 1], [1, 1], [4, 4]]), "fewer than 3 distinct points"),
    (poly([[0, 0], [2, 2], [4, 4]]), "zero area (its points are collinear)"),
    (poly([[0, 0]] + [[i % 7, i % 5] for i in range(MAX_POLYGON_POINTS)]), "at most 1000 items"),
    ({"shape": "circle", "kind": "relevant"}, "rois[0]: Input tag 'circle'"),
    ({**rect(), "kind": "maybe"}, "rois[0] (rectangle).kind: Input should be 'relevant' or 'irrelevant'"),
    ({**rect(), "w": 3}, "rois[0] (rectangle).w: Extra inputs are not permitted"),
    ({"shape": "brush", "kind": "relevant"}, "exactly one of mask_png_base64 or rle"),
    ({"shape": "brush", "kind": "relevant", "mask_png_base64": "***"}, "not valid base64"),
    ({"shape": "brush", "kind": "relevant", "mask_png_base64": base64.b64encode(b"hello").decode()},
     "does not decode to an image"),
    ({"shape": "brush", "kind": "relevant", "rle": {"width": 4, "height": 2, "counts": [3, 2]}},
     "run lengths sum to 5, expected width*height = 8"),
    ({**rect(), "x": "NaN"}, "rois[0] (rectangle).x: Input should be a valid number"),  # a string, even "NaN"
    (poly([[1, 1], [float("inf"), 1], [4, 6]]), "rois[0] (polygon).points[1][0]: Input should be a finite number"),
])
def test_malformed_roi_is_rejected_with_its_index_and_problem(roi: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidFeedback) as caught:
        parse_submission(body(rect(), roi))
    message = str(caught.value)
    assert expected.replace("rois[0]", "rois[1]") in message
    assert not any(p.startswith("rois[0]") for p in caught.value.problems)  # the good ROI is not blamed


@pytest.mark.parametrize("roi, expected", [
    (rect(x=18, width=3), "rois[0] (rectangle): x=18, y=1, width=3, height=2 reaches outside the 20x10 image"),
    (rect(x=-1), "reaches outside the 20x10 image"),
    (poly([[1, 1], [25, 1], [4, 6]]), "rois[0] (polygon): point 1 (25, 1) lies outside the 20x10 image"),
    (brush_png(np.ones((H, W + 1), bool)), "rois[0] (brush): mask is 21x10 but the image is 20x10"),
    (brush_rle(np.ones((H + 1, W), bool)), "rois[0] (brush): mask is 20x11 but the image is 20x10"),
    (rect(x=2.1, y=1.1, width=0.3, height=0.3), "rois[0] (rectangle): covers no pixel centre"),
    (brush_png(np.zeros((H, W), bool)), "rois[0] (brush): paints no pixel"),
])
def test_roi_not_fitting_the_image_is_rejected(roi: dict[str, Any], expected: str) -> None:
    assert expected in problem_of(body(roi))


def test_every_bad_roi_is_reported_not_just_the_first() -> None:
    with pytest.raises(InvalidFeedback) as caught:
        parse_submission(body(rect(x=30), rect(), poly([[0, 0], [1, 50], [3, 3]]))).validate_against(W, H)
    assert [p.split(" ")[0] for p in caught.value.problems] == ["rois[0]", "rois[2]"]


def test_submission_level_limits() -> None:
    assert "rois: List should have at most 50 items" in str(
        pytest.raises(InvalidFeedback, parse_submission, body(*[rect()] * (MAX_ROIS + 1))).value)
    assert "at least one ROI or a corrected_label" in str(pytest.raises(InvalidFeedback, parse_submission, body()).value)
    assert "comment: String should have at most 2000 characters" in str(
        pytest.raises(InvalidFeedback, parse_submission, body(rect(), comment="x" * 2001)).value)
    assert "expert_id: String should have at least 1 character" in str(
        pytest.raises(InvalidFeedback, parse_submission, body(rect(), expert_id="  ")).value)
    assert "body is not valid JSON" in str(pytest.raises(InvalidFeedback, parse_submission, b"{not json").value)
    assert isinstance(parse_submission(body(corrected_label="1")), FeedbackSubmission)


# -- rasterisation -------------------------------------------------------------------------------

def test_rectangle_covers_the_pixels_whose_centres_it_contains() -> None:
    mask = rasterize.rectangle_mask(2, 1, 3, 2, W, H)
    expected = np.zeros((H, W), bool)
    expected[1:3, 2:5] = True
    assert np.array_equal(mask, expected)
    # a fractional rectangle: centres 2.5 and 3.5 are inside [2.4, 3.6), 4.5 is not
    assert np.flatnonzero(rasterize.rectangle_mask(2.4, 0, 1.2, 1, W, H)[0]).tolist() == [2, 3]


def test_polygon_of_rectangle_corners_equals_the_rectangle() -> None:
    corners = [[2.4, 1.0], [7.7, 1.0], [7.7, 6.2], [2.4, 6.2]]
    assert np.array_equal(rasterize.polygon_mask(corners, W, H), rasterize.rectangle_mask(2.4, 1.0, 5.3, 5.2, W, H))


def test_polygon_triangle_and_even_odd_rule() -> None:
    triangle = rasterize.polygon_mask([[0, 0], [8, 0], [0, 8]], W, H)
    rows, cols = np.nonzero(triangle)
    # centre (c+.5, r+.5) is inside x + y < 8 exactly for c + r <= 6
    assert set(zip(rows.tolist(), cols.tolist())) == {(r, c) for r in range(8) for c in range(8) if r + c <= 6}
    # a ring drawn as one self-overlapping outline: the hole stays empty under even-odd
    ring = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0], [3, 3], [3, 7], [7, 7], [7, 3], [3, 3]]
    mask = rasterize.polygon_mask(ring, 10, 10)
    assert mask[1, 1] and not mask[5, 5] and mask.sum() == 100 - 16


def test_brush_png_uses_alpha_when_present_and_grey_otherwise() -> None:
    mask = np.zeros((H, W), bool)
    mask[3:7, 4:12] = True
    for mode in ("L", "RGBA"):
        roi = parse_submission(body(brush_png(mask, mode=mode))).rois[0]
        assert np.array_equal(roi.rasterize(H, W), mask)


def test_rle_round_trip_including_mask_starting_painted() -> None:
    rng = np.random.default_rng(0)
    for mask in (rng.random((H, W)) > 0.5, np.ones((3, 4), bool), np.zeros((3, 4), bool)):
        counts = rasterize.encode_rle(mask)
        assert sum(counts) == mask.size
        assert np.array_equal(rasterize.decode_rle(counts, mask.shape[1], mask.shape[0]), mask)
    assert rasterize.encode_rle(np.array([[True, False]]))[:2] == [0, 1]


def test_feedback_map_values_and_drawing_order() -> None:
    submission = parse_submission(body(rect(0, 0, 10, 10, kind="relevant"), rect(5, 5, 10, 5, kind="irrelevant")))
    out = feedback_map(submission.rois, W, H)
    assert out.dtype == np.uint8 and out.shape == (H, W)
    assert out[0, 0] == RELEVANT == 255
    assert out[6, 6] == IRRELEVANT == 0  # overlap: the later ROI wins
    assert out[0, 15] == UNTOUCHED == 128
    assert set(np.unique(out).tolist()) == {0, 128, 255}


def test_each_roi_type_rasterizes_itself_at_the_asked_size() -> None:
    mask = np.zeros((H, W), bool)
    mask[3:7, 4:12] = True
    submission = parse_submission(body(rect(4, 3, 8, 4), poly([[4, 3], [12, 3], [12, 7], [4, 7]]),
                                       brush_png(mask), brush_rle(mask)))
    for roi in submission.rois:
        got = roi.rasterize(H, W)
        assert got.dtype == bool and got.shape == (H, W), roi.shape
        assert np.array_equal(got, mask), roi.shape
    # a rectangle or polygon fits any image; the part outside a smaller one is cut off
    assert submission.rois[0].rasterize(5, 6).sum() == 2 * 2


def test_a_brush_asked_for_another_image_size_is_invalid_feedback() -> None:
    roi = parse_submission(body(brush_rle(np.ones((H, W), bool)))).rois[0]
    with pytest.raises(InvalidFeedback, match=f"mask is {W}x{H} but the image is 8x8"):
        roi.rasterize(8, 8)


def test_a_brush_png_of_another_format_names_the_field() -> None:
    buffer = io.BytesIO()
    Image.new("L", (W, H), 255).save(buffer, format="JPEG")
    roi = {"shape": "brush", "kind": "relevant", "mask_png_base64": base64.b64encode(buffer.getvalue()).decode()}
    with pytest.raises(InvalidFeedback, match=r"rois\[0\] \(brush\): mask_png_base64 must be a PNG, got JPEG"):
        parse_submission(body(roi))
