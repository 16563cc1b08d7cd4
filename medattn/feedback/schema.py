"""What an expert submits: regions of interest (ROIs) drawn on a prediction's attention map.

Wire format (JSON), all coordinates in *image pixel* units of the original image (not of the
resized model input and not of the screen), origin top-left, x to the right, y down::

    {"request_id": "...", "model_name": "medattn-fundus", "model_version": "3",
     "expert_id": "dr-lee", "corrected_label": "2", "comment": "lesion missed",
     "rois": [
       {"shape": "rectangle", "kind": "relevant", "x": 10, "y": 12, "width": 30, "height": 20},
       {"shape": "polygon", "kind": "irrelevant", "points": [[5, 5], [40, 5], [20, 30]]},
       {"shape": "brush", "kind": "relevant", "mask_png_base64": "iVBORw0..."},
       {"shape": "brush", "kind": "relevant", "rle": {"width": 64, "height": 48, "counts": [...]}}]}

A brush mask covers the whole image (same width and height); see ``rasterize`` for the pixel
convention and how the RLE counts are read. Parse with :func:`parse_submission` and check with
:meth:`FeedbackSubmission.validate_against` once the image size is known; both raise
:class:`InvalidFeedback` whose one-line message names the field or ``rois[i]`` at fault.

Each ROI type owns its rasterisation (``roi.rasterize(height, width)``, a boolean mask) and its
bounds check; :mod:`medattn.feedback.rasterize` is the geometry underneath, with no knowledge of
this schema. :func:`feedback_map` combines a list of ROIs into the 8-bit map that the export writes
and the feedback loss reads: ``RELEVANT`` (255) where the expert marked the region as relevant,
``IRRELEVANT`` (0) where they marked it irrelevant, ``UNTOUCHED`` (128) elsewhere. ROIs are painted
in list (drawing) order, so a later ROI overrides an earlier one where they overlap.

The feedback errors live here, beside the contract they guard; each carries the HTTP status
the service answers with (``status_code``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from medattn.errors import MedattnError
from medattn.feedback import rasterize

MAX_ROIS = 50
MAX_POLYGON_POINTS = 1000
MAX_RLE_RUNS = 1_000_000
MAX_COMMENT_LENGTH = 2000
MAX_NAME_LENGTH = 200
# Base64 of an 8 MiB PNG; a full-image brush mask compresses far below this.
MAX_MASK_PNG_BASE64_CHARS = 8 * 1024 * 1024 * 4 // 3 + 64
MAX_IMAGE_SIDE = 16384
# Brush-mask pixels one submission may declare in all (8192 x 8192, 64 MiB of boolean mask);
# the service passes its setting MEDATTN_MAX_FEEDBACK_MASK_PIXELS to parse_submission.
MAX_MASK_PIXELS_PER_FEEDBACK = 8192 * 8192

# Values of the combined feedback map (see the module docstring).
RELEVANT = 255
IRRELEVANT = 0
UNTOUCHED = 128


class FeedbackError(MedattnError):
    """Base of the feedback errors; ``status_code`` is the HTTP answer the service gives."""

    status_code = 400


class InvalidFeedback(FeedbackError):
    """The submission (or a query on the store) is malformed or does not fit the image."""

    status_code = 422

    def __init__(self, message: str, problems: Optional[list[str]] = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class FeedbackTooLarge(FeedbackError):
    """The submission asks for more work than a limit allows (mask pixels)."""

    status_code = 413


class UnknownRequest(FeedbackError):
    """The feedback names a ``request_id`` the service never answered."""

    status_code = 404


class FeedbackNotFound(FeedbackError):
    """No feedback record (or image blob) with that id."""

    status_code = 404


class FeedbackConflict(FeedbackError):
    """An Idempotency-Key reused with a different body, or feedback already consumed."""

    status_code = 409


class StoreUnavailable(FeedbackError):
    """The feedback database cannot be reached or is of an incompatible schema version."""

    status_code = 503


RoiKind = Literal["relevant", "irrelevant"]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
# Coordinates and sizes are JSON numbers: "10" or true is refused, not read as 10 or 1.
Coordinate = Annotated[float, Strict()]
Count = Annotated[int, Strict()]


def canonical_model_version(value: str) -> str:
    """MLflow's string for a registered version number: ``"0002"`` -> ``"2"``.

    Only ASCII digits count (``str.isdigit`` also accepts full-width ``"１"`` and superscripts),
    and versions start at 1; anything else is an :class:`InvalidFeedback` (422). Every way in
    (the submission body, ``GET /feedback?model_version=``) goes through here, so one version is
    stored and found under one string.
    """
    text = value.strip() if isinstance(value, str) else value
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 18:
        raise InvalidFeedback(f"model_version {str(value)[:40]!r} is not a version number (ASCII digits, e.g. \"3\")")
    if int(text) < 1:
        raise InvalidFeedback(f"model_version {value!r} is not a version number (versions start at 1)")
    return str(int(text))


class _Model(BaseModel):
    # extra="forbid": a typo such as "w" for "width" is an error, not a silently ignored key.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, str_strip_whitespace=True)


class _RoiBase(_Model):
    """What every ROI shape answers: its pixel mask on an image, and why it does not fit one.

    Both take the image size in array order (height, width), as the mask's shape is. The fields
    (``shape`` first, then ``kind``) are declared by each shape, which keeps them in that order
    in the published JSON schema.
    """

    def rasterize(self, height: int, width: int) -> np.ndarray:
        """Boolean (height, width) mask of the image pixels this ROI covers."""
        raise NotImplementedError

    def outside(self, height: int, width: int) -> Optional[str]:
        """Why the ROI does not fit an image of ``height`` x ``width`` pixels, or None when it does."""
        raise NotImplementedError


class RectangleRoi(_RoiBase):
    shape: Literal["rectangle"]
    kind: RoiKind
    x: Coordinate
    y: Coordinate
    width: Coordinate
    height: Coordinate

    @model_validator(mode="after")
    def _positive_area(self) -> "RectangleRoi":
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"rectangle has zero or negative area (width={self.width:g}, height={self.height:g})")
        return self

    def rasterize(self, height: int, width: int) -> np.ndarray:
        return rasterize.rectangle_mask(self.x, self.y, self.width, self.height, width, height)

    def outside(self, height: int, width: int) -> Optional[str]:
        # x + width is computed: allow float rounding (20.000000000000004) at the far edge.
        if self.x < 0 or self.y < 0 or self.x + self.width > width + 1e-6 or self.y + self.height > height + 1e-6:
            return (f"x={self.x:g}, y={self.y:g}, width={self.width:g}, height={self.height:g} "
                    f"reaches outside the {width}x{height} image")
        return None


class PolygonRoi(_RoiBase):
    shape: Literal["polygon"]
    kind: RoiKind
    points: list[tuple[Coordinate, Coordinate]] = Field(max_length=MAX_POLYGON_POINTS)

    @field_validator("points")
    @classmethod
    def _not_degenerate(cls, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if len(points) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {len(points)}")
        if len(set(points)) < 3:
            raise ValueError("polygon has fewer than 3 distinct points (repeated identical points)")
        xs, ys = np.asarray(points).T
        twice_area = float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)))
        if twice_area == 0.0:
            raise ValueError("polygon has zero area (its points are collinear)")
        return points

    def rasterize(self, height: int, width: int) -> np.ndarray:
        return rasterize.polygon_mask(self.points, width, height)

    def outside(self, height: int, width: int) -> Optional[str]:
        for n, (x, y) in enumerate(self.points):
            if not (0 <= x <= width and 0 <= y <= height):
                return f"point {n} ({x:g}, {y:g}) lies outside the {width}x{height} image"
        return None


class RunLengthMask(_Model):
    width: Count = Field(ge=1, le=MAX_IMAGE_SIDE)
    height: Count = Field(ge=1, le=MAX_IMAGE_SIDE)
    counts: list[Annotated[Count, Field(ge=0)]] = Field(min_length=1, max_length=MAX_RLE_RUNS)

    @model_validator(mode="after")
    def _covers_image(self) -> "RunLengthMask":
        total = sum(self.counts)
        if total != self.width * self.height:
            raise ValueError(f"run lengths sum to {total}, expected width*height = {self.width * self.height}")
        return self


class BrushRoi(_RoiBase):
    """A painted mask over the whole image: a PNG (base64) or run lengths.

    The mask's size is read from its header (the RLE ``width``/``height``, the PNG's IHDR) and
    compared with the image *before* a pixel is decoded, so a small body declaring a huge mask
    costs nothing; the pixels are decoded only once the size fits.
    """

    shape: Literal["brush"]
    kind: RoiKind
    mask_png_base64: Optional[str] = Field(default=None, max_length=MAX_MASK_PNG_BASE64_CHARS)
    rle: Optional[RunLengthMask] = None
    _png: Optional[Image.Image] = PrivateAttr(default=None)
    _mask: Optional[np.ndarray] = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_header(self) -> "BrushRoi":
        if (self.mask_png_base64 is None) == (self.rle is None):
            raise ValueError("a brush needs exactly one of mask_png_base64 or rle")
        if self.mask_png_base64 is not None:
            # The header only (Image.open reads IHDR): not base64, not a PNG -> 422 at once.
            try:
                self._png = rasterize.open_png_mask(self.mask_png_base64)
            except ValueError as exc:
                raise ValueError(f"mask_png_base64 {exc}") from None
        return self

    @property
    def declared_size(self) -> tuple[int, int]:
        """(width, height) the mask says it has, known without decoding it."""
        if self.rle is not None:
            return self.rle.width, self.rle.height
        assert self._png is not None
        return self._png.size

    def mask(self) -> np.ndarray:
        """Boolean (H, W) painted mask (decoded on first use)."""
        if self._mask is None:
            if self.rle is not None:
                self._mask = rasterize.decode_rle(self.rle.counts, self.rle.width, self.rle.height)
            else:
                assert self._png is not None
                try:
                    self._mask = rasterize.png_mask_to_array(self._png)
                except ValueError as exc:
                    raise InvalidFeedback(f"brush mask_png_base64 {exc}") from None
        return self._mask

    def rasterize(self, height: int, width: int) -> np.ndarray:
        problem = self.outside(height=height, width=width)
        if problem is not None:
            raise InvalidFeedback(f"brush {problem}")
        return self.mask()

    def outside(self, height: int, width: int) -> Optional[str]:
        mask_w, mask_h = self.declared_size
        if (mask_w, mask_h) != (width, height):
            return f"mask is {mask_w}x{mask_h} but the image is {width}x{height}"
        return None


Roi = Annotated[Union[RectangleRoi, PolygonRoi, BrushRoi], Field(discriminator="shape")]


class FeedbackSubmission(_Model):
    """One expert's feedback on one image (the body of ``POST /feedback``)."""

    request_id: Optional[str] = Field(default=None, min_length=1, max_length=128)
    model_name: Name
    model_version: Name
    expert_id: Name
    rois: list[Roi] = Field(default_factory=list, max_length=MAX_ROIS)
    corrected_label: Optional[Name] = None
    comment: Optional[str] = Field(default=None, max_length=MAX_COMMENT_LENGTH)

    @field_validator("model_version")
    @classmethod
    def _canonical_version(cls, value: str) -> str:
        try:
            return canonical_model_version(value)
        except InvalidFeedback as exc:
            raise ValueError(str(exc).removeprefix("model_version ")) from None

    @model_validator(mode="after")
    def _says_something(self) -> "FeedbackSubmission":
        if not self.rois and self.corrected_label is None:
            raise ValueError("feedback needs at least one ROI or a corrected_label")
        return self

    def validate_against(self, width: int, height: int) -> "FeedbackSubmission":
        """Check every ROI against an image of ``width`` x ``height`` pixels; returns self.

        Raises :class:`InvalidFeedback` listing every problem (``problems``), one line joined by "; ".
        """
        if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
            raise InvalidFeedback(f"image size {width}x{height} is outside 1..{MAX_IMAGE_SIDE} pixels")
        problems = [f"rois[{i}] ({roi.shape}): {problem}"
                    for i, roi in enumerate(self.rois)
                    if (problem := _roi_problem(roi, width, height))]
        if problems:
            raise InvalidFeedback("; ".join(problems), problems)
        return self

    def fingerprint_payload(self) -> dict[str, Any]:
        """JSON-able form used to tell whether two submissions are the same body."""
        return self.model_dump(mode="json", exclude_none=True)


