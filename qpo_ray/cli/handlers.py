"""What each `qpo` subcommand does beyond the shared run commands
(qpo_ray.run.commands): small wrappers that build a Config and call the library.
Library modules are imported inside each command so that `qpo --help` stays fast."""

from __future__ import annotations

import argparse
import json

from qpo_ray.run.commands import config_from_args


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


def cmd_check(args: argparse.Namespace) -> str:
    """The pre-run checks, then what each stage will spend."""
    import time

    from qpo_ray.common.console import log
    from qpo_ray.run.costs import estimate, plan_table
    from qpo_ray.run.loop import check_before_work
    from qpo_ray.tasks import fit_to_data

    start = time.perf_counter()
    cfg = fit_to_data(config_from_args(args))  # as `qpo run` fits them (one log line)
    check_before_work(cfg)
    log.info(f"checks passed in {time.perf_counter() - start:.1f} s: task, target, "
             "policy backbone, label words, test methods")
    table = plan_table(estimate(cfg))
    return (f"plan for {cfg.task.name} ({cfg.loop.num_loops} loops, target "
            f"{cfg.target.model} on {cfg.target.backend}, workdir {cfg.workdir}):\n{table}\n"
            "engine-s: the target's estimated compute (qpo_ray/run/costs.py; docs/cli.md); "
            "'-' = no estimate for this engine")


def cmd_config_show(args: argparse.Namespace) -> str:
    import yaml

    cfg = config_from_args(args)
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip()


def cmd_init(args: argparse.Namespace) -> str:
    from qpo_ray.cli.skeleton import write_skeleton

    written = write_skeleton(args.dir, force=args.force)
    return "\n".join(["wrote:"] + [f"  {p}" for p in written] + [
        f"next: qpo check --profile {written[-1]}",
        f"      qpo run --profile {written[-1]}"])
