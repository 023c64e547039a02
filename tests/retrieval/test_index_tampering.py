"""Tampered index files end in one line from `delf search` (exit 1); readers never mix
generations of an index that a writer keeps replacing; `read_generation`."""

import json
import shutil

import numpy as np
import pytest
import skimage.data
from PIL import Image

from delf_tf.cli import main
from delf_tf.config import RetrievalConfig
from delf_tf.extraction.folder import extract_to_store
from delf_tf.features import FeatureStore, LocalFeatures
from delf_tf.retrieval import Index, IndexFormatError
from delf_tf.retrieval.index import read_generation
from delf_tf.retrieval.search import load_searcher
from delf_tf.retrieval.structures import STRUCTURES, Ranking, SearchStructure


def make_store(path, names, seed, count=60, dim=16):
    """A store of random unit descriptors (60 per image) under one fingerprint."""
    rng = np.random.default_rng(seed)
    store = FeatureStore.open_or_create(path, "a" * 64, {"descriptor_dim": dim, "model": "t"})
    for name in names:
        descriptors = rng.normal(size=(count, dim)).astype(np.float32)
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
        points = rng.uniform([0, 0], [320, 240], (count, 2))
        store.save(
            name, LocalFeatures(points, np.ones(count), rng.uniform(size=count), descriptors)
        )
    return store


def _small(name, size=128):
    picture = Image.fromarray(np.asarray(getattr(skimage.data, name)())[:, :, :3])
    factor = size / max(picture.size)
    return picture.resize((round(picture.width * factor), round(picture.height * factor)))


@pytest.fixture(scope="module")
def built(extractor, model_config_file, tmp_path_factory):
    """(an index of 8 photographs with IVF-PQ and ASMK, the query image, search flags)."""
    root = tmp_path_factory.mktemp("tampering")
    photos = root / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee", "rocket", "chelsea"):
        _small(name).save(photos / f"{name}.png")
        _small(name).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / f"{name}-m.png")
    _small("astronaut").save(root / "query.png")
    extract_to_store(extractor, photos, root / "features", False)
    index = root / "index"
    command = ["delf", "index", f"--features={root / 'features'}", f"--output_dir={index}"]
    assert main([*command, "--index_type=votes,asmk", "--backend=ivfpq", "--codebook_size=16"]) == 0
    fast = [
        f"--model_config={model_config_file}",
        "--score_threshold=0",
        "--max_image_size=128",
        "--max_features=100",
    ]
    return index, root / "query.png", fast


def _header(path, change):
    header = json.loads((path / "index.json").read_text())
    change(header)
    (path / "index.json").write_text(json.dumps(header))


def _array(name, change):
    def tamper(path):
        array = np.load(path / name)
        change(array)
        np.save(path / name, array)

    return tamper


def _flip_lists(path):
    """Flip bits in the second half of neighbors.faiss: the inverted lists' codes and ids."""
    data = bytearray((path / "neighbors.faiss").read_bytes())
    start, stop = len(data) // 2, len(data) - 8
    data[start:stop] = bytes(byte ^ 0x5A for byte in data[start:stop])
    (path / "neighbors.faiss").write_bytes(bytes(data))


def _interior_image_ids(path):
    """Every row but the first and last of each image names image 99 (checked when read)."""
    ids, offsets = np.load(path / "image_ids.npy"), np.load(path / "offsets.npy")
    keep = np.zeros(len(ids), bool)
    keep[offsets[:-1][np.diff(offsets) > 0]] = True
    keep[offsets[1:][np.diff(offsets) > 0] - 1] = True
    ids[~keep] = 99
    np.save(path / "image_ids.npy", ids)


def _first_row_of_second_image(value):
    def tamper(path):
        ids, offsets = np.load(path / "image_ids.npy"), np.load(path / "offsets.npy")
        ids[offsets[1]] = value
        np.save(path / "image_ids.npy", ids)

    return tamper


def _huge_descriptors(path):
    """descriptors.npy and index.json both claim 1e11 rows; the file holds a few bytes."""
    dim = np.load(path / "descriptors.npy", mmap_mode="r").shape[1]
    with open(path / "descriptors.npy", "wb") as handle:
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**11, dim)}
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\0" * 64)
    _header(path, lambda h: h["arrays"]["descriptors"].update(shape=[10**11, dim]))


def _structure(name, change):
    return lambda path: _header(path, lambda header: change(header["structures"][name]))


