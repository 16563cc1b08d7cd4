"""Decode an uploaded image safely: PNG, JPEG, TIFF or DICOM bytes -> an 8-bit RGB PIL image.

Uploads are hostile until proven otherwise, so every check that can be done *before* pixels are
decoded is done first, and each rejection is an :class:`ImageRejected` carrying the HTTP status
the service answers with and a one-line reason:

- 413: more bytes than ``max_bytes``, or more pixels than ``max_pixels`` (read from the header,
  so a decompression bomb - a small file that inflates to gigabytes - is refused unopened);
- 415: a content type or image format the service does not take (GIF, BMP, text, JSON ...),
  or a declared image type that the bytes contradict;
- 422: bytes that are not an image at all, or an image that is truncated or corrupt.

The format is sniffed from the leading bytes (never trusted from the file name), and Pillow is
only allowed the decoder of the sniffed format. DICOM goes through pydicom: the modality and VOI
(window) transforms are applied, MONOCHROME1 is inverted so that bright means dense as in every
other format, and 16-bit values are stretched to 8 bits.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from medattn.data.preprocess import to_rgb
from medattn.errors import MedattnError, first_line

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# 50 megapixels: larger than any fundus camera or chest film, far below what would exhaust memory.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000

PIL_FORMATS = ("PNG", "JPEG", "TIFF")
SUPPORTED_FORMATS = (*PIL_FORMATS, "DICOM")

# Declared content type -> the format the bytes must then be.
CONTENT_TYPE_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/tiff": "TIFF",
    "image/tif": "TIFF",
    "application/dicom": "DICOM",
}
# Content types that say nothing about the format: the bytes decide.
UNSPECIFIC_CONTENT_TYPES = ("", "application/octet-stream", "binary/octet-stream")
ACCEPTED_CONTENT_TYPES = tuple(CONTENT_TYPE_FORMATS) + UNSPECIFIC_CONTENT_TYPES[1:]

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)
_DICOM_MAGIC_OFFSET = 128


class ImageRejected(MedattnError):
    """An upload the service will not decode; ``status_code`` is the HTTP answer (413/415/422)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds on what one upload may be (bytes on the wire, pixels once decoded)."""

    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def check_byte_count(self, n_bytes: int, what: str = "upload") -> None:
        if n_bytes > self.max_bytes:
            raise ImageRejected(413, f"{what} is {n_bytes} bytes, over the limit of {self.max_bytes} bytes")

    def check_pixel_count(self, width: int, height: int, what: str = "image") -> None:
        if width < 1 or height < 1:
            raise ImageRejected(422, f"{what} has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageRejected(
                413, f"{what} is {width}x{height} = {width * height} pixels, over the limit of "
                     f"{self.max_pixels} pixels")


@dataclass(frozen=True)
class DecodedImage:
    """An upload after decoding: ``image`` is 8-bit RGB at the upload's own resolution."""

    image: Image.Image
    format: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def sniff_format(data: bytes) -> str | None:
    """The supported format the leading bytes announce, or None."""
    for signature, fmt in _SIGNATURES:
        if data.startswith(signature):
            return fmt
    if data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "DICOM"
    return None


def normalize_content_type(content_type: str | None) -> str:
    """``"Image/PNG; charset=x"`` -> ``"image/png"``; None -> ``""``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_content_type(content_type: str | None) -> str:
    """Reject a content type that cannot hold a supported image; returns it normalised."""
    declared = normalize_content_type(content_type)
    if declared not in CONTENT_TYPE_FORMATS and declared not in UNSPECIFIC_CONTENT_TYPES:
        raise ImageRejected(
            415, f"content type {declared!r} is not accepted (send {', '.join(ACCEPTED_CONTENT_TYPES)})")
    return declared


def decode_image(data: bytes, content_type: str | None = None,
                 limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Check and decode one upload; raises :class:`ImageRejected` with the reason."""
    declared = check_content_type(content_type)
    limits.check_byte_count(len(data))
    if not data:
        raise ImageRejected(422, "upload is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        other = _other_image_format(data)
        if other is not None:
            raise ImageRejected(
                415, f"image format {other} is not supported (send {', '.join(SUPPORTED_FORMATS)})")
        raise ImageRejected(422, f"upload is not an image ({', '.join(SUPPORTED_FORMATS)} expected)")
    expected = CONTENT_TYPE_FORMATS.get(declared)
    if expected is not None and expected != fmt:
        raise ImageRejected(415, f"content type {declared} does not match the uploaded bytes, which are {fmt}")
    image = _decode_dicom(data, limits) if fmt == "DICOM" else _decode_with_pil(data, fmt, limits)
    return DecodedImage(image=image, format=fmt)


def _other_image_format(data: bytes) -> str | None:
    """Name an image format Pillow knows but the service does not take (reads the header only)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.format
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify is simply "not an image"
        return None


def _decode_with_pil(data: bytes, fmt: str, limits: ImageLimits) -> Image.Image:
    try:
        # formats=[fmt]: only the decoder the signature named may touch the bytes.
        with Image.open(io.BytesIO(data), formats=[fmt]) as opened:
            # Image.open reads the header only; the size is known before any pixel is decoded.
            limits.check_pixel_count(opened.width, opened.height, f"{fmt} image")
            opened.load()
            return to_rgb(opened)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, f"{fmt} image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected(422, f"upload starts like {fmt} but cannot be read as one") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow's "image file is truncated", broken PNG chunks, bad JPEG markers, ...
        raise ImageRejected(422, f"{fmt} image is truncated or corrupt: {first_line(exc)}") from None


def _decode_dicom(data: bytes, limits: ImageLimits) -> Image.Image:
    import pydicom  # late: only DICOM uploads pay for the import
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise ImageRejected(422, f"DICOM file cannot be parsed: {first_line(exc)}") from None
    if "PixelData" not in ds:
        raise ImageRejected(422, "DICOM file has no pixel data (PixelData element missing)")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise ImageRejected(422, "DICOM file lacks a valid Rows/Columns/NumberOfFrames") from None
    limits.check_pixel_count(columns, rows, "DICOM image")
    if frames != 1:
        raise ImageRejected(422, f"DICOM file has {frames} frames; send a single-frame image")
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad/unsupported pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        where = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        raise ImageRejected(422, f"DICOM pixel data cannot be decoded{where}: {first_line(exc)}") from None
    if pixels.shape[:2] != (rows, columns):
        raise ImageRejected(422, f"DICOM pixel data is {pixels.shape}, expected {rows}x{columns}")
    if pixels.ndim == 2:
        return Image.fromarray(_dicom_grey_to_uint8(pixels, ds), mode="L").convert("RGB")
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return Image.fromarray(_stretch_to_uint8(pixels.astype(np.float64)), mode="RGB")
    raise ImageRejected(422, f"DICOM pixel data of shape {pixels.shape} is neither grey nor RGB")


def _dicom_grey_to_uint8(pixels: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds)
    grey = _stretch_to_uint8(np.asarray(values, dtype=np.float64))
    # MONOCHROME1: the lowest value is displayed white; invert so that bright means dense.
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map min..max onto 0..255 (a flat image becomes black); 8-bit input is kept as is."""
    if not np.all(np.isfinite(values)):
        raise ImageRejected(422, "DICOM pixel data contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 255 and np.array_equal(values, np.rint(values)):
        return values.astype(np.uint8)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)

