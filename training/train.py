"""Train one DELF stage: `python training/train.py --flagfile=training/configs/descriptor.flags`.

A thin main over `delf train` (delf_tf/commands/train.py): the same flags,
`--help`, errors and exit statuses; the loop is delf_tf/training/trainer.py.
"""

from delf_tf.cli import run_command_main

if __name__ == "__main__":
    run_command_main("train")
