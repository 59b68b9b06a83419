"""The `qpo` command line. It parses arguments, builds a Config and calls the library;
it has no logic of its own. `run`, `train`, `augment` and `evaluate` are the commands of
qpo_ray.run.commands, shared with the jobs/ scripts (same arguments, same exit codes); the
others are in qpo_ray.cli.handlers. Library modules are imported inside each command so
that `qpo --help` stays fast. Console lines go through the `qpo` logger (-q / -v)."""

from __future__ import annotations

import argparse
import sys

from qpo_ray import __version__
from qpo_ray.cli.handlers import (cmd_check, cmd_config_show, cmd_dataset_build,
                                  cmd_dataset_import, cmd_dataset_stats, cmd_init, cmd_prompts,
                                  cmd_serve, cmd_serve_feedback_dataset, cmd_serve_report,
                                  cmd_setup)
from qpo_ray.common.console import set_verbosity
from qpo_ray.run.commands import COMMANDS, add_config_args, command_parser, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qpo-ray {__version__}")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                      default=0, help="only warnings and errors from the `qpo` logger")
    loud.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                      help="debug lines too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="the pre-run checks, then the plan: per stage the "
                       "pairs to score, prompt tokens, training steps, engine-seconds")
    add_config_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("config", help="the resolved configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    p = csub.add_parser("show", help="print the config a run would use, as YAML "
                        "(defaults <- profile and what it extends <- --set)")
    add_config_args(p)
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("init", help="write a bring-your-own-task skeleton (task spec, "
                       "data, prompts, a profile that extends cpu-demo) into DIR")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="overwrite the skeleton's files")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("setup", help="convert the embedded model once (cached)")
    p.set_defaults(func=cmd_setup)

    # run, train, augment, evaluate: the same arguments and work as the jobs/ scripts.
    for name, command in COMMANDS.items():
        p = command_parser(name, sub.add_parser(name, help=command.help))
        p.set_defaults(func=command.work)

    p = sub.add_parser("prompts", help="list the prompt collection: index, id, source, text "
                                         "(any of index, id or text names a prompt)")
    add_config_args(p)
    p.set_defaults(func=cmd_prompts)

    ds = sub.add_parser("dataset", help="build, import or describe an offline dataset")
    dsub = ds.add_subparsers(dest="dataset_command", required=True)
    p = dsub.add_parser("build", help="Step 0: score the prompt collection on the target")
    add_config_args(p)
    p.add_argument("--out", help="Parquet path (default <workdir>/dataset_loop0.parquet)")
    p.set_defaults(func=cmd_dataset_build)
    p = dsub.add_parser("stats", help="rows, distinct queries/prompts, reward quantiles")
    p.add_argument("path")
    p.set_defaults(func=cmd_dataset_stats)
    p = dsub.add_parser("import", help="import the QPO paper's published JSON")
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p.add_argument("--target-key", default="llama7b", help="the JSON's per-target key")
    p.set_defaults(func=cmd_dataset_import)

    p = sub.add_parser("serve", help="serve the champion policy (models:/<name>@champion) "
                       "on Ray Serve")
    add_config_args(p)
    p.add_argument("--policy", help="models:/name@alias (default: @champion; @latest: "
                   "every new version) or a policy directory")
    p.add_argument("--insecure", action="store_true",
                   help="serve without a token on a non-loopback serve.host (every request "
                        "is accepted; the log says so)")
    p.set_defaults(func=cmd_serve)
    ssub = p.add_subparsers(dest="serve_command", required=False)
    p = ssub.add_parser("report", help="per policy version: requests, feedback, accuracy "
                        "with a 95%% CI, the A/B difference; logged to MLflow")
    add_config_args(p, nested=True)  # `qpo serve --profile X report` keeps X
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="the two policy versions to compare (default: most feedback)")
    p.add_argument("--no-mlflow", action="store_true", help="print only")
    p.set_defaults(func=cmd_serve_report)
    p = ssub.add_parser("feedback-dataset", help="turn serving feedback into dataset rows "
                        "for the next training loop")
    add_config_args(p, nested=True)
    p.add_argument("--out", required=True, help="Parquet path to write")
    p.add_argument("--into", help="a run's dataset (D_t) to append the rows to")
    p.add_argument("--keep-all", action="store_true",
                   help="keep wrong / low-reward rows too (default: dataset.expert_fraction)")
    p.set_defaults(func=cmd_serve_feedback_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes as for the jobs/ scripts (qpo_ray.run.commands): 0, 2 wrong input, 1 failure."""
    args = build_parser().parse_args(argv)
    set_verbosity(args.verbosity)
    return run_command(lambda: args.func(args), "qpo")


if __name__ == "__main__":
    sys.exit(main())
