"""In-graph decoding of encoded images, the served counterpart of `delf_tf.images`.

Standard TF ops only (string slicing, `decode_raw`, `decode_jpeg`, `decode_image`,
`tf.data`, `tf.image` flips and rotations), so TF Serving runs it as it is. It
accepts exactly the formats `delf_tf.images.decode_image` accepts
(`delf_tf.images.SERVED_FORMATS`) and gives the same pixels for the same bytes:
- JPEG is decoded with `dct_method="INTEGER_ACCURATE"` (libjpeg's ISLOW, what
  Pillow uses; TF's default INTEGER_FAST differs by a few grey levels);
- PNG, GIF (the first frame of an animated one), BMP (uncompressed 24 / 32 bit)
  and WebP (still, lossy or lossless) through `decode_image`;
- the EXIF orientation tag (0x0112 of IFD0, from a JPEG APP1 "Exif" segment, a
  PNG eXIf chunk or a WebP EXIF chunk) is parsed from the bytes and applied as
  Pillow's `ImageOps.exif_transpose` does;
- grey and palette images become RGB, an alpha channel is dropped (colour kept);
  transparent pixels of a GIF are black (TF's GIF decoder; the loader does the same).
Refused in both paths: other formats (TIFF, JPEG XL, ...), animated WebP, BMPs
of other bit depths or compressions. Differences that remain: 16-bit PNGs keep
the high byte (Pillow rounds v / 257, at most one grey level apart); an
orientation given only in XMP is ignored (Pillow reads it).

`decode_image_bytes` fails (InvalidArgumentError) on refused formats, images over
`max_pixels` (read from the header, before any decoding) and corrupt data.
`decode_batch` gives per-item validity instead: the header checks run in the
graph, and decoding runs inside a `tf.data` pipeline with `ignore_errors`, the
one standard way to survive a kernel error, so a corrupt image never fails the
other images of its batch. (The pipeline's map function is the decode step
alone: `tf.data` re-instantiates it per request, which costs a few milliseconds
per op, so the header walks stay outside it.)
"""

from __future__ import annotations

import tensorflow as tf

from delf_tf.images import DEFAULT_MAX_PIXELS, EXIF_ORIENTATION_TAG

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GIF_MAGIC = b"GIF8"
BMP_MAGIC = b"BM"
RIFF_MAGIC = b"RIFF"
WEBP_MAGIC = b"WEBP"  # at byte 8 of a RIFF file
# Bounds on the header walks (segments / chunks / IFD entries looked at).
MAX_SEGMENTS = 64
MAX_IFD_ENTRIES = 256


def _read(data: tf.Tensor, position: tf.Tensor, length: int) -> tf.Tensor:
    """`length` bytes of string `data` from `position` as int32 [length], zero-padded past the end."""
    size = tf.strings.length(data)
    position = tf.clip_by_value(tf.cast(position, tf.int32), 0, size)
    values = tf.io.decode_raw(tf.strings.substr(data, position, length), tf.uint8)
    values = tf.cast(tf.reshape(values, [-1]), tf.int32)
    return tf.pad(values, [[0, length - tf.shape(values)[0]]])


def _uint16(pair: tf.Tensor, little_endian: tf.Tensor) -> tf.Tensor:
    """int32 [..., 2] bytes -> int32 [...] unsigned 16-bit value."""
    return tf.where(
        little_endian, pair[..., 0] + 256 * pair[..., 1], 256 * pair[..., 0] + pair[..., 1]
    )


def _uint32(quad: tf.Tensor, little_endian: tf.Tensor) -> tf.Tensor:
    """int32 [4] bytes -> int64 [] unsigned 32-bit value."""
    quad = tf.cast(quad, tf.int64)
    weights = tf.constant([1, 1 << 8, 1 << 16, 1 << 24], tf.int64)
    return tf.reduce_sum(quad * tf.where(little_endian, weights, tf.reverse(weights, [0])))


def _starts_with(data: tf.Tensor, magic: bytes) -> tf.Tensor:
    return tf.equal(tf.strings.substr(data, 0, len(magic)), magic)


