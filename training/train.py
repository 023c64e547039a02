"""Train one DELF stage: `python training/train.py --flagfile=training/configs/descriptor.flags`.

A thin absl main; the flags and the run are those of `delf train`
(delf_tf/commands/train.py), the loop is delf_tf/training/trainer.py.
"""

from absl import app, flags

from delf_tf.commands import train as train_command

train_command.define_flags(flags.FLAGS)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    return train_command.run(flags.FLAGS)


if __name__ == "__main__":
    app.run(main)
