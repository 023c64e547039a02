"""`delf export`: write a SavedModel that TF Serving serves as it is (see delf_tf.export).

The model flags are those of `delf extract` (a trained DelfModel, a training
checkpoint, a released reference model folder, or a fresh model from --weights),
so an export serves exactly the features that `delf extract` computes in process.
"""

from __future__ import annotations

import json

from absl import flags

from delf_tf.commands.common import define_extractor_flags


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    define_extractor_flags(flag_values, remote=False)
    flags.DEFINE_string(
        "export_base", None, "writes <export_base>/<model_name>/<version>/", **define
    )
    flags.DEFINE_string("model_name", "delf", "model name (TF Serving's --model_name)", **define)
    flags.DEFINE_integer(
        "version", None, "version number (default one above the highest existing)", **define
    )
    flags.mark_flag_as_required("export_base", **define)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.commands.common import extractor_from_flags, warn_if_untrained
    from delf_tf.contract import SIGNATURES
    from delf_tf.errors import InputError
    from delf_tf.export import export_saved_model

    if flag_values.model and flag_values["weights"].present:
        raise InputError("--weights applies only without --model")
    extractor = extractor_from_flags(flag_values)
    module = getattr(extractor, "module", None)
    if module is None:
        raise InputError(f"{flag_values.model}: already an export; serve it as it is")
    warn_if_untrained(extractor)
    path = export_saved_model(
        module,
        flag_values.export_base,
        model_name=flag_values.model_name,
        version=flag_values.version,
    )
    print(
        json.dumps(
            {
                "export": str(path),
                "model_name": flag_values.model_name,
                "version": int(path.name),
                "fingerprint": module.fingerprint,
                "descriptor_dim": module.descriptor_dim,
                "global_dim": module.global_dim,
                "signatures": list(SIGNATURES),
            }
        )
    )
    return 0
