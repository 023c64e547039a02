import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from delf_tf.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, list_images, load_image

RGB = skimage.data.astronaut()[::8, ::8]  # uint8 [64, 64, 3]


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "JPEG"])
def test_formats_decode_to_rgb_uint8(fmt):
    lossless = fmt in ("PNG", "BMP", "TIFF")
    options = {"WEBP": {"lossless": True}, "JPEG": {"quality": 95}}.get(fmt, {})
    # TIFF is not a served format (see test_format_agreement): read it with servable_only=False.
    data = encode(Image.fromarray(RGB), fmt, **options)
    decoded = decode_image(data, servable_only=fmt != "TIFF")
    assert decoded.dtype == np.uint8 and decoded.shape == RGB.shape
    if lossless or fmt == "WEBP":
        np.testing.assert_array_equal(decoded, RGB)
    else:
        assert np.abs(decoded.astype(int) - RGB).mean() < 8


@pytest.mark.parametrize(
    "orientation,transform",
    [
        (3, lambda a: a[::-1, ::-1]),  # rotated 180
        (6, lambda a: np.rot90(a, k=-1)),  # rotate 90 CW to display
        (8, lambda a: np.rot90(a, k=1)),  # rotate 90 CCW to display
    ],
)
def test_exif_orientation_is_applied(orientation, transform):
    stored = RGB[:, :48]  # non-square, so a rotation changes the shape
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data)
    expected = transform(stored)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).mean() < 8


def test_gray_alpha_palette_cmyk_and_16_bit():
    gray = RGB[:, :, 0]
    np.testing.assert_array_equal(
        decode_image(encode(Image.fromarray(gray), "PNG")), np.dstack([gray] * 3)
    )
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(rgba), "PNG")), RGB)
    palette = Image.fromarray(RGB).quantize(16)
    np.testing.assert_array_equal(
        decode_image(encode(palette, "PNG")), np.asarray(palette.convert("RGB"))
    )
    cmyk = Image.fromarray(RGB).convert("CMYK")
    assert np.abs(decode_image(encode(cmyk, "JPEG", quality=100)).astype(int) - RGB).max() <= 8
    tiff = encode(cmyk, "TIFF")
    assert np.abs(decode_image(tiff, servable_only=False).astype(int) - RGB).max() <= 2
    gray16 = gray.astype(np.uint16) * 257
    decoded16 = decode_image(encode(Image.fromarray(gray16), "PNG"))
    np.testing.assert_array_equal(decoded16, np.dstack([gray] * 3))


def test_rgb_16_bit_png():
    import tensorflow as tf

    rgb16 = RGB.astype(np.uint16) * 257
    decoded = decode_image(tf.io.encode_png(rgb16).numpy())
    np.testing.assert_array_equal(decoded, RGB)


def test_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        load_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        load_image(text)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(encode(Image.fromarray(RGB), "JPEG")[:600])
    with pytest.raises(ImageError, match=r"truncated\.jpg: truncated or corrupt"):
        load_image(truncated)
    with pytest.raises(ImageError, match=r"missing\.jpg: cannot read"):
        load_image(tmp_path / "missing.jpg")


def test_decompression_bomb_is_refused(tmp_path):
    # A 1-bit 20000 x 20000 PNG is a few kB but 400 megapixels once decoded.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    assert bomb.stat().st_size < 200_000 and DEFAULT_MAX_PIXELS < 20000 * 20000
    with pytest.raises(ImageError, match=r"bomb\.png: refused as a decompression bomb"):
        load_image(bomb)
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(encode(Image.fromarray(RGB), "PNG"), max_pixels=1000)


def test_list_images_is_recursive_and_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.JPG", "a.png", "b/1.webp", "skip.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == [
        "a.png",
        "b/1.webp",
        "b/2.JPG",
    ]
    assert list_images(tmp_path / "a.png") == [tmp_path / "a.png"]


def test_file_reads_are_bounded_and_sniffed(tmp_path, monkeypatch):
    """A 6 GB sparse `.jpg` is refused from its size, a non-image from its first bytes
    (neither read whole), a fifo without waiting on it."""
    import os
    import time

    import delf_tf.images as images

    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as handle:
        handle.truncate(6 << 30)  # sparse: takes no disk space
    reads = []
    real_fdopen = os.fdopen

    class Counting:  # counts the bytes read through the handle
        def __init__(self, *arguments):
            self.handle = real_fdopen(*arguments)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def read(self, size=-1):
            data = self.handle.read(size)
            reads.append(len(data))
            return data

    monkeypatch.setattr(images.os, "fdopen", Counting)
    start = time.monotonic()
    with pytest.raises(ImageError, match=r"huge\.jpg: 6442450944 bytes, over the limit"):
        load_image(sparse)
    assert time.monotonic() - start < 1.0 and sum(reads) == 0
    zeros = tmp_path / "zeros.jpg"
    with open(zeros, "wb") as handle:
        handle.truncate(100 << 20)
    with pytest.raises(ImageError, match=r"zeros\.jpg: not an image"):
        load_image(zeros)
    assert sum(reads) == 16  # the header only
    monkeypatch.undo()
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match=r"pipe\.jpg: not a regular file"):
        load_image(fifo)
    small = tmp_path / "small.png"
    small.write_bytes(encode(Image.fromarray(RGB), "PNG"))
    with pytest.raises(ImageError, match="over the limit of 100 bytes"):
        images.read_image_file(small, max_bytes=100)
    assert load_image(small).shape == RGB.shape
