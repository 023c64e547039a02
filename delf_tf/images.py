"""Robust image decoding to RGB uint8 [H, W, 3].

One set of formats for every path (`SERVED_FORMATS`): what the served model's
graph decodes (`delf_tf.extraction.image_bytes`) is what this loader accepts,
with the same pixels, so an image gives the same features in process and
through TF Serving: JPEG (also camera MPO files), PNG, GIF (the first frame of
an animated one), BMP (uncompressed 24 / 32 bit) and WebP (still). Anything
else (TIFF, animated WebP, 1/4/8/16-bit BMP, PPM, ...) raises ImageError naming
the file and the format; `servable_only=False` lifts that (for tools that
re-encode, such as the TFRecord writer).

EXIF orientation is applied. Grayscale, palette, CMYK and 16-bit inputs are
converted to 8-bit RGB; an alpha channel is dropped (the colour values are kept
as they are, as `tf.io.decode_png(channels=3)` does); transparent GIF pixels are
black, as TF's GIF decoder gives them. Every failure raises ImageError naming
the file.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image, ImageOps, UnidentifiedImageError

from delf_tf.errors import InputError

# Pillow's own default bound: larger images are treated as decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Pillow format names of the images every path decodes alike (see the module docstring).
SERVED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")
SERVED_FORMATS_TEXT = "JPEG, PNG, GIF, BMP (24/32-bit) and still WebP"
EXIF_ORIENTATION_TAG = 0x0112
# Orientations whose display swaps width and height (rotated by 90 or 270 degrees).
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


class ImageError(InputError):
    """An image could not be decoded; the message starts with the file's name."""


def load_image(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, servable_only: bool = True
) -> np.ndarray:
    """Reads and decodes an image file to uint8 [H, W, 3] RGB (EXIF orientation applied)."""
    data = read_image_file(path, servable_only=servable_only)
    return decode_image(data, name=str(path), max_pixels=max_pixels, servable_only=servable_only)


# The most bytes read from one image file: the dev server's default request bound
# (`delf serve --max_request_bytes`), so whatever `delf extract` reads, a server takes.
DEFAULT_MAX_FILE_BYTES = 256 << 20
# The first bytes of the files `read_image_file` reads on (servable_only): the served
# formats, and TIFF (refused by `decode_image` with a message that names it).
_SERVED_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_SNIFF_BYTES = 16


def read_image_file(
    path: str | os.PathLike,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    servable_only: bool = True,
) -> bytes:
    """The bytes of an image file, read only when they can be an image: ImageError (one
    line naming the file) for what is not a regular file (a fifo is never waited on),
    a file over `max_bytes` (from its size, before reading: a 6 GB sparse `.jpg` costs
    nothing) and, with servable_only, a file whose first bytes are no image header
    (a served format, or TIFF for its own message)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise ImageError(f"{path}: cannot read file ({error.strerror})") from error
    with os.fdopen(descriptor, "rb") as handle:
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise ImageError(f"{path}: not a regular file ({_file_kind(status)})")
            if status.st_size > max_bytes:
                raise ImageError(
                    f"{path}: {status.st_size} bytes, over the limit of {max_bytes} bytes "
                    "per image file"
                )
            head = handle.read(_SNIFF_BYTES)
            if servable_only and head and not _looks_like_image(head):
                raise ImageError(f"{path}: not an image (unrecognised format)")
            data = head + handle.read(max_bytes + 1 - len(head))
        except OSError as error:
            raise ImageError(f"{path}: cannot read file ({error.strerror})") from error
    if len(data) > max_bytes:  # grew while read
        raise ImageError(f"{path}: over the limit of {max_bytes} bytes per image file")
    return data


def _looks_like_image(head: bytes) -> bool:
    if head.startswith(_SERVED_MAGIC + _TIFF_MAGIC):
        return True
    return head.startswith(b"RIFF") and head[8:12] == b"WEBP"


def decode_image(
    data: bytes,
    name: str = "<bytes>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    servable_only: bool = True,
) -> np.ndarray:
    """Decodes encoded image bytes to uint8 [H, W, 3] RGB; `name` appears in errors.

    servable_only: refuse (ImageError) what the served graph does not decode, see
    `SERVED_FORMATS`; False accepts every format Pillow reads.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as error:
            raise ImageError(f"{name}: not an image (unrecognised format)") from error
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageError(f"{name}: refused as a decompression bomb ({error})") from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageError(f"{name}: truncated or corrupt image data ({error})") from error
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"{name}: refused as a decompression bomb: {width}x{height} = "
                f"{width * height} pixels > limit {max_pixels}"
            )
        if width == 0 or height == 0:
            raise ImageError(f"{name}: image has no pixels ({width}x{height})")
        if servable_only:
            _check_servable(image, data, name)
        try:
            image.load()
            kind = image.format
            image = ImageOps.exif_transpose(image)
            return _to_rgb_uint8(image, gif=kind == "GIF")
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageError(f"{name}: truncated or corrupt image data ({error})") from error


