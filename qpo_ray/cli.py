"""The `qpo` command line. It parses arguments, builds a Config and calls the library;
it has no logic of its own. Library modules are imported inside each command so that
`qpo --help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qpo_ray.config import ConfigError, load_config
from qpo_ray.rundir import RunDirBusy, lock_run_dir


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu-demo",
                   help="profile name (qpo_ray/profiles/) or path to a YAML profile")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key, e.g. loop.num_loops=2")
    p.add_argument("--workdir", help="run directory (overrides workdir)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides tracking.uri)")


def _config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if getattr(args, "workdir", None):
        overrides.append(f"workdir={args.workdir}")
    if getattr(args, "tracking_uri", None):
        overrides.append(f"tracking.uri={args.tracking_uri}")
    return load_config(args.profile, overrides)


def cmd_setup(args: argparse.Namespace) -> int:
    from qpo_ray.models import EMBEDDED_MODELS, provision_embedded

    for alias in EMBEDDED_MODELS:
        print(f"embedded model {alias}: {provision_embedded(alias)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = None if args.resume else _config(args)  # config errors before heavy imports
    from qpo_ray.loop import run_qpo

    # Held for the whole run: a second `qpo run` on this directory fails at once.
    with lock_run_dir(args.resume or cfg.workdir):
        result = run_qpo(cfg, resume_dir=args.resume)
    print(f"\nresults: {result}")
    return 0


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from qpo_ray.loop import build_initial_dataset

    path = build_initial_dataset(_config(args), out_path=args.out)
    print(f"dataset: {path}")
    return 0


def cmd_dataset_stats(args: argparse.Namespace) -> int:
    from qpo_ray.data.io import read_dataset
    from qpo_ray.data.stats import dataset_stats

    frame, _scale = read_dataset(args.path)
    print(json.dumps(dataset_stats(frame), indent=2, default=str))
    return 0


def cmd_dataset_import(args: argparse.Namespace) -> int:
    from qpo_ray.data.importer import import_paper_json
    from qpo_ray.data.io import write_dataset

    frame, scale = import_paper_json(args.path, target_key=args.target_key)
    write_dataset(frame, args.out, scale)
    print(f"imported {len(frame)} rows -> {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from qpo_ray.training import train_policy

    cfg = _config(args)
    result = train_policy(cfg, dataset_path=args.dataset, out_dir=args.out,
                          loop_index=args.loop, init_checkpoint=args.init)
    print(f"policy checkpoint: {result.checkpoint_dir}")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from qpo_ray.loop import augment_round

    path = augment_round(_config(args), policy_dir=args.policy, dataset_path=args.dataset,
                         round_index=args.round, out_path=args.out)
    print(f"augmented rows: {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qpo_ray.loop import evaluate

    cfg = _config(args)
    if args.target:
        cfg.target.model = args.target
    report = evaluate(cfg, run_dir=args.run_dir, policy_dir=args.policy)
    print(report)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from qpo_ray.serving import run_serve

    cfg = _config(args)
    if args.policy:
        cfg.serve.policy_uri = args.policy
    if args.insecure:
        cfg.serve.insecure = True
    run_serve(cfg, blocking=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup", help="convert the embedded model once (cached)")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("run", help="the whole QPO loop: Step 0, T loops, test phase")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.set_defaults(func=cmd_run)

    ds = sub.add_parser("dataset", help="build, import or describe an offline dataset")
    dsub = ds.add_subparsers(dest="dataset_command", required=True)
    p = dsub.add_parser("build", help="Step 0: score the prompt collection on the target")
    _add_config_args(p)
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

    p = sub.add_parser("train", help="one ORL training stage on Ray Train")
    _add_config_args(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--loop", type=int, default=1, help="1 = first loop (Table 9 schedule)")
    p.add_argument("--init", help="checkpoint to continue from")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("augment", help="one augmentation round (sample, score, merge)")
    _add_config_args(p)
    p.add_argument("--policy", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--round", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("evaluate", help="test phase: policy vs baselines, report table")
    _add_config_args(p)
    p.add_argument("--run-dir", help="a finished run directory (uses its latest policy)")
    p.add_argument("--policy", help="a policy directory (instead of --run-dir)")
    p.add_argument("--target", help="another target model (cross-model transfer)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="serve the latest policy on Ray Serve")
    _add_config_args(p)
    p.add_argument("--policy", help="models:/name@alias or a policy directory")
    p.add_argument("--insecure", action="store_true",
                   help="serve without a token on a non-loopback serve.host (every request "
                        "is accepted; the log says so)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, RunDirBusy) as exc:
        print(f"qpo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
