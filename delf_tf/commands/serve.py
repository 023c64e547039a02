"""`delf serve`: TF Serving's gRPC and REST APIs over exported models and over an index.

A stand-in, not a replacement, for `tensorflow_model_server` (see serving/README.md):
same flag names, same APIs and error codes, no request batching or GPU scheduling.

`--index=INDEX_DIR` adds the search service (`delf_tf.serving.search_service`): the
index is one more model name (`--index_name`) on the same Predict APIs, and the REST
port serves a web page, /status, /healthz, /readyz and /metrics. It is a flag of
`delf serve`, not a command of its own, because it is the same server: one set of
ports, bounds, timeouts, SIGTERM grace and TF Serving status/metadata APIs, and one
process may serve the model (--model_base_path, for remote feature extraction) and
the index together. Queries are extracted in process (--model/--weights/..., traced
once at start) or by TF Serving (--server/--protocol, --model_name there).
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from delf_tf.commands.common import define_extractor_flags
from delf_tf.commands.retrieval_flags import define_ranking_flags, define_retrieval_flags
from delf_tf.config import RetrievalConfig
from delf_tf.contract import SEARCH_MODEL_NAME
from delf_tf.errors import InputError
from delf_tf.serving.limits import (
    RequestLimits,
    SearchLimits,
    ServerLimits,
    parse_channel_arguments,
)

_DEFAULTS = ServerLimits()
_SEARCH_DEFAULTS = SearchLimits()


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    ports = {"lower_bound": 0, "upper_bound": 65535, **define}
    flags.DEFINE_integer("port", 8500, "gRPC port (0: any free port, printed)", **ports)
    flags.DEFINE_integer(
        "rest_api_port", 8501, "REST port (0 disables the REST API, as in TF Serving)", **ports
    )
    flags.DEFINE_string("model_name", "delf", "name of the served model", **define)
    flags.DEFINE_string(
        "model_base_path",
        None,
        "directory of numbered versions <model_base_path>/<version>/",
        **define,
    )
    flags.DEFINE_string(
        "model_config_file",
        None,
        "TF Serving ModelServerConfig text file (model_config_list), instead of "
        "--model_name/--model_base_path",
        **define,
    )
    flags.DEFINE_string(
        "host", "127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)", **define
    )
    flags.DEFINE_integer(
        "max_request_bytes",
        _DEFAULTS.max_request_bytes,
        "larger requests (gRPC message, REST body) are refused",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_integer(
        "max_batch_size",
        _DEFAULTS.request.max_batch_size,
        "most images in one serving_default request (INVALID_ARGUMENT beyond); TF Serving: "
        "max_batch_size in --batching_parameters_file",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_integer(
        "max_request_pixels",
        _DEFAULTS.request.max_request_pixels,
        "most decoded pixels of all the images of one request together (from the "
        "headers, before decoding; INVALID_ARGUMENT / 400 beyond)",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_float(
        "max_aspect_ratio",
        _DEFAULTS.request.max_aspect_ratio,
        "images whose long side is more than this many times the short side are refused "
        "(INVALID_ARGUMENT / 400)",
        lower_bound=1.0,
        **define,
    )
    flags.DEFINE_integer(
        "max_server_pixels",
        _DEFAULTS.max_server_pixels,
        "most decoded pixels of all running requests together: a request that does not "
        "fit waits for others, then gets RESOURCE_EXHAUSTED / 429; bounds the server's "
        "memory (see serving/README.md)",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_integer(
        "grpc_max_threads",
        _DEFAULTS.grpc_threads,
        "concurrent gRPC requests",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_string(
        "grpc_channel_arguments",
        "",
        "extra gRPC server arguments, name=value,name=value (e.g. "
        "grpc.max_concurrent_streams=16), as in TF Serving",
        **define,
    )
    flags.DEFINE_integer(
        "rest_api_num_threads",
        _DEFAULTS.rest_threads,
        "concurrent REST requests (complete requests wait for a free thread)",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_integer(
        "rest_api_timeout_in_ms",
        int(_DEFAULTS.rest_timeout * 1000),
        "a REST request's body must arrive, run and be answered within this (408 / 504)",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_float(
        "rest_api_idle_timeout_seconds",
        _DEFAULTS.rest_idle_timeout,
        "a connection that sends no complete request header for this long is closed (REST; "
        "also the gRPC handshake timeout)",
        lower_bound=0.001,
        **define,
    )
    flags.DEFINE_integer(
        "rest_api_max_connections",
        _DEFAULTS.rest_max_connections,
        "open REST connections; more are answered 503 and closed",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_float(
        "shutdown_grace_seconds",
        _DEFAULTS.shutdown_grace,
        "on SIGTERM / SIGINT: seconds running requests get to finish before the server exits",
        lower_bound=0.0,
        **define,
    )
    flags.DEFINE_float(
        "file_system_poll_wait_seconds",
        1.0,
        "rescan the model directories this often for new versions (0: only at start); "
        "with --index also the index directory for a new generation",
        **define,
    )
    _define_search_flags(flag_values)


def _define_search_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    defaults = RetrievalConfig()
    flags.DEFINE_string(
        "index",
        None,
        "serve searches over this index directory (from `delf index`); reloaded when a "
        "new generation lands there (`delf index --append` or a rebuild)",
        **define,
    )
    flags.DEFINE_string(
        "index_name", SEARCH_MODEL_NAME, "model name of the index on the Predict APIs", **define
    )
    flags.DEFINE_integer(
        "top_k",
        None,
        f"results per query when a request names none (default {defaults.top_k})",
        **define,
    )
    flags.DEFINE_integer(
        "shortlist",
        None,
        f"images of the initial ranking verified with RANSAC (default {defaults.shortlist})",
        **define,
    )
    flags.DEFINE_integer(
        "search_max_concurrent",
        _SEARCH_DEFAULTS.max_concurrent,
        "searches running at once",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_integer(
        "search_max_queued",
        _SEARCH_DEFAULTS.max_queued,
        "searches waiting for a slot; more are refused (RESOURCE_EXHAUSTED, HTTP 503)",
        lower_bound=0,
        **define,
    )
    flags.DEFINE_float(
        "search_queue_timeout_seconds",
        _SEARCH_DEFAULTS.queue_timeout,
        "seconds a search may wait for a slot (DEADLINE_EXCEEDED beyond)",
        lower_bound=0.0,
        **define,
    )
    define_extractor_flags(flag_values, remote=False)
    flags.DEFINE_string(
        "server",
        None,
        "with --index: HOST:PORT of TF Serving (or another `delf serve`) that extracts the "
        "query features (model --model_name there) instead of this process",
        **define,
    )
    flags.DEFINE_enum(
        "protocol", "grpc", ["grpc", "rest"], "API of --server (gRPC 8500, REST 8501)", **define
    )
    define_retrieval_flags(flag_values)
    define_ranking_flags(flag_values)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.serving.local_server import LocalServer, serve_until_signalled
    from delf_tf.serving.repository import ModelRepository, ModelSource, sources_from_config_file

    if flag_values.model_base_path and flag_values.model_config_file:
        raise InputError("give one of --model_base_path or --model_config_file, not both")
    if not (flag_values.model_base_path or flag_values.model_config_file or flag_values.index):
        raise InputError("give --model_base_path, --model_config_file or --index")
    sources = []
    if flag_values.model_config_file:
        sources = sources_from_config_file(flag_values.model_config_file)
    elif flag_values.model_base_path:
        base = Path(flag_values.model_base_path)
        if not base.is_dir():
            raise InputError(f"{base}: no such directory")
        sources = [ModelSource(flag_values.model_name, base.resolve())]
    try:
        channel_arguments = parse_channel_arguments(flag_values.grpc_channel_arguments)
    except ValueError as error:
        raise InputError(str(error)) from None
    limits = ServerLimits(
        max_request_bytes=flag_values.max_request_bytes,
        request=RequestLimits(
            max_batch_size=flag_values.max_batch_size,
            max_request_pixels=flag_values.max_request_pixels,
            max_aspect_ratio=flag_values.max_aspect_ratio,
        ),
        max_server_pixels=flag_values.max_server_pixels,
        grpc_threads=flag_values.grpc_max_threads,
        rest_threads=flag_values.rest_api_num_threads,
        rest_max_connections=flag_values.rest_api_max_connections,
        rest_idle_timeout=flag_values.rest_api_idle_timeout_seconds,
        rest_timeout=flag_values.rest_api_timeout_in_ms / 1000.0,
        shutdown_grace=flag_values.shutdown_grace_seconds,
    )
    search = _search_service(flag_values, limits, [source.name for source in sources])
    server = LocalServer(
        ModelRepository(sources),
        host=flag_values.host,
        grpc_port=flag_values.port,
        rest_port=flag_values.rest_api_port or None,
        poll_seconds=flag_values.file_system_poll_wait_seconds,
        limits=limits,
        grpc_arguments=channel_arguments,
        search=search,
    )
    serve_until_signalled(server)
    return 0


def _search_service(flag_values: flags.FlagValues, limits: ServerLimits, model_names: list[str]):
    """The SearchService of --index (None without it); refuses a fingerprint mismatch."""
    if not flag_values.index:
        return None
    if flag_values.index_name in model_names:
        raise InputError(f"--index_name={flag_values.index_name} is also a model name")
    import numpy as np

    from delf_tf.commands.common import extractor_for_index, warn_if_untrained
    from delf_tf.commands.retrieval_flags import retrieval_config_from_flags
    from delf_tf.retrieval.index import Index
    from delf_tf.serving.search_service import SearchService

    config = retrieval_config_from_flags(  # bad values refused before any model is built
        flag_values, top_k=flag_values.top_k, shortlist=flag_values.shortlist
    )
    index = Index.load(flag_values.index)
    extractor = extractor_for_index(flag_values, index, cached=True)
    warn_if_untrained(extractor)
    extractor.extract(np.zeros((64, 64, 3), np.uint8))  # warm up: the first query is not slower
    search_limits = SearchLimits(
        max_concurrent=flag_values.search_max_concurrent,
        max_queued=flag_values.search_max_queued,
        queue_timeout=flag_values.search_queue_timeout_seconds,
        max_image_bytes=min(SearchLimits().max_image_bytes, limits.max_request_bytes),
    )
    return SearchService.from_index(
        index,
        extractor,
        config=config,
        name=flag_values.index_name,
        limits=search_limits,
        poll_seconds=flag_values.file_system_poll_wait_seconds,
    )
