"""Flags shared by the subcommands that extract features (extract, search, match, ...).

Naming rule of every command's flags: inputs are named by what they are
(`--images`, `--features`, `--index`, `--model`), outputs by `--output_dir` (a
folder) or `--output_file` (a file); JSON configuration files by `--*_config`;
one weights flag (`--weights`). Defaults shown in help texts are read from the
config dataclasses. This module imports no TensorFlow, so `--help` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from absl import flags

from delf_tf.config import PRECISIONS, ExtractionConfig, ModelConfig
from delf_tf.errors import InputError
from delf_tf.presets import EXTRACTION_PRESETS, describe_preset, precision_for_host

if TYPE_CHECKING:
    from delf_tf.extraction.extractor import Extractor

# Settings of the in-process extractor; with --server the served export's own apply.
_LOCAL_ONLY_FLAGS = (
    "model",
    "delf_config",
    "pca",
    "extraction_config",
    "model_config",
    "preset",
    "score_threshold",
    "max_features",
    "max_image_size",
    "precision",
)
OVERRIDE_FLAGS = ("score_threshold", "max_features", "max_image_size", "precision")


def define_extractor_flags(flag_values: flags.FlagValues, remote: bool = True) -> None:
    """--model, --weights, --seed, configs, --pca, per-field overrides; with `remote`,
    --server/--protocol/--model_name for extraction in TF Serving."""
    define = {"flag_values": flag_values}
    defaults = ExtractionConfig()
    flags.DEFINE_string(
        "model",
        None,
        "a trained DelfModel (.keras), an exported SavedModel directory, or a released "
        "reference model folder (delf_gld_20190411, r50delg_gld_20200814, ...)",
        **define,
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
        "ModelConfig JSON: the architecture of a checkpoint given by --model, or of the fresh "
        'model built from --weights (default ResNet50; e.g. {"backbone": "tiny", '
        '"feature_depth": 64} for quick tests)',
        **define,
    )
    flags.DEFINE_enum(
        "preset",
        None,
        sorted(EXTRACTION_PRESETS),
        f"named extraction settings: paper (the reference values), fast ({describe_preset('fast')}) "
        "or a released model's reference config; default paper, or the release's own for a "
        "release folder",
        **define,
    )
    flags.DEFINE_string(
        "delf_config",
        None,
        "a reference DelfConfig text file (.pbtxt) for a released model: its model_path, "
        "scales, size limits, threshold, top-K and PCA files",
        **define,
    )
    flags.DEFINE_string(
        "extraction_config", None, "ExtractionConfig JSON file (over the preset)", **define
    )
    flags.DEFINE_string(
        "pca",
        None,
        "PCA .npz from `delf fit-pca`, or a folder of reference .datum files (mean.datum, "
        "pca_proj_mat.datum); not with an exported SavedModel",
        **define,
    )
    flags.DEFINE_float(
        "score_threshold",
        None,
        f"minimum attention score (default {defaults.score_threshold}, for trained models; an "
        "untrained attention head scores far below it: use 0 with random or imagenet weights)",
        **define,
    )
    flags.DEFINE_integer(
        "max_features",
        None,
        f"top-K features per image (default {defaults.max_features})",
        **define,
    )
    flags.DEFINE_integer(
        "max_image_size",
        None,
        f"long side limit before the pyramid, -1 keeps (default {defaults.max_image_size})",
        **define,
    )
    flags.DEFINE_enum(
        "precision",
        None,
        list(PRECISIONS),
        f"the network's arithmetic (default {defaults.precision}): bfloat16 is faster on CPUs "
        "with AVX512-BF16/AMX and on GPUs, float16 on GPUs; see bench/extraction.py for its "
        "measured fidelity",
        **define,
    )
    checks = {
        "max_image_size": (lambda v: v is None or v == -1 or v > 0, "-1 (keep) or > 0"),
        "max_features": (lambda v: v is None or v > 0, "> 0"),
        "score_threshold": (lambda v: v is None or v >= 0, ">= 0"),
    }
    for name, (check, wanted) in checks.items():
        flags.register_validator(name, check, message=f"--{name} must be {wanted}", **define)
    if not remote:
        return
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


def extraction_config_from_flags(
    flag_values: flags.FlagValues,
) -> tuple[ExtractionConfig | None, dict[str, object]]:
    """(--extraction_config or None; single-field overrides)."""
    if flag_values.preset and flag_values.extraction_config:
        raise InputError("give --preset or --extraction_config, not both")
    config = None
    if flag_values.extraction_config:
        config = ExtractionConfig.load(flag_values.extraction_config)
    overrides = {
        name: flag_values[name].value
        for name in OVERRIDE_FLAGS
        if flag_values[name].value is not None
    }
    return config, overrides


def extractor_from_flags(
    flag_values: flags.FlagValues,
    cached: bool = False,
    recorded: dict[str, object] | None = None,
) -> Extractor:
    """The extractor the flags describe: TF Serving with --server, else in process.

    cached: reuse the traced graph of an earlier run with the same flags (see
    delf_tf.extraction.cache): for commands that extract only an image or two.
    recorded: extraction settings (ExtractionConfig as a dict) that replace the
    preset's when no --preset, --extraction_config or --delf_config is given (see
    `extractor_for_index`); single-field flags still override them.
    """
    if "server" in flag_values and flag_values.server:
        given = [f"--{name}" for name in _LOCAL_ONLY_FLAGS if flag_values[name].present]
        if given:
            raise InputError(f"--server uses the served model and its settings; drop {given}")
        from delf_tf.serving.client import ServingExtractor

        return ServingExtractor(
            flag_values.server, model_name=flag_values.model_name, protocol=flag_values.protocol
        )
    from delf_tf.extraction.extractor import build_extractor

    model_config = ModelConfig.load(flag_values.model_config) if flag_values.model_config else None
    config, overrides = extraction_config_from_flags(flag_values)
    chosen = config is not None or flag_values.preset or flag_values.delf_config
    if recorded and not chosen:
        if _is_saved_model(flag_values.model):  # its config is fixed but for run-time fields
            overrides = {**_runtime_fields(recorded), **overrides}
        else:
            config = ExtractionConfig.from_dict(recorded, source="the index's extraction_config")
            # Precision is the host's (PER_HOST_FIELDS), not the collection's.
            config = config.replace(precision=precision_for_host(config.precision))
    arguments = {
        "model": flag_values.model,
        "weights": flag_values.weights,
        "seed": flag_values.seed,
        "config": config,
        "overrides": overrides,
        "pca": flag_values.pca,
        "model_config": model_config,
        "preset": flag_values.preset,
        "delf_config": flag_values.delf_config,
    }
    if not cached:
        return build_extractor(**arguments)
    from delf_tf.extraction.cache import cached_extractor

    described = {
        **arguments,
        "config": config.to_dict() if config else None,
        "model_config": model_config.to_dict() if model_config else None,
    }
    return cached_extractor(described, lambda: build_extractor(**arguments))


def check_output_path(flag: str, path: str | None, folder: bool = False) -> None:
    """InputError, before any work, when output `path` (a file, or with `folder` a
    folder) cannot be made: the nearest existing folder above it is a file."""
    if not path:
        return
    from pathlib import Path

    if folder and Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"--{flag}={path}: a file, not a folder")
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--{flag}={path}: {parent} is a file, not a folder")
            return


def extraction_precision(extractor: Extractor) -> str | None:
    """The arithmetic an in-process extractor runs in, for JSON summaries (the `fast`
    preset picks it by host); None for TF Serving, whose export decides."""
    return getattr(getattr(extractor, "config", None), "precision", None)


def extractor_for_index(flag_values: flags.FlagValues, index, *, cached: bool) -> Extractor:
    """The query extractor of `index` (a `delf_tf.retrieval.index.Index`).

    A query is extracted exactly as the collection was: the extraction settings the
    index records (`index.extractor["extraction_config"]`: score threshold, image
    size limits, scales, top-K, ...) replace the defaults; a flag given explicitly
    (--score_threshold, --extraction_config, --preset, ...) overrides them. The
    model, weights and PCA come from the flags, and an extractor of another
    descriptor space than the index's is refused by the index's fingerprint check
    (FingerprintMismatchError, one line saying what differs when it can tell).
    With --server the served export's settings apply; a difference from the
    recorded ones that can be seen is a note on stderr.

    cached: as in `extractor_from_flags` (one-query commands).
    """
    from delf_tf.errors import FingerprintMismatchError

    recorded = (index.extractor or {}).get("extraction_config")
    if "server" in flag_values and flag_values.server:
        extractor = extractor_from_flags(flag_values)
        _note_served_settings(extractor, recorded)
    else:
        extractor = extractor_from_flags(flag_values, cached=cached, recorded=recorded)
    try:
        index.check_fingerprint(extractor.fingerprint)
    except FingerprintMismatchError as error:
        hint = _pca_hint(index.extractor or {}, extractor.describe())
        if hint is None:
            raise
        raise FingerprintMismatchError(f"{index.path or 'index'}: {hint}") from error
    return extractor


def _pca_hint(built: dict, query: dict) -> str | None:
    """What to pass when the index and the query differ only in their PCA, else None."""
    same_model = all(built.get(name) == query.get(name) for name in ("model", "model_config"))
    if not same_model or "model" not in built:
        return None
    index_pca, query_pca = built.get("pca_file"), query.get("pca_file")
    if index_pca == query_pca and built.get("pca") == query.get("pca"):
        return None
    if index_pca:
        return f"the index was built with PCA {index_pca}; pass --pca={index_pca}"
    if built.get("pca"):
        return "the index was built with a PCA (file not recorded); pass the --pca it used"
    return "the index was built without PCA; drop --pca"


def _note_served_settings(extractor: Extractor, recorded: dict | None) -> None:
    """A note when the served model's extraction settings differ from the index's."""
    served = extractor.describe().get("extraction_config")
    if not recorded:
        return
    if served is None:
        note(
            "--server applies the served export's extraction settings; the index was built "
            f"with score_threshold={recorded.get('score_threshold')}, max_image_size="
            f"{recorded.get('max_image_size')}: queries match it only if the export does"
        )
        return
    differ = sorted(name for name in recorded if served.get(name) != recorded[name])
    if differ:
        note(f"the served export's extraction settings differ from the index's: {differ}")


def _is_saved_model(model: str | None) -> bool:
    """`--model` names an export of this project (whose settings are fixed in its graph)."""
    from delf_tf.contract import EXPORT_INFO_ASSET

    if not model or not Path(model).is_dir():
        return False
    info = f"assets/{EXPORT_INFO_ASSET}"
    return any(Path(model).glob(info)) or any(Path(model).glob(f"*/{info}"))


def _runtime_fields(recorded: dict[str, object]) -> dict[str, object]:
    from delf_tf.contract import RUNTIME_OVERRIDES

    return {name: recorded[name] for name in RUNTIME_OVERRIDES if name in recorded}


def is_untrained(extractor: Extractor) -> bool:
    """Whether the features come from a randomly initialised model."""
    return "weights=random" in str(extractor.describe().get("model", ""))


def warn_if_untrained(extractor: Extractor) -> None:
    """A note on stderr when the features come from a randomly initialised model."""
    if is_untrained(extractor):
        note("untrained (random) weights: features show the pipeline, not retrieval quality")


def deprecated(old: str, new: str) -> None:
    """The note of a flag renamed in this release (the old name works until the next)."""
    note(f"--{old} is deprecated and will be removed in the next release: use --{new}")


def note(message: str) -> None:
    """A human-readable note on stderr (stdout carries only the JSON summary)."""
    print(f"note: {message}", file=sys.stderr)


def define_lock_flag(flag_values: flags.FlagValues) -> None:
    """--wait_for_lock, for every command that writes an index or a store (delf_tf.locks)."""
    flags.DEFINE_bool(
        "wait_for_lock",
        False,
        "when another delf process writes the same index or store (it holds "
        "<dir>.lock), wait for it instead of stopping with an error",
        flag_values=flag_values,
    )
