"""Resource bounds of the dev server and its request checks' limits (TF-free).

`delf serve --help` reads its defaults from here without importing TensorFlow.
"""

from __future__ import annotations

import dataclasses

from delf_tf.errors import ConfigError, InputError

# Pillow's decompression-bomb bound (delf_tf.images.DEFAULT_MAX_PIXELS): one largest image.
DEFAULT_MAX_REQUEST_PIXELS = 89_478_485


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; checked before the model runs (INVALID_ARGUMENT beyond).

    max_batch_size: the 0th dimension of every input of `serving_default` (what
      TF Serving's batching.config `max_batch_size` bounds there).
    max_scales, max_scale: `extract_image`'s `scales`: 1..max_scales finite values in
      (0, max_scale] (each scale multiplies the pixels the network sees by scale**2).
    max_features: `extract_image`'s `max_features` in 1..max_features.
    max_tensor_bytes: the decoded size of one input TensorProto (a few bytes of
      protobuf can declare a huge tensor filled with one repeated value).
    max_request_pixels: the decoded pixels of all the images of one request together
      (serving_default: from the headers, before decoding) [--max_request_pixels].
    max_aspect_ratio: long side / short side of each image [--max_aspect_ratio].
    (See delf_tf.serving.memory.)
    """

    max_batch_size: int = 32
    max_scales: int = 16
    max_scale: float = 4.0
    max_features: int = 10_000
    max_tensor_bytes: int = 1 << 30
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    max_aspect_ratio: float = 1000.0

    def __post_init__(self):
        if (
            min(self.max_batch_size, self.max_scales, self.max_features) < 1
            or min(self.max_request_pixels, self.max_aspect_ratio) < 1
        ):
            raise ConfigError(f"request limits must be >= 1: {self}")


DEFAULT_MAX_REQUEST_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Resource bounds of the dev server (flag names of `delf serve` in brackets).

    max_request_bytes: one request, gRPC message or REST body [--max_request_bytes].
    request: batch size and extraction settings (`RequestLimits`) [--max_batch_size].
    grpc_threads: gRPC requests running at once [--grpc_max_threads]; at most
      8 x that many may be accepted (queued) at once, more get RESOURCE_EXHAUSTED.
    grpc_max_concurrent_streams: concurrent calls on one gRPC connection.
    rest_threads: REST requests running at once [--rest_api_num_threads].
    rest_max_connections: open REST connections; more get 503 [--rest_api_max_connections].
    rest_idle_timeout: seconds a connection may take to send a request header (from
      its opening or its previous answer); also the gRPC handshake and idle timeout
      [--rest_api_idle_timeout_seconds].
    rest_timeout: seconds to receive a REST body, run it and send the answer
      [--rest_api_timeout_in_ms / 1000].
    shutdown_grace: seconds running requests get to finish on stop
      [--shutdown_grace_seconds].
    max_server_pixels: decoded pixels of all running requests together; a request
      that does not fit waits (up to rest_timeout, or its gRPC deadline), then gets
      RESOURCE_EXHAUSTED [--max_server_pixels]. Worst-case memory: serving/README.md.
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request: RequestLimits = RequestLimits()
    grpc_threads: int = 8
    grpc_max_concurrent_streams: int = 32
    rest_threads: int = 8
    rest_max_connections: int = 512
    rest_idle_timeout: float = 30.0
    rest_timeout: float = 30.0
    shutdown_grace: float = 10.0
    max_server_pixels: int = 2 * DEFAULT_MAX_REQUEST_PIXELS


def parse_channel_arguments(text: str) -> dict[str, int | str]:
    """TF Serving's --grpc_channel_arguments: "name=value,name=value" (ints where numeric)."""
    arguments: dict[str, int | str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = item.partition("=")
        if not equals or not name.strip():
            raise InputError(f"--grpc_channel_arguments: expected name=value, got {item!r}")
        value = value.strip()
        arguments[name.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return arguments


@dataclasses.dataclass(frozen=True)
class SearchLimits:
    """Bounds of the search service (`delf serve --index`; flag names in brackets).

    max_concurrent: searches running at once [--search_max_concurrent]; each uses the
      extractor and BLAS/OpenMP threads, so a few per core at most.
    max_queued: searches that may wait for a running one to finish; one more is
      refused at once: RESOURCE_EXHAUSTED (gRPC), 503 (REST) [--search_max_queued].
    queue_timeout: seconds a search may wait for a slot (DEADLINE_EXCEEDED beyond; a
      gRPC deadline that is shorter wins) [--search_queue_timeout_seconds].
    max_top_k: results one query may ask for.
    max_image_bytes, max_image_pixels: one query image, encoded and decoded.
    """

    max_concurrent: int = 2
    max_queued: int = 32
    queue_timeout: float = 30.0
    max_top_k: int = 100
    max_image_bytes: int = 32 << 20
    max_image_pixels: int = 40_000_000

    def __post_init__(self):
        if self.max_concurrent < 1 or self.max_queued < 0 or self.max_top_k < 1:
            raise ConfigError(f"search limits out of range: {self}")
