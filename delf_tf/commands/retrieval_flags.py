"""Flags shared by the retrieval commands (search, match): matching and RANSAC settings."""

from __future__ import annotations

from absl import flags

from delf_tf.config import (
    NEIGHBOR_BACKENDS,
    RANKINGS,
    RANSAC_METHODS,
    RERANK_MATCHES,
    TRANSFORMS,
    RetrievalConfig,
)

# Flag name -> RetrievalConfig field; a flag left unset keeps the config's value.
OVERRIDES = {
    "distance_bound": "distance_bound",
    "transform": "transform",
    "residual_threshold": "residual_threshold",
    "max_trials": "max_trials",
    "ransac": "ransac_method",
    "ransac_seed": "seed",
    "backend": "backend",
    # Defined by define_ranking_flags (search, evaluate) only.
    "ranking": "ranking",
    "nprobe": "nprobe",
    "rerank_matches": "rerank_matches",
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
        "k-NN structure of the votes ranking (default auto: the one `delf index` saved; "
        "flat, kdtree and brute are exact and need no saved structure)",
        **define,
    )


def define_ranking_flags(flag_values: flags.FlagValues) -> None:
    """--ranking and --nprobe (search and evaluate)."""
    define = {"flag_values": flag_values}
    flags.DEFINE_enum(
        "ranking",
        None,
        RANKINGS,
        "initial ranking before RANSAC re-ranks the shortlist: votes (k-NN votes), asmk "
        "(needs `delf index --index_type=asmk`), global (DELG global descriptors), auto "
        "(global if the index has them, else asmk if built, else votes; the default)",
        **define,
    )
    flags.DEFINE_integer(
        "nprobe",
        None,
        "inverted lists an IVF k-NN structure visits per query (default the value "
        "`delf index` derived, recorded in index.json)",
        **define,
    )
    flags.DEFINE_enum(
        "rerank_matches",
        None,
        RERANK_MATCHES,
        "putative matches when re-ranking the asmk/global shortlist: knn (the votes rule "
        "within the shortlist; default) or nearest (the reference: nearest descriptor per image)",
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
        if name in flag_values and flag_values[name].value is not None
    }
    changes.update({k: v for k, v in extra_overrides.items() if v is not None})
    return config.replace(**changes)
