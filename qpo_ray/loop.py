"""Multi-loop QPO (paper Algorithm 1): the only module that knows the order of stages.

    step0      score the prompt collection on collection-set queries -> rewards (+ scale)
    filter     expert filter -> D_0, the training set of loop 1
    train_1    pi_1 = ORL(pi_0, D_0)
    augment_t  Q_t sampled with repeats, P_t = pi_t(q) at reward 100 (sampling), scored;
               R_task of the round = mean accuracy of its prompts; rewards on the STORED
               Step-0 scale; D_t = D_{t-1} + filter(D_A)               (t = 1 .. T-1)
    train_t+1  pi_{t+1} = ORL(pi_t, D_t), continuing from pi_t's checkpoint
    test       policy (greedy, reward 100) vs baselines -> report

The expert filter applies to augmented rows too, with the same cut as Step 0 (reward
>= expert_fraction * 100 on the stored 0-100 scale): the paper reports +17.1% data
from 3 x 1,000 generated pairs, i.e. most augmented pairs were filtered out, not all
kept. Every stage writes into the run directory and is marked done afterwards (see
qpo_ray.rundir); `run_qpo(None, resume_dir=...)` continues at the first unfinished
stage. Random choices are seeded from ``cfg.seed`` + the stage's index, never from
process state, so a resumed run builds the same dataset as an uninterrupted one.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from qpo_ray.config import Config
from qpo_ray.data.rewards import pair_accuracy
from qpo_ray.evaluation import init_ray, score_pairs
from qpo_ray.rundir import RunDir, sidecar, stage_names, write_json_atomic
from qpo_ray.tasks import task_and_splits


# -- shared helpers -------------------------------------------------------------------

def expert_cut(cfg: Config) -> float:
    """The expert filter's threshold on the stored 0-100 scale."""
    return 100.0 * cfg.dataset.expert_fraction


# -- Step 0 ---------------------------------------------------------------------------

def build_initial_dataset(cfg: Config, out_path: Optional[str | Path] = None) -> Path:
    """Step 0: every (query, prompt) pair of the collection, scored and rewarded, written
    as Parquet with its reward scale; or an existing dataset imported as is."""
    from qpo_ray.data.io import read_dataset, write_dataset

    out = Path(out_path) if out_path else Path(cfg.workdir) / "dataset_loop0.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    usage: dict[str, Any] = {}
    if cfg.dataset.import_path:
        source = Path(cfg.dataset.import_path)
        if not source.exists():
            raise FileNotFoundError(f"dataset.import_path: {source} does not exist")
        if source.suffix == ".json":
            from qpo_ray.data.importer import import_paper_json

            frame, scale = import_paper_json(str(source))
        else:
            frame, scale = read_dataset(source)
            if scale is None:
                raise ValueError(f"dataset.import_path: {source} has no reward scale in its "
                                 "Parquet metadata (write it with qpo_ray.data.io.write_dataset)")
        write_dataset(frame, out, scale)
    else:
        from qpo_ray.data.pairs import build_step0_pairs
        from qpo_ray.data.rewards import compute_rewards
        from qpo_ray.prompts import load_collection

        task, splits = task_and_splits(cfg)
        prompts = load_collection(cfg.prompts, task.name)
        pairs = build_step0_pairs(task, splits, prompts, cfg)
        scored, usage = score_pairs(cfg, task, splits, pairs)
        frame, scale = compute_rewards(scored, cfg.dataset.zero_shot_penalty,
                                       few_shot=cfg.task.num_shots > 0,
                                       answer=cfg.dataset.query_reward)
        write_dataset(frame, out, scale)
    write_json_atomic(sidecar(out, ".usage.json"), usage)
    return out


def filter_initial(cfg: Config, step0_path: Path, out_path: Path) -> dict[str, Any]:
    """D_0 = the expert part of Step 0."""
    from qpo_ray.data.io import read_dataset, write_dataset
    from qpo_ray.data.rewards import expert_filter

    frame, scale = read_dataset(step0_path)
    kept = expert_filter(frame, cfg.dataset.expert_fraction)
    write_dataset(kept.reset_index(drop=True), out_path, scale)
    return {"dataset": str(out_path), "rows_in": len(frame), "rows_kept": len(kept),
            "accept_rate": len(kept) / max(1, len(frame))}


