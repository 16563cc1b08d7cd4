"""Decode an uploaded image safely: PNG, JPEG, TIFF or DICOM bytes -> an 8-bit RGB PIL image.

Uploads are hostile until proven otherwise, so every check that can be done *before* pixels are
decoded is done first (:func:`probe_image` reads only the header), and each rejection is an
:class:`ImageRejected` carrying the HTTP status the service answers with and a one-line reason:

- 413: more bytes than ``max_bytes``, more pixels than ``max_pixels``, or a decode that would
  allocate more than ``max_decoded_bytes`` (estimated from the header: size, mode/bit depth,
  samples, frames), so a decompression bomb - a small file that inflates to gigabytes - is
  refused unopened;
- 415: a content type or image format the service does not take (GIF, BMP, text, JSON ...),
  or a declared image type that the bytes contradict;
- 422: bytes that are not an image at all, an image that is truncated or corrupt, or one whose
  aspect ratio is past ``max_aspect_ratio`` (the model squashes every image into a square).

The format is sniffed from the leading bytes (never trusted from the file name), and Pillow is
only allowed the decoder of the sniffed format. DICOM goes through pydicom: the modality and VOI
(window) transforms are applied, MONOCHROME1 is inverted so that bright means dense as in every
other format, and 16-bit values are stretched to 8 bits.

**The frame.** The decoded image is the one every later step uses - the model input, the
attention map, the ROI bounds, the stored blob - so they all share one coordinate frame: the
image *as displayed* (its EXIF orientation applied, here and only here) and, when it has more
than ``max_frame_pixels`` pixels, reduced by an integer factor (JPEG during decoding with
``Image.draft``, other formats with ``Image.reduce`` right after). ``DecodedImage.width`` and
``height`` are that frame's size; the response of ``/predict`` reports them.
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from medattn.data.preprocess import to_rgb
from medattn.errors import MedattnError, first_line

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# 50 megapixels: larger than any fundus camera or chest film, far below what would exhaust memory.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# What one image may hold from decoding to answer: a 50 MP 8-bit RGB image (Pillow keeps 4 bytes
# a pixel, plus its RGB copy) reduced to a 16 MP frame fits (~0.8 GB); a 24 GiB machine holds
# the in-flight budget (8 GiB) of such requests with room for the model runner.
DEFAULT_MAX_DECODED_BYTES = 1024 * 1024 * 1024
# The sum of those estimates over the images of one request (/predict_batch).
DEFAULT_MAX_BATCH_DECODED_BYTES = 2 * 1024 * 1024 * 1024
# 4096 x 4096: larger images are reduced to this before the model, the map and the blob see them.
DEFAULT_MAX_FRAME_PIXELS = 4096 * 4096
# Long side / short side: the model resizes every image to a square; past 4:1 that is a smear.
DEFAULT_MAX_ASPECT_RATIO = 4.0

EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Bytes a pixel takes in Pillow's memory, by mode (multi-band modes are stored 4 bytes a pixel).
_PIL_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Bytes a pixel costs on the way to RGB (``to_rgb``): the RGB copy (4), plus a float64 and a uint8
# array for 16-bit/32-bit/float modes, plus an RGBA copy when transparency is composited.
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
# Bytes a pixel of the *frame* costs once decoded, until the answer is sent: the RGB image (4) and
# its array for the runner (3), the attention map upsampled to the frame (float32 4, float64 8,
# uint8 1, palette image 1) and its PNG encoder's buffers. Counted in ``decoded_bytes`` so that
# the budgets bound what a request holds, not only what its decoder allocates.
FRAME_BYTES_PER_PIXEL = 24

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
    """Upper bounds on one upload: bytes on the wire, pixels and decoded bytes, frame size, shape."""

    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

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

    def check_aspect_ratio(self, width: int, height: int, what: str = "image") -> None:
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect_ratio:
            raise ImageRejected(
                422, f"{what} is {width}x{height}, an aspect ratio of {ratio:.1f}:1; the model takes "
                     f"images up to {self.max_aspect_ratio:g}:1 (crop it to the region of interest)")

    def check_decoded_bytes(self, n_bytes: int, width: int, height: int, mode: str, what: str = "image") -> None:
        if n_bytes > self.max_decoded_bytes:
            raise ImageRejected(
                413, f"{what} ({width}x{height}, mode {mode}) would take {n_bytes} bytes to decode and answer, "
                     f"over the limit of {self.max_decoded_bytes} decoded bytes per image")

    def reduction_for(self, width: int, height: int) -> int:
        """The integer factor that brings width x height within ``max_frame_pixels`` (1: none)."""
        factor = max(1, math.ceil(math.sqrt(width * height / self.max_frame_pixels)))
        while math.ceil(width / factor) * math.ceil(height / factor) > self.max_frame_pixels:
            factor += 1
        return factor


@dataclass(frozen=True)
class ImageHeader:
    """What the header says decoding will cost, read without decoding a pixel."""

    format: str
    width: int  # as stored (before orientation and reduction)
    height: int
    mode: str  # Pillow's mode, or "DICOM <samples>x<bits>"
    frames: int
    decode_width: int  # what the decoder will produce (JPEG draft: already reduced)
    decode_height: int
    decoded_bytes: int  # estimated bytes decoding, converting and answering will hold (after the checks)


@dataclass(frozen=True)
class DecodedImage:
    """An upload after decoding: ``image`` is 8-bit RGB in the frame (see the module docstring)."""

    image: Image.Image
    format: str
    header: Optional[ImageHeader] = None
    orientation: int = 1  # the EXIF orientation that was applied (1: none)
    reduction: int = 1  # the frame is the decoded image reduced by this factor

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def frame_is_stored_pixels(self) -> bool:
        """True when the frame is the upload's pixels as stored (no rotation, no reduction)."""
        return self.orientation == 1 and self.reduction == 1


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


