"""Write labelled images as sharded TFRecords (+ label map, per-class validation split).

    python training/build_tfrecords.py --image_folder=photos/ --output=records/
    python training/build_tfrecords.py --csv=train.csv --image_root=train/ --output=records/

A thin absl main over `delf build-tfrecords` (delf_tf/commands/build_tfrecords.py).
"""

from absl import app, flags

from delf_tf.commands import build_tfrecords as command

command.define_flags(flags.FLAGS)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    return command.run(flags.FLAGS)


if __name__ == "__main__":
    app.run(main)
