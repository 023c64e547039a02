"""`delf extract --server`: the files' own bytes travel in batches through serving_default."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from delf_tf.contract import BATCH_INPUT, SERVING_SIGNATURE


def test_folder_extraction_sends_file_bytes_in_batches(
    local_server, serving_reference, astronaut_small, tmp_path
):
    from delf_tf.extraction.folder import extract_to_store
    from delf_tf.serving.client import ServingExtractor

    images = tmp_path / "images"
    images.mkdir()
    files = {}
    for index in range(5):
        buffer = io.BytesIO()
        Image.fromarray(np.roll(astronaut_small, 7 * index, axis=1)).save(buffer, "JPEG")
        files[f"{index}.jpg"] = buffer.getvalue()
        (images / f"{index}.jpg").write_bytes(files[f"{index}.jpg"])
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    client = ServingExtractor(local_server.addresses()["grpc"], batch_size=2)
    sent = []
    predict = client._predict

    def recording(signature, inputs, output_filter=None):
        if signature == SERVING_SIGNATURE and output_filter is None:
            sent.append([bytes(item) for item in inputs[BATCH_INPUT]])
        return predict(signature, inputs, output_filter)

    client._predict = recording
    store, summary = extract_to_store(client, images, tmp_path / "store", progress=False)
    assert [len(batch) for batch in sent] == [2, 2, 2]  # 6 files, batch_size 2
    assert {data for batch in sent for data in batch} >= set(files.values())  # as they are
    assert summary.extracted == 5 and len(summary.failed) == 1
    assert summary.failed[0].path.endswith("broken.png")
    assert "could not decode" in summary.failed[0].reason
    expected = serving_reference.extract(np.asarray(Image.open(io.BytesIO(files["3.jpg"]))))
    np.testing.assert_allclose(store.load("3.jpg").descriptors, expected.descriptors, atol=1e-5)