def _sniffed_format(data: bytes, content_type: str | None, limits: ImageLimits) -> str:
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
    return fmt


def probe_image(data: bytes, content_type: str | None = None,
                limits: ImageLimits = ImageLimits()) -> ImageHeader:
    """Every check that needs only the header; raises :class:`ImageRejected`, decodes nothing.

    Cheap enough to run over all images of a batch before any of them is decoded.
    """
    fmt = _sniffed_format(data, content_type, limits)
    if fmt == "DICOM":
        return _check_header(_dicom_header(_read_dicom(data, with_pixels=False)), limits)
    with _open_pil(data, fmt) as opened:
        return _check_header(_pil_header(opened, fmt, limits), limits)


def decode_image(data: bytes, content_type: str | None = None,
                 limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Check and decode one upload into its frame; raises :class:`ImageRejected` with the reason."""
    fmt = _sniffed_format(data, content_type, limits)
    if fmt == "DICOM":
        ds = _read_dicom(data, with_pixels=True)
        header = _check_header(_dicom_header(ds), limits)
        return _in_frame(_decode_dicom(ds, header), fmt, header, 1, limits)
    return _decode_with_pil(data, fmt, limits)


def _check_header(header: ImageHeader, limits: ImageLimits) -> ImageHeader:
    what = f"{header.format} image"
    reduction = limits.reduction_for(header.decode_width, header.decode_height)
    frame_pixels = math.ceil(header.decode_width / reduction) * math.ceil(header.decode_height / reduction)
    header = dataclasses.replace(header, decoded_bytes=header.decoded_bytes + frame_pixels * FRAME_BYTES_PER_PIXEL)
    limits.check_pixel_count(header.width, header.height, what)
    limits.check_aspect_ratio(header.width, header.height, what)
    limits.check_decoded_bytes(header.decoded_bytes, header.decode_width, header.decode_height, header.mode, what)
    return header


def _in_frame(image: Image.Image, fmt: str, header: ImageHeader, orientation: int,
              limits: ImageLimits) -> DecodedImage:
    """RGB image as decoded -> the frame: reduced to ``max_frame_pixels``, then shown upright."""
    reduction = limits.reduction_for(image.width, image.height)
    if reduction > 1:
        image = image.reduce(reduction)
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    if transpose is not None:
        image = image.transpose(transpose)
    # A JPEG drafted at 1/s counts as reduced too: the frame is not the stored pixels.
    drafted = max(1, round(header.width / header.decode_width))
    return DecodedImage(image=image, format=fmt, header=header,
                        orientation=orientation if transpose is not None else 1, reduction=reduction * drafted)


def _other_image_format(data: bytes) -> str | None:
    """Name an image format Pillow knows but the service does not take (reads the header only)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.format
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify is simply "not an image"
        return None


class _open_pil:
    """``with _open_pil(data, fmt) as opened``: Pillow's header-only open, errors as ImageRejected."""

    def __init__(self, data: bytes, fmt: str) -> None:
        self.data, self.fmt = data, fmt
        self.image: Optional[Image.Image] = None

    def __enter__(self) -> Image.Image:
        try:
            # formats=[fmt]: only the decoder the signature named may touch the bytes.
            self.image = Image.open(io.BytesIO(self.data), formats=[self.fmt])
        except Exception as exc:  # noqa: BLE001 - mapped to the answer it deserves
            raise _pil_error(exc, self.fmt) from None
        return self.image

    def __exit__(self, *exc: object) -> None:
        if self.image is not None:
            self.image.close()


def _pil_error(exc: BaseException, fmt: str) -> ImageRejected:
    if isinstance(exc, ImageRejected):
        return exc
    if isinstance(exc, Image.DecompressionBombError):
        return ImageRejected(413, f"{fmt} image refused as a decompression bomb: {exc}")
    if isinstance(exc, UnidentifiedImageError):
        return ImageRejected(422, f"upload starts like {fmt} but cannot be read as one")
    if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError, KeyError, struct.error)):
        # Pillow's "image file is truncated", broken PNG chunks, bad JPEG markers, ...
        return ImageRejected(422, f"{fmt} image is truncated or corrupt: {first_line(exc)}")
    raise exc


