"""What the blob store keeps of an upload: the policy of ``MEDATTN_STORED_UPLOAD`` and ``MEDATTN_STRIP_METADATA``.

Feedback needs the image the expert drew on, in the frame the model saw (see
:mod:`medattn.serving.imaging`) - nothing else. Two policies:

- ``reencoded`` (default): a lossless PNG of the decoded frame. It has no metadata at all (no
  EXIF, no text chunks, no DICOM header), no bytes after the image's end, and is exactly the
  pixels the attention map and the ROIs refer to. An upload that already is such a PNG (8-bit
  RGB, one frame, shown as stored) is not compressed again: its pixel chunks (``IHDR``,
  ``IDAT``, ``IEND``) are kept and every other chunk dropped (:func:`png_pixel_chunks`), which
  decodes to the same pixels. Re-compressing took about a third of the API process's CPU per
  prediction (benchmarks/serving_benchmark.py, 256 x 256 uploads).
- ``original``: the uploaded file, cut at the image's end (PNG ``IEND``, JPEG ``EOI``) so junk
  appended to it is not kept. With ``strip_metadata`` (default true) PNG text/EXIF/time chunks
  and JPEG EXIF/XMP/IPTC/comment segments are dropped and a DICOM file is de-identified (patient
  module emptied, private tags removed) by pydicom. When the original cannot represent the frame -
  it was rotated by EXIF orientation, reduced, or is a TIFF whose tags cannot be stripped safely -
  the re-encoded PNG is kept instead, so a stored image always matches the ROIs that cite it.
"""

from __future__ import annotations

import io
import struct
from typing import Literal

from medattn.serving.imaging import DecodedImage

StoredUpload = Literal["reencoded", "original"]
STORED_UPLOAD_POLICIES: tuple[str, ...] = ("reencoded", "original")
# zlib level 3: a blob is written once per prediction on the request path; most of level 6's size.
BLOB_PNG_COMPRESS_LEVEL = 3

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The chunks a PNG needs to carry its pixels (8-bit RGB: no palette, no transparency key).
_PNG_PIXEL_CHUNKS = {b"IHDR", b"IDAT", b"IEND"}
_PNG_RGB_COLOUR_TYPE = 2
# Chunks that change which pixels a decoder produces: with one of them, re-encode instead.
_PNG_PIXEL_CHANGING_CHUNKS = {b"PLTE", b"tRNS", b"acTL", b"fcTL", b"fdAT"}
# Ancillary PNG chunks that can carry who/where/when: text, EXIF, modification time.
_PNG_IDENTIFYING_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}
# JPEG segments that carry metadata rather than pixels: APP1 (EXIF, XMP), APP12, APP13 (IPTC), COM.
_JPEG_METADATA_MARKERS = {0xE1, 0xEC, 0xED, 0xFE}
_DICOM_PIXEL_DATA_TAG = 0x7FE00010
# DICOM Patient module (PS3.3 C.7.1.1) and other attributes naming a person or an institution.
DICOM_IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAge",
    "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "EthnicGroup", "PatientComments", "PatientBirthName", "ResponsiblePerson", "ResponsibleOrganization",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "InstitutionName", "InstitutionAddress", "AccessionNumber", "StudyID",
)


