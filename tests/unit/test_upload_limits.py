"""Decode cost from the header, frame reduction, aspect ratio and EXIF orientation (medattn.serving.imaging)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from medattn.serving import imaging
from medattn.serving.imaging import ImageLimits, ImageRejected, decode_image, probe_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG whose IHDR claims width x height (any bit depth) with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def never_decoded(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("pixels were decoded although the header should have refused the image")

    monkeypatch.setattr(Image.Image, "load", refuse)
    monkeypatch.setattr(imaging, "to_rgb", refuse)


@pytest.mark.parametrize(("bit_depth", "colour_type", "mode"), [(1, 0, "1"), (16, 0, "I;16"), (8, 6, "RGBA")])
def test_a_bomb_is_refused_from_its_header_by_decoded_bytes_naming_the_limit(monkeypatch, bit_depth, colour_type, mode):
    data = png_header_only(7000, 7000, bit_depth, colour_type)  # 49 M pixels: under the pixel cap
    limits = ImageLimits(max_pixels=50_000_000, max_decoded_bytes=64 * 2**20)
    never_decoded(monkeypatch)
    with pytest.raises(ImageRejected) as info:
        decode_image(data, "image/png", limits)
    assert info.value.status_code == 413
    assert f"over the limit of {64 * 2**20} decoded bytes per image" in str(info.value)
    assert f"mode {mode}" in str(info.value)
    header_cost = imaging.pil_decoded_bytes(7000, 7000, mode)
    assert header_cost > 7000 * 7000 * 4  # at least the RGB copy


def test_probe_reads_the_header_and_estimates_what_decoding_allocates():
    data = encode(noise(60, 50), "PNG")
    header = probe_image(data, "image/png")
    assert (header.format, header.width, header.height, header.mode) == ("PNG", 60, 50, "RGB")
    assert header.decoded_bytes == 60 * 50 * (4 + 4 + imaging.FRAME_BYTES_PER_PIXEL)


def test_a_large_jpeg_is_drafted_down_during_decoding_and_reduced_to_the_frame():
    data = encode(noise(1600, 1200), "JPEG", quality=80)
    limits = ImageLimits(max_frame_pixels=40_000)
    header = probe_image(data, "image/jpeg", limits)
    assert header.decode_width < 1600 and header.decode_height < 1200  # draft: 1/2, 1/4 or 1/8 scale
    assert header.decoded_bytes < imaging.pil_decoded_bytes(1600, 1200, "RGB") + 40_000 * imaging.FRAME_BYTES_PER_PIXEL
    decoded = decode_image(data, "image/jpeg", limits)
    assert decoded.width * decoded.height <= 40_000
    assert decoded.reduction > 1 and not decoded.frame_is_stored_pixels
    assert decoded.width / decoded.height == pytest.approx(4 / 3, rel=0.05)


def test_a_jpeg_too_big_to_decode_whole_fits_the_budget_once_drafted():
    data = encode(noise(1600, 1200), "JPEG", quality=80)
    full_cost = imaging.pil_decoded_bytes(1600, 1200, "RGB")
    limits = ImageLimits(max_decoded_bytes=full_cost // 2, max_frame_pixels=200_000)
    decoded = decode_image(data, "image/jpeg", limits)
    assert decoded.width * decoded.height <= 200_000
    with pytest.raises(ImageRejected) as info:  # the same budget without draft: refused
        decode_image(encode(noise(1600, 1200), "PNG"), "image/png", limits)
    assert info.value.status_code == 413


def test_a_large_png_is_reduced_to_the_frame_by_an_integer_factor():
    image = noise(300, 200)
    decoded = decode_image(encode(image, "PNG"), "image/png", ImageLimits(max_frame_pixels=7000))
    assert decoded.reduction == 3 and (decoded.width, decoded.height) == (100, 67)
    expected = np.asarray(image.reduce(3))
    assert np.array_equal(np.asarray(decoded.image), expected)


@pytest.mark.parametrize("size", [(400, 20), (20, 400), (1000, 1)])
def test_an_aspect_ratio_the_model_cannot_use_is_refused(size):
    with pytest.raises(ImageRejected) as info:
        decode_image(encode(noise(*size), "PNG"), "image/png", ImageLimits(max_aspect_ratio=4.0))
    assert info.value.status_code == 422
    assert "aspect ratio" in str(info.value) and "4:1" in str(info.value)


def test_four_to_one_is_still_accepted():
    assert decode_image(encode(noise(80, 20), "PNG"), "image/png").width == 80


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_once_so_the_frame_is_the_displayed_image(orientation):
    stored = noise(40, 30, seed=orientation)
    exif = Image.Exif()
    exif[imaging.EXIF_ORIENTATION_TAG] = orientation
    data = encode(stored, "PNG", exif=exif.tobytes())  # PNG: lossless, so pixels compare exactly
    displayed = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    decoded = decode_image(data, "image/png")
    assert (decoded.width, decoded.height) == displayed.size
    assert np.array_equal(np.asarray(decoded.image), np.asarray(displayed.convert("RGB")))
    assert decoded.orientation == orientation
    assert decoded.frame_is_stored_pixels == (orientation == 1)


def test_exif_rotated_jpeg_is_upright_in_its_frame():
    exif = Image.Exif()
    exif[imaging.EXIF_ORIENTATION_TAG] = 6  # stored landscape, displayed portrait
    data = encode(noise(64, 32), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data, "image/jpeg")
    assert (decoded.width, decoded.height) == (32, 64)


def test_dicom_cost_comes_from_rows_columns_and_bits_before_pixel_data_is_read(monkeypatch):
    from tests.unit.test_imaging import dicom_bytes

    data = dicom_bytes(np.zeros((4, 4), dtype=np.uint16), rows=4000, columns=4000)
    limits = ImageLimits(max_decoded_bytes=100 * 2**20)
    import pydicom.dataset

    def refuse(self):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(refuse))
    with pytest.raises(ImageRejected) as info:
        decode_image(data, "application/dicom", limits)
    assert info.value.status_code == 413 and "decoded bytes per image" in str(info.value)
    cost = probe_image(data, None, ImageLimits(max_decoded_bytes=2**31)).decoded_bytes
    assert cost == 4000 * 4000 * (2 + 16 + 4 + imaging.FRAME_BYTES_PER_PIXEL)


def test_the_default_limits_take_an_image_at_the_pixel_cap():
    limits = ImageLimits()
    header = imaging.ImageHeader("PNG", 7000, 7000, "RGB", 1, 7000, 7000, imaging.pil_decoded_bytes(7000, 7000, "RGB"))
    assert imaging._check_header(header, limits).decoded_bytes <= limits.max_decoded_bytes


def test_reduction_for_always_fits_the_frame():
    limits = ImageLimits(max_frame_pixels=1000)
    for width, height in [(1001, 1), (33, 31), (4000, 1000), (999, 999)]:
        factor = limits.reduction_for(width, height)
        assert -(-width // factor) * -(-height // factor) <= 1000
        assert factor == 1 or -(-width // (factor - 1)) * -(-height // (factor - 1)) > 1000