def pil_decoded_bytes(width: int, height: int, mode: str) -> int:
    """Estimated peak bytes of decoding a ``mode`` image and converting it to RGB (``to_rgb``)."""
    stored = _PIL_BYTES_PER_PIXEL.get(mode, 4)
    conversion = 4 + (9 if mode in _WIDE_MODES else 0) + (4 if mode in ("RGBA", "LA", "PA", "P") else 0)
    return width * height * (stored + conversion)


def _pil_header(opened: Image.Image, fmt: str, limits: ImageLimits) -> ImageHeader:
    """Read size and mode; a large JPEG is set to decode at 1/2, 1/4 or 1/8 scale (``draft``)."""
    width, height = opened.size
    limits.check_pixel_count(width, height, f"{fmt} image")  # before draft: the stored size counts
    if fmt == "JPEG" and width * height > limits.max_frame_pixels:
        factor = limits.reduction_for(width, height)
        # draft keeps the result at least this big, so the frame reduction afterwards is small.
        opened.draft(opened.mode, (math.ceil(width / factor), math.ceil(height / factor)))
    frames = int(getattr(opened, "n_frames", 1)) if fmt == "PNG" else 1  # APNG: from acTL, cheap
    return ImageHeader(format=fmt, width=width, height=height, mode=opened.mode, frames=frames,
                       decode_width=opened.width, decode_height=opened.height,
                       decoded_bytes=pil_decoded_bytes(opened.width, opened.height, opened.mode))


def _orientation(opened: Image.Image) -> int:
    try:
        value = opened.getexif().get(EXIF_ORIENTATION_TAG, 1)
        return int(value) if int(value) in _ORIENTATION_TRANSPOSE else 1
    except Exception:  # noqa: BLE001 - an unreadable EXIF block leaves the image as stored
        return 1


def _decode_with_pil(data: bytes, fmt: str, limits: ImageLimits) -> DecodedImage:
    with _open_pil(data, fmt) as opened:
        header = _check_header(_pil_header(opened, fmt, limits), limits)
        orientation = _orientation(opened)
        try:
            opened.load()  # only the first frame of a multi-frame file is decoded
            rgb = to_rgb(opened)
        except Exception as exc:  # noqa: BLE001 - mapped by _pil_error, bugs re-raised
            raise _pil_error(exc, fmt) from None
    return _in_frame(rgb, fmt, header, orientation, limits)


def _read_dicom(data: bytes, with_pixels: bool) -> Any:
    import pydicom  # late: only DICOM uploads pay for the import
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not with_pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise ImageRejected(422, f"DICOM file cannot be parsed: {first_line(exc)}") from None


def _dicom_header(ds: Any) -> ImageHeader:
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (AttributeError, TypeError, ValueError):
        raise ImageRejected(422, "DICOM file lacks a valid Rows/Columns/NumberOfFrames") from None
    if frames != 1:
        raise ImageRejected(422, f"DICOM file has {frames} frames; send a single-frame image")
    # The pixel array, the float64 LUT output and its stretched copy, then the 8-bit RGB image.
    per_pixel = samples * (max(bits, 8) // 8 + 16) + 4
    return ImageHeader(format="DICOM", width=columns, height=rows, mode=f"DICOM {samples}x{bits}-bit",
                       frames=frames, decode_width=columns, decode_height=rows,
                       decoded_bytes=rows * columns * frames * per_pixel)


def _decode_dicom(ds: Any, header: ImageHeader) -> Image.Image:
    if "PixelData" not in ds:
        raise ImageRejected(422, "DICOM file has no pixel data (PixelData element missing)")
    rows, columns = header.height, header.width
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

