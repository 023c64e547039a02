"""Write labelled images as sharded TFRecords (+ label map, per-class validation split).

    python training/build_tfrecords.py --image_folder=photos/ --output_dir=records/
    python training/build_tfrecords.py --csv=train.csv --image_root=train/ --output_dir=records/

A thin main over `delf build-tfrecords` (delf_tf/commands/build_tfrecords.py).
"""

from delf_tf.cli import run_command_main

if __name__ == "__main__":
    run_command_main("build-tfrecords")
