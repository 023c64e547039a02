"""Flags shared by the subcommands that extract features (extract, search, match, ...)."""

from __future__ import annotations

from absl import flags

from delf_tf.config import ExtractionConfig, ModelConfig
from delf_tf.extraction.extractor import Extractor, build_extractor

# Settings of the in-process extractor; with --server the served export's own apply.
_LOCAL_ONLY_FLAGS = (
    "model",
    "model_config",
    "pca",
    "config",
    "score_threshold",
    "max_features",
    "max_image_size",
)


def define_extractor_flags(flag_values: flags.FlagValues) -> None:
    """--model, --weights, --seed, --model_config, --config, --pca, per-field overrides;
    --server for TF Serving."""
    define = {"flag_values": flag_values}
    flags.DEFINE_string(
        "model", None, "a trained DelfModel (.keras) or an exported SavedModel directory", **define
    )
    flags.DEFINE_string(
        "weights",
        "random",
        "backbone weights when --model is not given: random (seeded by --seed), imagenet "
        "(needs internet or the Keras cache), or a local ResNet50 .h5/.weights.h5/.keras file",
        **define,
    )
    flags.DEFINE_integer("seed", 0, "seed of the random initialisation", **define)
    flags.DEFINE_string(
        "model_config",
        None,
        "ModelConfig JSON of the fresh model built when --model is not given (default: "
        'ResNet50; e.g. {"backbone": "tiny", "feature_depth": 64} for quick tests)',
        **define,
    )
    flags.DEFINE_string("config", None, "ExtractionConfig JSON file", **define)
    flags.DEFINE_string(
        "pca", None, "PCA .npz from `delf fit-pca` (not with a SavedModel)", **define
    )
    flags.DEFINE_float(
        "score_threshold",
        None,
        "minimum attention score (config default 100.0, for trained models; an untrained "
        "attention head scores far below it, so use 0 with random or imagenet weights)",
        **define,
    )
    flags.DEFINE_integer("max_features", None, "top-K features per image (default 1000)", **define)
    flags.DEFINE_integer(
        "max_image_size",
        None,
        "long side limit before the pyramid, -1 keeps (default 1024)",
        **define,
    )
    flags.DEFINE_string(
        "server",
        None,
        "HOST:PORT of TF Serving (or `delf serve`): extract there instead of in process, "
        "with the served export's own settings",
        **define,
    )
    flags.DEFINE_enum(
        "protocol",
        "grpc",
        ["grpc", "rest"],
        "API of --server (gRPC port 8500, REST 8501)",
        **define,
    )
    flags.DEFINE_string("model_name", "delf", "model name on --server", **define)


def extractor_from_flags(flag_values: flags.FlagValues) -> Extractor:
    if flag_values.server:
        given = [f"--{name}" for name in _LOCAL_ONLY_FLAGS if flag_values[name].present]
        if given:
            raise ValueError(f"--server uses the served model and its settings; drop {given}")
        from delf_tf.serving.client import ServingExtractor

        return ServingExtractor(
            flag_values.server, model_name=flag_values.model_name, protocol=flag_values.protocol
        )
    if flag_values.model and flag_values.model_config:
        raise ValueError("--model_config applies only without --model (a model has its own)")
    model_config = ModelConfig.load(flag_values.model_config) if flag_values.model_config else None
    config = ExtractionConfig.load(flag_values.config) if flag_values.config else None
    overrides = {
        name: flag_values[name].value
        for name in ("score_threshold", "max_features", "max_image_size")
        if flag_values[name].value is not None
    }
    return build_extractor(
        model=flag_values.model,
        weights=flag_values.weights,
        seed=flag_values.seed,
        config=config,
        overrides=overrides,
        pca=flag_values.pca,
        model_config=model_config,
    )


def weights_are_trained(extractor: Extractor) -> bool:
    """False when the features come from a randomly initialised model."""
    return "weights=random" not in extractor.describe().get("model", "")
