"""TF Serving: the client (`client.ServingExtractor`) and a dev/CI stand-in server (`local_server`).

Import the submodules directly; this package imports nothing itself, so `delf --help`
stays fast.
"""
