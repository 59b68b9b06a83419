"""What every Ray job entry point shares: the config arguments and the exit codes.

Jobs are submitted from the repository root, e.g.

    ray job submit --working-dir . -- python jobs/qpo_loop.py --profile cpu-demo

so the job's working directory is the repository; its root is put on ``sys.path`` so
``qpo_ray`` imports there even where the package is not installed on the cluster.
Exit codes: 0 success, 2 bad configuration or input, 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--profile", default="cpu-demo",
                   help="profile name (qpo_ray/profiles/) or path to a YAML profile")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. loop.num_loops=2 (repeatable)")
    p.add_argument("--workdir", help="run directory (overrides workdir)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides tracking.uri)")
    return p


def config(args: argparse.Namespace):
    from qpo_ray.config import load_config

    overrides = list(args.overrides)
    if args.workdir:
        overrides.append(f"workdir={args.workdir}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    return load_config(args.profile, overrides)


def run(main: Callable[[], object]) -> int:
    """Call `main`, print its result, and turn the outcome into an exit code."""
    from qpo_ray.config import ConfigError
    from qpo_ray.data.io import DatasetFileError
    from qpo_ray.prompts import PromptCollectionError
    from qpo_ray.rundir import RunDirBusy
    from qpo_ray.tasks import TaskDataError

    try:
        result = main()
    except (ConfigError, FileNotFoundError, DatasetFileError, PromptCollectionError,
            TaskDataError, RunDirBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:
        traceback.print_exc()
        return EXIT_FAILURE
    if result is not None:
        print(result)
    return EXIT_OK
