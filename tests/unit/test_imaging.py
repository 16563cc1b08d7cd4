"""Upload decoding: every supported format decodes to RGB; every bad upload is refused with its status."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medattn.serving.imaging import ImageLimits, ImageRejected, decode_image, sniff_format


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient_rgb(width: int = 40, height: int = 30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 90.0)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", frames: int = 1,
                window: tuple[float, float] | None = None, rows: int | None = None,
                columns: int | None = None, with_pixels: bool = True) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows = rows if rows is not None else pixels.shape[0]
    ds.Columns = columns if columns is not None else pixels.shape[1]
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = pixels.dtype.itemsize * 8 - 1
    ds.PixelRepresentation = 0
    if frames != 1:
        ds.NumberOfFrames = frames
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def rejection(data: bytes, content_type: str | None = None, limits: ImageLimits = ImageLimits()) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, content_type, limits)
    return info.value


# ---- accepted uploads ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, content_type", [("PNG", "image/png"), ("TIFF", "image/tiff"),
                                               ("PNG", "application/octet-stream"), ("PNG", None),
                                               ("PNG", "Image/PNG; charset=binary")])
def test_lossless_formats_decode_to_the_exact_rgb_pixels(fmt, content_type):
    original = gradient_rgb()
    decoded = decode_image(encode(original, fmt), content_type)
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB" and (decoded.width, decoded.height) == (40, 30)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(original))


def test_jpeg_decodes_close_to_the_original():
    original = gradient_rgb()
    decoded = decode_image(encode(original, "JPEG", quality=95), "image/jpeg")
    assert decoded.format == "JPEG" and decoded.image.size == (40, 30)
    assert np.abs(np.asarray(decoded.image, dtype=int) - np.asarray(original, dtype=int)).mean() < 4


def test_grey_and_16_bit_images_become_8_bit_rgb():
    grey16 = Image.fromarray(np.arange(12 * 10, dtype=np.uint16).reshape(10, 12) * 500)
    decoded = decode_image(encode(grey16, "PNG"), "image/png")
    pixels = np.asarray(decoded.image)
    assert pixels.shape == (10, 12, 3) and pixels.dtype == np.uint8
    assert pixels[..., 0].max() == 255 and np.array_equal(pixels[..., 0], pixels[..., 2])


def test_dicom_16_bit_monochrome2_is_stretched_to_8_bits():
    pixels = np.linspace(1000, 3000, 16 * 20).reshape(16, 20).astype(np.uint16)
    decoded = decode_image(dicom_bytes(pixels), "application/dicom")
    grey = np.asarray(decoded.image)[..., 0]
    assert decoded.format == "DICOM" and decoded.image.size == (20, 16)
    assert grey[0, 0] == 0 and grey[-1, -1] == 255
    assert np.all(np.diff(grey.ravel().astype(int)) >= 0)  # monotone: brighter stays brighter


def test_dicom_monochrome1_is_inverted():
    pixels = np.linspace(0, 4000, 8 * 8).reshape(8, 8).astype(np.uint16)
    normal = np.asarray(decode_image(dicom_bytes(pixels, "MONOCHROME2")).image)[..., 0].astype(int)
    inverted = np.asarray(decode_image(dicom_bytes(pixels, "MONOCHROME1")).image)[..., 0].astype(int)
    assert np.array_equal(inverted, 255 - normal)
    assert inverted[0, 0] == 255  # the lowest stored value is displayed white in MONOCHROME1


def test_dicom_window_clips_values_outside_it():
    pixels = np.tile(np.array([0, 1000, 1500, 2000, 4000], dtype=np.uint16), (4, 1))
    grey = np.asarray(decode_image(dicom_bytes(pixels, window=(1500, 1000))).image)[0, :, 0].astype(int)
    assert grey[0] == grey[1] == 0  # at or below the window's low edge
    assert grey[3] == grey[4] == 255  # at or above its high edge
    assert 100 < grey[2] < 155  # the centre maps to mid grey


def test_dicom_rgb_8_bit_is_kept():
    rgb = np.asarray(gradient_rgb(6, 5))
    decoded = decode_image(dicom_bytes(rgb, "RGB"))
    assert np.array_equal(np.asarray(decoded.image), rgb)


def test_sniffing_reads_bytes_not_names():
    assert sniff_format(encode(gradient_rgb(), "PNG")) == "PNG"
    assert sniff_format(encode(gradient_rgb(), "JPEG")) == "JPEG"
    assert sniff_format(encode(gradient_rgb(), "TIFF")) == "TIFF"
    assert sniff_format(dicom_bytes(np.zeros((2, 2), np.uint16))) == "DICOM"
    assert sniff_format(b"hello world") is None


# ---- refused uploads ----------------------------------------------------------------------------


def test_not_an_image_is_422():
    error = rejection(b"patient,grade\n1,2\n", "application/octet-stream")
    assert error.status_code == 422 and "not an image" in str(error)


def test_empty_upload_is_422():
    assert rejection(b"", "image/png").status_code == 422


def test_unsupported_image_format_is_415_and_named():
    error = rejection(encode(gradient_rgb(), "GIF"))
    assert error.status_code == 415 and "GIF" in str(error)


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "image/gif"])
def test_wrong_content_type_is_415(content_type):
    error = rejection(encode(gradient_rgb(), "PNG"), content_type)
    assert error.status_code == 415 and content_type in str(error)


def test_content_type_contradicted_by_the_bytes_is_415():
    error = rejection(encode(gradient_rgb(), "JPEG"), "image/png")
    assert error.status_code == 415 and "JPEG" in str(error)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_truncated_image_is_422(fmt):
    data = encode(gradient_rgb(120, 90), fmt)
    error = rejection(data[: len(data) // 2])
    assert error.status_code == 422
    assert fmt in str(error)


def test_upload_over_the_byte_limit_is_413():
    data = encode(gradient_rgb(), "PNG")
    error = rejection(data, "image/png", ImageLimits(max_bytes=len(data) - 1))
    assert error.status_code == 413 and str(len(data)) in str(error)
    assert decode_image(data, "image/png", ImageLimits(max_bytes=len(data))).width == 40


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # 5000 x 5000 claimed, a few bytes of pixel data: decoding would fail (422), the header check comes first.
    error = rejection(png_header_only(5000, 5000), "image/png", ImageLimits(max_pixels=1_000_000))
    assert error.status_code == 413 and "5000x5000" in str(error)


def test_decompression_bomb_beyond_pillows_own_limit_is_413():
    error = rejection(png_header_only(20000, 20000), "image/png", ImageLimits(max_pixels=10**12))
    assert error.status_code == 413 and "decompression bomb" in str(error)


def test_dicom_over_the_pixel_limit_is_refused_before_its_pixels_are_read():
    # The header claims 4000 x 4000; the pixel data (2 x 2) could not even be decoded.
    data = dicom_bytes(np.zeros((2, 2), np.uint16), rows=4000, columns=4000)
    error = rejection(data, "application/dicom", ImageLimits(max_pixels=1_000_000))
    assert error.status_code == 413


def test_dicom_with_inconsistent_pixel_data_is_422():
    data = dicom_bytes(np.zeros((2, 2), np.uint16), rows=64, columns=64)
    assert rejection(data).status_code == 422


def test_dicom_without_pixels_or_with_several_frames_is_422():
    no_pixels = rejection(dicom_bytes(np.zeros((4, 4), np.uint16), with_pixels=False))
    assert no_pixels.status_code == 422 and "no pixel data" in str(no_pixels)
    frames = rejection(dicom_bytes(np.zeros((3, 4, 4), np.uint16).reshape(12, 4), rows=4, columns=4, frames=3))
    assert frames.status_code == 422 and "3 frames" in str(frames)


def test_truncated_dicom_is_422():
    data = dicom_bytes(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    assert rejection(data[: len(data) - 3000]).status_code == 422