def _roi_problem(roi: Roi, width: int, height: int) -> Optional[str]:
    problem = roi.outside(height=height, width=width)
    if problem is not None:
        return problem
    try:
        covered = roi.rasterize(height=height, width=width).any()
    except InvalidFeedback as exc:  # a PNG mask whose pixels turn out damaged
        return str(exc).removeprefix("brush ")
    if not covered:
        return "covers no pixel centre (draw a larger region)" if roi.shape != "brush" else "paints no pixel"
    return None


def feedback_map(rois: Sequence[Roi], width: int, height: int) -> np.ndarray:
    """uint8 (height, width) map: RELEVANT / IRRELEVANT inside ROIs (later ones win), UNTOUCHED elsewhere."""
    out = np.full((height, width), UNTOUCHED, dtype=np.uint8)
    for roi in rois:
        out[roi.rasterize(height=height, width=width)] = RELEVANT if roi.kind == "relevant" else IRRELEVANT
    return out


def parse_submission(raw: Union[bytes, str, Mapping[str, Any]],
                     max_mask_pixels: int = MAX_MASK_PIXELS_PER_FEEDBACK) -> FeedbackSubmission:
    """Parse a JSON body (or an already decoded mapping); errors become :class:`InvalidFeedback`.

    ``max_mask_pixels`` bounds the brush-mask pixels the submission declares in all (413 past it),
    checked from the masks' headers before any is decoded.
    """
    try:
        if isinstance(raw, (bytes, str)):
            submission = FeedbackSubmission.model_validate_json(raw)
        else:
            submission = FeedbackSubmission.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors(include_url=False)]
        raise InvalidFeedback("; ".join(problems), problems) from None
    declared = sum(w * h for roi in submission.rois if isinstance(roi, BrushRoi)
                   for w, h in [roi.declared_size])
    if declared > max_mask_pixels:
        raise FeedbackTooLarge(f"brush masks declare {declared} pixels in all, over the limit of "
                               f"{max_mask_pixels} mask pixels per feedback")
    return submission


_ROI_TAGS = {"rectangle", "polygon", "brush"}


def _describe(error: Mapping[str, Any]) -> str:
    """``rois[1] (polygon).points: a polygon needs at least 3 points, got 2``."""
    where = ""
    for part in error["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part in _ROI_TAGS and where.endswith("]"):
            where += f" ({part})"
        else:
            where += f".{part}" if where else str(part)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "json_invalid":
        return f"body is not valid JSON: {json.dumps(error.get('ctx', {}).get('error', message))}"
    return f"{where}: {message}" if where else message