def stored_upload(data: bytes, decoded: DecodedImage, policy: str = "reencoded",
                  strip_metadata: bool = True) -> bytes:
    """The bytes the blob store keeps for this upload (see the module docstring)."""
    if policy == "original" and decoded.frame_is_stored_pixels:
        if decoded.format == "PNG":
            return png_without_trailer(data, strip_metadata)
        if decoded.format == "JPEG":
            return jpeg_without_trailer(data, strip_metadata)
        if decoded.format == "DICOM":
            return dicom_without_trailer(data, deidentify=strip_metadata)
        if decoded.format == "TIFF" and not strip_metadata:
            return data
    if decoded.format == "PNG" and decoded.frame_is_stored_pixels:
        pixels_only = png_pixel_chunks(data)
        if pixels_only is not None:
            return pixels_only
    buffer = io.BytesIO()
    decoded.image.save(buffer, format="PNG", compress_level=BLOB_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def png_without_trailer(data: bytes, strip_metadata: bool) -> bytes:
    """The PNG's chunks up to and including IEND; identifying chunks dropped when asked."""
    out, pos = [_PNG_SIGNATURE], len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if not (strip_metadata and kind in _PNG_IDENTIFYING_CHUNKS):
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    return b"".join(out)


def png_pixel_chunks(data: bytes) -> bytes | None:
    """The PNG reduced to ``IHDR``, ``IDAT`` and ``IEND`` when that is a complete 8-bit RGB image.

    None when the file is anything else (palette, grey, 16-bit, alpha, a transparency key, an
    animation, no ``IEND``): then the caller re-encodes the decoded frame. The ``IDAT`` bytes are
    the upload's, already decoded (and CRC-checked by Pillow) once, so the result decodes to the
    same pixels; no ancillary chunk (text, EXIF, time, colour profile, private chunks) survives.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    out, pos, complete = [_PNG_SIGNATURE], len(_PNG_SIGNATURE), False
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data) or kind in _PNG_PIXEL_CHANGING_CHUNKS:
            return None
        if kind == b"IHDR":
            # width, height (4 + 4), bit depth, colour type: 8-bit truecolour only.
            if length != 13 or data[pos + 16] != 8 or data[pos + 17] != _PNG_RGB_COLOUR_TYPE:
                return None
        if kind in _PNG_PIXEL_CHUNKS:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            complete = True
            break
    if not complete or len(out) < 4 or out[1][4:8] != b"IHDR":  # signature, IHDR, >= 1 IDAT, IEND
        return None
    return b"".join(out)


def jpeg_without_trailer(data: bytes, strip_metadata: bool) -> bytes:
    """The JPEG from SOI to its EOI marker; metadata segments dropped when asked.

    Marker segments are walked by their lengths; after each start-of-scan the entropy-coded data
    is skipped to the next marker (``FF`` followed by neither ``00`` stuffing nor a restart marker),
    so an ``FF D9`` inside an embedded thumbnail or a scan never ends the file early.
    """
    out, pos, n = [data[:2]], 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            out.append(data[pos:pos + 2])
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # stand-alone markers
            out.append(data[pos:pos + 2])
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        end = pos + 2 + length
        if not (strip_metadata and marker in _JPEG_METADATA_MARKERS):
            out.append(data[pos:end])
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
            scan_end = _next_marker(data, pos)
            out.append(data[pos:scan_end])
            pos = scan_end
    return b"".join(out)  # no EOI (a truncated file Pillow still decoded): keep what there is


def _next_marker(data: bytes, pos: int) -> int:
    """Offset of the first marker at or after ``pos`` in entropy-coded data (len(data) if none)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        following = data[pos + 1]
        if following != 0x00 and not 0xD0 <= following <= 0xD7:
            return pos
        pos += 2


def dicom_without_trailer(data: bytes, deidentify: bool = True) -> bytes:
    """The DICOM file re-written by pydicom without anything after its pixel data.

    Bytes appended to a DICOM file parse as bogus elements after ``PixelData``; they are dropped
    (so is the optional trailing padding). With ``deidentify`` the patient module and other
    attributes naming a person or institution are removed, and so are private tags.
    """
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    in_file_order = list(ds.keys())  # junk parses as elements of any tag, in file order after PixelData
    if _DICOM_PIXEL_DATA_TAG in in_file_order:
        for tag in in_file_order[in_file_order.index(_DICOM_PIXEL_DATA_TAG) + 1:]:
            del ds[tag]
    if deidentify:
        for keyword in DICOM_IDENTIFYING_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)
        ds.remove_private_tags()
        ds.PatientIdentityRemoved = "YES"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