# -- one augmentation round ----------------------------------------------------------

def augment_round(cfg: Config, policy_dir: str | Path, dataset_path: str | Path,
                  round_index: int, out_path: str | Path,
                  seed: Optional[int] = None) -> Path:
    """Round `round_index` of Algorithm 1 with the policy in `policy_dir`: sample queries,
    generate prompts at the target reward, score them, reward them on the dataset's
    stored scale and write D_{t-1} + filter(D_A) to `out_path`.

    Besides `out_path` it writes `<out>.rows.parquet` (every scored row of the round,
    before the filter) and `<out>.round.json` (R_task, target cost, accept rate).
    """
    from qpo_ray.data.io import read_dataset, write_dataset
    from qpo_ray.data.pairs import make_pairs
    from qpo_ray.data.rewards import compute_rewards
    from qpo_ray.policy import QPOPolicy, generate_prompts
    from qpo_ray.prompts import prompt_id

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous, scale = read_dataset(dataset_path)
    if scale is None:
        raise ValueError(f"{dataset_path}: no reward scale in its metadata; augmented rewards "
                         "must use the Step-0 scale")
    seed = cfg.seed + round_index if seed is None else seed
    task, splits = task_and_splits(cfg)
    queries = random.Random(seed).choices(splits.collection, k=cfg.loop.augment_queries_per_round)

    policy = QPOPolicy.load(str(policy_dir))
    texts = generate_prompts(policy, [q.text for q in queries],
                             target_reward=cfg.loop.target_reward, do_sample=True,
                             top_k=cfg.loop.top_k, top_p=cfg.loop.top_p, seed=seed)
    del policy
    prompts = [(prompt_id(t), t, "policy") for t in texts]
    pairs = make_pairs(queries, prompts, task, splits, cfg, loop=round_index, seed=seed)
    scored, usage = score_pairs(cfg, task, splits, pairs)

    r_task = float(pair_accuracy(scored).mean())
    rows, _ = compute_rewards(scored, cfg.dataset.zero_shot_penalty,
                              few_shot=cfg.task.num_shots > 0, scale=scale, r_task=r_task,
                              answer=cfg.dataset.query_reward)
    kept = rows[rows["reward"] >= expert_cut(cfg)]
    merged = pd.concat([previous, kept], ignore_index=True)
    write_dataset(rows, sidecar(out, ".rows.parquet"), scale)
    write_dataset(merged, out, scale)
    write_json_atomic(sidecar(out, ".round.json"), {
        "round": round_index, "seed": seed, "r_task": r_task, "usage": usage,
        "rows_generated": len(rows), "rows_added": len(kept),
        "accept_rate": len(kept) / max(1, len(rows)),
        "distinct_generated_prompts": int(rows["prompt"].nunique()),
    })
    return out


# -- the test phase ------------------------------------------------------------------

def evaluate(cfg: Config, run_dir: Optional[str] = None,
             policy_dir: Optional[str] = None) -> str:
    """The test phase (qpo_ray.report) with this run's task, splits and target."""
    from qpo_ray.report import evaluate_run

    task, splits = task_and_splits(cfg)
    init_ray(cfg)  # the ablations train on Ray before anything is scored
    return evaluate_run(cfg, task, splits, lambda pairs: score_pairs(cfg, task, splits, pairs),
                        run_dir=run_dir, policy_dir=policy_dir)


# -- the whole run ---------------------------------------------------------------------

