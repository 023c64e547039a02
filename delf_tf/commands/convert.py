"""`delf convert`: a released reference model as a Keras model file (`.keras`).

The release's variables (those its fetches read) are mapped by the graph's structure
onto the Keras architecture the release is (`delf_tf.releases.convert`): tf-slim
resnet_v1_50 for delf_gld_20190411, the reference TF2 ResNet50 with DELG heads for
the DELG releases. The result extracts, exports, trains and runs in reduced
precision like any Keras model of this project; extract with the release's preset
(and its PCA) to get the release's features:
`delf extract --model=model.keras --preset=<release name> [--pca=<release>/pca]`.
"""

from __future__ import annotations

import json

from absl import flags


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string(
        "model",
        None,
        "a released model folder (delf_gld_20190411, r50delg_gld_20200814, ...)",
        **define,
    )
    flags.DEFINE_string("output_file", None, "the Keras model file to write (.keras)", **define)
    flags.DEFINE_enum(
        "size",
        None,
        ["resnet50", "tiny"],
        "the architecture's size (default: the one whose structure the release has)",
        **define,
    )
    flags.mark_flags_as_required(["model", "output_file"], **define)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.commands.common import check_output_path
    from delf_tf.errors import InputError
    from delf_tf.releases.convert import convert_release, save_converted

    if not flag_values.output_file.endswith(".keras"):  # before the release is read
        raise InputError(f"--output_file={flag_values.output_file}: must end in .keras")
    check_output_path("output_file", flag_values.output_file)

    conversion = convert_release(flag_values.model, size=flag_values.size)
    path = save_converted(conversion, flag_values.output_file)
    summary = {"output_file": str(path), **conversion.summary()}
    release = conversion.release
    hint = [f"--model={path}"]
    if release.name:
        hint.append(f"--preset={release.name}")
    if release.pca_dir is not None and release.preset.use_pca:
        hint.append(f"--pca={release.pca_dir}")
    summary["extract_with"] = " ".join(hint)
    print(json.dumps(summary))
    return 0
