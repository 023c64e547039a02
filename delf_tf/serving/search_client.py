"""`SearchClient`: queries the search service (`delf serve --index`) over gRPC or REST.

The same TF Serving Predict call any tensorflow-serving-api client can make (see
`delf_tf.contract`, SEARCH_*), wrapped: image files or bytes in, ranked hits out.

    with SearchClient("127.0.0.1:8500") as client:
        reply = client.search("photo.jpg", top_k=5)
        print(reply.generation, [(hit.key, hit.inliers) for hit in reply.hits])
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from delf_tf.contract import SEARCH_INPUT, SEARCH_MODEL_NAME, SERVING_SIGNATURE
from delf_tf.errors import ConfigError
from delf_tf.serving.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOLS,
    _GrpcTransport,
    _RestTransport,
)
from delf_tf.serving.errors import ServingError


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One ranked collection image: its id (position in the index), store key, initial
    ranking score and RANSAC inliers."""

    image_id: int
    key: str
    score: float
    inliers: int


@dataclasses.dataclass(frozen=True)
class SearchReply:
    """The answer to one query image: hits best first, and the index generation."""

    generation: int
    hits: list[SearchHit]


class SearchClient:
    """Search requests to `target` ("HOST:PORT"; gRPC port or REST port by `protocol`)."""

    def __init__(
        self,
        target: str,
        name: str = SEARCH_MODEL_NAME,
        protocol: str = "grpc",
        timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.target = target
        self.name = name
        self.protocol = protocol
        self.timeout = timeout
        self._transport = (
            _GrpcTransport(target, max_message_bytes)
            if protocol == "grpc"
            else _RestTransport(target)
        )

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def search(
        self, image: bytes | str | os.PathLike, top_k: int | None = None, ranking: str | None = None
    ) -> SearchReply:
        """Hits of one query: encoded image bytes, or the path of an image file."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        return self.search_batch([data], top_k, ranking)[0]

    def search_batch(
        self, images: Sequence[bytes], top_k: int | None = None, ranking: str | None = None
    ) -> list[SearchReply]:
        """One request of several encoded images; a reply per image, in order."""
        inputs: dict[str, Any] = {SEARCH_INPUT: np.array(list(images), dtype=object)}
        if top_k is not None:
            inputs["top_k"] = np.int32(top_k)
        if ranking is not None:
            inputs["ranking"] = np.array(ranking)
        outputs, _ = self._transport.predict(
            self.name, None, SERVING_SIGNATURE, inputs, None, self.timeout
        )
        try:
            return _replies(outputs, len(images))
        except (KeyError, ValueError, TypeError, IndexError) as error:
            raise ServingError(
                "INTERNAL", f"unexpected search answer from {self.target}: {error}"
            ) from error

    def status(self) -> dict[str, Any]:
        """TF Serving's model status of the index: its generations (the served one
        AVAILABLE, a failed one END with its error)."""
        return self._transport.status(self.name, None, self.timeout)


def _replies(outputs: dict[str, Any], batch: int) -> list[SearchReply]:
    counts = np.asarray(outputs["num_results"]).reshape(batch)
    generations = np.asarray(outputs["generation"]).reshape(batch)
    ids = np.asarray(outputs["image_ids"]).reshape(batch, -1)
    scores = np.asarray(outputs["scores"], np.float64).reshape(batch, -1)
    inliers = np.asarray(outputs["inliers"]).reshape(batch, -1)
    keys = np.asarray(outputs["keys"], dtype=object).reshape(batch, -1)
    replies = []
    for row in range(batch):
        hits = [
            SearchHit(
                int(ids[row, column]),
                keys[row, column].decode("utf-8")
                if isinstance(keys[row, column], bytes)
                else str(keys[row, column]),
                float(scores[row, column]),
                int(inliers[row, column]),
            )
            for column in range(int(counts[row]))
        ]
        replies.append(SearchReply(int(generations[row]), hits))
    return replies