def _tiff_orientation(data: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
    """Orientation (int32 []) of the TIFF structure at byte `start`; 1 when absent."""
    header = _read(data, start, 8)
    little = tf.reduce_all(tf.equal(header[:2], [0x49, 0x49]))  # "II"
    big = tf.reduce_all(tf.equal(header[:2], [0x4D, 0x4D]))  # "MM"
    ifd = tf.cast(start, tf.int64) + _uint32(header[4:8], little)
    ifd = tf.cast(tf.minimum(ifd, tf.int32.max - 16), tf.int32)
    count = tf.minimum(_uint16(_read(data, ifd, 2), little), MAX_IFD_ENTRIES)
    entries = tf.reshape(_read(data, ifd + 2, 12 * MAX_IFD_ENTRIES), [MAX_IFD_ENTRIES, 12])
    entries = entries[:count]
    tags = _uint16(entries[:, 0:2], little)
    match = tf.where(tf.equal(tags, EXIF_ORIENTATION_TAG))[:, 0]
    found = (little | big) & (tf.size(match) > 0)
    entry = tf.cond(found, lambda: entries[match[0]], lambda: tf.zeros([12], tf.int32))
    # SHORT (type 3) is the only type the standard allows; LONG (4) is read too.
    value_type = _uint16(entry[2:4], little)
    value = tf.where(
        tf.equal(value_type, 4),
        tf.cast(tf.minimum(_uint32(entry[8:12], little), 1 << 16), tf.int32),
        _uint16(entry[8:10], little),
    )
    return tf.where(found, value, 1)


def _jpeg_walk(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Walks the JPEG segments up to SOS.

    Returns (exif_start int32 []: byte offset of the TIFF header of the first APP1
    "Exif" segment, or -1; size int64 [2]: (height, width) of the first SOF
    segment, or zeros).
    """
    data_size = tf.strings.length(data)

    def step(i, position, start, size):
        header = _read(data, position, 4)
        marker = header[1]
        standalone = (marker == 0x01) | ((marker >= 0xD0) & (marker <= 0xD7)) | (marker == 0xFF)
        length = 256 * header[2] + header[3]
        is_exif = (
            (start < 0)
            & (marker == 0xE1)
            & tf.reduce_all(
                tf.equal(_read(data, position + 4, 6), [0x45, 0x78, 0x69, 0x66, 0, 0])  # Exif\0\0
            )
        )
        start = tf.where(is_exif, position + 10, start)
        # Start of frame: C0-CF except C4 (DHT), C8 (JPG), CC (DAC).
        is_frame = ((marker >= 0xC0) & (marker <= 0xCF) & (marker != 0xC4) & (marker != 0xC8)) & (
            marker != 0xCC
        )
        dims = _read(data, position + 5, 4)
        frame = tf.cast(tf.stack([256 * dims[0] + dims[1], 256 * dims[2] + dims[3]]), tf.int64)
        size = tf.where(is_frame & tf.reduce_all(tf.equal(size, 0)), frame, size)
        stop = (header[0] != 0xFF) | (marker == 0xDA) | (marker == 0xD9)  # SOS, EOI
        advance = tf.where(marker == 0xFF, 1, tf.where(standalone, 2, 2 + length))
        position = tf.where(stop, data_size, position + advance)
        return i + 1, position, start, size

    _, _, start, size = tf.while_loop(
        lambda i, position, start, size: (i < MAX_SEGMENTS) & (position + 4 <= data_size),
        step,
        (tf.constant(0), tf.constant(2), tf.constant(-1), tf.zeros([2], tf.int64)),
    )
    return start, size


def _png_exif_start(data: tf.Tensor) -> tf.Tensor:
    """Byte offset of the data of the first eXIf chunk before IDAT, or -1."""
    size = tf.strings.length(data)
    big_endian = tf.constant(False)

    def step(i, position, start):
        header = _read(data, position, 8)
        length = _uint32(header[:4], big_endian)
        kind = header[4:8]
        is_exif = tf.reduce_all(tf.equal(kind, [0x65, 0x58, 0x49, 0x66]))  # eXIf
        stop = tf.reduce_all(tf.equal(kind, [0x49, 0x44, 0x41, 0x54])) | tf.reduce_all(
            tf.equal(kind, [0x49, 0x45, 0x4E, 0x44])
        )  # IDAT, IEND
        start = tf.where(is_exif, position + 8, start)
        following = tf.cast(position, tf.int64) + 12 + length
        position = tf.where(
            stop | is_exif, size, tf.cast(tf.minimum(following, tf.cast(size, tf.int64)), tf.int32)
        )
        return i + 1, position, start

    _, _, start = tf.while_loop(
        lambda i, position, start: (i < MAX_SEGMENTS) & (position + 8 <= size),
        step,
        (tf.constant(0), tf.constant(8), tf.constant(-1)),
    )
    return start


def _substr(data: tf.Tensor, position: int, length: int) -> tf.Tensor:
    """`length` bytes from `position`, shorter (or empty) past the end; never an error."""
    return tf.strings.substr(data, tf.minimum(position, tf.strings.length(data)), length)


def _is_webp(data: tf.Tensor) -> tf.Tensor:
    return _starts_with(data, RIFF_MAGIC) & tf.equal(_substr(data, 8, 4), WEBP_MAGIC)


def _webp_exif_start(data: tf.Tensor) -> tf.Tensor:
    """Byte offset of the TIFF header in the first EXIF chunk of a WebP (RIFF) file, or -1."""
    size = tf.strings.length(data)
    little = tf.constant(True)

    def step(i, position, start):
        header = _read(data, position, 8)
        length = _uint32(header[4:8], little)
        is_exif = tf.reduce_all(tf.equal(header[:4], [0x45, 0x58, 0x49, 0x46]))  # EXIF
        # Some writers keep the JPEG "Exif\0\0" prefix in the chunk (Pillow skips it).
        prefixed = tf.reduce_all(
            tf.equal(_read(data, position + 8, 6), [0x45, 0x78, 0x69, 0x66, 0, 0])
        )
        start = tf.where(is_exif, position + 8 + tf.where(prefixed, 6, 0), start)
        following = tf.cast(position, tf.int64) + 8 + length + length % 2  # padded to even
        position = tf.where(
            is_exif, size, tf.cast(tf.minimum(following, tf.cast(size, tf.int64)), tf.int32)
        )
        return i + 1, position, start

    _, _, start = tf.while_loop(
        lambda i, position, start: (i < MAX_SEGMENTS) & (position + 8 <= size),
        step,
        (tf.constant(0), tf.constant(12), tf.constant(-1)),
    )
    return start


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """EXIF orientation (int32 [], 1..8; 1 when absent) of encoded JPEG, PNG or WebP bytes."""
    data = tf.convert_to_tensor(data, tf.string)
    start = tf.case(
        [
            (_starts_with(data, JPEG_MAGIC), lambda: _jpeg_walk(data)[0]),
            (_starts_with(data, PNG_MAGIC), lambda: _png_exif_start(data)),
            (_is_webp(data), lambda: _webp_exif_start(data)),
        ],
        default=lambda: tf.constant(-1),
    )
    return tf.cond(start >= 0, lambda: _tiff_orientation(data, start), lambda: tf.constant(1))


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Transposes image [H, W, C] as Pillow's `ImageOps.exif_transpose` does for `orientation`."""
    branches = [
        lambda: image,  # 1 (and any unknown value): as stored
        lambda: tf.image.flip_left_right(image),  # 2
        lambda: tf.image.rot90(image, k=2),  # 3
        lambda: tf.image.flip_up_down(image),  # 4
        lambda: tf.image.transpose(image),  # 5
        lambda: tf.image.rot90(image, k=3),  # 6: 90 degrees clockwise
        lambda: tf.image.rot90(tf.image.transpose(image), k=2),  # 7
        lambda: tf.image.rot90(image, k=1),  # 8: 90 degrees anticlockwise
    ]
    index = tf.where((orientation >= 1) & (orientation <= 8), orientation - 1, 0)
    return tf.switch_case(index, branches)


def header_size(data: tf.Tensor) -> tf.Tensor:
    """(height, width) int64 [2] from the header, without decoding; (0, 0) if unknown.

    Never fails, whatever the bytes: every read is bounds-checked.
    """
    big = tf.constant(False)

    def png():  # IHDR: width, height as big-endian uint32 at bytes 16..24
        return tf.stack([_uint32(_read(data, 20, 4), big), _uint32(_read(data, 16, 4), big)])

    def gif():  # logical screen: width, height as little-endian uint16 at bytes 6..10
        size = _read(data, 6, 4)
        little = tf.constant(True)
        return tf.cast(tf.stack([_uint16(size[2:4], little), _uint16(size[0:2], little)]), tf.int64)

    def bmp():
        # BITMAPINFOHEADER or later (size >= 40): width, height int32 at 18, 22 (a negative
        # height is a top-down image), bits per pixel uint16 at 28, compression uint32 at 30.
        # TF's BMP decoder reads 24 / 32-bit BI_RGB pixels only (it ignores palettes and
        # masks), so any other BMP counts as unknown here.
        little = tf.constant(True)
        fields = _read(data, 14, 20)
        info_size = _uint32(fields[0:4], little)
        width = _uint32(fields[4:8], little)
        height = _uint32(fields[8:12], little)
        height = tf.where(height >= 1 << 31, (1 << 32) - height, height)
        bits = _uint16(fields[14:16], little)
        compression = _uint32(fields[16:20], little)
        supported = (info_size >= 40) & ((bits == 24) | (bits == 32)) & (compression == 0)
        supported &= width < 1 << 31
        return tf.where(supported, tf.stack([height, width]), tf.zeros([2], tf.int64))

    def webp():
        # The first chunk: "VP8 " (lossy: 14-bit sizes at 26, 28), "VP8L" (lossless: 14-bit
        # sizes - 1 packed after the 0x2f byte at 20) or "VP8X" (extended: 24-bit canvas
        # sizes - 1 at 24, 27; flag 0x02 = animation, which is refused).
        little = tf.constant(True)
        kind = _substr(data, 12, 4)
        head = _read(data, 20, 10)
        lossy = tf.stack([_uint16(head[8:10], little), _uint16(head[6:8], little)]) % (1 << 14)
        bits = _uint32(head[1:5], little)
        lossless = tf.stack([(bits // (1 << 14)) % (1 << 14) + 1, bits % (1 << 14) + 1])
        canvas = tf.stack(
            [
                head[7] + 256 * head[8] + 65536 * head[9] + 1,
                head[4] + 256 * head[5] + 65536 * head[6] + 1,
            ]
        )
        animated = tf.bitwise.bitwise_and(head[0], 2) > 0
        complete = tf.strings.length(data) >= 30  # the size fields are all there
        return tf.case(
            [
                (
                    complete
                    & tf.equal(kind, b"VP8 ")
                    & tf.reduce_all(tf.equal(head[3:6], [0x9D, 0x01, 0x2A])),
                    lambda: tf.cast(lossy, tf.int64),
                ),
                (complete & tf.equal(kind, b"VP8L") & tf.equal(head[0], 0x2F), lambda: lossless),
                (complete & tf.equal(kind, b"VP8X") & ~animated, lambda: tf.cast(canvas, tf.int64)),
            ],
            default=lambda: tf.zeros([2], tf.int64),
        )

    return tf.case(
        [
            (_starts_with(data, JPEG_MAGIC), lambda: _jpeg_walk(data)[1]),
            (_starts_with(data, PNG_MAGIC), png),
            (_starts_with(data, GIF_MAGIC), gif),
            (_starts_with(data, BMP_MAGIC), bmp),
            (_is_webp(data), webp),
        ],
        default=lambda: tf.zeros([2], tf.int64),
    )


def acceptable(data: tf.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """bool []: a header of a served format (`delf_tf.images.SERVED_FORMATS`) declaring
    1 .. max_pixels pixels (nothing decoded)."""
    size = header_size(data)
    pixels = size[0] * size[1]
    return (pixels > 0) & (pixels <= max_pixels)


# decode_image's channel counts (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) -> RGB channels.
_RGB_CHANNELS = ((0, 0, 0), (0, 0, 0), (0, 1, 2), (0, 1, 2))


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, C] with C = 1 (grey), 2 (grey + alpha), 3 or 4 (RGBA) -> uint8 [H, W, 3]:
    grey repeated, alpha dropped (colour kept), as Pillow's convert("RGB") does."""
    table = tf.constant(_RGB_CHANNELS, tf.int32)
    return tf.gather(image, table[tf.shape(image)[2] - 1], axis=2)


def _decode_jpeg(data: tf.Tensor) -> tf.Tensor:
    """JPEG string [] -> uint8 [H, W, 3] with libjpeg's accurate DCT (as Pillow)."""
    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")


def _decode_other(data: tf.Tensor) -> tf.Tensor:
    """PNG / GIF / BMP / WebP string [] -> uint8 [H, W, C] in the file's own channels (WebP
    refuses any other count; C in 1..4), the first frame of an animation."""
    return tf.io.decode_image(data, channels=0, expand_animations=False)


def _decode(data: tf.Tensor) -> tf.Tensor:
    """An image of a served format, string [] -> uint8 [H, W, 3] as stored (no orientation)."""
    return tf.cond(
        _starts_with(data, JPEG_MAGIC),
        lambda: _decode_jpeg(data),
        lambda: to_rgb(_decode_other(data)),
    )


def decode_image_bytes(data: tf.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """Encoded image string [] (a served format) -> RGB uint8 [H, W, 3], orientation applied.

    Raises InvalidArgumentError (at run time) for other formats, images of more than
    `max_pixels` pixels (checked before decoding) and corrupt or truncated data.
    """
    data = tf.convert_to_tensor(data, tf.string)
    check = tf.debugging.Assert(
        acceptable(data, max_pixels),
        [
            "not a JPEG, PNG, GIF, BMP (24/32-bit) or still WebP image, or height x width "
            "is 0 or over",
            max_pixels,
        ],
    )
    with tf.control_dependencies([check]):
        image = tf.ensure_shape(_decode(data), [None, None, 3])
    return apply_orientation(image, exif_orientation(data))


def decode_batch(images: tf.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decodes encoded images string [B], skipping those that cannot be decoded.

    Returns (indices int32 [M], pixels uint8 [sum of H*W*C], shapes int32 [M, 3]): the
    items that decoded (JPEGs first, otherwise in order), their pixels as stored,
    flattened one after the other, in C = 1..4 channels: an item is
    `to_rgb(reshape(pixels[offset:offset + H*W*C], [H, W, C]))`, then
    `apply_orientation(image, exif_orientation(images[index]))`. Items failing
    `acceptable` are not decoded at all; decoding errors drop the item (`tf.data`
    `ignore_errors`) instead of failing the batch.

    Two pipelines of one decode op each (JPEG with Pillow's DCT, the other formats with
    `decode_image`) rather than one with a `tf.cond`: `tf.data` instantiates its functions
    for every request, and a cond costs ~15 ms there; graph rewrites of the pipeline are
    turned off for the same reason (a few ms, nothing to gain on a handful of items).
    """
    ok = tf.map_fn(lambda data: acceptable(data, max_pixels), images, fn_output_signature=tf.bool)
    is_jpeg = tf.equal(tf.strings.substr(images, 0, len(JPEG_MAGIC)), JPEG_MAGIC)
    indices = tf.range(tf.shape(images)[0])

    def pipeline(selected, decode_fn):
        def decode(index, data):
            image = decode_fn(data)
            return index, tf.reshape(image, [-1]), tf.shape(image)

        chosen = ok & selected  # the others are not decoded at all
        dataset = tf.data.Dataset.from_tensor_slices(
            (tf.boolean_mask(indices, chosen), tf.boolean_mask(images, chosen))
        )
        return dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def append(state, item):
        return tuple(
            tf.concat([state[k], part], axis=0)
            for k, part in enumerate((item[0][None], item[1], item[2][None]))
        )

    dataset = pipeline(is_jpeg, _decode_jpeg).concatenate(pipeline(~is_jpeg, _decode_other))
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    dataset = dataset.with_options(options)
    initial = (tf.zeros([0], tf.int32), tf.zeros([0], tf.uint8), tf.zeros([0, 3], tf.int32))
    return dataset.ignore_errors().reduce(initial, append)
