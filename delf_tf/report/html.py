"""Building blocks of self-contained HTML pages: escaped text, embedded pictures, one file.

A page is a single file that opens in any browser, offline, and can be copied or
mailed as it is: every picture is a base64 data URI (JPEG thumbnails, PNG
plots), the CSS is inline, and there is no script, font, frame or link to
fetch. A Content-Security-Policy meta tag (`CSP` below) makes the browser
refuse anything else, so a page cannot reach the network even by mistake.
Every text that comes from data (paths, ids, setup names) goes through `esc`.

Own code instead of a template engine: a few escaped f-strings need no
dependency, and the pages have no logic a template language would help with.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from delf_tf.atomic import atomic_write_text
from delf_tf.images import ImageError, load_image

# Thumbnails: long side in pixels and JPEG quality.
THUMB_SIZE = 160
THUMB_QUALITY = 80
# Larger embedded pictures (match drawings): JPEG quality.
PICTURE_QUALITY = 85
# No script, font, frame or remote resource: only inline styles and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

# Border colours of ranked results and their text labels (the label is always shown too,
# so the marking does not rely on colour alone).
COLORS = {
    "query": "#0969da",
    "positive": "#1a7f37",
    "junk": "#bf8700",
    "negative": "#cf222e",
    "neutral": "#8c959f",
}

BASE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 16px 24px;
  color: #1f2328; background: #fff; font-size: 14px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 24px 0 8px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.meta { color: #57606a; margin: 2px 0; overflow-wrap: anywhere; }
.bounds { color: #57606a; font-style: italic; margin: 6px 0; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f6f8fa; }
.row { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.card { width: 168px; border: 4px solid #8c959f; border-radius: 6px; padding: 4px; margin: 0;
  background: #fff; }
.card .pic { height: 160px; display: flex; align-items: center; justify-content: center; }
.card img { display: block; max-width: 160px; max-height: 160px; }
.card .label { font-weight: 600; margin-top: 3px; }
.card .stats { font-size: 12px; }
.card .caption { font-size: 11px; color: #57606a; overflow-wrap: break-word; margin-top: 2px; }
.card.self { border-style: dashed; }
.card .self-mark { font-size: 11px; font-weight: 600; color: #0969da; }
.banner { border: 2px solid #bf8700; background: #fff8c5; padding: 6px 10px; border-radius: 6px;
  margin: 8px 0; }
.query-card { border-color: #0969da; width: auto; min-width: 168px; max-width: 336px; }
.query-card .pic { height: auto; min-height: 160px; }
.query-card img { max-width: 320px; max-height: 320px; }
.placeholder { width: 156px; height: 116px; border: 2px dashed #8c959f; background: #f6f8fa;
  color: #57606a; font-size: 11px; display: flex; align-items: center; justify-content: center;
  text-align: center; overflow: hidden; overflow-wrap: anywhere; padding: 2px; }
.matches figure { margin: 8px 0 14px; }
.matches img { display: block; max-width: 100%; height: auto; border: 1px solid #d0d7de; }
.matches figcaption { font-size: 12px; color: #57606a; overflow-wrap: anywhere; }
.legend span { display: inline-block; border: 3px solid; border-radius: 4px; padding: 0 6px;
  margin-right: 8px; }
"""


def esc(value: object) -> str:
    """HTML-escaped text of `value` (quotes included: safe in text and attribute values)."""
    return html.escape(str(value), quote=True)


UNTRAINED_BANNER = (
    "Untrained weights: these features come from a randomly initialised model. Matches "
    "along image borders and between unrelated images are to be expected; they show the "
    "pipeline, not retrieval quality."
)


def untrained_banner() -> str:
    """The banner of a page whose features come from random weights."""
    return f'<p class="banner">{esc(UNTRAINED_BANNER)}</p>'


def path_text(path: object) -> str:
    """An escaped file path that breaks only after a "/" (never inside a name that fits)."""
    return "/<wbr>".join(esc(part) for part in str(path).split("/"))


