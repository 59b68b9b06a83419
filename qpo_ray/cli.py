"""The `qpo` command line. It parses arguments, builds a Config and calls the library;
it has no logic of its own. `run`, `train`, `augment` and `evaluate` are the commands of
qpo_ray.run.commands, shared with the jobs/ scripts (same arguments, same exit codes). Library
modules are imported inside each command so that `qpo --help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys

from qpo_ray.run.commands import COMMANDS, add_config_args, command_parser, config_from_args, run_command


def cmd_setup(args: argparse.Namespace) -> str:
    from qpo_ray.common.models import EMBEDDED_MODELS, provision_embedded

    return "\n".join(f"embedded model {alias}: {provision_embedded(alias)}"
                     for alias in EMBEDDED_MODELS)


def cmd_prompts(args: argparse.Namespace) -> str:
    from qpo_ray.prompts import load_collection, manual_prompt
    from qpo_ray.tasks import get_task

    cfg = config_from_args(args)
    records = load_collection(cfg.prompts, get_task(cfg.task).name)
    manual = manual_prompt(records, cfg.prompts)
    lines = ["index  id              source      text   (* = the manual baseline)"]
    for i, r in enumerate(records):
        mark = "*" if r.id == manual.id else " "
        lines.append(f"{i:>5}{mark} {r.id}  {r.source[:10]:<10}  {r.text}")
    return "\n".join(lines)


def cmd_dataset_build(args: argparse.Namespace) -> str:
    from qpo_ray.run.loop import build_initial_dataset

    return f"dataset: {build_initial_dataset(config_from_args(args), out_path=args.out)}"


def cmd_dataset_stats(args: argparse.Namespace) -> str:
    from qpo_ray.data.io import read_dataset
    from qpo_ray.data.stats import dataset_stats

    frame, _scale = read_dataset(args.path)
    return json.dumps(dataset_stats(frame), indent=2, default=str)


def cmd_dataset_import(args: argparse.Namespace) -> str:
    from qpo_ray.data.importer import import_paper_json
    from qpo_ray.data.io import write_dataset

    frame, scale = import_paper_json(args.path, target_key=args.target_key)
    write_dataset(frame, args.out, scale)
    return f"imported {len(frame)} rows -> {args.out}"


def cmd_serve(args: argparse.Namespace) -> None:
    from qpo_ray.serving import run_serve

    cfg = config_from_args(args)
    serve = {**({"policy_uri": args.policy} if args.policy else {}),
             **({"insecure": True} if args.insecure else {})}
    run_serve(cfg.with_changes({"serve": serve}) if serve else cfg, blocking=True)


def cmd_serve_report(args: argparse.Namespace) -> str:
    from qpo_ray.serving.feedback_report import report

    return report(config_from_args(args), to_mlflow=not args.no_mlflow,
                  versions=tuple(args.compare) if args.compare else None)


def cmd_serve_feedback_dataset(args: argparse.Namespace) -> str:
    from qpo_ray.run.rundir import lock_outputs

    cfg = config_from_args(args)
    with lock_outputs(args.out):  # --out inside a run directory: no run writes there now
        from qpo_ray.serving.feedback_report import write_feedback_dataset

        path, added = write_feedback_dataset(cfg, args.out, into=args.into,
                                             keep_all=args.keep_all)
    return f"{added} feedback rows{' + ' + args.into if args.into else ''} -> {path}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("serve", help="serve the champion policy (models:/<name>@champion) on Ray Serve")
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
    add_config_args(p)
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="the two policy versions to compare (default: most feedback)")
    p.add_argument("--no-mlflow", action="store_true", help="print only")
    p.set_defaults(func=cmd_serve_report)
    p = ssub.add_parser("feedback-dataset", help="turn serving feedback into dataset rows "
                        "for the next training loop")
    add_config_args(p)
    p.add_argument("--out", required=True, help="Parquet path to write")
    p.add_argument("--into", help="a run's dataset (D_t) to append the rows to")
    p.add_argument("--keep-all", action="store_true",
                   help="keep wrong / low-reward rows too (default: dataset.expert_fraction)")
    p.set_defaults(func=cmd_serve_feedback_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes as for the jobs/ scripts (qpo_ray.run.commands): 0, 2 wrong input, 1 failure."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), "qpo")


if __name__ == "__main__":
    sys.exit(main())
