"""`delf index`: one index over a feature store (new, or appended to), with its search
structures (the k-NN structure of the votes ranking, ASMK*) built once and saved."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from delf_tf.commands.common import define_lock_flag
from delf_tf.config import NEIGHBOR_BACKENDS

INDEX_TYPES = ("votes", "asmk")


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("features", None, "feature store from `delf extract`", **define)
    flags.DEFINE_string("output_dir", None, "index directory (replaced atomically)", **define)
    flags.DEFINE_string(
        "images",
        None,
        "the folder the features were extracted from: records image paths and sizes "
        "(needed by `delf search --visualize/--html`); without it paths are the store keys",
        **define,
    )
    flags.DEFINE_bool(
        "append",
        False,
        "add the store's images to the existing index at --output_dir (skips images "
        "already there; trained structures are extended without retraining when still "
        "valid); without it --output_dir is rebuilt from the store alone",
        **define,
    )
    flags.DEFINE_list(
        "index_type",
        None,
        "structures to build, any of votes (k-NN structure of the votes ranking), asmk "
        "(ASMK* codebook + inverted file); default votes for a new index, the present "
        "ones with --append",
        **define,
    )
    flags.DEFINE_enum(
        "backend",
        None,
        NEIGHBOR_BACKENDS,
        "k-NN structure of the votes ranking; auto (default for a new index): exact FAISS "
        "search up to 50 000 descriptors, IVF-PQ beyond; kdtree/brute are built at load; "
        "ivfpq-ondisk: 8-bit IVF-PQ whose inverted lists stay on disk, built in resumable "
        "shards (collections past the machine's memory; --append merges the new rows' "
        "lists without retraining); "
        "milvus: the votes ranking's descriptors AND the global descriptors go into "
        "Milvus collections at --milvus_uri (ASMK stays FAISS); default: the index's",
        **define,
    )
    flags.DEFINE_string(
        "milvus_uri",
        None,
        "with --backend=milvus: a Milvus Lite file (PATH.db, embedded, one process at a "
        "time) or a Milvus server URL (http://host:19530); default with --append: the "
        "index's",
        **define,
    )
    flags.DEFINE_string(
        "features_uri",
        None,
        "with --backend=milvus: where search workers read --features' store (a copy at "
        "gs://BUCKET/features, read through tf.io.gfile); default: --features",
        **define,
    )
    flags.DEFINE_integer(
        "shard_rows",
        None,
        "with --backend=ivfpq-ondisk: descriptors added per shard of the build (each "
        "shard a file, kept across a kill in <output_dir>.build/ so that a rerun resumes "
        "after the last finished shard); default 10 000 000",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_integer(
        "codebook_size",
        None,
        "ASMK visual words (default ~descriptors / 64 as a power of two, 16..65536); "
        "another size than the index's retrains the codebook",
        **define,
    )
    flags.DEFINE_bool(
        "recall",
        True,
        "measure the sampled recall@10 of an approximate k-NN structure against exact search",
        **define,
    )
    define_lock_flag(flag_values)
    flags.mark_flags_as_required(["features", "output_dir"], **define)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.errors import InputError
    from delf_tf.features.store import FeatureStore
    from delf_tf.locks import writer_lock

    output = Path(flag_values.output_dir)
    index_types = flag_values.index_type
    unknown = sorted(set(index_types or ()) - set(INDEX_TYPES))
    if unknown:
        raise InputError(f"--index_type {unknown}: known {list(INDEX_TYPES)}")
    if flag_values.images is not None and not Path(flag_values.images).is_dir():
        raise InputError(f"--images={flag_values.images}: no such directory")
    store = FeatureStore.open(flag_values.features)
    if next(store.stored_keys(), None) is None:
        raise InputError(f"{store.root}: an empty feature store (run `delf extract` into it)")
    # One writer per index: the read of an existing index (--append) and the swap of
    # the new one happen under the lock, so no concurrent writer's update is lost.
    with writer_lock(output, wait=flag_values.wait_for_lock):
        return _write(flag_values, store, output, index_types)


def _write(flag_values, store, output: Path, index_types) -> int:
    from delf_tf.atomic import recover_staged_directory
    from delf_tf.errors import InputError
    from delf_tf.features import fingerprint as fingerprints
    from delf_tf.retrieval.index import HEADER, Index

    # First of all: a run killed while swapping the index folder may have left the
    # previous index under its backup name; nothing may be decided before it is back.
    recover_staged_directory(output)
    if output.is_dir() and not (output / HEADER).exists() and any(output.iterdir()):
        raise InputError(f"{output}: a folder that is not an index; refusing to replace it")
    if flag_values.append and (output / HEADER).exists():
        existing = Index.load(output)
        index, added = existing.add_store(store, flag_values.images, beside=output)
    else:
        index = Index.from_store(store, flag_values.images, beside=output)
        added = index.num_images
    milvus = flag_values.backend == "milvus" or any(
        header.get("backend") == "milvus" for header in index.structures.values()
    )
    for flag in ("milvus_uri", "features_uri"):
        if getattr(flag_values, flag) and not milvus:
            raise InputError(f"--{flag} needs --backend=milvus (or an index built with it)")
    report = index.build_structures(
        backend=flag_values.backend,
        milvus_uri=flag_values.milvus_uri,
        milvus_prefix=milvus_prefix(output) if milvus else None,
        stores={store.identity: flag_values.features_uri or str(Path(store.root).resolve())}
        if milvus
        else None,
        votes=None if index_types is None else "votes" in index_types,
        asmk=None if index_types is None else "asmk" in index_types,
        codebook_size=flag_values.codebook_size,
        recall=flag_values.recall,
        work_dir=output.parent / f"{output.name}.build",
        shard_rows=flag_values.shard_rows,
    )
    index.save(output)
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    summary = {
        "output_dir": str(output),
        "images": index.num_images,
        "added": added,
        "descriptors": index.num_descriptors,
        "descriptor_dim": index.dim,
        "global_descriptors": index.global_descriptors is not None,
        "fingerprint": fingerprints.short(index.fingerprint) if index.fingerprint else None,
        "structures": {name: value for name, value in report.items() if name != "notes"},
    }
    print(json.dumps(summary))
    return 0


def milvus_prefix(output: Path) -> str:
    """The Milvus collection prefix of the index at `output` (one per index folder, so
    a rerun after a kill finds and drops what the killed run left)."""
    import hashlib

    digest = hashlib.sha256(str(output.resolve()).encode("utf-8")).hexdigest()
    return f"delf_{digest[:12]}"
