"""Does QPO beat a fixed prompt? Paired test accuracy on 1,000 held-out queries, per seed
and over seeds.

    .venv/bin/python benchmarks/effectiveness.py --seeds 0 1 2
    .venv/bin/python benchmarks/effectiveness.py --seeds 0 1 2 --report-only   # summarise

Each seed is one whole `qpo run` (Step 0, training, augmentation, dev-split choice,
test phase) of `benchmarks/profiles/effectiveness.yaml` in `<workdir>/seed<k>`; the seed
changes the collection/dev split, Step-0 sampling, training and sampling. A finished
seed is reused (methods added to the profile since it ran are scored on its saved
policies and Step 0 and added to its report), an interrupted one resumed, so seeds can
run as separate processes (`--seeds 1` in one shell, `--seeds 2` in another) and be
summarised together.

It prints, from each run's `report/predictions.parquet` (test split only; nothing here
looks at the test set to choose anything):
- one row per method and seed: accuracy, and the paired difference against `manual`
  and against `best_single` (bootstrap 95% CI over queries, McNemar exact p);
- the mean over seeds: the mean of the per-seed differences, with a bootstrap that
  resamples queries within each seed;
- the checks of the effectiveness issue: QPO above best_single and manual with the CI
  above 0, QPO >= router and label_router, multi-loop QPO >= loop 1;
- the same two differences with seeds as the unit (a t-interval over the per-seed
  differences): the pooled CI above carries only query-to-query noise, so a win carried
  by one seed passes it; this one says whether QPO wins reliably;
- the share of well-formed prompts of each policy row (readable, naming the labels);
- each seed's dev accuracy of every (loop, decoding) the dev split chose among: the
  figures `qpo` was chosen by, so a profile can be compared with another on dev alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qpo_ray.testphase.render import well_formed  # noqa: E402
from qpo_ray.testphase.stats import across_seeds, paired_difference  # noqa: E402

PROFILE = REPO / "benchmarks" / "profiles" / "effectiveness.yaml"
REFERENCES = ("manual", "best_single")


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


def load_predictions(workdir: Path, seeds: list[int]) -> pd.DataFrame:
    """Every seed's prediction rows (test and dev splits), with a `seed` column."""
    frames = []
    for seed in seeds:
        path = workdir / f"seed{seed}" / "report" / "predictions.parquet"
        if not path.exists():
            raise SystemExit(f"seed {seed}: no {path}; run it first (without --report-only)")
        frames.append(pd.read_parquet(path).assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


def print_dev_choice(dev: pd.DataFrame) -> None:
    """Dev accuracy (%) per seed of each candidate the run chose `qpo` among."""
    if dev.empty:
        return
    table = 100 * dev.pivot_table(index="method", columns="seed", values="accuracy")
    print("\ndev accuracy of the candidates qpo was chosen among (the dev split only):")
    print(table.round(1).rename(columns=lambda seed: f"seed {seed}")
          .rename_axis(columns=None).to_string())


def label_words(run_dir: Path) -> tuple:
    """The run's task's label words (what a well-formed prompt must name)."""
    from qpo_ray.run.rundir import RunDir
    from qpo_ray.tasks import get_task

    _, cfg = RunDir.load(run_dir)
    return tuple(getattr(get_task(cfg.task), "label_words", ()))


def _aligned(pred: pd.DataFrame, method: str, ref: str) -> tuple | None:
    a = pred[pred["method"] == method].set_index("query_id")["accuracy"]
    b = pred[pred["method"] == ref].set_index("query_id")["accuracy"]
    if a.empty or b.empty:
        return None
    common = a.index.intersection(b.index)
    return a.loc[common].to_numpy(), b.loc[common].to_numpy()


def per_seed_pairs(pred: pd.DataFrame, seeds: list[int], method: str, ref: str) -> list:
    """(method, ref) accuracy arrays aligned on query ids, one pair per seed that has both."""
    pairs = [_aligned(pred[pred["seed"] == s], method, ref) for s in seeds]
    return [pair for pair in pairs if pair is not None]


def summarise(pred: pd.DataFrame, seeds: list[int]) -> dict[str, dict]:
    methods = [m for m in pred["method"].unique() if not m.startswith("single:")]
    summary: dict[str, dict] = {}
    print(f"\n{'method':<24} {'seed':>4} {'acc':>6}  {'vs manual':<32} {'vs best_single':<32}")
    for method in methods:
        per_ref: dict[str, list] = {ref: [] for ref in REFERENCES}
        accs = []
        for seed in seeds:
            part = pred[pred["seed"] == seed]
            rows = part[part["method"] == method]
            if rows.empty:
                continue
            accs.append(rows["accuracy"].mean())
            cells = []
            for ref in REFERENCES:
                pair = _aligned(part, method, ref) if method != ref else None
                if pair is not None:
                    per_ref[ref].append(pair)
                cells.append(paired_difference([pair]).in_points() if pair is not None else "")
            print(f"{method:<24} {seed:>4} {100 * accs[-1]:6.1f}  {cells[0]:<32} {cells[1]:<32}")
        mean = {ref: paired_difference(groups) for ref, groups in per_ref.items() if groups}
        cells = [mean[ref].in_points() if ref in mean else "" for ref in REFERENCES]
        print(f"{method:<24} {'mean':>4} {100 * sum(accs) / len(accs):6.1f}  "
              f"{cells[0]:<32} {cells[1]:<32}")
        summary[method] = {"accuracy": sum(accs) / len(accs), **mean}
    return summary


def checks(pred: pd.DataFrame, summary: dict, seeds: list[int], label_words) -> None:
    print("\nchecks (mean over seeds; paired 95% CI):")

    def above(method: str, ref: str) -> str:
        d = summary.get(method, {}).get(ref)
        if d is None:
            return "n/a"
        return f"{'PASS' if d.ci_low > 0 else 'FAIL'} ({d.in_points()})"
    print(f"  qpo > best_single, CI > 0:    {above('qpo', 'best_single')}")
    print(f"  qpo > manual, CI > 0:         {above('qpo', 'manual')}")
    for ref in REFERENCES:
        per_seed = [a.mean() - b.mean() for a, b in per_seed_pairs(pred, seeds, "qpo", ref)]
        if per_seed:
            print(f"  qpo - {ref}, seeds as the unit (t-interval): "
                  f"{across_seeds(per_seed).in_points()}")
    for other in ("router", "label_router", "label_router_collection", "qpo_loop1",
                  "qpo_greedy"):
        groups = per_seed_pairs(pred, seeds, "qpo", other)
        if groups:
            d = paired_difference(groups)
            verdict = "PASS" if d.diff >= 0 else "FAIL"
            print(f"  qpo >= {other:<24} {verdict} ({d.in_points()})")
    print("\nwell-formed prompts (>= 3 words, printable, every label named), per seed:")
    for method in sorted(m for m in pred["method"].unique() if m.startswith("qpo")):
        shares = [pred[(pred["seed"] == s) & (pred["method"] == method)]["prompt"]
                  .map(lambda p: well_formed(p, label_words)).mean() for s in seeds]
        distinct = [pred[(pred["seed"] == s) & (pred["method"] == method)]["prompt"].nunique()
                    for s in seeds]
        print(f"  {method:<12} " + ", ".join(f"{100 * v:.0f}% ({n} distinct)"
                                             for v, n in zip(shares, distinct)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "effectiveness")
    p.add_argument("--profile", type=Path, default=PROFILE)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="section.key=value passed to every seed's run (e.g. "
                        "dataset.query_reward=predicted); use another --workdir per variant")
    p.add_argument("--report-only", action="store_true", help="summarise finished seeds only")
    args = p.parse_args()
    if any(o.replace(" ", "").startswith("test.split=") for o in args.overrides):
        p.error("--set test.split: this benchmark measures on the test split; compare on the "
                "dev split with `qpo evaluate --run-dir <seed dir> --set test.split=dev "
                "--set test.decoding=greedy` (docs/experiments.md: "The router on the dev split")")
    if not args.report_only:
        for seed in args.seeds:
            run_seed(seed, args.workdir, args.profile, args.overrides)
    every = load_predictions(args.workdir, args.seeds)
    pred = every[(every["split"] == "test") & (every["shots"] == 0)]
    print(f"test queries per seed: {pred.groupby('seed')['query_id'].nunique().to_dict()}")
    summary = summarise(pred, args.seeds)
    checks(pred, summary, args.seeds, label_words(args.workdir / f"seed{args.seeds[0]}"))
    print_dev_choice(every[every["split"] == "dev"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
