"""`delf fit-pca`: learn PCA from the raw (1024-D) descriptors of a feature store."""

from __future__ import annotations

import json

from absl import flags


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("features", None, "feature store of raw descriptors (no --pca)", **define)
    flags.DEFINE_integer("dim", 40, "number of principal components to keep", **define)
    flags.DEFINE_bool("whiten", False, "whiten: divide components by sqrt(variance)", **define)
    flags.DEFINE_string(
        "output_file", None, "output .npz (mean, projection, variances, whiten)", **define
    )
    flags.DEFINE_string(
        "output_dir",
        None,
        "with --format=datum: output folder of mean.datum, pca_proj_mat.datum, "
        "pca_vars.datum, which the reference extractor reads",
        **define,
    )
    flags.DEFINE_enum(
        "format",
        "npz",
        ["npz", "datum"],
        "PCA file format: this project's or the reference's",
        **define,
    )
    flags.DEFINE_integer("max_descriptors", 1_000_000, "random subsample bound", **define)
    flags.DEFINE_integer("seed", 0, "seed of the subsample", **define)
    flags.mark_flags_as_required(["features"], **define)
    flags.register_multi_flags_validator(
        ["output_file", "output_dir"],
        lambda v: bool(v["output_file"]) != bool(v["output_dir"]),
        message="give --output_file=PCA.npz (or, with --format=datum, --output_dir=FOLDER)",
        **define,
    )


def run(flag_values: flags.FlagValues) -> int:
    import numpy as np

    from delf_tf.errors import InputError
    from delf_tf.extraction.pca import fit_pca
    from delf_tf.features.store import FeatureStore

    output = flag_values.output_dir or flag_values.output_file
    if flag_values.format == "datum" and flag_values.output_file:
        from delf_tf.commands.common import deprecated

        deprecated("output_file with --format=datum", "output_dir (a folder)")
    elif flag_values.format == "npz" and flag_values.output_dir:
        raise InputError("--output_dir is for --format=datum; give --output_file=PCA.npz")
    store = FeatureStore.open(flag_values.features)
    descriptors = [store.load(key).descriptors for key in store.stored_keys()]
    descriptors = [d for d in descriptors if len(d)]
    if not descriptors:
        raise InputError(f"{store.root}: no descriptors to fit PCA on")
    data = np.concatenate(descriptors)
    if data.shape[0] > flag_values.max_descriptors:
        rng = np.random.default_rng(flag_values.seed)
        data = data[rng.choice(data.shape[0], flag_values.max_descriptors, replace=False)]
    pca = fit_pca(data, flag_values.dim, whiten=flag_values.whiten)
    if flag_values.format == "datum":
        pca.save_datum_folder(output)
    else:
        pca.save(output)
    explained = float(pca.variances.sum() / max(np.var(data, axis=0, ddof=1).sum(), 1e-12))
    print(
        json.dumps(
            {
                ("output_dir" if flag_values.format == "datum" else "output_file"): output,
                "format": flag_values.format,
                "descriptors": int(data.shape[0]),
                "dim": pca.output_dim,
                "whiten": pca.whiten,
                "explained_variance": round(explained, 4),
            }
        )
    )
    return 0
