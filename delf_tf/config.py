"""Frozen configuration dataclasses with a JSON round trip.

Every default of the pipeline is named here once, with the value of the DELF
paper (Noh et al., ICCV 2017) or its reference implementation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from delf_tf.errors import ConfigError

T = TypeVar("T", bound="JsonConfig")

# Backbones of ModelConfig.backbone; ResNet50's conv4 output has 1024 channels.
BACKBONES: tuple[str, ...] = ("resnet50", "tiny")
# Network architectures (ModelConfig.architecture): the paper's DelfModel, and the two
# released reference networks as Keras models (delf_tf.model.reference_nets).
ARCHITECTURES: tuple[str, ...] = ("delf", "resnet_v1_50", "delg_resnet50")
RESNET50_FEATURE_DEPTH = 1024

# Image pyramid of the paper: 7 scales, a factor sqrt(2) apart, 0.25 .. 2.0.
DEFAULT_SCALES: tuple[float, ...] = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


class JsonConfig:
    """Mixin: JSON (de)serialisation for frozen dataclasses with strict field checks."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {unknown} for {cls.__name__}; "
                f"known fields are {sorted(fields)}"
            )
        kwargs = {}
        for name, value in data.items():
            default = getattr(cls, name, None)
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{source}: {error}") from error

    @classmethod
    def from_json(cls: type[T], text: str, source: str = "config") -> T:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source}: not valid JSON ({error})") from error
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{path}: cannot read config ({error.strerror})") from error
        return cls.from_json(text, source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True)
