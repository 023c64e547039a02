"""`delf export`: write a SavedModel that TF Serving serves as it is (see delf_tf.export)."""

from __future__ import annotations

import json

from absl import flags

from delf_tf.config import ExtractionConfig
from delf_tf.presets import EXTRACTION_PRESETS


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string(
        "model",
        None,
        "a trained DelfModel: a .keras file, or a training checkpoint (a directory or prefix "
        "of tf.train.Checkpoint(model=<DelfModel>); its architecture from --model_config or "
        "the model_config.json beside it). Without it a fresh model is built from --weights",
        **define,
    )
    flags.DEFINE_string(
        "weights",
        "random",
        "backbone weights when --model is not given: random (seeded by --seed), imagenet, or "
        "a local ResNet50 .h5/.weights.h5/.keras file",
        **define,
    )
    flags.DEFINE_integer("seed", 0, "seed of the random initialisation", **define)
    flags.DEFINE_string(
        "model_config",
        None,
        "ModelConfig JSON: the architecture of a checkpoint given by --model, or of the fresh "
        "model built from --weights (default: ResNet50)",
        **define,
    )
    flags.DEFINE_string("pca", None, "PCA .npz from `delf fit-pca`, applied in the graph", **define)
    flags.DEFINE_enum(
        "preset",
        None,
        sorted(EXTRACTION_PRESETS),
        "named extraction settings (default paper)",
        **define,
    )
    flags.DEFINE_string(
        "extraction_config",
        None,
        f"ExtractionConfig JSON (default: the paper's settings, {ExtractionConfig().to_dict()})",
        **define,
    )
    flags.DEFINE_string(
        "export_base", None, "writes <export_base>/<model_name>/<version>/", **define
    )
    flags.DEFINE_string("model_name", "delf", "model name (TF Serving's --model_name)", **define)
    flags.DEFINE_integer(
        "version", None, "version number (default: one above the highest existing)", **define
    )
    flags.mark_flag_as_required("export_base", **define)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.commands.common import note
    from delf_tf.config import ModelConfig
    from delf_tf.contract import EXPORT_INFO_ASSET, SIGNATURES
    from delf_tf.errors import InputError
    from delf_tf.export import export_model
    from delf_tf.extraction.pca import PcaParams
    from delf_tf.model.delf import build_delf_model
    from delf_tf.model.loading import load_delf_model
    from delf_tf.presets import extraction_preset

    if flag_values.model and flag_values["weights"].present:
        raise InputError("--weights applies only without --model")
    if flag_values.preset and flag_values.extraction_config:
        raise InputError("give --preset or --extraction_config, not both")
    model_config = ModelConfig.load(flag_values.model_config) if flag_values.model_config else None
    if flag_values.model:
        model = load_delf_model(flag_values.model, model_config)
    else:
        model = build_delf_model(model_config, weights=flag_values.weights, seed=flag_values.seed)
        if flag_values.weights == "random":
            note("untrained (random) weights: the export shows the pipeline, not quality")
    if flag_values.extraction_config:
        config = ExtractionConfig.load(flag_values.extraction_config)
    else:
        config = extraction_preset(flag_values.preset or "paper")
    pca = PcaParams.load(flag_values.pca) if flag_values.pca else None
    path = export_model(
        model,
        flag_values.export_base,
        config=config,
        pca=pca,
        model_name=flag_values.model_name,
        version=flag_values.version,
    )
    info = json.loads((path / "assets" / EXPORT_INFO_ASSET).read_text())
    print(
        json.dumps(
            {
                "export": str(path),
                "model_name": flag_values.model_name,
                "version": int(path.name),
                "fingerprint": info["fingerprint"],
                "descriptor_dim": info["descriptor_dim"],
                "signatures": list(SIGNATURES),
            }
        )
    )
    return 0
