"""The `delf` command: one entry point, one subcommand per pipeline step.

Each subcommand module defines its absl flags on its own FlagValues (so
`delf extract --help` lists only extract's flags and `--flagfile` works) and
imports TensorFlow only inside `run`, so `delf --help` and `delf X --help`
answer at once. Conventions every command follows:
- exactly one JSON summary on stdout; notes, warnings and progress on stderr;
- a user error (`delf_tf.errors.DelfError`, or an OSError naming a file) is one
  line `delf <command>: error: <message>` and exit status 1; a traceback means a bug;
- exit statuses: 0 done, 1 user error, 2 bad command line, 3 done but some inputs
  failed (listed in the summary).
TensorFlow's native start-up chatter is hidden unless DELF_TF_LOGS=1.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import flags, logging

from delf_tf.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, DelfError
from delf_tf.tf_runtime import import_tensorflow_quietly, quiet_library_loggers

# name -> (module under delf_tf.commands, one-line help, whether it runs TensorFlow)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "extract": ("extract", "extract DELF/DELG features of images into a feature store", True),
    "fit-pca": ("fit_pca", "learn PCA (mean, projection, variances) from raw descriptors", False),
    "index": ("index", "build (or --append to) one index over a feature store", False),
    "search": ("search", "rank the images of an index against query images", True),
    "match": ("match", "match two images (nearest neighbours + RANSAC), draw the matches", True),
    "evaluate": ("evaluate", "mAP / mP@k on Oxford5k, ROxford5k, RParis6k or a JSON set", True),
    "export": ("export", "export a SavedModel that TF Serving serves as it is", True),
    "convert": ("convert", "a released reference model as a Keras model file (.keras)", True),
    "serve": ("serve", "TF Serving's gRPC/REST APIs over exports (dev and CI stand-in)", True),
    "train": ("train", "train one DELF stage (descriptor, attention, joint) with tf.data", True),
    "build-tfrecords": ("build_tfrecords", "write labelled images as sharded TFRecords", True),
    "demo": ("demo", "end to end on scikit-image photos: extract, index, query, match", True),
}
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def usage() -> str:
    lines = [
        "usage: delf <command> [--flags]   (delf <command> --help lists its flags)",
        "",
        "pipeline: extract -> fit-pca -> index -> search / match / evaluate -> export -> serve",
        "",
    ]
    width = max(len(name) for name in COMMANDS)
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text, _) in COMMANDS.items()]
    lines += [
        "",
        "exit status: 0 done, 1 user error (one line on stderr), 2 bad command line,",
        "3 done but some inputs failed (listed in the JSON summary on stdout).",
        "Every command takes --flagfile=FILE. DELF_TF_LOGS=1 shows TensorFlow's own logs.",
    ]
    return "\n".join(lines)


def command_flags(name: str) -> tuple[object, flags.FlagValues]:
    """The command module of `name` and a FlagValues with its flags defined."""
    command = importlib.import_module(f"delf_tf.commands.{COMMANDS[name][0]}")
    flag_values = flags.FlagValues()
    command.define_flags(flag_values)
    return command, flag_values


# Shared flags by purpose, in the order help lists them (after the command's own flags).
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("model", "weights", "seed", "model_config", "delf_config", "pca"),
    "extraction settings": (
        "preset",
        "extraction_config",
        "score_threshold",
        "max_features",
        "max_image_size",
        "precision",
    ),
    "extraction in TF Serving": ("server", "protocol", "model_name"),
    "ranking": ("ranking", "nprobe", "rerank_matches"),
    "matching and RANSAC": (
        "retrieval_config",
        "distance_bound",
        "transform",
        "residual_threshold",
        "max_trials",
        "ransac",
        "ransac_seed",
        "backend",
    ),
    "distributed extraction (Apache Beam)": ("runner", "beam_options", "batch_size"),
}
GENERAL_HELP = (
    "general:\n"
    "  --flagfile=FILE: read flags from FILE, one --name=value a line\n"
    "  --undefok=NAMES: flag names (comma-separated) that may be given without being defined"
)


def command_help(name: str, flag_values: flags.FlagValues) -> str:
    """The command's help: its own flags first, then the shared ones grouped by purpose,
    deprecated names last; one default style, `(default X)`."""
    module = f"delf_tf.commands.{COMMANDS[name][0]}"
    by_module = flag_values.flags_by_module_dict()
    own = [flag for flag in by_module.get(module, []) if not _deprecated(flag)]
    shared = {
        flag.name: flag
        for flags_of in by_module.values()
        for flag in flags_of
        if flag not in own and not _deprecated(flag)
    }
    sections = [(f"{name} flags", own)]
    for title, names in FLAG_GROUPS.items():
        sections.append((title, [shared.pop(n) for n in names if n in shared]))
    sections.append(("other", list(shared.values())))
    old = [f for flags_of in by_module.values() for f in flags_of if _deprecated(f)]
    sections.append(("deprecated names (work until the next release)", old))
    text = [f"delf {name}: {COMMANDS[name][1]}"]
    for title, members in sections:
        if members:
            text.append(f"{title}:\n" + "\n".join(_flag_help(flag) for flag in members))
    text.append(GENERAL_HELP)
    return "\n\n".join(text) + "\n"


def _deprecated(flag: flags.Flag) -> bool:
    return (flag.help or "").startswith("deprecated")


def _flag_help(flag: flags.Flag) -> str:
    import textwrap

    values = getattr(flag.parser, "enum_values", None)
    text = flag.help or ""
    if values and text.startswith("<"):  # absl's own "<a|b>: " prefix of enum flags
        text = text.split(">: ", 1)[-1]
    if flag.boolean:
        usage = f"--[no]{flag.name}"
    elif values and len(values) <= 4:
        usage = f"--{flag.name}={'|'.join(values)}"
    elif values:
        usage = f"--{flag.name}=<name>"
        text += f" (one of {', '.join(values)})"
    else:
        usage = f"--{flag.name}=<{flag.flag_type().split()[-1]}>"
    if "(default" not in text and flag.default not in (None, "", []):
        default = flag.default
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, list):
            default = ",".join(map(str, default))
        text += f" (default {default})"
    if any(
        "must have a value other than None" in getattr(v, "message", "") for v in flag.validators
    ):
        text += " [required]"
    return textwrap.fill(
        f"{usage}: {text}",
        width=100,
        initial_indent="  ",
        subsequent_indent="      ",
        break_on_hyphens=False,
        break_long_words=False,
    )


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in HELP_FLAGS + ("help",):
        print(usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        return EXIT_OK if len(argv) >= 2 else EXIT_USAGE
    name = argv[1]
    if name not in COMMANDS:
        print(f"delf: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    command, flag_values = command_flags(name)
    # Help first: required-flag validators must not stand between a user and --help.
    if any(arg in HELP_FLAGS for arg in argv[2:]):
        print(command_help(name, flag_values))
        return EXIT_OK
    try:
        leftover = flag_values([f"delf {name}", *argv[2:]])[1:]
    except flags.Error as error:
        print(f"delf {name}: {one_line(error)} (see delf {name} --help)", file=sys.stderr)
        return EXIT_USAGE
    if leftover:
        print(
            f"delf {name}: unexpected arguments {leftover}; every input is a --flag "
            f"(see delf {name} --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    logging.use_absl_handler()
    flags.FLAGS.mark_as_parsed()  # our flags live on the command's FlagValues: no absl warning
    logging.set_verbosity(logging.INFO)
    quiet_library_loggers()
    try:
        check_input_paths(flag_values)  # before TensorFlow loads: answered at once
        if COMMANDS[name][2]:
            import_tensorflow_quietly()
        return int(command.run(flag_values) or EXIT_OK)
    except (DelfError, OSError) as error:
        print(f"delf {name}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"delf {name}: interrupted", file=sys.stderr)
        return 130


# Flags that name an existing input file or folder (in every command that has them).
INPUT_PATH_FLAGS = (
    "images",
    "image",
    "queries",
    "image1",
    "image2",
    "features",
    "index",
    "model",
    "pca",
    "model_config",
    "extraction_config",
    "retrieval_config",
    "delf_config",
    "dataset_dir",
    "groundtruth",
)


def check_input_paths(flag_values: flags.FlagValues) -> None:
    """InputError for an input flag whose file or folder does not exist (remote paths
    and glob patterns, which Beam reads, are left to the command)."""
    from pathlib import Path

    from delf_tf.errors import InputError

    for name in INPUT_PATH_FLAGS:
        if name not in flag_values or not flag_values[name].value:
            continue
        value = str(flag_values[name].value)
        if "://" in value or any(char in value for char in "*?["):
            continue
        if not Path(value).exists():
            raise InputError(f"--{name}={value}: no such file or directory")


def one_line(error: BaseException) -> str:
    """The error's message on one line (OSErrors name their file)."""
    if isinstance(error, OSError) and not isinstance(error, DelfError) and error.filename:
        reason = error.strerror or error
        if isinstance(error, (FileExistsError, NotADirectoryError)) and os.path.isfile(
            error.filename
        ):  # making a folder where a file is ("File exists" says too little)
            reason = "a file, where a folder is needed"
        text = f"{error.filename}: {reason}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def run_main() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv))


def run_command_main(name: str) -> None:
    """Entry point of a thin main (training/train.py, export/export_model.py, ...)."""
    sys.exit(main(["delf", name, *sys.argv[1:]]))


if __name__ == "__main__":
    run_main()
