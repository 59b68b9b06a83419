"""What the `qpo` command (qpo_ray/cli.py) and the Ray job scripts (jobs/) share: the
arguments of each command, the Config built from them, the work each command does, and
one policy that turns the outcome into an exit code:

    0  success (the command's message is printed)
    2  wrong input: a setting (ConfigError), a data or prompt file, a missing path, a
       run directory another process holds; one line `<prog>: error: ...` on stderr
    1  anything else, with its traceback

Library modules are imported inside each command so that `qpo --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from qpo_ray.config import Config, load_config
from qpo_ray.common.errors import ConfigError
from qpo_ray.run.rundir import RunDirBusy, lock_outputs, lock_run_dir

EXIT_OK, EXIT_FAILURE, EXIT_INPUT = 0, 1, 2
# ConfigError, DatasetFileError, PromptCollectionError and TaskDataError are ValueErrors.
INPUT_ERRORS = (ValueError, FileNotFoundError, RunDirBusy)


DEFAULT_PROFILE = "cpu-demo"


def add_config_args(p: argparse.ArgumentParser, nested: bool = False) -> None:
    """The config flags. `nested`: a sub-subcommand (`qpo serve report`) whose flags,
    when not given, leave the parent's (`qpo serve --profile cluster report`) in place."""
    keep = {"default": argparse.SUPPRESS} if nested else {}
    p.add_argument("--profile", **(keep or {"default": None}),
                   help="profile name (qpo_ray/config/profiles/) or path to a YAML profile "
                        f"(default: {DEFAULT_PROFILE}, announced)")
    p.add_argument("--set", dest="nested_overrides" if nested else "overrides",
                   action="append", **(keep or {"default": []}), metavar="KEY=VALUE",
                   help="override a config key, e.g. loop.num_loops=2 (repeatable)")
    p.add_argument("--workdir", **keep, help="run directory (overrides workdir)")
    p.add_argument("--tracking-uri", **keep,
                   help="MLflow tracking URI (overrides tracking.uri)")


def profile_of(args: argparse.Namespace) -> str:
    """--profile, or the default, said once on stderr (-q keeps it quiet)."""
    if getattr(args, "profile", None):
        return args.profile
    if getattr(args, "verbosity", 0) >= 0:
        print(f"qpo: no --profile given: using {DEFAULT_PROFILE} "
              f"(qpo_ray/config/profiles/{DEFAULT_PROFILE}.yaml)", file=sys.stderr)
    args.profile = DEFAULT_PROFILE
    return DEFAULT_PROFILE


def overrides_of(args: argparse.Namespace) -> list[str]:
    return list(getattr(args, "overrides", [])) + list(getattr(args, "nested_overrides", []))


def config_from_args(args: argparse.Namespace, *extra: str) -> Config:
    """Profile <- --set <- the dedicated flags (--workdir, --tracking-uri) <- `extra`."""
    overrides = overrides_of(args)
    if getattr(args, "workdir", None):
        overrides.append(f"workdir={args.workdir}")
    if getattr(args, "tracking_uri", None):
        overrides.append(f"tracking.uri={args.tracking_uri}")
    return load_config(profile_of(args), overrides + list(extra))


def run_command(work: Callable[[], Optional[str]], prog: str) -> int:
    """Call `work`, print the message it returns, map what it raised to an exit code."""
    try:
        message = work()
    except INPUT_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:
        if not _is_hub_error(exc):
            traceback.print_exc()
            return EXIT_FAILURE
        # Past the pre-run check (which names the key): a model id that does not load.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"{prog}: error: a Hugging Face model did not load ({first[:200]}); check "
              "target.model, target.tokenizer and policy.backbone", file=sys.stderr)
        return EXIT_INPUT
    except Exception:
        traceback.print_exc()
        return EXIT_FAILURE
    if message is not None:
        print(message)
    return EXIT_OK


def _is_hub_error(exc: OSError) -> bool:
    """huggingface_hub's errors, and transformers' OSError for an id it cannot load."""
    return (type(exc).__module__.startswith("huggingface_hub")
            or "huggingface.co" in str(exc) or "valid model identifier" in str(exc))


# -- the commands both `qpo` and jobs/ run ------------------------------------------------

