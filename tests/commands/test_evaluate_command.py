"""`delf evaluate` on a tiny JSON benchmark of transformed scikit-image photos."""

import csv
import json

from conftest import skimage_photo as photo
from PIL import Image

from delf_tf.cli import main
from delf_tf.extraction.folder import extract_to_store
from delf_tf.retrieval import Index
from delf_tf.retrieval.queries import cropped, rotated, scaled


def test_evaluate_json_dataset(tmp_path, extractor, small_config, model_config_file, capsys):
    images = tmp_path / "bench" / "images"
    images.mkdir(parents=True)
    views = {
        "astronaut_a": photo("astronaut"),
        "astronaut_b": rotated(photo("astronaut"), 10),
        "astronaut_c": scaled(photo("astronaut"), 0.8),
        "coffee_a": photo("coffee"),
        "coffee_b": cropped(photo("coffee"), 0.8),
        "rocket": photo("rocket"),
    }
    for name, image in views.items():
        Image.fromarray(image).save(images / f"{name}.png")
    labels = {name: None if name == "rocket" else name.split("_")[0] for name in views}
    groundtruth = {"labels": labels, "queries": ["astronaut_a", "coffee_a"]}
    (tmp_path / "bench" / "groundtruth.json").write_text(json.dumps(groundtruth))

    store, _ = extract_to_store(extractor, images, tmp_path / "features", progress=False)
    index = Index.from_store(store, images, progress=False)
    index.build_structures(asmk=True, progress=False)
    index.save(tmp_path / "index")
    config = tmp_path / "extraction.json"
    small_config.save(config)
    report_dir = tmp_path / "report"
    args = [
        "--dataset=json",
        f"--dataset_dir={tmp_path / 'bench'}",
        f"--index={tmp_path / 'index'}",
        f"--output_dir={report_dir}",
        f"--extraction_config={config}",
        f"--model_config={model_config_file}",  # the session's `extractor` (tiny, seed 0)
    ]
    assert main(["delf", "evaluate", *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["queries"] == 2
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["queries"] == 2
    summary = next(iter(metrics["setups"].values()))
    # Transformed copies of the same photo share many exact-ish descriptors even with
    # random weights: both queries must rank their own landmark's views first.
    assert summary["mAP"] == 1.0, summary
    with open(report_dir / "per_query.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    assert (report_dir / "pr_curves.png").stat().st_size > 0
    # report.html (delf_tf/report, rendered in tests/report/test_report_html.py): named in the
    # summary, with the mAP and both queries' first ranked images (3 other views each).
    assert printed["files"]["report"] == str(report_dir / "report.html")
    page = (report_dir / "report.html").read_text()
    assert '<td class="num">1.0000</td>' in page
    assert page.count('<figure class="card result') >= 2 * 3

    # The ASMK* ranking goes through the same batch path; re-ranking keeps mAP 1.
    assert main(["delf", "evaluate", *args, "--ranking=asmk"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ranking"] == "asmk"
    assert next(iter(report["setups"].values()))["mAP"] == 1.0
    assert main(["delf", "evaluate", *args, "--ranking=global"]) == 1
    assert "no global descriptors" in capsys.readouterr().err

    # A query extractor of another model (seed) is refused.
    assert main(["delf", "evaluate", *args, "--seed=1"]) == 1
    assert "extractor" in capsys.readouterr().err
