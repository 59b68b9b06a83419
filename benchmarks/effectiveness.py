"""Does QPO beat a fixed prompt, on several tasks? Paired test accuracy per task, seed and
pooled, with reference rows that need no prompt.

    .venv/bin/python benchmarks/effectiveness.py --tasks rotten_tomatoes ag_news tweet_emotion
    .venv/bin/python benchmarks/effectiveness.py --tasks ag_news my_task.yaml --seeds 0
    .venv/bin/python benchmarks/effectiveness.py --tasks ag_news --report-only   # summarise
    .venv/bin/python benchmarks/effectiveness.py --tasks tweet_emotion --tiny     # wiring smoke

A task is a built-in name (its data read from `--data-root/<name>` when that folder
exists: ag_news and tweet_emotion from ../shared/data; rotten_tomatoes is embedded) or a
bring-your-own spec file (task.name=byo). Every task runs ONE frozen profile,
`benchmarks/profiles/effectiveness.yaml`; what differs per task is derived from its data
by one rule (`task_overrides`), never set by hand:
- the collection share: COLLECTION_QUERIES train queries (task.collection_fraction =
  COLLECTION_QUERIES / train size), of which the profile's task.dev_queries are dev;
- the test set: at most the profile's task.max_test_queries;
- the prompts: every prompt the project has for the task, the builtin collection first
  (its manual prompt is `manual`), then InstructEval's (../shared/data/instructeval_prompts)
  where it has the task, duplicates dropped, written to `<workdir>/<task>/prompts.jsonl`.

Each (task, seed) is one whole `qpo run` in `<workdir>/<task>/seed<k>`: a finished one is
reused (methods added to the profile since are scored on its saved policies and added to
its report), an interrupted one resumed, so tasks and seeds can run as separate processes
and be summarised together.

It prints, from each run's `report/predictions.parquet` (test split; nothing here looks at
the test set to choose anything): each task's collection, dev and test label priors per
seed; per task, one row per method and seed and the mean over seeds, paired against
manual, best_single, best_single_dev, probe and majority (bootstrap 95% CI over queries,
McNemar exact p); the issue's checks per task; the same pooled over tasks and seeds; the
shifted-prior setting: each test set re-sampled (seeded) to its collection's label
shares reversed by rank, every method's rows on that sample compared again; and the dev
accuracies qpo was chosen by.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import effectiveness_report as report  # noqa: E402

PROFILE = REPO / "benchmarks" / "profiles" / "effectiveness.yaml"
# The profile's version (its header says what changed): runs go to a folder of their own,
# so a finished run of an earlier version is never reused as this one's.
PROFILE_VERSION = 2
# What --archive keeps of a finished (task, seed): enough for --report-only (predictions)
# and for a reader (the report, the dev choice), ~150 KB; runs/ itself is not in git.
ARCHIVED = ("predictions.parquet", "selection.json", "results.csv", "report.md")
DATA_ROOT = Path(os.environ.get("QPO_SHARED_DATA", REPO.parent / "shared" / "data"))
# Train queries every task's collection share holds (dev queries included): Step 0's
# 64 shared + 700 wide queries, augmentation's and the dev split's fit in it.
COLLECTION_QUERIES = 1020
# --tiny: a wiring smoke of a few minutes per (task, seed) on 2 cores; its figures say
# nothing about QPO. Applied after the derived sizes (TINY_COLLECTION replaces
# COLLECTION_QUERIES). One loop: a 3-step policy can generate an empty prompt, which
# augmentation keeps and the next train stage refuses (seen 2026-12-07).
TINY_COLLECTION = 160
TINY = ["task.max_test_queries=30", "task.dev_queries=20", "target.backend=transformers",
        "target.dtype=float32", "target.batch_size=16", "evaluation.num_actors=1",
        "dataset.queries_per_group=8", "dataset.wide.prompts=4", "dataset.wide.queries=40",
        "policy.backbone_num_layers=1", "policy.query_summary.layers=4",
        "policy.query_summary.dims=8", "training.epochs_first_loop=1",
        "training.summary.epochs=1", "training.max_steps_per_loop=3",
        "loop.num_loops=1", "test.dev_decodings=[greedy]"]


def task_arg(arg: str, data_root: Path) -> tuple[str, list[str]]:
    """(a short name for the task's folder, its task overrides) for a built-in task name
    or a bring-your-own spec file."""
    from qpo_ray.tasks import TASKS

    path = Path(arg)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SystemExit(f"--tasks: {arg}: no such task spec file")
        return path.stem, ["task.name=byo", f"task.spec_path={path.resolve()}"]
    if arg not in TASKS:
        raise SystemExit(f"--tasks: {arg!r} is neither a built-in task ({sorted(TASKS)}) "
                         "nor a .yaml task spec")
    folder = data_root / arg
    return arg, [f"task.name={arg}"] + ([f"task.data_dir={folder}"] if folder.is_dir() else [])


def prompt_file(name: str, base: list[str], out: Path, data_root: Path) -> Path:
    """Every prompt the project has for the task (builtin first, then InstructEval's),
    written as a .jsonl the profile's prompts.source points at."""
    from qpo_ray.config import ConfigError, PromptsConfig
    from qpo_ray.prompts import load_collection
    from qpo_ray.tasks import get_task

    task = get_task(_task_config(base))
    records = []
    for source in ("builtin", str(data_root / "instructeval_prompts")):
        try:
            records += load_collection(PromptsConfig(source=source), task.name)
        except (ConfigError, FileNotFoundError, ValueError):
            continue  # no such collection for this task
    if not records:
        raise SystemExit(f"{name}: no prompt collection (builtin or InstructEval)")
    seen, lines = set(), []
    for r in records:
        if r.text not in seen:
            seen.add(r.text)
            lines.append(json.dumps({"text": r.text, "source": r.source}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def _task_config(base: list[str]):
    from qpo_ray.config import load_config

    return load_config(PROFILE, base).task


def task_overrides(name: str, base: list[str], workdir: Path, data_root: Path,
                   tiny: bool) -> list[str]:
    """The task's settings, derived from its data by the rules of the module docstring."""
    from qpo_ray.tasks import get_task

    task = get_task(_task_config(base))
    train = len(task.load_split("train"))
    wanted = TINY_COLLECTION if tiny else COLLECTION_QUERIES
    if train <= wanted:
        raise SystemExit(f"{name}: {train} train queries; the benchmark needs more than "
                         f"{wanted} for its collection share")
    prompts = prompt_file(name, base, workdir / name / "prompts.jsonl", data_root)
    return [*base, f"task.collection_fraction={wanted / train:.6f}",
            f"prompts.source={prompts}", *(TINY if tiny else [])]


def splits_of(profile: Path, overrides: list[str], seed: int):
    from qpo_ray.config import load_config
    from qpo_ray.tasks import task_and_splits

    cfg = load_config(profile, [*overrides, f"seed={seed}"])
    return task_and_splits(cfg.task, cfg.seed)


def missing_methods(run_dir: Path, profile: Path, overrides: list[str]) -> list[str]:
    """The profile's test methods a finished seed's report has no rows for (methods
    added to the profile after the seed ran), and qpo if its dev choice weighed other
    decodings than the profile's."""
    from qpo_ray.config import load_config

    config = load_config(profile, overrides)
    methods = config.test.methods
    have = set(pd.read_parquet(run_dir / "report" / "predictions.parquet",
                               columns=["method"])["method"])
    # best_single_oracle's rows are the collection's prompts, one row each (single:<id>).
    have |= {"best_single_oracle"} if any(m.startswith("single:") for m in have) else set()
    # qpo is chosen on dev among test.dev_decodings: a seed whose dev choice weighed
    # other decodings, or mbr at a temperature not fitted on dev where the profile fits
    # it, is chosen again (the same policies; only the test stage reruns).
    selection = run_dir / "report" / "selection.json"
    if selection.exists():
        chosen = json.loads(selection.read_text())
        weighed = {k.split("/")[1] for k in chosen.get("dev_accuracy", {})}
        fits = "mbr" in weighed and config.test.mbr.calibration == "dev"
        if weighed and (weighed != set(config.test.dev_decodings)
                        or (fits and "mbr_temperatures" not in chosen)):
            have.discard("qpo")
    return [m for m in methods if m not in have]


def run_seed(seed: int, workdir: Path, profile: Path, overrides: list[str]) -> float:
    """Run (or resume) one seed's `qpo run`; returns its wall time in seconds. A finished
    seed is reused, with the profile's methods its report lacks scored and added
    (`qpo evaluate --add`: the same policies, Step 0 and test queries)."""
    run_dir = workdir / f"seed{seed}"
    config = ["--profile", str(profile), "--set", f"seed={seed}"]
    for item in overrides:
        config += ["--set", item]
    cmd = [sys.executable, "-m", "qpo_ray.cli"]
    if (run_dir / "report" / "predictions.parquet").exists():
        missing = missing_methods(run_dir, profile, [f"seed={seed}", *overrides])
        print(f"seed {seed}: finished run found in {run_dir}"
              + (f"; adding {missing} to its report" if missing else ""), flush=True)
        if not missing:
            return 0.0
        cmd += ["evaluate", "--run-dir", str(run_dir), *config, "--add", *missing]
    elif (run_dir / "stages.json").exists():
        cmd += ["run", "--resume", str(run_dir)]
    else:
        cmd += ["run", "--workdir", str(run_dir), *config]
    # The run inherits this environment as it is, with no OMP_NUM_THREADS default: the
    # driver ranks and generates with torch between the scoring phases, and one thread
    # there made the test stage several times slower; Ray already caps each scoring
    # actor's threads at its num_cpus.
    start = time.perf_counter()
    log = run_dir.parent / f"seed{seed}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"seed {seed}: {' '.join(cmd)} (log: {log})", flush=True)
    with open(log, "a") as out:
        subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    print(f"seed {seed}: done in {seconds / 60:.1f} min", flush=True)
    return seconds


def load_predictions(workdir: Path, tasks: list[str], seeds: list[int],
                     finished_only: bool = False) -> pd.DataFrame:
    """Every (task, seed)'s prediction rows (test and dev), with task and seed columns.
    finished_only (--report-only): a (task, seed) with no report yet is named and left
    out, so a summary can be read while seeds are still running."""
    frames, missing = [], []
    for task in tasks:
        for seed in seeds:
            path = workdir / task / f"seed{seed}" / "report" / "predictions.parquet"
            if path.exists():
                frames.append(pd.read_parquet(path).assign(task=task, seed=seed))
            elif finished_only:
                missing.append(f"{task} seed {seed}")
            else:
                raise SystemExit(f"{task} seed {seed}: no {path}; the run did not finish")
    if missing:
        print(f"\nnot finished, left out of everything below: {', '.join(missing)}")
    if not frames:
        raise SystemExit("no finished (task, seed) to summarise: run them first "
                         "(without --report-only)")
    return pd.concat(frames, ignore_index=True)


def archive(workdir: Path, dest: Path, every: pd.DataFrame) -> None:
    """Copy the report files (ARCHIVED) of every summarised (task, seed) under `dest`."""
    for (task, seed), _ in every.groupby(["task", "seed"]):
        src, out = (root / task / f"seed{seed}" / "report" for root in (workdir, dest))
        if src.resolve() == out.resolve():
            continue
        out.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED:
            if (src / name).exists():
                shutil.copy2(src / name, out / name)
    print(f"\narchived {every.groupby(['task', 'seed']).ngroups} (task, seed) report(s) "
          f"under {dest}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "ag_news", "tweet_emotion"],
                   help="built-in task names and/or bring-your-own task spec files (.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", type=Path,
                   default=REPO / "runs" / f"effectiveness-v{PROFILE_VERSION}")
    p.add_argument("--profile", type=Path, default=PROFILE)
    p.add_argument("--data-root", type=Path, default=DATA_ROOT,
                   help="where built-in tasks' data folders and instructeval_prompts are")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="section.key=value passed to every run (e.g. "
                        "dataset.query_reward=predicted); use another --workdir per variant")
    p.add_argument("--tiny", action="store_true",
                   help="a wiring smoke: tiny sizes (TINY), minutes per run; no verdicts")
    p.add_argument("--report-only", action="store_true", help="summarise finished runs only")
    p.add_argument("--archive", type=Path, metavar="DIR",
                   help="copy each finished (task, seed)'s report files to DIR/<task>/seed<k>/"
                        "report/ (e.g. benchmarks/results/effectiveness-v2, kept in git); "
                        "--report-only --workdir DIR then summarises them")
    args = p.parse_args()
    if any(o.replace(" ", "").startswith("test.split=") for o in args.overrides):
        p.error("--set test.split: this benchmark measures on the test split; compare on the "
                "dev split with `qpo evaluate --run-dir <seed dir> --set test.split=dev "
                "--set test.decoding=greedy` (docs/experiments.md: \"The router on the dev split\")")
    names, shares, words = [], {}, {}
    for arg in args.tasks:
        name, base = task_arg(arg, args.data_root)
        overrides = task_overrides(name, base, args.workdir, args.data_root, args.tiny) \
            + args.overrides
        names.append(name)
        print(f"\n{name}: {' '.join(overrides)}", flush=True)
        for seed in args.seeds:
            task, splits = splits_of(args.profile, overrides, seed)
            words[name] = tuple(task.label_words)
            report.print_priors(name, seed, splits, words[name])
            labels = [int(e.label) for e in splits.collection]
            shares[(name, seed)] = {y: labels.count(y) / len(labels)
                                    for y in range(len(words[name]))}
            if not args.report_only:
                run_seed(seed, args.workdir / name, args.profile, overrides)
    every = load_predictions(args.workdir, names, args.seeds, finished_only=args.report_only)
    if args.archive is not None:
        archive(args.workdir, args.archive, every)
    pred = every[(every["split"] == "test") & (every["shots"] == 0)]
    print("\ntest queries per task and seed: "
          f"{pred.groupby(['task', 'seed'])['query_id'].nunique().to_dict()}")
    for name in names:
        part = pred[pred["task"] == name]
        report.task_checks(part, report.summarise_task(part, name), name, words[name])
    report.pooled(pred, names)
    report.shifted_report(pred, shares, words)
    report.print_dev_choice(every[every["split"] == "dev"])
    if args.tiny:
        print("\n--tiny: a wiring smoke; these figures say nothing about QPO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
