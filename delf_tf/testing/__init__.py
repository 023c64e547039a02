"""Test and benchmark scaffolding, not part of the library's pipeline.

Imported only by `tests/` and `bench/`:
- `soak`: a bounded soak run of `delf serve` on loopback (good traffic under hostile);
- `synthetic_releases`: TF1 stand-ins with the released DELF/DELG models' feeds and fetches;
- `synthetic_training`: a synthetic landmark task the CPU can learn (attention check).
"""
