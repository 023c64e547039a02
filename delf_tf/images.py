"""Robust image decoding to RGB uint8 [H, W, 3].

JPEG, PNG, BMP, TIFF, WebP and GIF (first frame) through Pillow. EXIF
orientation is applied. Grayscale, palette, CMYK and 16-bit inputs are converted
to 8-bit RGB; an alpha channel is dropped (the colour values are kept as they
are, as `tf.io.decode_png(channels=3)` does, so the served model sees the same
pixels). Every failure raises ImageError naming the file.
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
EXIF_ORIENTATION_TAG = 0x0112
# Orientations whose display swaps width and height (rotated by 90 or 270 degrees).
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


class ImageError(InputError):
    """An image could not be decoded; the message starts with the file's name."""


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Reads and decodes an image file to uint8 [H, W, 3] RGB (EXIF orientation applied)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageError(f"{path}: cannot read file ({error.strerror})") from error
    return decode_image(data, name=str(path), max_pixels=max_pixels)


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decodes encoded image bytes to uint8 [H, W, 3] RGB; `name` appears in errors."""
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
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb_uint8(image)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageError(f"{name}: truncated or corrupt image data ({error})") from error


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation (1..8) of an opened image, read from its header; 1 when absent."""
    return int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
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
