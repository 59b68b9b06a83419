"""What every Ray job entry point shares with the `qpo` command: qpo_ray.run.commands (the
arguments of each command, the Config built from them, the work, the exit codes).

Jobs are submitted from the repository root, e.g.

    ray job submit --working-dir . -- python jobs/qpo_loop.py --profile cpu-demo

so the job's working directory is the repository; its root is put on ``sys.path`` so
``qpo_ray`` imports there even where the package is not installed on the cluster.
Exit codes: 0 success, 2 bad configuration or input, 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from qpo_ray.run.commands import (EXIT_FAILURE, EXIT_INPUT, EXIT_OK, add_config_args,  # noqa: E402
                           config_from_args, job_main)

EXIT_CONFIG = EXIT_INPUT
__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "config", "job_main", "parser"]


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the config arguments every job takes."""
    p = argparse.ArgumentParser(description=description)
    add_config_args(p)
    return p


def config(args: argparse.Namespace):
    return config_from_args(args)
