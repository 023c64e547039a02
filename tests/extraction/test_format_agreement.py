"""One decoding rule (issue 12): the in-process loader (Pillow) and the served graph accept the
same image formats and give the same pixels; what one refuses, the other refuses too."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from delf_tf.contract import BATCH_INPUT, SERVING_SIGNATURE
from delf_tf.extraction.image_bytes import (
    apply_orientation,
    decode_batch,
    exif_orientation,
    to_rgb,
)
from delf_tf.images import ImageError, decode_image


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def samples(astronaut_small) -> dict[str, tuple[bytes, bool]]:
    """name -> (encoded bytes made here with Pillow, whether both paths must accept it)."""
    rgb = astronaut_small[:40, :56]
    image = Image.fromarray(rgb)
    alpha = Image.fromarray(
        np.dstack([rgb, np.linspace(0, 255, 56, dtype=np.uint8)[None].repeat(40, 0)])
    )
    palette = image.quantize(32)
    flipped = Image.fromarray(rgb[::-1]).quantize(32)
    rotated = Image.Exif()
    rotated[0x0112] = 6
    return {
        "jpeg": (_save(image, "JPEG", quality=90), True),
        "jpeg_exif_rotated": (_save(image, "JPEG", quality=90, exif=rotated.tobytes()), True),
        "jpeg_gray": (_save(image.convert("L"), "JPEG"), True),
        "jpeg_cmyk": (_save(image.convert("CMYK"), "JPEG"), True),
        "png": (_save(image, "PNG"), True),
        "png_rgba": (_save(alpha, "PNG"), True),
        "png_palette": (_save(palette, "PNG"), True),
        "gif": (_save(palette, "GIF"), True),
        "gif_transparent": (_save(palette, "GIF", transparency=3), True),
        "gif_animated": (
            _save(palette, "GIF", save_all=True, append_images=[flipped], duration=50, loop=0),
            True,
        ),
        "bmp": (_save(image, "BMP"), True),
        "bmp_32": (_save(alpha, "BMP"), True),
        "bmp_8bit_palette": (_save(palette, "BMP"), False),
        "bmp_1bit": (_save(image.convert("1"), "BMP"), False),
        "webp": (_save(image, "WEBP", quality=80), True),
        "webp_lossless": (_save(image, "WEBP", lossless=True), True),
        "webp_alpha": (_save(alpha, "WEBP", quality=80), True),
        "webp_exif_rotated": (_save(image, "WEBP", lossless=True, exif=rotated.tobytes()), True),
        "webp_animated": (
            _save(image, "WEBP", save_all=True, append_images=[Image.fromarray(rgb[::-1])]),
            False,
        ),
        "tiff": (_save(image, "TIFF"), False),
        "ppm": (_save(image, "PPM"), False),
        "ico": (_save(image, "ICO"), False),
        "truncated_png": (_save(image, "PNG")[:200], False),
    }


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def served_decode(images):
    """What serving_default does before the network: (indices [M], RGB images of those)."""
    indices, pixels, shapes = decode_batch(images)
    sizes = tf.reduce_prod(shapes, axis=1)
    offsets = tf.cumsum(sizes, exclusive=True)
    return (
        indices,
        pixels,
        shapes,
        offsets,
        tf.map_fn(exif_orientation, images, fn_output_signature=tf.int32),
    )


def served_images(data: list[bytes]) -> list[np.ndarray | None]:
    indices, pixels, shapes, offsets, orientations = (
        t.numpy() for t in served_decode(tf.constant(data))
    )
    out: list[np.ndarray | None] = [None] * len(data)
    for row, index in enumerate(indices):
        stored = pixels[offsets[row] : offsets[row] + np.prod(shapes[row])].reshape(shapes[row])
        out[index] = apply_orientation(to_rgb(tf.constant(stored)), orientations[index]).numpy()
    return out


def test_in_process_and_served_decoding_agree(samples):
    names = list(samples)
    served = served_images([samples[name][0] for name in names])
    for name, result in zip(names, served, strict=True):
        data, accepted = samples[name]
        try:
            local = decode_image(data, name=name)
        except ImageError as error:
            local = None
            assert name in str(error)
        assert (local is not None) == accepted, (
            f"{name}: in-process {'accepts' if local is not None else 'refuses'}"
        )
        assert (result is not None) == accepted, (
            f"{name}: served {'accepts' if result is not None else 'refuses'}"
        )
        if accepted:
            assert result.shape == local.shape, name
            np.testing.assert_array_equal(result, local, err_msg=name)


def test_refusals_name_the_file_and_format(samples):
    with pytest.raises(ImageError, match=r"^photo\.tif: TIFF images are not supported.*JPEG, PNG"):
        decode_image(samples["tiff"][0], name="photo.tif")
    with pytest.raises(ImageError, match="animated WebP"):
        decode_image(samples["webp_animated"][0], name="a.webp")
    with pytest.raises(ImageError, match="BMP with 8 bits per pixel"):
        decode_image(samples["bmp_8bit_palette"][0], name="a.bmp")
    # Tools that re-encode (the TFRecord writer) may still read every Pillow format.
    assert decode_image(samples["tiff"][0], servable_only=False).shape == (40, 56, 3)


def test_dev_server_reports_the_same_validity(local_server, samples):
    """The exported model behind `delf serve` flags exactly the refused files as invalid."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    names = list(samples)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "delf"
    request.model_spec.signature_name = SERVING_SIGNATURE
    request.inputs[BATCH_INPUT].CopyFrom(
        tf.make_tensor_proto(np.array([samples[name][0] for name in names], dtype=object))
    )
    options = [("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(local_server.addresses()["grpc"], options=options) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=120
        )
    valid = tf.make_ndarray(response.outputs["valid"]).tolist()
    assert dict(zip(names, valid, strict=True)) == {name: samples[name][1] for name in names}
