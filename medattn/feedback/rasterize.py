"""Pixel geometry of expert drawings: rectangle and polygon fill, RLE and PNG mask decoding.

Pure geometry on numbers and arrays, with no knowledge of the feedback schema: each ROI type of
:mod:`medattn.feedback.schema` rasterises itself with these functions (``roi.rasterize(h, w)``).

Pixel convention (the one the review page draws in): image pixel ``(column i, row j)`` covers
the square ``[i, i+1) x [j, j+1)`` in image coordinates, so its centre is ``(i + 0.5, j + 0.5)``.
A rectangle or polygon *covers* a pixel when it contains that centre (half-open on the
right/bottom edge, even-odd rule for polygons). Consequences: a rectangle ``x=2, width=3``
covers columns 2, 3 and 4; a rectangle and the polygon of its four corners give the same mask;
two ROIs that share an edge never both cover a pixel.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

# A brush PNG from a canvas is anti-aliased: a pixel counts as painted from half opacity up.
PAINTED_THRESHOLD = 128
# Guard against decompression bombs: no mask may decode to more pixels than this.
MAX_MASK_PIXELS = 8192 * 8192


def _first_covered(edge: float) -> int:
    """Index of the first pixel whose centre ``i + 0.5`` is >= ``edge``."""
    return math.ceil(edge - 0.5)


def rectangle_mask(x: float, y: float, width: float, height: float,
                   image_width: int, image_height: int) -> np.ndarray:
    """Boolean (H, W) mask of the pixels whose centres lie in ``[x, x+width) x [y, y+height)``."""
    mask = np.zeros((image_height, image_width), dtype=bool)
    c0, c1 = max(_first_covered(x), 0), min(_first_covered(x + width), image_width)
    r0, r1 = max(_first_covered(y), 0), min(_first_covered(y + height), image_height)
    if c0 < c1 and r0 < r1:
        mask[r0:r1, c0:c1] = True
    return mask


def polygon_mask(points: Sequence[Sequence[float]], image_width: int, image_height: int) -> np.ndarray:
    """Boolean (H, W) mask of the pixel centres inside the closed polygon (even-odd rule).

    Scan-line fill: for each pixel row, the x positions where the polygon's edges cross the
    row's centre line, sorted, pair up into covered spans. An edge counts as crossing when the
    centre line lies in its half-open y range, so shared vertices are not counted twice and
    horizontal edges never cross.
    """
    mask = np.zeros((image_height, image_width), dtype=bool)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 3:
        return mask
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    first_row = max(_first_covered(float(y0.min())), 0)
    last_row = min(_first_covered(float(y0.max())), image_height)
    for row in range(first_row, last_row):
        yc = row + 0.5
        crossing = (y0 <= yc) != (y1 <= yc)
        if not crossing.any():
            continue
        xa, ya, xb, yb = x0[crossing], y0[crossing], x1[crossing], y1[crossing]
        xs = np.sort(xa + (yc - ya) * (xb - xa) / (yb - ya))
        for left, right in zip(xs[0::2], xs[1::2]):
            c0 = max(_first_covered(float(left)), 0)
            c1 = min(_first_covered(float(right)), image_width)
            if c0 < c1:
                mask[row, c0:c1] = True
    return mask


def decode_rle(counts: Sequence[int], width: int, height: int) -> np.ndarray:
    """Boolean (H, W) mask from row-major run lengths that start with an *unpainted* run.

    ``[3, 2, 5]`` on a 5x2 image means 3 unpainted, 2 painted, 5 unpainted pixels, read row by
    row. A mask that starts painted starts with a 0 count. The counts must sum to W*H
    (the schema checks this before the mask is decoded).
    """
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, np.asarray(counts, dtype=np.int64))
    return flat.reshape(height, width)


def encode_rle(mask: np.ndarray) -> list[int]:
    """Inverse of :func:`decode_rle` (for clients written in Python and for tests)."""
    flat = np.asarray(mask, dtype=bool).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return counts


def strip_data_url(text: str) -> str:
    """Accept what ``canvas.toDataURL()`` returns as well as bare base64."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    return text


def open_png_mask(encoded: str) -> Image.Image:
    """Decode base64 (or a data URL) into a PIL image, checking it is a PNG of sane size.

    Raises ``ValueError`` with a one-line reason that reads after the field's name
    ("... is not valid base64"); the schema adds the field and the ROI index.
    """
    try:
        raw = base64.b64decode(strip_data_url(encoded), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception:  # PIL raises several unrelated types for undecodable bytes
        raise ValueError("does not decode to an image") from None
    if image.format != "PNG":
        raise ValueError(f"must be a PNG, got {image.format}")
    w, h = image.size
    if w * h > MAX_MASK_PIXELS:
        raise ValueError(f"decodes to {w}x{h}, more than {MAX_MASK_PIXELS} pixels")
    return image


def png_mask_to_array(image: Image.Image) -> np.ndarray:
    """Boolean (H, W) painted mask: the alpha channel when the PNG has one, else the grey level."""
    try:
        channel = image.getchannel("A") if "A" in image.getbands() else image.convert("L")
        return np.asarray(channel, dtype=np.uint8) >= PAINTED_THRESHOLD
    except Exception:  # truncated or corrupt data only shows up when the pixels are decoded
        raise ValueError("is a damaged PNG") from None

