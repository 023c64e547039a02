"""The README's pipeline and the package docstring's Python example run as written.

Only the model changes: the README's `$MODEL` gets `--model_config=<the tests' tiny
model>` added (same random weights, seed 0, tiny backbone), and the Python example's
`build_extractor(...)` gets `model_config=TINY_MODEL`. Images are made here.
"""

from __future__ import annotations

import doctest
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import skimage_photo as photo
from PIL import Image

import delf_tf
from delf_tf.cli import main
from delf_tf.retrieval.queries import cropped, rotated, scaled

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def collection(tmp_path, monkeypatch):
    """photos/ (two landmarks in three and two views, a distractor), query.jpg and
    groundtruth.json in the working directory, as the README's commands expect."""
    photos = tmp_path / "photos"
    photos.mkdir()
    views = {
        "astronaut_a": photo("astronaut"),
        "astronaut_b": scaled(photo("astronaut"), 0.8),
        "coffee_a": photo("coffee"),
        "coffee_b": cropped(photo("coffee"), 0.8),
        "rocket": photo("rocket"),
    }
    for name, image in views.items():
        Image.fromarray(image).save(photos / f"{name}.png")
    Image.fromarray(rotated(photo("astronaut"), 10)).save(tmp_path / "query.jpg", quality=95)
    labels = {name: None if name == "rocket" else name.split("_")[0] for name in views}
    groundtruth = {"labels": labels, "queries": ["astronaut_a", "coffee_a"]}
    (tmp_path / "groundtruth.json").write_text(json.dumps(groundtruth))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def readme_pipeline() -> tuple[str, list[str]]:
    """(the value of MODEL, the `delf` command lines) of the README's pipeline block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## The pipeline on one screen", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)
    block = block.replace("\\\n", " ")
    model = None
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].startswith("MODEL="):
            model = words[0].split("=", 1)[1]
        elif words and words[0] == "delf":
            commands.append(line)
    return model, commands


def test_readme_pipeline_runs_as_written(collection, model_config_file, capsys):
    model, commands = readme_pipeline()
    assert model is not None and "--score_threshold=0" in model.split()
    model = f"{model} --model_config={model_config_file}"
    ran = []
    for line in commands:
        argv = shlex.split(line.replace("$MODEL", model), comments=True)
        if argv[1] in ("export", "serve") or any(a.startswith("--server") for a in argv):
            continue  # serving: tests/serving
        assert main(argv) == 0, (line, capsys.readouterr().err)
        out = capsys.readouterr().out.strip().splitlines()
        ran.append((argv[1], json.loads(out[-1])))
    assert [name for name, _ in ran] == [
        "extract",
        "fit-pca",
        "extract",
        "index",
        "search",
        "evaluate",
    ]
    outputs = dict(ran[3:])
    assert ran[0][1]["mean_features"] > 0 and ran[0][1]["zero_features"] == 0
    assert outputs["index"]["images"] == 5 and outputs["index"]["descriptor_dim"] == 40
    results = outputs["search"]["results"]
    assert results and Path(results[0]["path"]).name == "astronaut_a.png"
    assert (collection / "results.html").is_file()
    assert outputs["evaluate"]["queries"] == 2
    assert (collection / "eval" / "report.html").is_file()

    # docs/retrieval.md's Python snippet, over the index the README made.
    docs = (REPO / "docs" / "retrieval.md").read_text(encoding="utf-8")
    snippet = docs.split("```python\n", 1)[1].split("```")[0]
    assert 'weights="random",' in snippet
    from tests.conftest import TINY_MODEL

    code = snippet.replace('weights="random",', 'weights="random", model_config=TINY_MODEL,')
    exec(compile(code, "docs/retrieval.md", "exec"), {"TINY_MODEL": TINY_MODEL})
    printed = capsys.readouterr().out.splitlines()
    assert printed and Path(printed[0].split()[0]).name == "astronaut_a.png"


def python_example() -> list[str]:
    """The `>>>` lines of the package docstring."""
    return [line[4:] for line in delf_tf.__doc__.splitlines() if line.startswith(">>> ")]


def test_package_docstring_example_is_the_readme_one_and_runs(collection):
    lines = python_example()
    assert len(lines) == 5
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("## The Python API", 1)[1].split("```python\n", 1)[1].split("```")[0]
    assert [line for line in block.splitlines() if line] == lines  # one example, twice
    Image.fromarray(photo("astronaut")).save(collection / "query.jpg")
    source = "".join(f">>> {line}\n" for line in lines).replace(
        'weights="random",', 'weights="random", model_config=TINY_MODEL,'
    )
    assert "TINY_MODEL" in source
    from tests.conftest import TINY_MODEL

    test = doctest.DocTestParser().get_doctest(
        source, {"TINY_MODEL": TINY_MODEL}, "delf_tf", None, 0
    )
    runner = doctest.DocTestRunner(verbose=False)
    runner.run(test, clear_globs=False)
    assert runner.summarize(verbose=False).failed == 0
    results = test.globs["results"]
    assert Path(results[0].path).name == "astronaut_a.png" and results[0].inliers > 0
    assert "delf_tf.build_extractor" in (delf_tf.__doc__ or "")
