"""Subcommands of the `gsparse` command, one module each."""