def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run; --set changes its saved config unless "
                        "the change would contradict a finished stage (docs/running.md: Resume)")


def _run(args: argparse.Namespace) -> str:
    overrides = overrides_of(args)  # on resume: changes to the saved config (qpo_ray.run.resume)
    if args.resume:
        if getattr(args, "workdir", None):
            raise ConfigError("--workdir and --resume: the run directory is --resume's")
        if getattr(args, "tracking_uri", None):
            overrides.append(f"tracking.uri={args.tracking_uri}")
    cfg = None if args.resume else config_from_args(args)  # config errors before imports
    # Held for the whole run: a second run on this directory fails at once, before the
    # stages' libraries load.
    with lock_run_dir(args.resume or cfg.workdir):
        from qpo_ray.run.loop import run_qpo

        result = run_qpo(cfg, resume_dir=args.resume, overrides=overrides)
    return f"\nresults: {result}"


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="Parquet dataset with its reward scale")
    p.add_argument("--out", required=True, help="output directory (policy/, metrics.json)")
    p.add_argument("--loop", type=int, default=1, help="1 = first loop (Table 9 schedule)")
    p.add_argument("--init", help="checkpoint to continue from")


def _train(args: argparse.Namespace) -> str:
    cfg = config_from_args(args)
    with lock_outputs(args.out):  # the run directory --out lies in, if any
        from qpo_ray.training.trainer import train_policy

        result = train_policy(cfg, dataset_path=args.dataset, out_dir=args.out,
                              loop_index=args.loop, init_checkpoint=args.init)
    return f"policy checkpoint: {result.checkpoint_dir}"


def _augment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="policy directory of loop `round`")
    p.add_argument("--dataset", required=True, help="D_{t-1} (Parquet with its reward scale)")
    p.add_argument("--round", type=int, default=1)
    p.add_argument("--out", required=True, help="where D_t is written")


def _augment(args: argparse.Namespace) -> str:
    from qpo_ray.run.loop import augment_round

    path = augment_round(config_from_args(args), policy_dir=args.policy,
                         dataset_path=args.dataset, round_index=args.round, out_path=args.out)
    return f"augmented rows: {path}"


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", help="a finished run directory (uses its latest policy)")
    p.add_argument("--policy", help="a policy directory (instead of --run-dir)")
    p.add_argument("--target", help="another target model (cross-model transfer)")
    p.add_argument("--add", nargs="+", metavar="METHOD",
                   help="score only these methods and add their rows to the run's existing "
                        "report (e.g. a baseline added after the run finished)")


def _evaluate(args: argparse.Namespace) -> str:
    from qpo_ray.run.loop import evaluate_tracked

    extra = [f"target.model={args.target}"] if args.target else []
    if args.run_dir and not args.workdir:  # its MLflow store, its baselines
        extra.append(f"workdir={Path(args.run_dir).resolve()}")
    if args.add:
        extra.append(f"test.methods=[{', '.join(args.add)}]")
    cfg = config_from_args(args, *extra)
    # Logged to MLflow as a run nested under the evaluated run.
    report, logged = evaluate_tracked(cfg, run_dir=args.run_dir, policy_dir=args.policy,
                                      add=bool(args.add))
    return f"{report}\n{logged}"


@dataclass(frozen=True)
class Command:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    work: Callable[[argparse.Namespace], Optional[str]]


COMMANDS: dict[str, Command] = {
    "run": Command("the whole QPO loop: Step 0, T loops, test phase", _run_args, _run),
    "train": Command("one ORL training stage on Ray Train", _train_args, _train),
    "augment": Command("one augmentation round (sample, score, merge)", _augment_args,
                       _augment),
    "evaluate": Command("test phase: policy vs baselines, report table", _evaluate_args,
                        _evaluate),
}


def command_parser(name: str, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` with the config arguments and those of command `name`."""
    add_config_args(parser)
    COMMANDS[name].add_args(parser)
    return parser


def job_main(name: str, description: str, argv: Optional[list[str]] = None) -> int:
    """A job script's whole body: parse, do command `name`, return the exit code."""
    parser = command_parser(name, argparse.ArgumentParser(description=description))
    args = parser.parse_args(argv)
    return run_command(lambda: COMMANDS[name].work(args), parser.prog)
