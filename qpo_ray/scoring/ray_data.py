"""Sharded pair scoring on Ray Data over a pool of engine actors: pairs -> equal blocks
-> map_batches tasks, each handing its block to the engine actor it was dealt to ->
scored rows, back in input order.

The engines are Ray actors the scorer owns, not Ray Data's own per-execution pool, so
they start once per scorer: every call a stage makes (the test phase scores its dev
pairs, then its test pairs; a wide Step 0 scores twice) reuses them, and the run loop
releases them when the stage ends, since training comes next and needs the CPUs/GPUs.
A vLLM-CPU engine takes 11-23 s to start here, and each call used to pay it again.

Ray Data 2.60 launches none of its tasks, not even 0-CPU ones, while actors outside it
hold every CPU of the cluster (ray-project/ray#44687: the pipeline hangs). Its tasks
here only hand a block to an engine and wait, so where the engines would reserve every
CPU, each reserves a share that leaves one CPU free and still runs the threads it was
configured with (`engine_cpus`).

Fault tolerance: the engine actors are created with max_restarts=-1, and a call on one
that died is retried on its restarted self (max_task_retries, from
`evaluation.max_task_retries`). The output is checked to hold every input pair exactly
once.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from qpo_ray.common import faults
from qpo_ray.backends import create_backend, validate_backend_config
from qpo_ray.backends.base import Usage
from qpo_ray.config import Config, EvaluationConfig, TargetConfig
from qpo_ray.data.schema import SCORE_COLUMNS
from qpo_ray.common.local_ray import init_ray
from qpo_ray.scoring.local import LocalScorer, PairScorer, score_batch
from qpo_ray.tasks.base import Example, Task

# Test hook for fault tolerance: "<flag file>:<pair_id>" makes the actor that receives
# the batch holding <pair_id> die (os._exit) once; the flag file records that it did.
FAULT_ENV = "QPO_RAY_EVAL_CRASH_ONCE"

# Per-batch usage travels back as columns (set on a batch's first row, 0 elsewhere), so
# a retried batch is counted once: only the output that survives is summed. An actor's
# engine start rides on the first batch it returns.
_USAGE_COLUMNS = {"_usage_calls": "calls", "_usage_engine_seconds": "engine_seconds",
                  "_usage_cached_prompt_tokens": "cached_prompt_tokens"}
_START_COLUMN = "_usage_engine_start_seconds"
_ROW = "_row"
_ENGINE = "_engine"  # which engine actor a block is dealt to


class _ScoringActor:
    """One engine per Ray actor; `score` is called on each block of pairs dealt to it."""

    def __init__(self, target_config, max_new_tokens: int, crash_once: str | None,
                 kill_driver: int | None = None, cpu_threads: int = 1) -> None:
        from qpo_ray.common import device as devices

        started = time.perf_counter()
        if not devices.has_cuda():
            # the configured CPUs per actor, not what Ray derives from the (possibly
            # smaller) reservation: see engine_cpus
            devices.configure_cpu_threads(cpu_threads)
        # The task and demo pool come with the first batch (`score`), not as constructor
        # arguments: Ray 2.60 logs an error for a restartable actor whose constructor
        # holds object-store refs (ray-project/ray#53727), and a restarted actor would
        # need those refs alive; fetched on first use, a restart simply fetches again.
        self.task, self.demo_lookup = None, {}
        self.max_new_tokens = max_new_tokens
        self.crash_once = crash_once
        self.kill_driver = kill_driver  # qpo_ray.common.faults: the resume test's "<stage>:score"
        self.backend = create_backend(target_config)
        self.start_seconds = time.perf_counter() - started

    def _maybe_crash(self, batch: pd.DataFrame) -> None:
        if not self.crash_once:
            return
        flag, pair_id = self.crash_once.rsplit(":", 1)
        if pair_id in set(batch["pair_id"]) and not os.path.exists(flag):
            with open(flag, "w") as fh:
                fh.write(str(os.getpid()))
            os._exit(1)

    def score(self, batch: pd.DataFrame, shared: dict[str, Any]) -> pd.DataFrame:
        """Scores `batch`; `shared` holds the refs of the task and demo pool (refs in a
        dict are not resolved by Ray: fetched here once per actor)."""
        import ray

        if self.task is None:
            started = time.perf_counter()
            self.task = ray.get(shared["task"])
            self.demo_lookup = ray.get(shared["demos"])
            self.start_seconds += time.perf_counter() - started
        self._maybe_crash(batch)
        before = Usage().add(self.backend.usage)
        scored = score_batch(self.task, self.backend, batch, self.demo_lookup,
                             self.max_new_tokens)
        after = self.backend.usage
        firsts = {column: float(getattr(after, field) - getattr(before, field))
                  for column, field in _USAGE_COLUMNS.items()}
        firsts[_START_COLUMN] = self.start_seconds
        if len(scored):
            self.start_seconds = 0.0
        for column, value in firsts.items():
            scored[column] = ([value] + [0.0] * (len(scored) - 1)) if len(scored) else []
        faults.kill(self.kill_driver)  # scored, never received
        return scored


def _forward(batch: pd.DataFrame, engines: list, shared: dict[str, Any]) -> pd.DataFrame:
    """A Ray Data task: its block to the engine actor the block was dealt to, and back.
    It holds no CPU; the engine does the work."""
    import ray

    engine = engines[int(batch[_ENGINE].iloc[0])]
    return ray.get(engine.score.remote(batch.drop(columns=[_ENGINE]), shared))


def engine_cpus(per_engine: float, num_engines: int, cluster_cpus: float) -> float:
    """The CPUs each engine actor reserves: `per_engine` (evaluation.num_cpus_per_actor),
    or, where the engines would then hold every CPU of the cluster, an equal share of
    all but one. Ray Data schedules nothing while outside actors hold every CPU
    (ray-project/ray#44687), and its tasks here only wait on the engines, so the CPU
    left free costs no compute: on 2 cores two 1-CPU engines reserve 0.5 each and run one
    thread each, as before."""
    if per_engine * num_engines <= cluster_cpus - 1:
        return per_engine
    return max(0.0, cluster_cpus - 1) / max(1, num_engines)


def batch_pairs(num_pairs: int, max_pairs: int, num_actors: int) -> int:
    """Pairs per batch: at most `max_pairs`, in a number of batches that is a multiple
    of the pool's size, all equal but the last (short by less than a pair per batch), so
    every engine gets the same share of a call. With batches of exactly `max_pairs`, 96
    pairs went to one actor of two, and 319 to three batches on two actors (one scored
    two while the other waited)."""
    if num_pairs <= 0:
        return max(1, max_pairs)
    per_round = max(1, num_actors)
    batches = -(-num_pairs // max_pairs)
    batches = min(num_pairs, -(-batches // per_round) * per_round)
    return -(-num_pairs // batches)


def default_num_actors(ev: EvaluationConfig) -> int:
    """evaluation.num_actors, or as many as the cluster's GPUs hold (1 on CPU-only)."""
    import ray

    if ev.num_actors > 0:
        return ev.num_actors
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if ev.engines_on_gpu and gpus > 0:
        return max(1, int(gpus // ev.num_gpus_per_actor))
    return 1


# What an engine holds besides its weights: the Python/torch runtime, tokenizer, buffers.
_RUNTIME_BYTES = int(1.5 * 2**30)


def actor_memory_bytes(target: TargetConfig, ev: EvaluationConfig, num_actors: int) -> int:
    """The memory each scoring actor asks Ray for: `evaluation.memory_per_actor_gib`, or
    its engine's weights (the checkpoint's safetensors) + vLLM's CPU KV cache + the
    runtime; never more than the cluster's memory per actor (else no actor would ever
    be scheduled). Without it Ray Data schedules actors by CPU alone and warns that
    they use more memory than requested."""
    import ray

    from qpo_ray.common.models import resolve_model

    if ev.memory_per_actor_gib > 0:
        wanted = int(ev.memory_per_actor_gib * 2**30)
    else:
        wanted = _RUNTIME_BYTES
        path = Path(resolve_model(target.model)) if target.backend != "openai" else None
        if path is not None and path.is_dir():
            wanted += sum(f.stat().st_size for f in path.glob("*.safetensors"))
        if target.backend == "vllm" and not ev.engines_on_gpu:
            wanted += target.cpu_kvcache_space_gib * 2**30
    available = ray.cluster_resources().get("memory", 0.0)
    return int(min(wanted, available / max(1, num_actors))) if available else wanted


class RayDataScorer(PairScorer):
    """Scores pairs on a pool of engine actors, each running the `target` backend with
    the `evaluation` section's resources; joins Ray at `ray_address` (None: local)."""

    def __init__(self, target: TargetConfig, evaluation: EvaluationConfig, task: Task,
                 demo_pool: Sequence[Example], label: str = "scoring",
                 ray_address: Optional[str] = None) -> None:
        import ray

        from qpo_ray.common.local_ray import connect_ray

        validate_backend_config(target)
        connect_ray(ray_address)
        self.target, self.evaluation = target, evaluation
        self.label = label
        self.num_actors = default_num_actors(evaluation)
        self.last_slowest_start_seconds = 0.0
        self._shared = {"task": ray.put(task), "demos": ray.put({d.id: d for d in demo_pool})}
        self.usage = Usage()
        self._engines: list = []  # started on the first call that needs them, then kept

    def score(self, pairs_df: pd.DataFrame) -> pd.DataFrame:
        import ray.data

        if pairs_df.empty:
            return score_batch(ray.get(self._shared["task"]), None, pairs_df, {}, 0)
        if pairs_df["pair_id"].duplicated().any():
            dup = pairs_df.loc[pairs_df["pair_id"].duplicated(), "pair_id"].iloc[0]
            raise ValueError(f"pairs: pair_id {dup!r} occurs more than once")
        ev = self.evaluation
        frame = pairs_df.reset_index(drop=True).assign(**{_ROW: range(len(pairs_df))})
        # Pairs of one prompt in the same batches: the engines compute the prompt (and
        # the chat template before it) once per batch, not once per pair.
        frame = frame.sort_values("prompt", kind="stable")
        size = batch_pairs(len(frame), ev.batch_size_pairs, self.num_actors)
        with warnings.catch_warnings():
            # Ray 2.60 deprecates **ray_remote_args but has no named parameter for a
            # task's retry limit yet; without it a block whose engine keeps dying would
            # be retried forever (Ray Data's default is -1).
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            # one block per batch, dealt to the engines in turn: equal blocks, a multiple
            # of the engines, so each engine gets the same share of the call
            blocks = [frame.iloc[i:i + size] for i in range(0, len(frame), size)]
            reused = min(len(self._engines), len(blocks))
            self._start_engines(min(self.num_actors, len(blocks)))
            blocks = [b.assign(**{_ENGINE: k % len(self._engines)}) for k, b in enumerate(blocks)]
            ds = self._pipeline(ray.data.from_pandas(blocks), len(blocks), size)
        out = self._collect(ds, len(frame), reused).sort_values(_ROW)
        rows = out[_ROW].to_numpy()
        if len(rows) != len(frame) or not (rows == np.arange(len(frame))).all():
            raise RuntimeError(f"evaluation returned {len(out)} rows for {len(frame)} pairs "
                               "(lost or duplicated batches)")
        batch_usage = Usage(calls=int(out["_usage_calls"].sum()),
                            prompt_tokens=int(out["prompt_tokens"].sum()),
                            completion_tokens=int(out["completion_tokens"].sum()),
                            engine_seconds=float(out["_usage_engine_seconds"].sum()),
                            engine_start_seconds=float(out[_START_COLUMN].sum()),
                            cached_prompt_tokens=int(out["_usage_cached_prompt_tokens"].sum()))
        self.usage = self.usage.add(batch_usage)
        # The actors start side by side: the slowest start is what the run waited for.
        self.last_slowest_start_seconds = float(out[_START_COLUMN].max())
        # The pair columns come back from Arrow as numpy arrays: keep the caller's own
        # and take only the score columns from the pipeline.
        scored = pairs_df.drop(columns=list(SCORE_COLUMNS), errors="ignore").copy()
        for column in SCORE_COLUMNS:
            scored[column] = out[column].to_numpy()
        scored["demo_correct"] = [[bool(v) for v in cell] for cell in scored["demo_correct"]]
        scored["label_logprobs"] = [[float(v) for v in cell] for cell in scored["label_logprobs"]]
        return scored

    def _collect(self, ds, total: int, reused: int) -> pd.DataFrame:
        """The pipeline's output, block by block as engines finish them (progress;
        `reused`: engines an earlier call started)."""
        from qpo_ray.common.progress import Progress

        progress = Progress(self.label, total, "pairs")
        parts, done, starts = [], 0, []
        for part in ds.iter_batches(batch_size=None, batch_format="pandas"):
            parts.append(part)
            done += len(part)
            # Each engine reports its start once, on its first batch: the run log says
            # which pass paid for it and which reused engines a pass before started.
            starts += [s for s in part[_START_COLUMN] if s > 0]
            notes = [f"{len(starts)} started in <= {max(starts):.0f} s"] if starts else []
            notes += [f"{reused} reused"] if reused else []
            progress.update(done, **({"engines": ", ".join(notes)} if notes else {}))
        progress.close()
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def _start_engines(self, wanted: int) -> None:
        """Up to `wanted` engine actors (never fewer than already running). A call with
        fewer blocks than `evaluation.num_actors` starts no engine it would leave idle."""
        import ray

        if len(self._engines) >= wanted:  # a later call of the stage: nothing to start
            return
        ev = self.evaluation
        engine = ray.remote(_ScoringActor).options(
            num_cpus=engine_cpus(ev.num_cpus_per_actor, self.num_actors,
                                 ray.cluster_resources().get("CPU", 0.0)),
            num_gpus=ev.num_gpus_per_actor or None,
            memory=actor_memory_bytes(self.target, ev, self.num_actors),
            resources=dict(ev.resources) or None,
            max_restarts=-1, max_task_retries=ev.max_task_retries)
        while len(self._engines) < wanted:
            self._engines.append(engine.remote(
                target_config=self.target, max_new_tokens=self.target.max_new_tokens,
                crash_once=os.environ.get(FAULT_ENV), kill_driver=faults.armed_pid("score"),
                cpu_threads=max(1, int(ev.num_cpus_per_actor))))

    def _pipeline(self, ds, n_batches: int, batch_size: int):
        # One block in flight per engine: the blocks are equal and dealt in turn, so the
        # next block in line is usually the just-freed engine's. (A second block queued
        # behind a busy engine while a free one idled: under Ray Data's own actor pool,
        # with 2 in flight per actor, the test-shaped job of benchmarks/eval_throughput.py
        # took 66.8 s, with 1 57.9 s.) Every task at once cost more: each is a Ray worker
        # process to start on the engines' cores (the float32 vLLM Step-0 job at 35 x 64
        # took 190 s that way, 159-177 s otherwise).
        import ray.data

        return ds.map_batches(_forward,
                              fn_kwargs={"engines": self._engines, "shared": self._shared},
                              batch_size=batch_size, batch_format="pandas", num_cpus=0,
                              compute=ray.data.TaskPoolStrategy(
                                  size=min(n_batches, len(self._engines))),
                              max_retries=self.evaluation.max_task_retries)

    def close(self) -> None:
        """Stop the engines (the run loop does at the end of each stage)."""
        import ray

        for engine in self._engines:
            ray.kill(engine)
        self._engines = []


def score_pairs(cfg: Config, task: Task, splits, pairs: pd.DataFrame,
                label: str = "scoring") -> tuple[pd.DataFrame, dict]:
    """One scoring call on engines started for it and stopped after it (scripts that
    score once); returns (scored, usage). A run's stages share engines through their
    RunContext instead."""
    init_ray(cfg.ray_address)
    scorer = make_scorer(cfg.target, cfg.evaluation, task, splits.demo_pool, label=label,
                         ray_address=cfg.ray_address)
    try:
        scored = scorer.score(pairs)
        return scored, scorer.usage.as_dict()
    finally:
        scorer.close()


def make_scorer(target: TargetConfig, evaluation: EvaluationConfig, task: Task,
                demo_pool: Sequence[Example], distributed: bool = True,
                label: str = "scoring", ray_address: Optional[str] = None) -> PairScorer:
    """Ray Data over an actor pool (its progress line named `label`), or one engine in
    this process."""
    if distributed:
        return RayDataScorer(target, evaluation, task, demo_pool, label=label,
                             ray_address=ray_address)
    validate_backend_config(target)
    return LocalScorer(task, create_backend(target), demo_pool,
                       max_new_tokens=target.max_new_tokens)
