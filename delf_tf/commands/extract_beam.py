"""`delf extract --runner=...`: the extraction as an Apache Beam pipeline (flags and driver).

Beam pipeline options travel in one flag, `--beam_options="--project=P --region=R ..."`
(split like a shell line), because absl rejects flags it does not know and the
`delf` command line drops what follows a `--` separator. This module imports
neither TensorFlow nor Beam, so `delf extract --help` stays instant; the pipeline
lives in `delf_tf.extraction.beam_pipeline`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys

from absl import flags

from delf_tf.errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, InputError

# `delf extract --format` (on main) -> FeatureStore formats; None keeps the store's own.
_FORMATS = {None: None, "npz": ("npz",), "delf": ("delf",), "both": ("npz", "delf")}
# With an exported model these are fixed in its graph; with any other model they are
# applied before the on-the-fly export (so they are allowed there).
_EXPORT_FIXED_FLAGS = (
    "weights",
    "seed",
    "model_config",
    "preset",
    "delf_config",
    "extraction_config",
    "pca",
    "score_threshold",
    "max_features",
    "max_image_size",
)


def define_beam_flags(flag_values: flags.FlagValues) -> None:
    """--runner, --beam_options, --batch_size (the last two only with --runner)."""
    define = {"flag_values": flag_values}
    flags.DEFINE_string(
        "runner",
        None,
        "run the extraction as an Apache Beam pipeline on this runner: DirectRunner, "
        "DataflowRunner, FlinkRunner, SparkRunner, PortableRunner, ... Workers run the "
        "exported SavedModel (--model, or an export of it made first); --images may then "
        "also be a glob pattern, and --images, --output_dir and --model gs:// paths",
        **define,
    )
    flags.DEFINE_string(
        "beam_options",
        "",
        "with --runner: Beam pipeline options as one string, e.g. "
        '"--direct_num_workers=2 --direct_running_mode=multi_processing" or '
        '"--project=P --region=R --temp_location=gs://B/tmp --setup_file=./setup.py"',
        **define,
    )
    flags.DEFINE_integer(
        "batch_size",
        None,
        "with --runner: most images per serving_default call (default 8)",
        lower_bound=1,
        **define,
    )
    flags.register_multi_flags_validator(
        ["runner", "beam_options", "batch_size"],
        lambda values: (
            bool(values["runner"]) or (not values["beam_options"] and values["batch_size"] is None)
        ),
        message="--beam_options and --batch_size apply only with --runner",
        flag_values=flag_values,
    )


def run_beam(flag_values: flags.FlagValues) -> int:
    """Runs `delf extract` as a Beam pipeline; prints the JSON summary; returns the exit code."""
    from delf_tf.atomic import is_remote
    from delf_tf.commands.common import extractor_from_flags, note, warn_if_untrained
    from delf_tf.export import export_saved_model
    from delf_tf.extraction import beam_pipeline
    from delf_tf.tf_runtime import VERBOSE_ENV

    if os.environ.get(VERBOSE_ENV) != "1":  # Beam's INFO chatter (and its workers', relayed)
        logging.getLogger("apache_beam").setLevel(logging.WARNING)

    if "server" in flag_values and flag_values.server:
        raise InputError("--runner runs the exported model on the Beam workers; drop --server")
    if "overwrite" in flag_values and flag_values.overwrite:
        raise InputError("--overwrite applies without --runner; give Beam a new --output_dir")
    try:
        beam_args = shlex.split(flag_values.beam_options or "")
    except ValueError as error:
        raise InputError(f"--beam_options: {error}") from error
    runner = flag_values.runner
    beam_pipeline.check_runner(runner)  # before any export is made
    if flag_values.batch_size is not None and flag_values.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {flag_values.batch_size}")
    batch_size = flag_values.batch_size or 8
    local_runner = beam_pipeline.is_local_runner(runner)

    export_dir = beam_pipeline.resolve_export(flag_values.model) if flag_values.model else None
    if export_dir is None and flag_values.model and is_remote(flag_values.model):
        raise InputError(f"{flag_values.model}: not an export of `delf export`")
    if export_dir is not None:
        given = [f"--{name}" for name in _EXPORT_FIXED_FLAGS if flag_values[name].present]
        if given:
            raise InputError(
                f"{flag_values.model}: an export carries its own settings; drop {given} "
                "(or export again with them)"
            )
        return _run(flag_values, beam_pipeline, export_dir, runner, beam_args, batch_size)

    # Not an export: export it first, so every worker runs the same served graph.
    extractor = extractor_from_flags(flag_values)
    module = getattr(extractor, "module", None)
    if module is None:
        raise InputError(f"{flag_values.model}: cannot export this model for the pipeline")
    warn_if_untrained(extractor)
    with beam_pipeline.LocalExport() as base:
        export_dir = str(export_saved_model(module, base))
        note(f"exported the model to {export_dir} for the pipeline")
        staged = None
        temp = None if local_runner else beam_pipeline.temp_location(beam_args)
        if temp:
            staged = beam_pipeline.stage_export(export_dir, temp)
            note(f"staged the export at {staged} for the workers")
        elif not local_runner:
            note(
                f"{runner}: workers read the export at the local path {export_dir}; give "
                "--temp_location in --beam_options to stage it where remote workers can read it"
            )
        try:
            return _run(
                flag_values, beam_pipeline, staged or export_dir, runner, beam_args, batch_size
            )
        finally:
            if staged:
                beam_pipeline.remove_tree(staged)


def _run(flag_values, beam_pipeline, export_dir, runner, beam_args, batch_size) -> int:
    from delf_tf.locks import writer_lock

    formats = _FORMATS[flag_values["format"].value] if "format" in flag_values else None
    wait = "wait_for_lock" in flag_values and flag_values.wait_for_lock
    # The launching process holds the store's writer lock for the whole pipeline (its
    # workers write under it); a remote store (gs://) cannot be locked and is exempt.
    with writer_lock(flag_values.output_dir, wait=wait):
        summary, report = beam_pipeline.run_extraction(
            flag_values.images,
            flag_values.output_dir,
            export_dir,
            runner,
            beam_args,
            batch_size=batch_size,
            formats=formats,
        )
    for path, reason in summary.failed:
        print(f"skipped: {path!r}: {reason}", file=sys.stderr)
    print(
        json.dumps(
            {
                "output_dir": flag_values.output_dir,
                "runner": runner,
                "model": export_dir,
                **summary.to_dict(),
                "report": report,
            }
        )
    )
    if summary.images and not summary.extracted + summary.skipped_existing:
        return EXIT_ERROR
    all_zero = summary.extracted and not summary.features
    if all_zero:
        print(
            f"note: all {summary.extracted} images have 0 features: no location scored above "
            "the export's score_threshold (untrained weights score far below the reference "
            "100: export with --score_threshold=0)",
            file=sys.stderr,
        )
    return EXIT_PARTIAL if summary.failed or all_zero else EXIT_OK
