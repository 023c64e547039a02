"""The reference implementation's released models, as one more extraction back end.

The released DELF/DELG models of tensorflow/models research/delf
(`delf_gld_20190411`, `r50delg_gld_20200814`, `r101delg_gld_20200814`,
`r50delg_gldv2clean_20200914`, `r101delg_gldv2clean_20200914`) are TF1 graph
SavedModels without a usable signature. This package
- recognises such a folder as downloaded (`folder.find_release`);
- gives the settings of the matching reference config (`presets`);
- runs the release's own graph (no conversion that changes numbers) as the
  network stage of the one extraction graph (`network.ReleaseNetwork`), so that
  the reference post-processing, the export for TF Serving and everything
  downstream are the same code as for the project's own model;
- drives a release the reference extractor's way, prune + numpy post-processing
  (`reference`), as the baseline of `bench/releases.py` and an oracle in tests;
Synthetic stand-ins with the same feeds and fetches are test scaffolding:
`delf_tf.testing.synthetic_releases`.
"""
