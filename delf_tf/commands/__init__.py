"""Subcommands of `delf`: each defines its flags and a `run(flag_values)`; logic stays in the library."""