def fmt(value: float | None, digits: int = 4) -> str:
    """A metric for display: fixed decimals, "n/a" for None or NaN."""
    if value is None or value != value:
        return "n/a"
    return f"{value:.{digits}f}"


@dataclasses.dataclass(frozen=True)
class Picture:
    """An embedded picture, or the reason there is none.

    Attributes:
      uri: "data:image/...;base64,..." or None when the image could not be made.
      width, height: pixel size of the embedded picture (0 without one).
      reason: why there is no picture (shown in a placeholder box), else None.
    """

    uri: str | None
    width: int = 0
    height: int = 0
    reason: str | None = None


def to_picture(
    image: np.ndarray | Image.Image,
    long_side: int | None = THUMB_SIZE,
    kind: str = "JPEG",
    quality: int = THUMB_QUALITY,
) -> Picture:
    """Embeds an image: uint8 [H, W, 3] RGB or a PIL image, shrunk to `long_side` (None: as is).

    JPEG for photographs (`quality`), PNG for drawings and plots (lossless).
    """
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    picture = picture.convert("RGB")
    if long_side is not None and max(picture.size) > long_side:
        picture = picture.copy()
        picture.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if kind == "JPEG":
        picture.save(buffer, format="JPEG", quality=quality, optimize=True)
        mime = "image/jpeg"
    elif kind == "PNG":
        picture.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    else:
        raise ValueError(f"unsupported picture format {kind!r}")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Picture(f"data:{mime};base64,{data}", picture.width, picture.height)


def missing(reason: str) -> Picture:
    return Picture(None, reason=reason)


class Thumbnails:
    """Thumbnails of image files, each made once (a database image recurs across rankings).

    Files are decoded with `delf_tf.images.load_image` (EXIF orientation, gray,
    16-bit and alpha handled as for extraction); a file that is missing or cannot
    be decoded gives a `Picture` without uri whose reason is the decoder's message.
    """

    def __init__(self, long_side: int = THUMB_SIZE, quality: int = THUMB_QUALITY):
        self.long_side = long_side
        self.quality = quality
        self._cache: dict[str, Picture] = {}

    def of_file(self, path: str | os.PathLike | None) -> Picture:
        if path is None:
            return missing("no image file recorded")
        key = str(path)
        if key not in self._cache:
            try:
                image = load_image(key)
            except (ImageError, OSError) as error:
                self._cache[key] = missing(f"image unavailable: {error_reason(error, key)}")
            else:
                self._cache[key] = self.of_array(image)
        return self._cache[key]

    def of_array(self, image: np.ndarray, long_side: int | None = None) -> Picture:
        """Thumbnail of uint8 [H, W, 3] RGB pixels (long side `long_side` or the default)."""
        return to_picture(image, long_side or self.long_side, "JPEG", self.quality)


def error_reason(error: Exception, path: str | os.PathLike) -> str:
    """An error's message without the leading "<path>: " (the caption shows the path)."""
    message = str(error)
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def img(picture: Picture, alt: str, title: str | None = None) -> str:
    """An <img> of `picture`, or a placeholder box with the reason (never a broken <img>)."""
    title_attr = f' title="{esc(title)}"' if title else ""
    if picture.uri is None:
        reason = picture.reason or "no picture"
        return (
            f'<div class="placeholder" role="img" aria-label="{esc(alt)}: {esc(reason)}"'
            f"{title_attr}>{esc(reason)}</div>"
        )
    return (
        f'<img src="{picture.uri}" width="{picture.width}" height="{picture.height}" '
        f'alt="{esc(alt)}"{title_attr}>'
    )


def page(title: str, body: str, css: str = "") -> str:
    """A complete HTML document: `body` (already escaped HTML) under an escaped `title`."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{esc(title)}</title>\n"
        f"<style>{BASE_CSS}{css}</style>\n"
        f"</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_page(path: str | os.PathLike, text: str) -> Path:
    """Writes a page atomically (UTF-8); returns its path."""
    atomic_write_text(path, text)
    return Path(path)
