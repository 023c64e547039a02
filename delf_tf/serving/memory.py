"""Memory of the dev server: decoded pixels bounded per request and per server, and the
allocator made to give memory back after a large request.

Extraction memory grows with the pixels an image decodes to (the image, its float
copies for the resize and the pyramid, the network's activations): per request,
the images' pixels are summed (serving_default: the sizes their headers declare, read
by Pillow, nothing decoded; extract_image: the image
tensor's height x width) and checked against `RequestLimits`:
- max_request_pixels: the sum over the request's images (INVALID_ARGUMENT above);
- max_aspect_ratio: long side / short side of each image (INVALID_ARGUMENT above): a
  1 x 80 000 000 image is under every pixel bound, but the resize to the size limits
  cannot make a usable image of it, and its degenerate resample costs ~200 bytes a pixel.
`PixelBudget` bounds the pixels of all running requests together (max_server_pixels):
a request that does not fit waits for running ones to finish, up to a timeout, and
then gets RESOURCE_EXHAUSTED (HTTP 429).

Memory return (measured in bench/soak.py): TF builds with oneDNN serve large CPU
tensors from a BFC allocator (MklCPUAllocator) that keeps every region it ever grew
to, so the peak of one large request stayed allocated for the life of the server.
`configure_allocator` (called by `LocalServer.start`, before a model is loaded) sets
TF_ONEDNN_USE_SYSTEM_ALLOCATOR=true, which sends those tensors to malloc (the oneDNN
kernels stay), and fixes glibc's mmap threshold (M_MMAP_THRESHOLD, which also stops
glibc from raising it after each large free), so every block of MMAP_THRESHOLD_BYTES
or more is mapped and unmapped on free; `release_memory` (malloc_trim) hands the
heaps' free pages back after a request of more than TRIM_AFTER_PIXELS pixels. The
environment variable is read once per process, at TF's first large allocation: a
process that ran TF before (the tests' in-process servers) keeps its allocator.
The glibc calls are no-ops where glibc is absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Iterator

import numpy as np

from delf_tf.contract import BATCH_INPUT, IMAGE_SIGNATURE, SERVING_SIGNATURE
from delf_tf.serving.errors import ServingError

SYSTEM_ALLOCATOR_ENV = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_AFTER_PIXELS = 1 << 20
TRIM_AFTER_BYTES = 1 << 20  # a request message at least this large: trimmed after it
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = library if hasattr(library, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def configure_allocator() -> bool:
    """TF's large CPU tensors from malloc, glibc's mmap threshold fixed (see the module
    docstring); whether glibc took the setting."""
    os.environ.setdefault(SYSTEM_ALLOCATOR_ENV, "true")
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_memory() -> bool:
    """Returns the free pages of malloc's heaps to the system (glibc malloc_trim)."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))


_pending_release: threading.Timer | None = None
_pending_lock = threading.Lock()


def release_memory_soon(delay: float = 0.2) -> None:
    """`release_memory` in `delay` seconds, once however often it is asked for meanwhile:
    after a large request, once its message (held by gRPC or the REST front end until
    the handler returns) is freed."""
    global _pending_release
    with _pending_lock:
        if _pending_release is not None and _pending_release.is_alive():
            return
        _pending_release = threading.Timer(delay, release_memory)
        _pending_release.daemon = True
        _pending_release.start()


class PixelBudget:
    """The decoded pixels of all running requests together, at most `capacity`."""

    def __init__(self, capacity: int, wait_seconds: float = 30.0):
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        self.in_use = 0
        self._condition = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, wait_seconds: float | None = None) -> Iterator[None]:
        """Holds `pixels` of the budget while the block runs; waits for them up to
        `wait_seconds` (default self.wait_seconds), then RESOURCE_EXHAUSTED."""
        pixels = min(int(pixels), self.capacity)  # one request alone always fits
        wait = self.wait_seconds if wait_seconds is None else wait_seconds
        deadline = time.monotonic() + max(wait, 0.0)
        with self._condition:
            while self.in_use + pixels > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServingError(
                        "RESOURCE_EXHAUSTED",
                        f"the server decodes {self.in_use} pixels for running requests; "
                        f"{pixels} more would pass its limit of {self.capacity} "
                        "(--max_server_pixels): retry later",
                    )
                self._condition.wait(left)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._condition:
                self.in_use -= pixels
                self._condition.notify_all()
        if pixels > TRIM_AFTER_PIXELS:
            release_memory()
            release_memory_soon()  # and again once the answer is sent


# The first bytes of the formats the served graph decodes (image_bytes.header_size).
_SERVED_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM")


def header_sizes(images: np.ndarray) -> np.ndarray:
    """int64 [B, 2]: (height, width) each encoded image's header declares, read by
    Pillow's lazy open (the header only, ~0.1 ms an image); (0, 0) for bytes of no
    served format or a header Pillow cannot read (the served graph's own reader,
    `delf_tf.extraction.image_bytes.header_size`, refuses those it cannot size too; a
    header that one reads and Pillow does not, if any, goes uncounted here and stays
    bounded by the export's per-image max_pixels). (serving does not import extraction:
    the packages import each other in one direction.)"""
    import io
    import warnings

    from PIL import Image

    flat = np.asarray(images, dtype=object).reshape(-1)
    sizes = np.zeros((flat.size, 2), np.int64)
    for number, data in enumerate(flat):
        data = bytes(data)
        served = data.startswith(_SERVED_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
        if not served:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
        except Exception:  # noqa: BLE001 - an unreadable header: not decoded by the graph
            continue
        sizes[number] = (height, width)
    return sizes


def image_sizes(signature_name: str, arrays: dict[str, np.ndarray], max_image_pixels: int):
    """int64 [N, 2]: (height, width) of the images a request decodes: serving_default's
    items whose header declares 1..max_image_pixels pixels (the others are not decoded),
    or extract_image's image. Other signatures: none."""
    if signature_name == SERVING_SIGNATURE and BATCH_INPUT in arrays:
        sizes = header_sizes(arrays[BATCH_INPUT])
        pixels = sizes[:, 0] * sizes[:, 1]
        return sizes[(pixels > 0) & (pixels <= max_image_pixels)]
    if signature_name == IMAGE_SIGNATURE and "image" in arrays:
        shape = np.shape(arrays["image"])
        return np.array([shape[:2]], np.int64) if len(shape) == 3 else np.zeros((0, 2), np.int64)
    return np.zeros((0, 2), np.int64)


def check_pixels(sizes: np.ndarray, max_request_pixels: int, max_aspect_ratio: float) -> int:
    """The request's decoded pixels; INVALID_ARGUMENT over max_request_pixels or for an
    image longer than max_aspect_ratio times its width (or the other way round)."""
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    total = int(np.sum(sizes[:, 0] * sizes[:, 1]))
    if total > max_request_pixels:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"the request's images decode to {total} pixels, over the server's limit of "
            f"{max_request_pixels} per request (--max_request_pixels); send fewer or "
            "smaller images",
        )
    for number, (height, width) in enumerate(sizes.tolist()):
        short, long = min(height, width), max(height, width)
        if long > max_aspect_ratio * max(short, 1):
            raise ServingError(
                "INVALID_ARGUMENT",
                f"image {number} is {height} x {width} pixels: its aspect ratio is over the "
                f"server's limit of {max_aspect_ratio:g} (--max_aspect_ratio)",
            )
    return total
