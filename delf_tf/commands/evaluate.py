"""`delf evaluate`: mAP and mP@k of an index on Oxford5k, ROxford5k/RParis6k or a JSON set."""

from __future__ import annotations

import json
import sys

from absl import flags

from delf_tf.commands.common import define_extractor_flags, extractor_from_flags
from delf_tf.commands.retrieval_flags import (
    define_ranking_flags,
    define_retrieval_flags,
    retrieval_config_from_flags,
)
from delf_tf.errors import FingerprintMismatchError
from delf_tf.evaluation.datasets import DATASET_KINDS, GroundTruthError, load_dataset
from delf_tf.evaluation.engine import engine_rank_fn
from delf_tf.evaluation.evaluate import evaluate, write_report
from delf_tf.evaluation.metrics import TIE_POLICIES
from delf_tf.retrieval.index import Index, IndexFormatError
from delf_tf.retrieval.search import Searcher


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_enum("dataset", None, list(DATASET_KINDS), "benchmark protocol", **define)
    flags.DEFINE_string("dataset_dir", None, "dataset folder (images + ground truth)", **define)
    flags.DEFINE_string(
        "images", None, "image folder (default: found under --dataset_dir)", **define
    )
    flags.DEFINE_string(
        "groundtruth", None, "ground-truth file or folder (default: found)", **define
    )
    flags.DEFINE_string("index", None, "index of the database images (`delf index`)", **define)
    flags.DEFINE_integer("shortlist", None, "images verified by RANSAC (default 100)", **define)
    flags.DEFINE_list("setups", None, "setups to report (default: all of the dataset)", **define)
    flags.DEFINE_enum(
        "ties", "pessimistic", list(TIE_POLICIES), "order within equal scores", **define
    )
    flags.DEFINE_string(
        "output", None, "report folder: metrics.json, per_query.csv, pr_curves.png", **define
    )
    flags.mark_flags_as_required(["dataset", "dataset_dir", "index", "output"], **define)
    define_extractor_flags(flag_values)
    define_retrieval_flags(flag_values)
    define_ranking_flags(flag_values)


def run(flag_values: flags.FlagValues) -> int:
    try:
        config = retrieval_config_from_flags(flag_values, shortlist=flag_values.shortlist)
        dataset = load_dataset(
            flag_values.dataset,
            flag_values.dataset_dir,
            flag_values.images,
            flag_values.groundtruth,
        )
        index = Index.load(flag_values.index)
        searcher = Searcher(index, config)
        extractor = extractor_from_flags(flag_values)
        index.check_fingerprint(extractor.fingerprint)
    except (GroundTruthError, IndexFormatError, FingerprintMismatchError, ValueError) as error:
        print(f"delf evaluate: error: {error}", file=sys.stderr)
        return 1
    rank_fn = engine_rank_fn(extractor, searcher)
    try:
        result = evaluate(dataset, rank_fn, setups=flag_values.setups, ties=flag_values.ties)
    except ValueError as error:  # e.g. --ranking=global with queries without global descriptor
        print(f"delf evaluate: error: {error}", file=sys.stderr)
        return 1
    paths = write_report(result, flag_values.output)
    report = result.to_dict()
    report["ranking"] = searcher.method
    report["files"] = {name: str(path) for name, path in paths.items()}
    print(json.dumps(report, indent=2))
    return 0
