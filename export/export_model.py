"""Export a model as a TF Serving SavedModel: <export_base>/<model_name>/<version>/.

A thin main over `delf export` (see `python export/export_model.py --help`), e.g.
    python export/export_model.py --model=runs/attention/model.keras --pca=pca.npz \
        --export_base=models
"""

from delf_tf.cli import run_command_main

if __name__ == "__main__":
    run_command_main("export")