def _check_servable(image: Image.Image, data: bytes, name: str) -> None:
    """ImageError unless the served graph decodes this image too (same rules as
    `delf_tf.extraction.image_bytes.header_size`)."""
    kind = image.format or "unknown"
    if kind not in SERVED_FORMATS:
        raise ImageError(
            f"{name}: {kind} images are not supported: delf reads {SERVED_FORMATS_TEXT}, "
            "the formats the served model decodes (convert it, e.g. to PNG)"
        )
    if kind == "BMP":
        info_size, bits, compression = (
            int.from_bytes(data[14:18], "little"),
            int.from_bytes(data[28:30], "little"),
            int.from_bytes(data[30:34], "little"),
        )
        if info_size < 40 or bits not in (24, 32) or compression != 0:
            raise ImageError(
                f"{name}: BMP with {bits} bits per pixel (compression {compression}) is not "
                "supported: only uncompressed 24 or 32-bit BMPs are, as in the served model "
                "(convert it, e.g. to PNG)"
            )
    if kind == "WEBP" and getattr(image, "n_frames", 1) > 1:
        raise ImageError(
            f"{name}: animated WebP is not supported (the served model decodes still WebP "
            "only; convert its first frame, e.g. to PNG)"
        )


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation (1..8) of an opened image, read from its header; 1 when absent."""
    return int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))


def _to_rgb_uint8(image: Image.Image, gif: bool = False) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) gray: map the 16-bit range to 8 bits.
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        gray = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if gif and "transparency" in image.info and mode in ("P", "L"):
        # TF's GIF decoder leaves transparent pixels black: do the same.
        transparent = np.asarray(image) == image.info["transparency"]
        rgb = np.array(image.convert("RGB"), dtype=np.uint8)
        rgb[transparent] = 0
        return rgb
    if gif and mode == "RGBA":
        rgba = np.array(image, dtype=np.uint8)
        rgba[rgba[:, :, 3] == 0, :3] = 0
        return np.ascontiguousarray(rgba[:, :, :3])
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes, lossless (a decoder gets the very same pixels back)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def scan_images(root: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(image files under `root`, what was skipped and why); [root] if it is a file.

    The walk is recursive and follows symbolic links, to files and to folders; a
    folder reached a second time (a link loop, or two links to one folder) is not
    scanned again. Images are the regular files with an image suffix (IMAGE_SUFFIXES,
    any case, dot-named files included), sorted. Skipped, each with a one-line
    reason: entries with an image suffix that are not regular files (a folder, a
    named pipe, a socket, a device), symbolic links that lead nowhere (dangling, a
    loop), links to a folder scanned already, and folders that cannot be read.
    Files without an image suffix are not images: left out without a word.
    Raises FileNotFoundError when `root` does not exist.
    """
    root = Path(root)
    try:
        status = os.stat(root)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{root}: no such file or directory") from error
    if stat.S_ISREG(status.st_mode):
        return [root], []
    if not stat.S_ISDIR(status.st_mode):
        raise InputError(f"{root}: neither an image file nor a folder ({_file_kind(status)})")
    images: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen = {(status.st_dev, status.st_ino): root}
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append((folder, f"cannot read folder ({error.strerror or error})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            image_name = path.suffix.lower() in IMAGE_SUFFIXES
            try:
                status = os.stat(entry.path)  # follows symbolic links
            except OSError as error:
                link = entry.is_symlink()
                if link and error.errno == errno.ELOOP:
                    skipped.append((path, "symbolic link loop"))
                elif link and error.errno == errno.ENOENT:
                    skipped.append((path, "dangling symbolic link"))
                elif link or image_name:
                    skipped.append((path, f"cannot stat ({error.strerror or error})"))
                continue
            if stat.S_ISDIR(status.st_mode):
                identity = (status.st_dev, status.st_ino)
                if identity in seen:
                    skipped.append((path, f"link to a folder scanned already ({seen[identity]})"))
                    continue
                seen[identity] = path
                if image_name:
                    skipped.append((path, "a folder, not an image file (its contents are scanned)"))
                pending.append(path)
            elif image_name:
                if stat.S_ISREG(status.st_mode):
                    images.append(path)
                else:
                    skipped.append((path, f"not a regular file ({_file_kind(status)})"))
    return sorted(images), sorted(skipped)


def _file_kind(status: os.stat_result) -> str:
    mode = status.st_mode
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root` (recursive, sorted), or [root] if it is a file.

    What `scan_images` skips is logged as a warning (one line each).
    """
    images, skipped = scan_images(root)
    for path, reason in skipped:
        logging.warning("skipped %r: %s", str(path), reason)
    return images
