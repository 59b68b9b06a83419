"""The `qpo` command (entry point `qpo_ray.cli:main`): the parser in main.py, the
subcommands' work in handlers.py, `qpo init`'s files in skeleton.py."""

from qpo_ray.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
