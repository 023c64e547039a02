"""`delf extract`: features of one image or a folder into a resumable feature store.

Every image that fails (or path that is skipped: not a regular file, a dangling or
looping link, an unreadable folder) is one line `skipped: <repr(path)>: <reason>`
on stderr and one JSON line in `<output_dir>/failures.jsonl`; the others are
extracted, and the exit status is then 3 (EXIT_PARTIAL). Images with 0 features are
listed there too (with a hint), and a run where every image has 0 features exits 3.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from delf_tf.commands.common import (
    define_extractor_flags,
    define_lock_flag,
    extraction_precision,
    extractor_from_flags,
    warn_if_untrained,
)
from delf_tf.commands.extract_beam import define_beam_flags, run_beam


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("images", None, "an image file or a folder (recursive)", **define)
    flags.DEFINE_string("output_dir", None, "feature store directory", **define)
    flags.DEFINE_enum(
        "format",
        None,
        ["npz", "delf", "both"],
        "feature files: npz (one .npz per image), delf (the reference's .delf, with a "
        ".delg_global for a DELG model) or both; default npz, or what the store records",
        **define,
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "delete the features already in --output_dir and extract every image again; "
        "without it a store of other extraction settings is refused",
        **define,
    )
    flags.mark_flags_as_required(["images", "output_dir"], **define)
    define_extractor_flags(flag_values)
    define_beam_flags(flag_values)
    define_lock_flag(flag_values)


def run(flag_values: flags.FlagValues) -> int:
    """Exit status EXIT_PARTIAL (3) when any image or path failed, after all the others."""
    if flag_values.runner:
        return run_beam(flag_values)
    from delf_tf.errors import EXIT_OK, EXIT_PARTIAL
    from delf_tf.extraction.folder import OutputFullError, extract_to_store

    def report(failure) -> None:  # repr(): a newline in a file name cannot forge a line
        print(f"skipped: {failure.path!r}: {failure.reason}", file=sys.stderr, flush=True)

    extractor = extractor_from_flags(flag_values)
    warn_if_untrained(extractor)
    formats = {None: None, "npz": ("npz",), "delf": ("delf",), "both": ("npz", "delf")}
    try:
        store, summary = extract_to_store(
            extractor,
            flag_values.images,
            flag_values.output_dir,
            formats=formats[flag_values.format],
            on_failure=report,
            overwrite=flag_values.overwrite,
            wait_for_lock=flag_values.wait_for_lock,
        )
    except OutputFullError as error:  # disk full: the summary of what was saved, then exit 1
        print(json.dumps({"output_dir": str(error.store.root), **error.summary.to_dict()}))
        raise
    if summary.zero_features:
        print(
            f"note: {len(summary.zero_features)} of {summary.extracted} images have "
            f"{summary.zero_features[0].reason} (listed in {summary.failures_file})",
            file=sys.stderr,
        )
    precision = extraction_precision(extractor)
    print(json.dumps({"output_dir": str(store.root), **summary.to_dict(), "precision": precision}))
    return EXIT_PARTIAL if summary.failed or summary.all_zero else EXIT_OK
