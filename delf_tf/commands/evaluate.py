"""`delf evaluate`: mAP and mP@k of an index on Oxford5k, ROxford5k/RParis6k or a JSON set."""

from __future__ import annotations

import json

from absl import flags

from delf_tf.commands.common import (
    check_output_path,
    define_extractor_flags,
    extractor_for_index,
    is_untrained,
)
from delf_tf.commands.retrieval_flags import (
    define_ranking_flags,
    define_retrieval_flags,
    retrieval_config_from_flags,
)
from delf_tf.config import RetrievalConfig
from delf_tf.evaluation.datasets import DATASET_KINDS
from delf_tf.evaluation.metrics import TIE_POLICIES


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_enum("dataset", None, list(DATASET_KINDS), "benchmark protocol", **define)
    flags.DEFINE_string(
        "dataset_dir",
        None,
        "dataset folder (images + ground truth); not needed for --dataset=json with "
        "--groundtruth and --images",
        **define,
    )
    flags.DEFINE_string(
        "images", None, "image folder (default found under --dataset_dir)", **define
    )
    flags.DEFINE_string(
        "groundtruth",
        None,
        "ground-truth file or folder (default found under --dataset_dir); for "
        '--dataset=json a file {"labels": {image: landmark or null}, "queries": [image, ...]}',
        **define,
    )
    flags.DEFINE_string("index", None, "index of the database images (`delf index`)", **define)
    flags.DEFINE_integer(
        "shortlist",
        None,
        f"images verified by RANSAC (default {RetrievalConfig().shortlist})",
        **define,
    )
    flags.DEFINE_list("setups", None, "setups to report (default all of the dataset)", **define)
    flags.DEFINE_enum(
        "ties", "pessimistic", list(TIE_POLICIES), "order within equal scores", **define
    )
    flags.DEFINE_string(
        "output_dir",
        None,
        "report folder: metrics.json, per_query.csv, pr_curves.png, report.html",
        **define,
    )
    flags.mark_flags_as_required(["dataset", "index", "output_dir"], **define)
    flags.register_multi_flags_validator(
        ["dataset", "dataset_dir", "groundtruth"],
        lambda v: bool(v["dataset_dir"]) or (v["dataset"] == "json" and bool(v["groundtruth"])),
        message="give --dataset_dir (or, with --dataset=json, --groundtruth)",
        **define,
    )
    define_extractor_flags(flag_values)
    define_retrieval_flags(flag_values)
    define_ranking_flags(flag_values)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.errors import InputError
    from delf_tf.evaluation.datasets import load_dataset
    from delf_tf.evaluation.engine import engine_rank_fn
    from delf_tf.evaluation.evaluate import evaluate, write_report
    from delf_tf.report.evaluation_page import write_evaluation_report
    from delf_tf.retrieval.search import load_searcher

    config = retrieval_config_from_flags(flag_values, shortlist=flag_values.shortlist)
    dataset = load_dataset(
        flag_values.dataset,
        flag_values.dataset_dir or "",
        flag_values.images,
        flag_values.groundtruth,
    )
    unknown = sorted(set(flag_values.setups or ()) - set(dataset.setups))
    if unknown:  # before any model is built
        raise InputError(f"--setups: {dataset.name} has no {unknown}; it has {dataset.setups}")
    check_output_path("output_dir", flag_values.output_dir, folder=True)
    searcher = load_searcher(flag_values.index, config)
    index = searcher.index
    extractor = extractor_for_index(flag_values, index, cached=False)
    rank_fn = engine_rank_fn(extractor, searcher)
    result = evaluate(dataset, rank_fn, setups=flag_values.setups, ties=flag_values.ties)
    paths = write_report(result, flag_values.output_dir)
    paths["report"] = write_evaluation_report(
        result, dataset, flag_values.output_dir, untrained=is_untrained(extractor)
    )
    report = result.to_dict()
    report["ranking"] = searcher.method
    report["files"] = {name: str(path) for name, path in paths.items()}
    print(json.dumps(report))
    return 0
