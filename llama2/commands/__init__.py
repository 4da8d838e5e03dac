"""Subcommands of the `llama2` command line, one module each (discovered by llama2.cli)."""
