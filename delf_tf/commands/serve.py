"""`delf serve`: TF Serving's gRPC and REST APIs over exported models, for development and CI.

A stand-in, not a replacement, for `tensorflow_model_server` (see serving/README.md):
same flag names, same APIs and error codes, no request batching or GPU scheduling.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from delf_tf.errors import InputError

# TF Serving has no request-size flag; 256 MiB bounds one request's body.
DEFAULT_MAX_REQUEST_BYTES = 256 << 20


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
        "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES, "larger requests are refused", **define
    )
    flags.DEFINE_integer("grpc_max_threads", 8, "concurrent gRPC requests", **define)
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
    server = LocalServer(
        ModelRepository(sources),
        host=flag_values.host,
        grpc_port=flag_values.port,
        rest_port=flag_values.rest_api_port or None,
        max_request_bytes=flag_values.max_request_bytes,
        workers=flag_values.grpc_max_threads,
        poll_seconds=flag_values.file_system_poll_wait_seconds,
    )
    serve_until_signalled(server)
    return 0
