"""Export the one extraction graph as a SavedModel that TF Serving serves as it is.

Layout: `<export_base>/<model_name>/<version>/` with saved_model.pb, variables/ and
assets/extraction_config.json (the ExtractionConfig, the fingerprint, the
descriptor size: what `InProcessExtractor.from_saved_model` and the serving
client read). Signatures (method `tensorflow/serving/predict`), both calling
`ExtractionModule.extract`, the same traced function that runs in process:

`serving_default` (batchable: every input and output has the batch dimension first)
  image_bytes: string [B], encoded JPEG / PNG / GIF / BMP / still WebP (EXIF
    orientation applied in the graph, see `delf_tf.extraction.image_bytes`).
  -> keypoints float32 [B, K, 2], scales float32 [B, K], scores float32 [B, K],
     descriptors float32 [B, K, D], zero-padded past num_features;
     num_features int32 [B]; valid bool [B]: False for an image that could not be
     decoded (unknown format, corrupt, over the pixel limit), which then has zero
     features while the other items of the batch are extracted as usual;
     fingerprint string [B]: the descriptor-space identity, the same in every row.
  K = max_features of the export's ExtractionConfig, whose threshold and scales apply.

`extract_image` (one raw image per call, not batchable)
  image: uint8 [H, W, 3] RGB; max_features int32 []; score_threshold float32 [];
  scales float32 [S]. The last three have defaults, the config's values, recorded
  in SignatureDef.defaults: TF Serving builds whose Predict honours them, and
  `delf serve`, let a request send `image` alone; older TF Serving builds need all
  four (the delf client always sends all four, filling them from the metadata).
  -> keypoints float32 [N, 2], scales float32 [N], scores float32 [N],
     descriptors float32 [N, D], fingerprint string [].
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from delf_tf.atomic import staged_directory
from delf_tf.config import ExtractionConfig
from delf_tf.contract import (
    BATCH_INPUT,
    EXPORT_FORMAT_VERSION,
    EXPORT_INFO_ASSET,
    FEATURE_OUTPUTS,
    FORBIDDEN_OPS,
    GLOBAL_OUTPUT,
    IMAGE_SIGNATURE,
    SERVING_SIGNATURE,
    SIGNATURES,
    WARMUP_FILE,
    next_version,
)
from delf_tf.errors import InputError
from delf_tf.extraction.graph import EXTRACT_SIGNATURE, ExtractionModule
from delf_tf.extraction.image_bytes import (
    apply_orientation,
    decode_batch,
    exif_orientation,
    to_rgb,
)
from delf_tf.extraction.pca import PcaParams
from delf_tf.images import DEFAULT_MAX_PIXELS, encode_png
from delf_tf.locks import writer_lock
from delf_tf.model.delf import DelfModel
from delf_tf.serving.saved_model_proto import graph_ops, uses_xla

__all__ = ["ServingModule", "export_model", "export_saved_model"]


class ServingModule(tf.Module):
    """What is saved: the ExtractionModule plus the two serving signatures.

    `extract` is `ExtractionModule.extract` itself (kept under that name for
    `InProcessExtractor.from_saved_model`); the signatures call it per image.
    """

    def __init__(self, extraction: ExtractionModule, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(name="delf_serving")
        self.extraction = extraction
        self.extract = extraction.extract
        self.max_pixels = max_pixels
        config = extraction.config
        self._fingerprint = tf.constant(extraction.fingerprint)
        self._max_features = tf.constant(config.max_features, tf.int32)
        self._threshold = tf.constant(config.score_threshold, tf.float32)
        self._scales = tf.constant(config.scales, tf.float32)
        self.serve_image_bytes = tf.function(
            self._serve_image_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name=BATCH_INPUT)],
            autograph=False,
        )
        defaults = extraction.default_arguments()

        def extract_image(
            image,
            max_features=defaults["max_features"],
            score_threshold=defaults["score_threshold"],
            scales=defaults["scales"],
        ):
            outputs = dict(extraction.extract(image, max_features, score_threshold, scales))
            outputs["fingerprint"] = tf.identity(self._fingerprint)
            return outputs

        self.extract_image = tf.function(
            extract_image,
            input_signature=EXTRACT_SIGNATURE,
            autograph=False,
        )

    def _serve_image_bytes(self, image_bytes):
        """string [B] -> padded features [B, K, ...], num_features, valid, fingerprint [B]
        (+ global_descriptor [B, G] for a model with a global head)."""
        batch = tf.shape(image_bytes)[0]
        k = self.extraction.config.max_features
        depth = self.extraction.descriptor_dim
        names = FEATURE_OUTPUTS + ("num_features",)
        element_shapes = ([k, 2], [k], [k], [k, depth], [])
        dtypes = (tf.float32,) * 4 + (tf.int32,)
        if self.extraction.global_dim is not None:
            names += (GLOBAL_OUTPUT,)
            element_shapes += ([self.extraction.global_dim],)
            dtypes += (tf.float32,)
        indices, pixels, shapes = decode_batch(image_bytes, self.max_pixels)
        sizes = tf.reduce_prod(tf.cast(shapes, tf.int64), axis=1)  # a batch may pass 2**31 bytes
        offsets = tf.cumsum(sizes, exclusive=True)
        count = tf.shape(indices)[0]

        def one_image(i, *arrays):
            image = to_rgb(tf.reshape(pixels[offsets[i] : offsets[i] + sizes[i]], shapes[i]))
            image = apply_orientation(image, exif_orientation(image_bytes[indices[i]]))
            found = self.extraction.extract(
                image, self._max_features, self._threshold, self._scales
            )
            n = tf.shape(found["scores"])[0]
            padded = (
                tf.pad(found["keypoints"], [[0, k - n], [0, 0]]),
                tf.pad(found["scales"], [[0, k - n]]),
                tf.pad(found["scores"], [[0, k - n]]),
                tf.pad(found["descriptors"], [[0, k - n], [0, 0]]),
                n,
            )
            if GLOBAL_OUTPUT in names:
                padded += (found[GLOBAL_OUTPUT],)
            return (i + 1,) + tuple(a.write(i, p) for a, p in zip(arrays, padded, strict=True))

        arrays = tuple(
            tf.TensorArray(dtype, size=count, element_shape=shape)
            for dtype, shape in zip(dtypes, element_shapes, strict=True)
        )
        _, *arrays = tf.while_loop(lambda i, *_: i < count, one_image, (tf.constant(0),) + arrays)
        where = indices[:, None]
        stacked = [a.stack() for a in arrays]
        outputs = {
            name: tf.scatter_nd(where, value, tf.concat([[batch], tf.constant(shape, tf.int32)], 0))
            for name, value, shape in zip(names, stacked, element_shapes, strict=True)
        }
        outputs["valid"] = tf.scatter_nd(where, tf.ones([count], tf.int32), [batch]) > 0
        outputs["fingerprint"] = tf.fill([batch], self._fingerprint)
        return outputs


def export_saved_model(
    extraction: ExtractionModule,
    export_base: str | os.PathLike,
    model_name: str = "delf",
    version: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Path:
    """Writes `<export_base>/<model_name>/<version>/` and returns that path.

    version: default one above the highest existing (1 for a new model). An
    existing version is never overwritten (FileExistsError). The SavedModel is
    written to a hidden temporary directory beside it and renamed in when
    complete (`delf_tf.atomic.staged_directory`), so TF Serving never sees a
    half-written version; a failed export leaves nothing behind, and the staging
    folder of a killed one is removed by the next export into the model folder.
    """
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise InputError(f"invalid model name {model_name!r}")
    model_dir = Path(export_base) / model_name
    # One exporter per model folder (`<model_name>.lock` beside it, delf_tf.locks), so
    # two exports never pick the same next version.
    with writer_lock(model_dir):
        return _export(extraction, model_dir, version, max_pixels)


def _export(extraction: ExtractionModule, model_dir: Path, version, max_pixels: int) -> Path:
    if version is None:
        version = next_version(model_dir)
    if version < 1:
        raise InputError(f"version must be >= 1, got {version}")
    final = model_dir / str(version)
    if final.exists():
        raise FileExistsError(f"{final}: version {version} exists; exports are never overwritten")
    with staged_directory(final, replace=False) as staging:
        module = ServingModule(extraction, max_pixels=max_pixels)
        signatures = {
            SERVING_SIGNATURE: module.serve_image_bytes.get_concrete_function(),
            IMAGE_SIGNATURE: module.extract_image,
        }
        tf.saved_model.save(module, str(staging), signatures=signatures)
        forbidden = graph_ops(staging) & FORBIDDEN_OPS
        if forbidden or uses_xla(staging):
            raise RuntimeError(
                f"the exported graph uses {sorted(forbidden) or 'XLA'}; TF Serving cannot run it"
            )
        info = {
            "format_version": EXPORT_FORMAT_VERSION,
            "extraction_config": extraction.config.to_dict(),
            "fingerprint": extraction.fingerprint,
            "descriptor_dim": int(extraction.descriptor_dim),
            "global_dim": extraction.global_dim,
            "network": extraction.network.describe(),
            "model_config": (
                extraction.model.config.to_dict() if extraction.model is not None else None
            ),
            "pca": extraction.pca_projection is not None,
            "max_pixels": max_pixels,
            "signatures": list(SIGNATURES),
            "tensorflow_version": tf.__version__,
        }
        write_warmup_requests(staging)
        (staging / "assets").mkdir(exist_ok=True)
        (staging / "assets" / EXPORT_INFO_ASSET).write_text(json.dumps(info, indent=2) + "\n")
    return final


def write_warmup_requests(version_dir: str | os.PathLike) -> Path:
    """`assets.extra/tf_serving_warmup_requests`: one serving_default request (a 64 x 64 PNG).

    TF Serving (and `delf serve`) replay it when loading the version, so the first
    real request does not pay for the graph's initialisation.
    """
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    image = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 255 - ramp[:, None]), -1)
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = SERVING_SIGNATURE
    request.inputs[BATCH_INPUT].CopyFrom(
        tf.make_tensor_proto(np.array([encode_png(image.astype(np.uint8))], dtype=object))
    )
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    path = Path(version_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(log.SerializeToString())
    return path


def export_model(
    model: DelfModel,
    export_base: str | os.PathLike,
    config: ExtractionConfig | None = None,
    pca: PcaParams | None = None,
    model_name: str = "delf",
    version: int | None = None,
) -> Path:
    """`export_saved_model` of a DelfModel (+ PCA) with `config` (default ExtractionConfig())."""
    extraction = ExtractionModule(model, config or ExtractionConfig(), pca)
    return export_saved_model(extraction, export_base, model_name=model_name, version=version)
