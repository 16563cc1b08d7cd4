"""Pixel-level pre-processing shared by the dataset loaders, training and serving.

Everything here is a pure function of its inputs (no files, no global state), so the exact same
code turns a raw photograph into a prepared image at ``prepare`` time and an uploaded image into
a model input at serving time: :func:`to_model_input` is the one path from a PIL image to the
normalised tensor the model sees, and :class:`medattn.data.dataset.ManifestDataset` uses the
same :func:`normalize_tensor` on its stored pixels.

Normalisation follows seed 001 (appendix 1.1): pixels scaled to [0, 1], then standardised with
the ImageNet channel means and standard deviations.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

EyeSide = Literal["left", "right"]

# Optic-disc search runs on a fixed-size copy, so the rule behaves the same whatever image_size is.
_DISC_SEARCH_SIZE = 128
# The optic disc is roughly 1/8 of the fundus diameter: averaging over a window of that size
# makes a whole disc outshine small bright lesions (exudates) and single-pixel reflections.
_DISC_WINDOW_FRACTION = 1 / 8
# Pixels darker than this (of 255) are the black surround outside the camera's field of view.
_FIELD_OF_VIEW_THRESHOLD = 20


def to_rgb(image: Image.Image) -> Image.Image:
    """Return a 3-channel 8-bit RGB copy of ``image`` whatever its mode.

    Grey levels are replicated into three channels; transparency is composited onto black (the
    background of medical photographs); 16-bit and float images are rescaled so that their
    maximum maps to 255, because a plain mode conversion would clip them to white.
    """
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        if peak > 255.0:
            values = values * (255.0 / peak)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def area_resize(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Resize to ``size`` (an int means a square) the way ``cv2.INTER_AREA`` does.

    When shrinking, every output pixel is the mean of the input pixels it covers (PIL's BOX
    filter is exactly that), which is what seed 001 used. When enlarging, area averaging has
    nothing to average, so bilinear interpolation is used instead of blocky pixel repetition.
    """
    width, height = (size, size) if isinstance(size, int) else size
    if (width, height) == image.size:
        return image.copy()
    shrinking = width <= image.width and height <= image.height
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return image.resize((width, height), resample=resample)


def crop_columns(image: Image.Image, first: int, last: int) -> Image.Image:
    """Keep the columns ``first..last`` (both inclusive) and every row."""
    if not 0 <= first <= last < image.width:
        raise ValueError(f"columns {first}..{last} are outside an image {image.width} pixels wide")
    return image.crop((first, 0, last + 1, image.height))


def flip_horizontal(image: Image.Image) -> Image.Image:
    """Mirror left to right."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def locate_optic_disc(image: Image.Image) -> tuple[float, float]:
    """``(x, y)`` of the optic disc as fractions of the width and height of a fundus photograph.

    The optic disc is the brightest *large* region of a colour fundus photograph. The image is
    shrunk to a fixed size, brightness is averaged over a disc-sized window (normalised by the
    share of field-of-view pixels in the window, so the dark surround does not pull the average
    down near the rim), and the brightest window inside the eroded field of view wins. Eroding
    the field of view keeps the bright reflections that some cameras leave on its rim out of
    the race.
    """
    x, y, _ = _search_optic_disc(image)
    return x, y


def optic_disc_side(image: Image.Image) -> EyeSide:
    """Which half of the field of view holds the optic disc: ``"left"`` or ``"right"``.

    The halves are split at the horizontal centre of the field of view (not of the image), so
    a fundus that is off-centre in its frame is judged correctly.
    """
    disc_x, _, field_centre_x = _search_optic_disc(image)
    return "right" if disc_x > field_centre_x else "left"


def _search_optic_disc(image: Image.Image) -> tuple[float, float, float]:
    """Disc x, disc y and the field of view's horizontal centre, as fractions of the image."""
    small = area_resize(to_rgb(image), (_DISC_SEARCH_SIZE, _DISC_SEARCH_SIZE))
    brightness = np.asarray(small.convert("L"), dtype=np.float64)
    window = max(3, round(_DISC_SEARCH_SIZE * _DISC_WINDOW_FRACTION))
    field = brightness > _FIELD_OF_VIEW_THRESHOLD
    if not field.any():  # an all-black image: no field of view to speak of, search everywhere
        field = np.ones_like(field)
    inner = ndimage.binary_erosion(field, iterations=window // 2)
    if not inner.any():  # a field of view smaller than the window: search all of it
        inner = field
    summed = ndimage.uniform_filter(brightness * field, size=window, mode="constant")
    coverage = ndimage.uniform_filter(field.astype(np.float64), size=window, mode="constant")
    mean_brightness = summed / np.maximum(coverage, 1e-9)
    score = np.where(inner, mean_brightness, -1.0)
    row, col = np.unravel_index(int(np.argmax(score)), score.shape)
    columns = np.flatnonzero(field.any(axis=0))
    field_centre_x = (columns[0] + columns[-1] + 1) / 2 / _DISC_SEARCH_SIZE
    return float((col + 0.5) / _DISC_SEARCH_SIZE), float((row + 0.5) / _DISC_SEARCH_SIZE), float(field_centre_x)


def orient_left(image: Image.Image, mask: Image.Image | None = None) -> tuple[Image.Image, Image.Image | None, bool]:
    """Mirror a right eye (optic disc in the right half) so its disc is on the left, as IDRiD's
    pre-processing does; ``mask`` (a lesion mask of the same image) is mirrored with it.

    Returns ``(image, mask, flipped)``. Left eyes come back as they are.
    """
    if optic_disc_side(image) != "right":
        return image, mask, False
    return flip_horizontal(image), (flip_horizontal(mask) if mask is not None else None), True


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W), the compact form images are kept in memory."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalize_tensor(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Scale to [0, 1] and standardise per channel; works on (3, H, W) and (B, 3, H, W).

    The dtype says the range: uint8 pixels are divided by 255, floating tensors are taken to be
    in [0, 1] already. Returns float32.
    """
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W) images, got shape {tuple(images.shape)}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 values each (std > 0), got mean={mean!r} std={std!r}")
    unit = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean_t = torch.tensor(mean, dtype=torch.float32, device=unit.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=unit.device).view(3, 1, 1)
    return (unit - mean_t) / std_t


def to_model_input(
    pil_image: Image.Image,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Any PIL image -> normalised float tensor (3, image_size, image_size) for the model.

    Serving calls this on uploaded images; the training dataset stores images already at
    ``image_size`` and applies the same :func:`normalize_tensor`, so both see identical inputs.
    """
    square = area_resize(to_rgb(pil_image), image_size)
    return normalize_tensor(pil_to_uint8_tensor(square), mean, std)