TAMPERED = {
    # name: (ranking, tamper(index folder), words of the one-line error)
    "image-id-out-of-range": ("votes", _first_row_of_second_image(13), "image_ids holds 13"),
    "image-id-negative": ("votes", _first_row_of_second_image(-4), "image_ids holds -4"),
    "image-ids-inside-an-image": ("votes", _interior_image_ids, "image_ids.npy holds 99"),
    "structures-a-list": (
        "votes",
        lambda p: _header(p, lambda h: h.update(structures=[])),
        "structures: expected a JSON object",
    ),
    "arrays-a-string": (
        "votes",
        lambda p: _header(p, lambda h: h.update(arrays="descriptors")),
        "arrays: expected a JSON object",
    ),
    "parameters-missing": (
        "votes",
        _structure("neighbors", lambda s: s.pop("parameters")),
        "neighbors.parameters: expected a JSON object",
    ),
    "flipped-bytes-in-neighbors-faiss": ("votes", _flip_lists, "neighbors.faiss"),
    "unknown-back-end": (
        "votes",
        _structure("neighbors", lambda s: s.update(backend="annoy")),
        "unknown back end 'annoy'",
    ),
    "unknown-structure": (
        "votes",
        lambda p: _header(p, lambda h: h["structures"].update(milvus={})),
        "unknown search structure 'milvus'",
    ),
    "asmk-entry-images": (
        "asmk",
        _array("asmk/entry_images.npy", lambda a: a.__iadd__(1000)),
        "entry_images holds",
    ),
    "asmk-offsets": (
        "asmk",
        _array("asmk/offsets.npy", lambda a: a.__setitem__(slice(1, -1), a[1:-1][::-1])),
        "offsets do not rise",
    ),
    "array-header-claims-1e11-rows": ("votes", _huge_descriptors, "descriptors.npy: truncated"),
    "path-outside-the-index": (
        "votes",
        _structure("neighbors", lambda s: s.update(file="../../etc/hostname")),
        "not inside the index folder",
    ),
    "num-features-negative": (
        "votes",
        lambda p: (p / "images.json").write_text(
            json.dumps(
                [
                    {**r, "num_features": -1} if n == 0 else r
                    for n, r in enumerate(json.loads((p / "images.json").read_text()))
                ]
            )
        ),
        "malformed num_features -1",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_index_is_one_line_and_exit_1(built, tmp_path, capsys, case):
    index, query, fast = built
    ranking, tamper, words = TAMPERED[case]
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    tamper(copy)
    command = ["delf", "search", f"--index={copy}", f"--images={query}", f"--ranking={ranking}"]
    assert main([*command, *fast]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("delf search: error:")]
    assert len(errors) == 1 and words in errors[0], err
    assert not any("Traceback" in line for line in err)


def test_untampered_index_searches(built, tmp_path, capsys):
    """The cases above fail for their tampering, not for the setup."""
    index, query, fast = built
    for ranking in ("votes", "asmk"):
        command = [
            "delf",
            "search",
            f"--index={index}",
            f"--images={query}",
            f"--ranking={ranking}",
        ]
        assert main([*command, *fast]) == 0
        assert json.loads(capsys.readouterr().out)["results"][0]["key"] == "astronaut.png"


def test_generation_counts_saves(tmp_path):
    path = tmp_path / "index"
    assert read_generation(path) is None
    index = Index.from_store(make_store(tmp_path / "s", ["a", "b"], seed=0), progress=False)
    index.save(path)
    assert read_generation(path) == 1 == Index.load(path).generation
    appended, _ = Index.load(path).add_store(
        make_store(tmp_path / "t", ["c"], seed=1), progress=False
    )
    appended.build_structures(progress=False)
    appended.save(path)
    assert read_generation(path) == 2
    Index.from_store(make_store(tmp_path / "u", ["d"], seed=2), progress=False).save(path)
    assert read_generation(path) == 3  # a rebuild over it continues the count
    path.rename(tmp_path / "moment-between-the-two-renames")
    assert read_generation(path) is None
    (tmp_path / "moment-between-the-two-renames").rename(path)
    _header(path, lambda header: header.pop("generation"))  # an index of before
    assert read_generation(path) == 0 and Index.load(path).num_images == 1
    _header(path, lambda header: header.update(generation="7"))
    assert read_generation(path) is None  # not loadable: a poller keeps what it has
    with pytest.raises(IndexFormatError, match="generation: expected a non-negative integer"):
        Index.load(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two saved indexes with ASMK (5 and 8 images of 60 descriptors): (folder, descriptors
    by count)."""
    root = tmp_path_factory.mktemp("sources")
    found = {}
    for size in (5, 8):
        names = [f"{size}-{n}" for n in range(size)]
        index = Index.from_store(make_store(root / f"s{size}", names, seed=size), progress=False)
        index.build_structures(backend="flat", asmk=True, codebook_size=16, progress=False)
        index.save(root / f"source{size}")
        found[index.num_descriptors] = np.asarray(index.descriptors).copy()
    return root, found


def test_a_structure_read_after_the_swap_is_refused(sources, tmp_path):
    path = tmp_path / "index"
    Index.load(sources[0] / "source5").save(path)
    old = Index.load(path)
    Index.load(path).save(path)  # another writer replaces it: generation 2
    with pytest.raises(IndexFormatError, match="replaced while in use"):
        old.asmk()
    assert load_searcher(path).index.generation == 2


_WRITER = """
import sys, time
from delf_tf.retrieval.index import Index
root, target = sys.argv[1], sys.argv[2]
for turn in range(40):
    Index.load(f"{root}/source{(5, 8)[turn % 2]}").save(target)
    time.sleep(0.02)
"""


def test_readers_racing_a_writer_never_see_a_mixed_state(sources, tmp_path):
    """A writer process swaps two indexes of different sizes over one path; a reader
    loads it (and its ASMK structure) all the while, also between the swap's two
    renames: never an error, never arrays of two of them. (A process, not a thread: on
    CPython 3.11 two threads parsing .npy headers at once may raise SystemError.)"""
    import subprocess
    import sys

    root, by_count = sources
    target = tmp_path / "index"
    Index.load(root / "source5").save(target)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(target)])
    seen = []
    try:
        while writer.poll() is None:
            searcher = load_searcher(target, RetrievalConfig(ranking="asmk"))
            index = searcher.index
            descriptors = by_count[index.num_descriptors]
            assert searcher.asmk.num_images == index.num_images
            assert index.offsets[-1] == index.num_descriptors == len(index.keypoints)
            assert sum(record.num_features for record in index.images) == len(descriptors)
            np.testing.assert_array_equal(np.asarray(index.descriptors), descriptors)
            seen.append(index.generation)
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0
    assert len(set(seen)) > 2, seen  # the reader did see the writer's generations go by
    assert read_generation(target) == 41


def test_every_structure_implements_the_interface():
    for name, cls in STRUCTURES.items():
        assert issubclass(cls, SearchStructure) and cls.name == name
        assert not getattr(cls, "__abstractmethods__", None), name


def test_staged_files_are_new_files_only(tmp_path):
    """`atomic.write_staged` (the index's files in its staging folder) never writes through
    an existing file or a planted link."""
    from delf_tf.atomic import write_staged

    write_staged(tmp_path / "a.bin", lambda handle: handle.write(b"data"))
    assert (tmp_path / "a.bin").read_bytes() == b"data"
    (tmp_path / "target").write_bytes(b"keep")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("a.bin", "link"):
        with pytest.raises(FileExistsError):
            write_staged(tmp_path / name, lambda handle: handle.write(b"x"))
    assert (tmp_path / "target").read_bytes() == b"keep"


class _OutsideStructure(SearchStructure):
    """An external structure (the shape of a Milvus back end): the vectors live in a
    "server" (a dict here), one location per save, named by "uri" in index.json."""

    name = "outside"
    covers = "num_images"
    external = True
    server: dict = {}

    @classmethod
    def build(cls, collection, options, notes):
        uri = f"memory://collection-{len(cls.server)}"
        means = np.stack([collection.descriptors[a:b].mean(0) for a, b in _pairs(collection)])
        cls.server[uri] = means
        return cls({"uri": uri, "num_images": collection.num_images}, means, fresh=True)

    def append(self, collection, options, notes):
        return self.build(collection, options, notes), "retrained"

    def load(self, collection, mmap=True):
        if self.header["uri"] not in self.server:
            raise IndexFormatError(f"{self.header['uri']}: no such collection")
        return self.server[self.header["uri"]]

    def search(self, collection, query, config):
        scores = self.value @ query.descriptors.mean(0)
        ids = np.argsort(-scores, kind="stable")
        return Ranking(ids.astype(np.int64), scores[ids].astype(np.float64))


def _pairs(collection):
    offsets = np.asarray(collection.offsets)
    return zip(offsets[:-1], offsets[1:], strict=True)


def test_a_structure_outside_the_directory_is_one_more_module(tmp_path, monkeypatch):
    monkeypatch.setitem(STRUCTURES, _OutsideStructure.name, _OutsideStructure)
    monkeypatch.setattr(_OutsideStructure, "server", {})
    store = make_store(tmp_path / "s", [f"i{n}" for n in range(4)], seed=3)
    index = Index.from_store(store, progress=False)
    report = index.build_structures(backend="flat", others=("outside",), progress=False)
    assert report["outside"]["action"] == "built"
    index.save(tmp_path / "index")
    header = json.loads((tmp_path / "index" / "index.json").read_text())
    assert header["structures"]["outside"]["uri"] == "memory://collection-0"
    assert not (tmp_path / "index" / "outside").exists()  # owns no file in the folder
    loaded = Index.load(tmp_path / "index")
    structure = loaded.structure("outside")
    query = store.load("i2")
    assert structure.search(loaded, query, RetrievalConfig()).ids[0] == 2
    appended, _ = loaded.add_store(make_store(tmp_path / "t", ["j"], seed=4), progress=False)
    appended.build_structures(progress=False)  # extends the structures it has
    appended.save(tmp_path / "index")
    header = json.loads((tmp_path / "index" / "index.json").read_text())
    assert header["structures"]["outside"] == {"uri": "memory://collection-1", "num_images": 5}
    _header(tmp_path / "index", lambda h: h["structures"]["outside"].pop("uri"))
    with pytest.raises(IndexFormatError, match="outside.uri: expected"):
        Index.load(tmp_path / "index")