def _train(cfg: Config, run: RunDir, loop: int) -> dict[str, Any]:
    from qpo_ray.training import train_policy

    init_ray(cfg)
    init = str(run.policy_dir(loop - 1)) if loop > 1 else None
    result = train_policy(cfg, dataset_path=str(run.dataset_path(loop)),
                          out_dir=str(run.train_dir(loop)), loop_index=loop,
                          init_checkpoint=init)
    write_json_atomic(run.train_dir(loop) / "metrics.json", result.metrics)
    if result.metrics:
        # How well the policy reproduces its expert prompts (per-token NLL), per epoch.
        curve = " -> ".join(f"{m['prompt_loss']:.2f}" for m in result.metrics)
        print(f"[qpo] train_{loop}: prompt NLL per epoch {curve}; "
              f"{result.metrics[-1].get('samples_per_s', 0):.1f} samples/s", flush=True)
    return {"checkpoint_dir": str(result.checkpoint_dir),
            "metrics": str(run.train_dir(loop) / "metrics.json")}


def _run_stage(cfg: Config, run: RunDir, name: str, index: int) -> dict[str, Any]:
    """Run one stage; its return value is recorded in stages.json."""
    if name == "step0":
        path = build_initial_dataset(cfg, run.step0_path())
        return {"dataset": str(path), "usage": str(sidecar(path, ".usage.json"))}
    if name == "filter":
        return filter_initial(cfg, run.step0_path(), run.dataset_path(1))
    if name.startswith("train_"):
        return _train(cfg, run, int(name.split("_")[1]))
    if name.startswith("augment_"):
        t = int(name.split("_")[1])
        path = augment_round(cfg, run.policy_dir(t), run.dataset_path(t), t,
                             run.dataset_path(t + 1), seed=cfg.seed + index)
        return {"dataset": str(path), "round": str(sidecar(path, ".round.json"))}
    if name == "test":
        evaluate(cfg, run_dir=str(run.path))
        return {"report": str(run.report_dir() / "report.md")}
    raise ValueError(f"unknown stage {name!r}")


def check_before_work(cfg: Config) -> None:
    """What the test stage needs, checked before Step 0 spends anything: the methods
    exist, the collection loads and has its manual prompt, the task's splits hold a dev
    set of the asked size."""
    from qpo_ray.methods import check_methods
    from qpo_ray.prompts import load_collection, manual_prompt

    check_methods(cfg.test.methods)
    task, _ = task_and_splits(cfg)
    collection = load_collection(cfg.prompts, task.name)
    if "manual" in cfg.test.methods:
        manual_prompt(collection, cfg.prompts)


def run_qpo(cfg: Optional[Config], resume_dir: Optional[str] = None) -> Path:
    """Run (or continue) QPO end to end; returns the run directory."""
    from qpo_ray.loop_tracking import log_stage
    from qpo_ray.tracking import Tracker

    if resume_dir is not None:
        run, cfg = RunDir.load(resume_dir)
        print(f"resuming {run.path}: done {list(run.stages())}")
    elif cfg is None:
        raise ValueError("run_qpo needs a config or a resume_dir")
    else:
        check_before_work(cfg)
        run = RunDir.create(cfg)
        cfg.workdir = str(run.path)
    tracker = Tracker(cfg, run.path)
    tracker.parent_run_id()
    logged = tracker.logged_stages()
    try:
        for index, name in enumerate(stage_names(cfg)):
            if not run.is_done(name):
                print(f"[qpo] stage {name} ...", flush=True)
                start = time.perf_counter()
                outputs = _run_stage(cfg, run, name, index)
                outputs["wall_s"] = round(time.perf_counter() - start, 1)
                run.mark_done(name, outputs)
                print(f"[qpo] stage {name} done in {outputs['wall_s']:.0f} s", flush=True)
            if name not in logged:
                log_stage(tracker, cfg, run, name)
                logged.add(name)
                tracker.mark_logged(name)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    report = (run.report_dir() / "report.md").read_text()
    print(report)
    print(f"run directory: {run.path}\nMLflow: {tracker.uri} (experiment "
          f"{cfg.tracking.experiment!r}, parent run {tracker.state['parent_run_id']})\n"
          f"report: {run.report_dir() / 'report.md'}, {run.report_dir() / 'results.csv'}")
    return run.path

