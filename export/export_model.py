"""Export a DelfModel as a TF Serving SavedModel: <export_base>/<model_name>/<version>/.

The same flags as `delf export` (see `python export/export_model.py --help`), e.g.
    python export/export_model.py --model=runs/attention/ckpt --pca=pca.npz \
        --config=extraction.json --export_base=models
"""

from absl import app, flags

from delf_tf.commands import export

export.define_flags(flags.FLAGS)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    return export.run(flags.FLAGS)


if __name__ == "__main__":
    app.run(main)