class ModelConfig(JsonConfig):
    """Architecture of the DELF Keras model.

    Attributes:
      num_classes: classes of the two training heads; 0 builds an extraction-only
        model without classifiers.
      attention_hidden_units: channels of the first 1x1 conv of the attention head.
      weight_decay: L2 penalty `weight_decay * sum(w**2)` on every conv / dense
        kernel, added to `model.losses` (0 disables it).
      backbone: "resnet50" (the paper's ResNet50 cut after conv4) or "tiny" (five
        small convs with average pooling, `build_tiny_backbone`: for fast tests and
        experiments; no pretrained weights). Both have stride 16 and take
        caffe-preprocessed input.
      feature_depth: channels of the backbone output (the raw descriptor size):
        fixed at 1024 for resnet50, any value >= 1 for tiny (e.g. 64). The paper's
        architecture only.
      architecture: "delf" (the paper's DelfModel), "resnet_v1_50" (tf-slim
        resnet_v1_50 + attention, as the release delf_gld_20190411) or "delg_resnet50"
        (the reference TF2 ResNet50 with attention, autoencoder and GeM global head, as
        the DELG releases); `backbone` then picks the size ("resnet50": the releases',
        "tiny": a small copy of the same structure for tests). Each carries its input
        convention (delf_tf.model.reference_nets.INPUT_CONVENTIONS).
    """

    num_classes: int = 0
    attention_hidden_units: int = 512
    weight_decay: float = 1e-4
    backbone: str = "resnet50"
    feature_depth: int = RESNET50_FEATURE_DEPTH
    architecture: str = "delf"

    def __post_init__(self) -> None:
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.backbone == "resnet50" and self.feature_depth != RESNET50_FEATURE_DEPTH:
            raise ConfigError(
                f"feature_depth is fixed at {RESNET50_FEATURE_DEPTH} for backbone 'resnet50', "
                f"got {self.feature_depth} (only backbone 'tiny' has a configurable depth)"
            )
        if self.feature_depth < 1:
            raise ConfigError(f"feature_depth must be >= 1, got {self.feature_depth}")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.attention_hidden_units < 1:
            raise ConfigError(
                f"attention_hidden_units must be >= 1, got {self.attention_hidden_units}"
            )
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclasses.dataclass(frozen=True)
class ExtractionConfig(JsonConfig):
    """Every knob of the in-graph multi-scale extraction, with the paper's defaults.

    Attributes:
      max_image_size: an image whose long side is longer is resized (Pillow's
        bilinear, as the reference extractor) so that it is this long, before the
        pyramid; -1 keeps every image as it is.
      min_image_size: an image whose long side is shorter is enlarged to this
        (-1: never; the reference's `min_image_size`).
      scales: pyramid scales applied to the (possibly downsized) image.
      score_threshold: keep locations whose attention score is >= this. 100.0 is
        the reference value for trained models; an untrained attention head
        scores far below it, so use 0 with random or ImageNet weights.
      max_features: keep at most this many features (top scores over all scales).
      iou_threshold: NMS on receptive-field boxes when < 1.0; 1.0 disables NMS.
      pca_dim: descriptor size after PCA (used only when PCA parameters are given;
        whether to whiten is recorded in the PCA file, see `delf fit-pca --whiten`).
      global_scale_indices: for models with a global head (DELG): indices into
        `scales` whose global descriptors are pooled (empty: all scales).
      precision: the network's arithmetic: "float32", "bfloat16" (fast on CPUs
        with AVX512-BF16/AMX and on GPUs/TPUs) or "float16" (GPUs); Keras
        mixed-precision policies, float32 variables. Attention scores, keypoints
        and the post-processing stay float32. Not for released TF1 graphs.
    """

    max_image_size: int = 1024
    min_image_size: int = -1
    scales: tuple[float, ...] = DEFAULT_SCALES
    score_threshold: float = 100.0
    max_features: int = 1000
    iou_threshold: float = 1.0
    pca_dim: int = 40
    global_scale_indices: tuple[int, ...] = ()
    precision: str = "float32"

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(
            self, "global_scale_indices", tuple(int(i) for i in self.global_scale_indices)
        )
        if any(i < 0 for i in self.global_scale_indices):
            raise ConfigError(f"global_scale_indices must be >= 0: {self.global_scale_indices}")
        if self.min_image_size == 0 or self.min_image_size < -1:
            raise ConfigError(f"min_image_size must be positive or -1, got {self.min_image_size}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"scales must be a non-empty list of positive numbers: {self.scales}")
        if self.max_image_size == 0 or self.max_image_size < -1:
            raise ConfigError(f"max_image_size must be positive or -1, got {self.max_image_size}")
        if self.max_features < 1:
            raise ConfigError(f"max_features must be >= 1, got {self.max_features}")
        if self.score_threshold != self.score_threshold:  # NaN keeps nothing
            raise ConfigError("score_threshold must be a number, got nan")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ConfigError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.pca_dim < 1:
            raise ConfigError(f"pca_dim must be >= 1, got {self.pca_dim}")


PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16")
# ExtractionConfig fields chosen per host, not per collection: a query or a resumed
# extraction may differ from the store's or index's record in these (same descriptor
# space within the measured fidelity; the fingerprint leaves them out).
PER_HOST_FIELDS: tuple[str, ...] = ("precision",)
TRAINING_STAGES: tuple[str, ...] = ("descriptor", "attention", "joint")
LR_SCHEDULES: tuple[str, ...] = ("linear", "cosine")
STRATEGIES: tuple[str, ...] = ("default", "mirrored", "multi_worker", "tpu")


@dataclasses.dataclass(frozen=True)
class TrainingConfig(JsonConfig):
    """Every knob of a training run (`training/train.py`, `delf train`).

    Defaults follow the DELF reference trainer (TF2 `train.py`): SGD with
    momentum 0.9, initial learning rate 0.01 decayed to 0, global-norm
    clipping at 10, 321 px crops, batch 32.

    Attributes:
      stage: "descriptor" (backbone + GAP classifier), "attention" (frozen
        backbone; attention head + attention classifier on rescaled inputs) or
        "joint" (both losses in one step, attention through stop-gradient).
      train_data / val_data: a TFRecord glob, a TFDS dataset name (optionally
        "tfds:name[/config][:split]") or an image folder with one subfolder per class.
      num_classes: 0 infers it from the data (label map, TFDS info, subfolders).
      batch_size: global batch size, split evenly over the replicas.
      image_size: side of the square training crops, in pixels.
      initial_lr / lr_schedule / max_steps: learning rate decays from
        initial_lr to 0 over max_steps, linearly or along a cosine.
      momentum: SGD momentum.
      clip_norm: global-norm gradient clipping of the summed (all-replica) gradient.
      attention_loss_weight: weight of the attention loss in the joint stage.
      arcface_margin / arcface_scale / reconstruction_loss_weight: DELG (architecture
        delg_resnet50): ArcFace margin 0.1 (DELG paper, Cao et al. ECCV 2020, and the
        reference's --delg_arcface_margin), initial value of the learnable ArcFace
        scale 45.25 = sqrt(2048) (the reference's --delg_scale_factor_init), weight of
        the autoencoder's reconstruction loss 10 (the reference's
        --reconstruction_loss_weight). See delf_tf.training.delg.
      attention_scale_range: attention stage: each batch is rescaled by a
        factor drawn uniformly from this range (the paper's [0.25, 1.0]).
      crop_area_range / crop_aspect_range: random resized crop (fraction of
        the image area, width / height).
      random_flip: horizontal flips (off: landmarks are not mirror-symmetric).
      shuffle_buffer: records held by the shuffle buffer (before decoding).
      strategy / tpu: tf.distribute strategy; tpu is the TPU name or address.
      mixed_precision: float16 compute (bfloat16 on TPU), float32 variables.
      model_dir: checkpoints, TensorBoard logs and the final `model.keras`.
      weights: backbone weights: "imagenet", "random" or a local ResNet50 weights file.
      init_from: a previous stage's `model.keras` (or its model_dir).
      seed: seeds the initialisation, the data order and augmentation.
      log_every / checkpoint_every / image_summary_every / eval_every: in steps
        (0 disables evaluation and attention images).
      eval_steps: validation batches per evaluation (0: the whole set).
      keep_checkpoints: checkpoints kept by the CheckpointManager.
      tfds_data_dir / tfds_manual_dir: TFDS data directory, and the folder a
        local TFDS builder prepares from when the dataset is not prepared yet.
    """

    stage: str = "descriptor"
    train_data: str = ""
    val_data: str = ""
    num_classes: int = 0
    batch_size: int = 32
    image_size: int = 321
    initial_lr: float = 0.01
    max_steps: int = 500_000
    lr_schedule: str = "linear"
    momentum: float = 0.9
    clip_norm: float = 10.0
    attention_loss_weight: float = 1.0
    arcface_margin: float = 0.1
    arcface_scale: float = 45.25
    reconstruction_loss_weight: float = 10.0
    attention_scale_range: tuple[float, ...] = (0.25, 1.0)
    crop_area_range: tuple[float, ...] = (0.08, 1.0)
    crop_aspect_range: tuple[float, ...] = (0.75, 1.3333)
    random_flip: bool = False
    shuffle_buffer: int = 1000
    strategy: str = "default"
    tpu: str = ""
    mixed_precision: bool = False
    model_dir: str = ""
    weights: str = "imagenet"
    init_from: str = ""
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000
    image_summary_every: int = 1000
    eval_every: int = 1000
    eval_steps: int = 100
    keep_checkpoints: int = 3
    tfds_data_dir: str = ""
    tfds_manual_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("attention_scale_range", "crop_area_range", "crop_aspect_range"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        _check_choice("stage", self.stage, TRAINING_STAGES)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("strategy", self.strategy, STRATEGIES)
        for name in ("batch_size", "image_size", "max_steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_classes", "image_summary_every", "eval_every", "eval_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.initial_lr <= 0 or self.clip_norm <= 0:
            raise ConfigError(
                f"initial_lr and clip_norm must be > 0, got {self.initial_lr}, {self.clip_norm}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        for name in ("attention_loss_weight", "reconstruction_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.arcface_margin < 3.14159 or self.arcface_scale <= 0:
            raise ConfigError(
                f"arcface_margin must be in [0, pi) and arcface_scale > 0, got "
                f"{self.arcface_margin}, {self.arcface_scale}"
            )
        _check_range("attention_scale_range", self.attention_scale_range, upper=1.0)
        _check_range("crop_area_range", self.crop_area_range, upper=1.0)
        _check_range("crop_aspect_range", self.crop_aspect_range, upper=None)
        if self.keep_checkpoints < 1 or self.shuffle_buffer < 1:
            raise ConfigError("keep_checkpoints and shuffle_buffer must be >= 1")


@dataclasses.dataclass(frozen=True)
class DatasetBuildConfig(JsonConfig):
    """Writing labelled images as sharded TFRecords (`training/build_tfrecords.py`).

    Attributes:
      validation_fraction: share of each class's images held out for validation
        (a class always keeps at least one training image).
      images_per_shard: target number of images per TFRecord shard.
      seed: seeds the per-class split.
      num_workers: threads that validate and encode images.
    """

    validation_fraction: float = 0.2
    images_per_shard: int = 1000
    seed: int = 0
    num_workers: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.images_per_shard < 1 or self.num_workers < 1:
            raise ConfigError("images_per_shard and num_workers must be >= 1")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_range(name: str, values: tuple[float, ...], upper: float | None) -> None:
    low_high_ok = len(values) == 2 and 0.0 < values[0] <= values[1]
    if not low_high_ok or (upper is not None and values[1] > upper):
        bound = f", at most {upper}" if upper is not None else ""
        raise ConfigError(f"{name} must be (low, high) with 0 < low <= high{bound}, got {values}")


TRANSFORMS = ("affine", "homography")
RANSAC_METHODS = ("vectorized", "skimage")
# Nearest-neighbour back ends of the `votes` ranking (delf_tf/matching/neighbors.py).
# "auto", "flat", "ivfpq", "ivfpq-hnsw" and "ivfpq-ondisk" (inverted lists searched
# from disk, built in shards: delf_tf/matching/ondisk.py) are FAISS structures that
# `delf index` builds once and saves in the index; "kdtree" (the DELF reference's
# choice) and "brute" (tests) are built in memory when an index is loaded.
NEIGHBOR_BACKENDS = (
    "auto",
    "flat",
    "ivfpq",
    "ivfpq-hnsw",
    "ivfpq-ondisk",
    "kdtree",
    "brute",
    "milvus",
)
# Older name of "ivfpq", still accepted.
_BACKEND_ALIASES = {"faiss-ivfpq": "ivfpq"}
# How the whole collection is ranked before local verification re-ranks the top.
RANKINGS = ("auto", "votes", "asmk", "global")
# Putative matches of a shortlisted image when re-ranking the asmk/global rankings.
RERANK_MATCHES = ("knn", "nearest")


@dataclasses.dataclass(frozen=True)
class RetrievalConfig(JsonConfig):
    """Matching, ranking and geometric verification, with the DELF reference defaults.

    Attributes:
      distance_bound: a database descriptor is a match of a query descriptor only
        when their L2 distance is below this (the reference's KD-tree
        `distance_upper_bound`; unit-norm descriptors, so 0.8 ~ cosine 0.68).
      neighbors: nearest database descriptors looked up per query descriptor in the
        global index; each database image gets at most one vote per query descriptor.
      shortlist: images of the initial ranking (votes, ASMK or global) that go on
        to local verification (RANSAC) and are re-ranked by inliers (the
        reference re-ranks 100).
      top_k: results returned.
      transform: geometric model verified by RANSAC: "affine" or "homography".
      residual_threshold: RANSAC inlier bound, in pixels of the database image.
      max_trials: RANSAC hypotheses per image pair.
      ransac_method: "vectorized" (numpy, all hypotheses at once) or "skimage"
        (`skimage.measure.ransac`, the reference implementation's choice).
      seed: seed of RANSAC sampling (results are reproducible).
      backend: nearest-neighbour structure of the `votes` ranking. At `delf index`:
        the structure to build and save ("auto": exact FAISS search for small
        indexes, IVF-PQ beyond a size, see `delf_tf.matching.neighbors.choose_backend`).
        At search: "auto" uses the saved structure; "flat", "kdtree" and "brute"
        (exact) can replace it; "ivfpq"/"ivfpq-hnsw"/"ivfpq-ondisk" must be the
        saved one. "ivfpq-ondisk": 8-bit IVF-PQ whose inverted lists stay on disk,
        built in resumable shards (for collections past the machine's memory).
        "milvus" (`delf index --milvus_uri`): Milvus collections hold the votes
        ranking's descriptors and the global descriptors (both rankings).
      ranking: "votes" (k-NN votes over all local descriptors), "asmk" (ASMK*
        aggregated binary residuals, needs an index built with ASMK), "global"
        (inner product of global descriptors, needs an index of DELG features) or
        "auto" (global if the index has global descriptors, else asmk if built,
        else votes).
      nprobe: inverted lists an IVF structure visits per query; 0 keeps the value
        `delf index` derived and recorded in the index.
      asmk_alpha: exponent of the ASMK selective kernel (sign(u) |u|^alpha).
      asmk_threshold: the selective kernel ignores word similarities at or below this.
      asmk_query_assignments: visual words each query descriptor is assigned to
        (multiple assignment on the query side only).
      rerank_matches: putative matches when the asmk/global rankings re-rank their
        shortlist. "knn": the votes ranking's rule restricted to the shortlisted
        images (the `neighbors` nearest of their descriptors within
        `distance_bound`, one match per query descriptor and image); "nearest":
        the reference re-ranking's rule (the nearest descriptor of each image
        within the bound), which on untrained DELF features admits many more
        spurious matches (mAP 0.34 against 0.85 on landmarks-dev).
    """

    distance_bound: float = 0.8
    neighbors: int = 10
    shortlist: int = 100
    top_k: int = 10
    transform: str = "affine"
    residual_threshold: float = 20.0
    max_trials: int = 1000
    ransac_method: str = "vectorized"
    seed: int = 0
    backend: str = "auto"
    ranking: str = "auto"
    nprobe: int = 0
    asmk_alpha: float = 3.0
    asmk_threshold: float = 0.0
    asmk_query_assignments: int = 5
    rerank_matches: str = "knn"

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", _BACKEND_ALIASES.get(self.backend, self.backend))
        if self.distance_bound <= 0:
            raise ConfigError(f"distance_bound must be > 0, got {self.distance_bound}")
        for name in ("neighbors", "shortlist", "top_k", "max_trials", "asmk_query_assignments"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.residual_threshold <= 0:
            raise ConfigError(f"residual_threshold must be > 0, got {self.residual_threshold}")
        if self.nprobe < 0:
            raise ConfigError(f"nprobe must be >= 0, got {self.nprobe}")
        if self.asmk_alpha <= 0 or not -1.0 <= self.asmk_threshold < 1.0:
            raise ConfigError(
                "asmk_alpha must be > 0 and asmk_threshold in [-1, 1), got "
                f"{self.asmk_alpha}, {self.asmk_threshold}"
            )
        for name, allowed in (
            ("transform", TRANSFORMS),
            ("ransac_method", RANSAC_METHODS),
            ("backend", NEIGHBOR_BACKENDS),
            ("ranking", RANKINGS),
            ("rerank_matches", RERANK_MATCHES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
