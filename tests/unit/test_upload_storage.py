"""What the blob store keeps of an upload: no trailing bytes, no identifying metadata, the frame's pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from medattn.serving import imaging
from medattn.serving.imaging import ImageLimits, decode_image
from medattn.serving.upload_storage import (
    jpeg_without_trailer,
    png_pixel_chunks,
    png_without_trailer,
    stored_upload,
)
from tests.unit.test_imaging import dicom_bytes

JUNK = b"TRAILING-JUNK" * 100
SECRET = "Jane Doe 1970-01-01"


def noise(width: int = 48, height: int = 32) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def png_with_text() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", SECRET)
    info.add_itxt("Comment", SECRET)
    buffer = io.BytesIO()
    noise().save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue() + JUNK


def jpeg_with_exif_and_comment() -> bytes:
    exif = Image.Exif()
    exif[0x013B] = SECRET  # Artist
    exif[0x010E] = SECRET  # ImageDescription
    buffer = io.BytesIO()
    noise().save(buffer, format="JPEG", exif=exif.tobytes(), comment=SECRET.encode(), quality=90)
    return buffer.getvalue() + JUNK


@pytest.mark.parametrize("make", [png_with_text, jpeg_with_exif_and_comment])
@pytest.mark.parametrize("policy", ["reencoded", "original"])
def test_stored_bytes_have_no_trailer_and_no_identifying_text(make, policy):
    data = make()
    decoded = decode_image(data)
    kept = stored_upload(data, decoded, policy, strip_metadata=True)
    assert JUNK[:13] not in kept and SECRET.encode() not in kept
    assert SECRET.encode() in data  # the upload did carry them
    again = decode_image(kept)
    assert (again.width, again.height) == (decoded.width, decoded.height)
    assert np.array_equal(np.asarray(again.image), np.asarray(decoded.image))


def test_original_without_stripping_keeps_metadata_but_not_the_trailer():
    data = png_with_text()
    kept = stored_upload(data, decode_image(data), "original", strip_metadata=False)
    assert SECRET.encode() in kept and not kept.endswith(JUNK)
    assert kept == data[:-len(JUNK)]


def test_reencoded_is_a_png_of_the_frame_even_for_jpeg():
    data = jpeg_with_exif_and_comment()
    decoded = decode_image(data)
    kept = stored_upload(data, decoded, "reencoded")
    assert kept.startswith(b"\x89PNG") and Image.open(io.BytesIO(kept)).info.get("exif") is None


def test_original_of_a_rotated_or_reduced_image_is_stored_reencoded_so_it_matches_the_frame():
    exif = Image.Exif()
    exif[imaging.EXIF_ORIENTATION_TAG] = 6
    buffer = io.BytesIO()
    noise(64, 32).save(buffer, format="PNG", exif=exif.tobytes())
    decoded = decode_image(buffer.getvalue())
    kept = stored_upload(buffer.getvalue(), decoded, "original")
    assert Image.open(io.BytesIO(kept)).size == (32, 64) == (decoded.width, decoded.height)
    reduced = decode_image(buffer.getvalue(), limits=ImageLimits(max_frame_pixels=500))
    assert Image.open(io.BytesIO(stored_upload(buffer.getvalue(), reduced, "original"))).size == reduced.image.size


def test_dicom_original_is_deidentified():
    import pydicom

    data = dicom_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8))
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID-123456", "19700101"
    ds.add_new(0x00091010, "LO", "private secret")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue() + JUNK
    kept = stored_upload(data, decode_image(data), "original", strip_metadata=True)
    for secret in (b"Doe^Jane", b"PID-123456", b"19700101", b"private secret", JUNK[:13]):
        assert secret not in kept
    clean = pydicom.dcmread(io.BytesIO(kept))
    assert clean.PatientIdentityRemoved == "YES" and "PatientName" not in clean
    assert np.array_equal(clean.pixel_array, ds.pixel_array)


def test_jpeg_end_is_found_past_ff_d9_inside_an_embedded_thumbnail():
    thumb = io.BytesIO()
    noise(8, 8).save(thumb, format="JPEG")
    assert b"\xff\xd9" in thumb.getvalue()
    main = io.BytesIO()
    noise().save(main, format="JPEG", comment=thumb.getvalue())  # COM segment holding a whole JPEG
    data = main.getvalue()
    assert jpeg_without_trailer(data + JUNK, strip_metadata=False) == data
    assert png_without_trailer(png_with_text(), strip_metadata=False).endswith(b"IEND\xaeB`\x82")


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(kind, payload) of every chunk of a PNG, in order."""
    import struct

    chunks, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def rgb_png_with_every_kind_of_metadata() -> bytes:
    """8-bit RGB with text, EXIF, a colour profile chunk, gamma, a private chunk and a trailer."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", SECRET)
    info.add_itxt("Comment", SECRET)
    info.add(b"gAMA", (45455).to_bytes(4, "big"))
    info.add(b"prVt", SECRET.encode())  # a private ancillary chunk
    exif = Image.Exif()
    exif[0x013B] = SECRET
    buffer = io.BytesIO()
    noise(64, 40).save(buffer, format="PNG", pnginfo=info, exif=exif.tobytes(), optimize=False)
    return buffer.getvalue() + JUNK


def test_reencoded_rgb_png_keeps_its_own_pixel_chunks_and_nothing_else():
    data = rgb_png_with_every_kind_of_metadata()
    decoded = decode_image(data)
    kept = stored_upload(data, decoded, "reencoded")
    assert SECRET.encode() not in kept and JUNK[:13] not in kept
    assert [kind for kind, _ in png_chunks(kept)] == [b"IHDR", b"IDAT", b"IEND"]
    # Not compressed again: the compressed pixel data is the upload's own.
    upload_idat = b"".join(p for kind, p in png_chunks(data) if kind == b"IDAT")
    assert b"".join(p for kind, p in png_chunks(kept) if kind == b"IDAT") == upload_idat
    assert np.array_equal(np.asarray(decode_image(kept).image), np.asarray(decoded.image))


def _png(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


@pytest.mark.parametrize("make", [
    lambda: _png(noise().convert("P")),                      # palette
    lambda: _png(noise().convert("L")),                      # grey
    lambda: _png(noise().convert("RGBA")),                   # alpha
    lambda: _png(noise(), transparency=(0, 0, 0)),           # RGB with a transparency key (tRNS)
    lambda: _png(Image.fromarray(np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 40)),  # 16-bit
    lambda: _png(noise(), save_all=True, append_images=[noise(48, 32).rotate(90)]),  # animated
])
def test_other_pngs_are_reencoded_as_rgb_of_the_frame(make):
    data = make()
    assert png_pixel_chunks(data) is None
    decoded = decode_image(data)
    kept = stored_upload(data, decoded, "reencoded")
    assert Image.open(io.BytesIO(kept)).mode == "RGB"
    assert np.array_equal(np.asarray(decode_image(kept).image), np.asarray(decoded.image))


def test_pixel_chunks_refuse_a_png_cut_before_its_end():
    data = _png(noise())
    assert png_pixel_chunks(data) is not None
    assert png_pixel_chunks(data[:-12]) is None  # no IEND
    assert png_pixel_chunks(data[:40]) is None  # cut inside IDAT
