"""Flags shared by the retrieval commands (search, match): matching and RANSAC settings."""

from __future__ import annotations

from absl import flags

from delf_tf.config import NEIGHBOR_BACKENDS, RANSAC_METHODS, TRANSFORMS, RetrievalConfig

# Flag name -> RetrievalConfig field; a flag left unset keeps the config's value.
OVERRIDES = {
    "distance_bound": "distance_bound",
    "transform": "transform",
    "residual_threshold": "residual_threshold",
    "max_trials": "max_trials",
    "ransac": "ransac_method",
    "ransac_seed": "seed",
    "backend": "backend",
}


def define_retrieval_flags(flag_values: flags.FlagValues) -> None:
    """--retrieval_config and per-field overrides (defaults: RetrievalConfig)."""
    define = {"flag_values": flag_values}
    defaults = RetrievalConfig()
    flags.DEFINE_string("retrieval_config", None, "RetrievalConfig JSON file", **define)
    flags.DEFINE_float(
        "distance_bound",
        None,
        f"max L2 distance of a descriptor match (default {defaults.distance_bound})",
        **define,
    )
    flags.DEFINE_enum(
        "transform", None, TRANSFORMS, f"RANSAC model (default {defaults.transform})", **define
    )
    flags.DEFINE_float(
        "residual_threshold",
        None,
        f"RANSAC inlier bound in pixels (default {defaults.residual_threshold})",
        **define,
    )
    flags.DEFINE_integer(
        "max_trials", None, f"RANSAC hypotheses (default {defaults.max_trials})", **define
    )
    flags.DEFINE_enum(
        "ransac",
        None,
        RANSAC_METHODS,
        f"RANSAC implementation; skimage is the reference (default {defaults.ransac_method})",
        **define,
    )
    flags.DEFINE_integer(
        "ransac_seed", None, f"seed of RANSAC sampling (default {defaults.seed})", **define
    )
    flags.DEFINE_enum(
        "backend",
        None,
        NEIGHBOR_BACKENDS,
        f"nearest-neighbour back end (default {defaults.backend}; faiss-ivfpq needs faiss-cpu)",
        **define,
    )


def retrieval_config_from_flags(
    flag_values: flags.FlagValues, **extra_overrides: object
) -> RetrievalConfig:
    """RetrievalConfig from --retrieval_config, then flags that were set, then `extra_overrides`."""
    path = flag_values.retrieval_config
    config = RetrievalConfig.load(path) if path else RetrievalConfig()
    changes = {
        field: flag_values[name].value
        for name, field in OVERRIDES.items()
        if flag_values[name].value is not None
    }
    changes.update({k: v for k, v in extra_overrides.items() if v is not None})
    return config.replace(**changes)
