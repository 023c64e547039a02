"""In-graph decoding (the served `image_bytes` path) against Pillow (the in-process path)."""

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from delf_tf.extraction.image_bytes import (
    decode_batch,
    decode_image_bytes,
    exif_orientation,
    header_size,
    to_rgb,
)
from delf_tf.images import decode_image

decode = tf.function(decode_image_bytes, input_signature=[tf.TensorSpec([], tf.string)])
orientation_of = tf.function(exif_orientation, input_signature=[tf.TensorSpec([], tf.string)])


@pytest.fixture(scope="module")
def photo(astronaut_small):
    """A non-square crop, so that every orientation gives a distinct array."""
    return astronaut_small[:48, :80]


def encoded(image, fmt, orientation=None, **options):
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, exif=exif, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_exif_orientation_applied_as_pillow_does(photo, fmt, orientation):
    data = encoded(photo, fmt, orientation)
    expected = decode_image(data)  # Pillow + ImageOps.exif_transpose
    assert int(orientation_of(data)) == (orientation or 1)
    np.testing.assert_array_equal(decode(data).numpy(), expected)
    if orientation in (5, 6, 7, 8):
        assert expected.shape[:2] == photo.shape[1::-1]


def test_big_endian_exif_after_other_segments(photo):
    """An "MM" (Motorola) TIFF header in APP1, after the JFIF APP0 segment."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">I", 0)
    exif = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", exif=exif, quality=90)
    data = buffer.getvalue()
    assert data[2:4] == b"\xff\xe0"  # APP0 first: the walk must skip it
    assert int(orientation_of(data)) == 6
    np.testing.assert_array_equal(decode(data).numpy(), decode_image(data))


def test_gif_bmp_webp_decoded_and_other_formats_refused(photo):
    buffer = io.BytesIO()
    Image.fromarray(photo).save(
        buffer, "GIF", save_all=True, append_images=[Image.fromarray(photo[::-1])]
    )
    animated_gif = buffer.getvalue()
    for data in (
        encoded(photo, "GIF"),
        animated_gif,  # its first frame, as Pillow gives it
        encoded(photo, "BMP"),
        encoded(photo, "WEBP"),
        encoded(photo, "WEBP", lossless=True),
    ):
        np.testing.assert_array_equal(decode(data).numpy(), decode_image(data))
    for data in (encoded(photo, "TIFF"), encoded(photo, "PPM")):
        with pytest.raises(tf.errors.InvalidArgumentError):
            decode(data)


def test_header_size_without_decoding(photo):
    size_of = tf.function(header_size, input_signature=[tf.TensorSpec([], tf.string)])
    for data in (
        encoded(photo, "JPEG", quality=80, subsampling=2),
        encoded(photo, "JPEG", progressive=True),  # SOF2
        encoded(photo, "JPEG", 6),  # APP1 before SOF: size as stored
        encoded(photo, "PNG"),
        encoded(photo, "GIF"),
        encoded(photo, "BMP"),
        encoded(photo, "WEBP"),
        encoded(photo, "WEBP", lossless=True),
        encoded(photo, "WEBP", 6),  # VP8X with an EXIF chunk: size as stored
    ):
        assert size_of(data).numpy().tolist() == [48, 80]
    for junk in (
        b"",
        b"\xff\xd8\xff",
        b"\xff\xd8\xff\xe1\xff\xff",
        b"GIF8",
        b"\x89PNG\r\n\x1a\n",
        b"BM",
        b"RIFF",
        b"RIFF\0\0\0\0WEBPVP8X",
    ):
        assert size_of(junk).numpy().tolist() == [0, 0]  # never an error, whatever the bytes


def test_jpeg_pixels_equal_pillow_for_every_subsampling(photo):
    for subsampling in (0, 1, 2):
        data = encoded(photo, "JPEG", quality=95, subsampling=subsampling)
        np.testing.assert_array_equal(decode(data).numpy(), decode_image(data))


def test_bad_bytes_fail(photo):
    jpeg = encoded(photo, "JPEG")
    png = encoded(photo, "PNG")
    # A PNG header claiming 100000 x 100000 pixels is refused before any decoding.
    huge = png[:16] + struct.pack(">II", 100_000, 100_000) + png[24:]
    for data in (b"", b"plain text", jpeg[:-200], png[:60], huge):
        with pytest.raises(tf.errors.InvalidArgumentError):
            decode(data)


def test_decode_batch_drops_failures_and_keeps_indices(photo):
    good = encoded(photo, "PNG")
    rotated = encoded(photo, "JPEG", 6)
    batch = tf.constant([good, b"junk", rotated, good[:100], b"", rotated[:-100]])
    indices, pixels, shapes = tf.function(decode_batch)(batch)
    assert indices.numpy().tolist() == [2, 0]  # JPEGs first (their own pipeline)
    assert shapes.numpy().tolist() == [[48, 80, 3], [48, 80, 3]]  # as stored, not yet rotated
    np.testing.assert_array_equal(pixels.numpy()[48 * 80 * 3 :].reshape(48, 80, 3), photo)


def test_decode_batch_keeps_channels_for_to_rgb(photo):
    gray = encoded(photo[:, :, 0], "PNG")
    rgba = encoded(np.dstack([photo, photo[:, :, :1]]), "PNG")
    indices, pixels, shapes = tf.function(decode_batch)(tf.constant([gray, rgba]))
    assert indices.numpy().tolist() == [0, 1]
    assert shapes.numpy().tolist() == [[48, 80, 1], [48, 80, 4]]
    first = tf.reshape(pixels[: 48 * 80], [48, 80, 1])
    second = tf.reshape(pixels[48 * 80 :], [48, 80, 4])
    np.testing.assert_array_equal(to_rgb(first).numpy(), np.dstack([photo[:, :, 0]] * 3))
    np.testing.assert_array_equal(to_rgb(second).numpy(), photo)
