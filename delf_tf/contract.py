"""The serving contract: what an export of delf-tf offers and what its consumers rely on.

One TF-free module that every producer (the exporter, the extraction graph) and
every consumer (the TF Serving client, the dev server, the in-process loader of
exports, the Beam runner) imports, so names, dtypes and folder rules are written
down once.

Layout: `<export_base>/<model_name>/<version>/` with `saved_model.pb`,
`variables/`, `assets/<EXPORT_INFO_ASSET>` (JSON: the ExtractionConfig, the
fingerprint, the descriptor size, ...) and `assets.extra/<WARMUP_FILE>`.

Signatures (method `tensorflow/serving/predict`):

`serving_default` (batchable: every input and output has the batch dimension first)
  image_bytes: string [B], encoded JPEG / PNG / GIF (first frame) / BMP (24, 32 bit) /
    still WebP: the formats `delf_tf.images.SERVED_FORMATS` names, for every path.
  -> keypoints float32 [B, K, 2], scales float32 [B, K], scores float32 [B, K],
     descriptors float32 [B, K, D], zero-padded past num_features;
     num_features int32 [B]; valid bool [B]; fingerprint string [B];
     global_descriptor float32 [B, G] when the model has a global head (DELG).

`extract_image` (one raw image per call)
  image uint8 [H, W, 3]; max_features int32 []; score_threshold float32 [];
  scales float32 [S] (the last three have defaults recorded in the SignatureDef).
  -> keypoints float32 [N, 2], scales float32 [N], scores float32 [N],
     descriptors float32 [N, D], fingerprint string [],
     global_descriptor float32 [G] when the model has a global head.
"""

from __future__ import annotations

import os
from pathlib import Path

SERVING_SIGNATURE = "serving_default"
IMAGE_SIGNATURE = "extract_image"
SIGNATURES = (SERVING_SIGNATURE, IMAGE_SIGNATURE)
PREDICT_METHOD = "tensorflow/serving/predict"

# serving_default
BATCH_INPUT = "image_bytes"
FEATURE_OUTPUTS = ("keypoints", "scales", "scores", "descriptors")
BATCH_OUTPUTS = FEATURE_OUTPUTS + ("num_features", "valid", "fingerprint")
GLOBAL_OUTPUT = "global_descriptor"

# extract_image: input name -> numpy dtype name
IMAGE_INPUTS = {
    "image": "uint8",
    "max_features": "int32",
    "score_threshold": "float32",
    "scales": "float32",
}
# The inputs of extract_image that a call may leave to the recorded defaults.
RUNTIME_OVERRIDES = ("max_features", "score_threshold", "scales")
IMAGE_OUTPUTS = FEATURE_OUTPUTS + ("fingerprint",)

# Files of a version folder.
SAVED_MODEL_FILE = "saved_model.pb"
EXPORT_INFO_ASSET = "extraction_config.json"
EXPORT_FORMAT_VERSION = 2
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"

# Ops that would tie an export to a Python process or a special build.
FORBIDDEN_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc", "XlaLaunch", "_XlaRun"})


def is_version_name(name: str) -> bool:
    """True for a folder name TF Serving reads as a version: decimal digits, value >= 1."""
    return name.isascii() and name.isdigit() and len(name) <= 18 and int(name) >= 1


def existing_versions(model_dir: str | os.PathLike, complete: bool = False) -> list[int]:
    """Numeric version subfolders of `model_dir`, sorted (TF Serving's view of it).

    complete: only versions that hold a saved_model.pb.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(child.name)
        for child in model_dir.iterdir()
        if is_version_name(child.name)
        and child.is_dir()
        and (not complete or (child / SAVED_MODEL_FILE).is_file())
    )


def next_version(model_dir: str | os.PathLike) -> int:
    """One above the highest existing version of `model_dir` (1 for a new model)."""
    return (existing_versions(model_dir) or [0])[-1] + 1


def resolve_version_dir(path: str | os.PathLike) -> Path:
    """`path` itself if it holds saved_model.pb, else its highest complete version.

    Raises FileNotFoundError naming `path` when neither exists.
    """
    path = Path(path)
    if (path / SAVED_MODEL_FILE).is_file():
        return path
    versions = existing_versions(path, complete=True)
    if not versions:
        raise FileNotFoundError(
            f"{path}: no SavedModel here (expected {SAVED_MODEL_FILE} or "
            f"<version>/{SAVED_MODEL_FILE})"
        )
    return path / str(versions[-1])


# The search service (`delf serve --index=INDEX_DIR`): one more model name on the same
# PredictionService/Predict (gRPC) and POST /v1/models/<name>:predict (REST).
#   image_bytes: string [B], encoded query images (SERVED_FORMATS);
#   top_k: int32 [] (optional, 1..the server's max_top_k; default the server's top_k);
#   ranking: string [] (optional: votes, asmk, global, auto; default the server's).
#   -> image_ids int64 [B, K] (position in the index's images.json, -1 past num_results),
#      keys string [B, K] (the images' store keys, "" past num_results),
#      scores float32 [B, K] (the initial ranking's score), inliers int32 [B, K] (RANSAC),
#      num_results int32 [B], generation int64 [B] (of the index that answered).
# K is the request's top_k; results are best first (by inliers, then score).
SEARCH_MODEL_NAME = "index"
SEARCH_INPUT = BATCH_INPUT
SEARCH_OPTIONAL_INPUTS = {"top_k": "int32", "ranking": "string"}
SEARCH_OUTPUTS = ("image_ids", "keys", "scores", "inliers", "num_results", "generation")
SEARCH_OUTPUT_DTYPES = {
    "image_ids": "int64",
    "keys": "string",
    "scores": "float32",
    "inliers": "int32",
    "num_results": "int32",
    "generation": "int64",
}
