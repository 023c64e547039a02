"""`delf index`, `delf search` and `delf match` end to end, in process."""

import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from delf_tf.cli import main
from delf_tf.extraction.folder import extract_to_store
from delf_tf.retrieval import Index
from delf_tf.retrieval.queries import rotated


@pytest.fixture()
def fast(model_config_file):
    """Flags of a quick extraction with the tests' tiny model (the session's `extractor`)."""
    return [
        f"--model_config={model_config_file}",
        "--score_threshold=0",
        "--max_image_size=128",
        "--max_features=100",
    ]


def small(name, size=128):
    picture = Image.fromarray(np.asarray(getattr(skimage.data, name)())[:, :, :3])
    factor = size / max(picture.size)
    return picture.resize((round(picture.width * factor), round(picture.height * factor)))


@pytest.fixture()
def folders(tmp_path):
    first, second = tmp_path / "photos1", tmp_path / "photos2"
    first.mkdir(), second.mkdir()
    small("astronaut").save(first / "astronaut.png")
    small("coffee").save(first / "coffee.png")
    small("rocket").save(second / "rocket.png")
    Image.fromarray(rotated(np.asarray(small("astronaut")), 15)).save(tmp_path / "query.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not an image")
    return tmp_path


def test_index_append_search_and_errors(folders, extractor, capsys, fast):
    root = folders
    index = root / "index"
    # The session's extractor has the weights of `delf ... --model_config=<tiny> --seed=0`, so
    # its stores match the command's query extractor; it is traced once per session.
    for number in (1, 2):
        extract_to_store(extractor, root / f"photos{number}", root / f"features{number}", False)
    assert (
        main(
            [
                "delf",
                "index",
                f"--features={root / 'features1'}",
                f"--output_dir={index}",
                f"--images={root / 'photos1'}",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 2 and summary["added"] == 2
    append = [
        "delf",
        "index",
        f"--features={root / 'features2'}",
        f"--output_dir={index}",
        "--append",
        f"--images={root / 'photos2'}",
    ]
    assert main(append) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 3 and summary["added"] == 1
    assert [r.key for r in Index.load(index).images] == [
        "astronaut.png",
        "coffee.png",
        "rocket.png",
    ]

    picture = root / "results.png"
    search = ["delf", "search", f"--index={index}", f"--images={root / 'query.png'}", *fast]
    assert main([*search, "--top_k=2", f"--visualize={picture}"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in payload["results"]][0] == "astronaut.png"
    assert len(payload["results"]) == 2
    assert payload["results"][0]["inliers"] > payload["results"][1]["inliers"]
    assert Image.open(picture).size[0] > 128

    # Many queries: one JSON line each, an unreadable image is an error line (exit 3).
    queries = root / "queries"
    queries.mkdir()
    (queries / "a_query.png").write_bytes((root / "query.png").read_bytes())
    (queries / "b_broken.jpg").write_bytes((root / "broken.jpg").read_bytes())
    os.mkfifo(queries / "c_pipe.jpg")  # skipped paths are failed queries, as in extract
    (queries / "d_dangling.png").symlink_to(root / "nowhere.png")
    results = root / "results.jsonl"
    batch = ["delf", "search", f"--index={index}", f"--images={queries}", *fast]
    assert main([*batch, f"--output_file={results}", "--top_k=2"]) == 3
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["answered"], summary["failed"], summary["ranking"]) == (4, 3, "votes")
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert lines[0]["results"][0]["key"] == "astronaut.png" and "b_broken.jpg" in lines[1]["error"]
    assert "not a regular file" in lines[2]["error"] and "c_pipe.jpg" in lines[2]["query"]
    assert "d_dangling.png" in lines[3]["query"] and "cannot read" in lines[3]["error"]
    assert main([*batch, f"--output_file={results}"]) == 3  # resumed: nothing left to do
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["answered"], summary["skipped"], summary["failed"]) == (0, 4, 3)
    assert len(results.read_text().splitlines()) == 4
    assert main([*search, f"--queries={queries}"]) == 1  # two query inputs
    assert "give the query images once" in capsys.readouterr().err

    # A bad query image: a clear error naming the file, before any model is built.
    bad = ["delf", "search", f"--index={index}", f"--images={root / 'broken.jpg'}", *fast]
    assert main(bad) == 1
    assert "broken.jpg" in capsys.readouterr().err
    # Another model than the index's: refused.
    assert main([*search, "--seed=1"]) == 1
    assert "built from features of extractor" in capsys.readouterr().err


def test_match_draws_a_picture(folders, capsys, fast):
    output = folders / "match.png"
    args = [
        f"--image1={folders / 'query.png'}",
        f"--image2={folders / 'photos1' / 'astronaut.png'}",
    ]
    assert main(["delf", "match", *args, f"--output_file={output}", *fast]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["inliers"] >= 10 and summary["matches"] >= summary["inliers"]
    assert np.asarray(summary["transform"]).shape == (3, 3)
    assert Image.open(output).mode == "RGB"
    assert main(["delf", "match", f"--image1={folders / 'broken.jpg'}", *args[1:]]) == 1
    assert "broken.jpg" in capsys.readouterr().err


@pytest.fixture()
def one_faiss_thread():
    """FAISS's OpenMP k-means on 2 busy cores is ~10x slower with 2 threads than with 1."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def test_index_with_the_ondisk_backend_then_search(
    folders, extractor, capsys, fast, one_faiss_thread
):
    """`delf index --backend=ivfpq-ondisk` (in shards) then `delf search` through it."""
    from delf_tf.features import FeatureStore, LocalFeatures

    root = folders
    store = root / "features1"
    extract_to_store(extractor, root / "photos1", store, False)
    # Unrelated images, so that the 8-bit codes have >= 256 descriptors to train on.
    opened = FeatureStore.open(store)
    rng = np.random.default_rng(0)
    dim = opened.load("astronaut.png").dim
    for number in range(6):
        rows = rng.normal(size=(100, dim)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        ones = np.ones(100, np.float32)
        opened.save(
            f"filler{number}.png", LocalFeatures(rng.uniform(0, 128, (100, 2)), ones, ones, rows)
        )
    index = root / "index"
    command = ["delf", "index", f"--features={store}", f"--output_dir={index}"]
    assert main([*command, "--backend=ivfpq-ondisk", "--shard_rows=200", "--norecall"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["structures"]["neighbors"]["backend"] == "ivfpq-ondisk"
    assert (index / "neighbors.ivfdata").is_file() and not (root / "index.build").exists()
    search = ["delf", "search", f"--index={index}", f"--images={root / 'query.png'}", *fast]
    assert main([*search, "--top_k=2"]) == 0
    payload = json.loads(capsys.readouterr().out)  # nothing of FAISS's on stdout
    assert payload["results"][0]["key"] == "astronaut.png"
