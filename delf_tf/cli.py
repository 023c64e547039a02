"""The `delf` command: one entry point, one subcommand per pipeline step.

Each subcommand module defines its absl flags on its own FlagValues (so
`delf extract --help` lists only extract's flags and `--flagfile` works) and
is imported only when used, so `delf --help` starts without TensorFlow.
"""

from __future__ import annotations

import importlib
import sys

from absl import flags, logging

# name -> (module under delf_tf.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("extract", "extract DELF features of an image or a folder into a feature store"),
    "fit-pca": ("fit_pca", "learn PCA (mean, projection, variances) from raw descriptors"),
    "export": ("export", "export a SavedModel that TF Serving serves as it is"),
    "serve": ("serve", "TF Serving's gRPC/REST APIs over exported models (dev and CI stand-in)"),
    "train": ("train", "train one DELF stage (descriptor, attention, joint) with tf.data"),
    "build-tfrecords": ("build_tfrecords", "write labelled images as sharded TFRecords"),
    "index": ("index", "build (or --append to) one global index over a feature store"),
    "search": ("search", "rank the images of an index against a query image (votes + RANSAC)"),
    "match": ("match", "match two images (nearest neighbours + RANSAC) and draw the matches"),
    "evaluate": (
        "evaluate",
        "mAP / mP@k of an index on Oxford5k, ROxford5k, RParis6k or a JSON set",
    ),
    "demo": ("demo", "end to end on scikit-image photos: extract, index, query, match picture"),
}


def usage() -> str:
    lines = ["usage: delf <command> [--flags]   (delf <command> --help for its flags)", ""]
    width = max(len(name) for name in COMMANDS)
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return 0 if len(argv) >= 2 else 2
    name = argv[1]
    if name not in COMMANDS:
        print(f"delf: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    command = importlib.import_module(f"delf_tf.commands.{COMMANDS[name][0]}")
    flag_values = flags.FlagValues()
    command.define_flags(flag_values)
    flags.DEFINE_bool("help", False, "show this command's flags", flag_values=flag_values)
    try:
        flag_values([f"delf {name}", *argv[2:]])
    except flags.Error as error:
        print(f"delf {name}: {error}\n(see delf {name} --help)", file=sys.stderr)
        return 2
    if flag_values.help:
        print(f"delf {name}: {COMMANDS[name][1]}\n")
        print(flag_values.get_help())
        return 0
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    return int(command.run(flag_values) or 0)


def run_main() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run_main()
