"""`delf serve`: TF Serving's gRPC and REST APIs over exported models, for development and CI.

A stand-in, not a replacement, for `tensorflow_model_server` (see serving/README.md):
same flag names, same APIs and error codes, no request batching or GPU scheduling.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from delf_tf.errors import InputError
from delf_tf.serving.limits import RequestLimits, ServerLimits, parse_channel_arguments

_DEFAULTS = ServerLimits()


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_integer("port", 8500, "gRPC port (0: any free port, printed)", **define)
    flags.DEFINE_integer(
        "rest_api_port", 8501, "REST port (0 disables the REST API, as in TF Serving)", **define
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
        "rescan the model directories this often for new versions (0: only at start)",
        **define,
    )


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.serving.local_server import LocalServer, serve_until_signalled
    from delf_tf.serving.repository import ModelRepository, ModelSource, sources_from_config_file

    if bool(flag_values.model_base_path) == bool(flag_values.model_config_file):
        raise InputError("give exactly one of --model_base_path or --model_config_file")
    if flag_values.model_config_file:
        sources = sources_from_config_file(flag_values.model_config_file)
    else:
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
    server = LocalServer(
        ModelRepository(sources),
        host=flag_values.host,
        grpc_port=flag_values.port,
        rest_port=flag_values.rest_api_port or None,
        poll_seconds=flag_values.file_system_poll_wait_seconds,
        limits=limits,
        grpc_arguments=channel_arguments,
    )
    serve_until_signalled(server)
    return 0
