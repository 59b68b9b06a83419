"""One ORL training stage of the policy, on Ray Train (paper Table 9 schedule).

`train_policy` reads and checks the Parquet dataset on the driver, ships its
(query, prompt, reward) rows to the workers through the object store, and runs a
`TorchTrainer`: every worker tokenises the rows, takes its shard through a seeded
`DistributedSampler`, and trains with AdamW + gradient clipping + StepLR. The strategy
comes from `cfg.training`:

- ``ddp``: `ray.train.torch.prepare_model` (DistributedDataParallel when there is more
  than one worker) over gloo on CPUs or NCCL on GPUs; optional autocast (bf16 on CPUs
  that multiply it in hardware, bf16/fp16 on GPUs, fp16 with a gradient scaler). Rank 0
  reports the policy directory as the checkpoint.
- ``deepspeed``: ZeRO at `zero_stage` (see `training_deepspeed`); every rank reports
  its own shard directory so no optimizer partition is lost, and the driver merges the
  fp32 partitions back into the normal policy directory, so loading a policy never
  needs DeepSpeed.

How the shipped profiles run:

- ``cpu-demo``: 1 CPU worker, DDP (no wrapping with one worker), bf16 autocast where
  the CPU multiplies bf16 in hardware (float32 elsewhere), a 6-layer SmolLM2 backbone,
  `max_steps_per_loop` capping each stage.
- ``v100``: GPT-2 on 1 GPU worker, DDP over NCCL, fp16 autocast with a gradient scaler
  and fp32 master weights (V100s have no bf16), 100 epochs at lr 1e-3 then 20 at 1e-4.
- ``cluster``: 4 GPU workers, DeepSpeed ZeRO-2 over NCCL in bf16, global batch 128
  (32 per worker); `workdir` must be on storage every node sees (the init checkpoint and
  Ray Train's `storage_path` live there).

With a query summary (`policy.query_summary.layers`), `train_policy(part="summary")`
then trains only its adapter (the backbone frozen; DDP whatever the strategy, for a few
thousand weights ZeRO buys nothing) on each query's best-reward rows; in the main part
the adapter stays as it is (qpo_ray.policy.summary says why). With
`training.summary.queries: unseen` the two parts train on different queries: the
summary part on wide Step 0's, the main part on all others.

Outputs under `out_dir`: ``policy/`` (the checkpoint `QPOPolicy.load` reads),
``metrics.json`` (per-epoch metrics) and ``ray_train/`` (Ray Train's run storage).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from qpo_ray.common import faults
from qpo_ray.common.atomic import atomic_dir, write_text_atomic
from qpo_ray.config import Config, ConfigError, TrainingConfig, config_from_dict
from qpo_ray.common.device import autocast_dtype, configure_cpu_threads, get_device, move
from qpo_ray.training.engine import EngineBase
from qpo_ray.policy import QPOPolicy, as_batch, encode_rows, training_rows
from qpo_ray.policy.batching import best_rows
from qpo_ray.training.summary_part import (BestEpoch, check_summary_policy, prepare_summary,
                                           split_holdout)
from qpo_ray.common.progress import training_step_reporter

METRIC_KEYS = ("loss", "prompt_loss", "reward_loss", "reward_mae")
METRICS_FILE = "metrics.json"
POLICY_SUBDIR = "policy"


@dataclass
class TrainResult:
    # A directory `QPOPolicy.load` reads.
    checkpoint_dir: str
    # Per epoch: epoch, lr, loss, prompt_loss, reward_loss, reward_mae, samples_per_s, steps.
    metrics: list[dict[str, float]] = field(default_factory=list)
    # Ray Train's reported checkpoint (DeepSpeed: every rank's shard, merged).
    ray_checkpoint: str | None = None


def schedule_for_loop(tcfg: TrainingConfig, loop_index: int) -> tuple[float, int]:
    """(learning rate, epochs): Table 9's first-loop values for loop 1, later ones after."""
    if loop_index < 1:
        raise ValueError(f"loop_index must be >= 1 (1 = first training loop), got {loop_index}")
    if loop_index == 1:
        lr, epochs = tcfg.lr_first_loop, tcfg.epochs_first_loop
    else:
        lr, epochs = tcfg.lr_later_loops, tcfg.epochs_later_loops
    return lr, epochs


def check_training_config(cfg: Config) -> None:
    """The training section's checks (ConfigError), for a config built without
    `load_config` (which runs them already)."""
    cfg.training.validate()


# ----- the per-step engine (shared by Ray workers and the bare benchmark loop) ------------
class TorchEngine(EngineBase):
    """AdamW + clipping + StepLR around a policy, optionally wrapped (DDP) by `wrap`."""

    def __init__(self, policy: QPOPolicy, tcfg: TrainingConfig, lr: float,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        self.model = wrap(policy) if wrap else policy
        super().__init__(policy, tcfg, lr)
        self.clip = tcfg.grad_clip_norm
        self.amp_dtype = autocast_dtype(tcfg.mixed_precision, self.device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range.
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if self.amp_dtype == torch.float16 else None)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(out["loss"]).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.clip)
            self.optimizer.step()
        return out

    def save(self, rank_dir: Path, rank: int) -> bool:
        """Write this rank's part of a checkpoint; True when it wrote anything."""
        if rank != 0:
            return False
        self.policy.save(rank_dir / POLICY_SUBDIR)
        return True


def run_epoch(engine, loader: DataLoader, max_steps: int | None,
              after_step: Callable[[int, int, torch.Tensor], None] | None = None
              ) -> dict[str, float]:
    """Train one pass over `loader` (at most `max_steps` steps); this rank's sums.
    `after_step(steps, samples, loss)` is called after every step (progress, faults)."""
    engine.policy.train()
    sums = torch.zeros(len(METRIC_KEYS), device=engine.device)
    steps = samples = 0
    start = time.perf_counter()
    for tensors in loader:
        if max_steps is not None and steps >= max_steps:
            break
        out = engine.step(move(as_batch(tensors), engine.device))
        sums += torch.stack([out[k].detach().float() for k in METRIC_KEYS])
        steps += 1
        samples += len(tensors[0])
        if after_step is not None:
            after_step(steps, samples, out["loss"])
    seconds = time.perf_counter() - start
    return {**dict(zip(METRIC_KEYS, sums.tolist())), "steps": steps, "samples": samples,
            "seconds": seconds}


def _reduce_epoch(local: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean losses over all ranks' steps, global samples/s (slowest rank's time)."""
    sums = torch.tensor([local[k] for k in METRIC_KEYS] + [local["steps"], local["samples"]],
                        dtype=torch.float64, device=device)
    seconds = torch.tensor([local["seconds"]], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    values = sums.tolist()
    steps, samples = values[-2], values[-1]
    metrics = {k: v / max(steps, 1.0) for k, v in zip(METRIC_KEYS, values)}
    metrics["samples_per_s"] = samples / max(seconds.item(), 1e-9)
    metrics["steps"] = int(local["steps"])
    return metrics


def build_loader(policy: QPOPolicy, rows: dict[str, list], batch_size: int, rank: int,
                 world_size: int, seed: int) -> tuple[DataLoader, DistributedSampler]:
    pcfg = policy.config
    encoded = encode_rows(policy.tokenizer, rows["query"], rows["prompt"], rows["reward"],
                          pcfg.max_query_tokens, pcfg.max_prompt_tokens)
    dataset = TensorDataset(*encoded.tensors())
    # Seeded shuffling, the same on every rank, each rank taking its own shard.
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler), sampler


def initial_policy(cfg: Config, init_checkpoint: str | None, device: torch.device) -> QPOPolicy:
    # Same seed on every rank: the new heads start identical (DDP/DeepSpeed also broadcast).
    torch.manual_seed(cfg.seed)
    if init_checkpoint:
        return QPOPolicy.load(init_checkpoint, device=device)
    return QPOPolicy.from_backbone(cfg.policy, device=device)


# ----- the Ray Train worker --------------------------------------------------------------
def _train_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    tcfg = cfg.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not tcfg.use_gpu:
        configure_cpu_threads(tcfg.num_cpus_per_worker)
    device = get_device(prefer_gpu=tcfg.use_gpu)
    policy = initial_policy(cfg, config["init_checkpoint"], device)
    rows = ray.get(config["rows"])
    stopper = None
    if config["part"] == "summary":
        prepare_summary(policy, rows["query"])
        if rows["holdout"] is not None:
            stopper = BestEpoch(rows["holdout"], autocast_dtype(tcfg.mixed_precision, device))
            stopper.after_epoch(policy, 0)  # the summary as it came in may be the best
    elif policy.query_summary is not None:
        policy.query_summary.adapter.requires_grad_(False)  # trained in its own part only
    per_worker = max(1, tcfg.batch_size_global // world)
    loader, sampler = build_loader(policy, rows, per_worker, rank, world, cfg.seed)

    if tcfg.strategy == "deepspeed":
        from qpo_ray.training.deepspeed_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(policy, tcfg, config["lr"], world)
    else:
        engine = TorchEngine(policy, tcfg, config["lr"], wrap=ray.train.torch.prepare_model)

    # qpo_ray.common.faults: the resume test's "<stage>:train" kills the driver mid-epoch.
    kill_driver = config.get("kill_driver")
    history: list[dict[str, float]] = []
    steps_left = tcfg.max_steps_per_loop
    epochs = config["epochs"]
    report = training_step_reporter(config.get("progress_file") if rank == 0 else None,
                                    epochs * len(loader), steps_left, world)

    def after_step(steps: int, samples: int, loss: torch.Tensor) -> None:
        if report is not None:
            report(steps, samples, loss)
        faults.kill(kill_driver)

    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        lr = engine.optimizer.param_groups[0]["lr"]
        local = run_epoch(engine, loader, steps_left, after_step=after_step)
        engine.end_epoch()
        metrics = {"epoch": epoch + 1, "lr": lr, **_reduce_epoch(local, device)}
        if stopper is not None:  # every rank scores the same queries and keeps the same heads
            metrics["holdout_choice_loss"] = stopper.after_epoch(policy, epoch + 1)
        history.append(metrics)
        if steps_left is not None:
            steps_left -= local["steps"]
        last = epoch == epochs - 1 or (steps_left is not None and steps_left <= 0)
        if not last:
            ray.train.report(metrics)
            continue
        if stopper is not None:
            stopper.restore(policy)
            metrics.update(kept_epoch=stopper.kept_epoch,
                           holdout_choice_loss_start=stopper.losses[0])
        # Every rank writes its part (DeepSpeed: its shard) and reports it; Ray Train
        # merges the parts into one checkpoint directory.
        with tempfile.TemporaryDirectory() as tmp:
            rank_dir = Path(tmp)
            wrote = engine.save(rank_dir, rank)
            if rank == 0:
                (rank_dir / METRICS_FILE).write_text(json.dumps(history, indent=2))
                wrote = True
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if wrote else None
            ray.train.report(metrics, checkpoint=checkpoint)
        break


# ----- the driver ------------------------------------------------------------------------
def read_training_rows(cfg: Config, dataset_path: str, part: str = "policy",
                       candidates: list[str] | None = None) -> dict[str, Any]:
    """The part's rows as lists (query, prompt, reward) and, for a summary part with
    `training.summary.holdout`, its held-out queries (`Holdout`, their belief read over
    mbr's `candidates`; else None)."""
    from qpo_ray.data.io import DatasetFileError, read_dataset
    from qpo_ray.data.pairs import WIDE_GROUP, on_wide_queries

    scfg = cfg.training.summary
    rank_by = scfg.rank_by if part == "summary" else "reward"
    unseen = scfg.queries == "unseen"
    holdout = part == "summary" and scfg.holdout > 0
    frame, _scale = read_dataset(dataset_path, required=("query", "prompt", "reward", rank_by)
                                 + (("loop", "group") if unseen else ()))
    if unseen:
        # training.summary.queries: each part on its own queries.
        wide = on_wide_queries(frame)
        if not wide.any():
            raise DatasetFileError(f"{dataset_path}: training.summary.queries: 'unseen' needs "
                                   "wide Step-0 rows (loop 0, group "
                                   f"{WIDE_GROUP}); the dataset has none")
        frame = frame[wide if part == "summary" else ~wide]
    rows = training_rows(frame, cfg.policy.mode, source=str(dataset_path), keep=(rank_by,))
    held = None
    if holdout:
        if not candidates:
            raise ConfigError("training.summary.holdout: needs mbr's candidates (the prompts "
                              "Step 0 scored on the same queries); this run has none")
        try:
            held = split_holdout(rows, candidates, scfg.holdout, rank_by,
                                 cfg.loop.target_reward, cfg.seed)
        except ValueError as exc:
            raise DatasetFileError(f"{dataset_path}: {exc}") from exc
        rows = rows[~rows["query"].isin(set(held.queries))]
    if part == "summary":
        rows = best_rows(rows, scfg.top_k, by=rank_by)
        if scfg.reward == "target":
            rows["reward"] = float(cfg.loop.target_reward)
    return {"query": rows["query"].tolist(), "prompt": rows["prompt"].tolist(),
            "reward": rows["reward"].tolist(), "holdout": held}


def train_policy(cfg: Config, dataset_path: str, out_dir: str, loop_index: int,
                 init_checkpoint: str | None = None, part: str = "policy",
                 candidates: list[str] | None = None) -> TrainResult:
    """Train the policy on `dataset_path` (continuing from `init_checkpoint` if given);
    `part="summary"`: only its query summary's adapter (module docstring), stopped early
    on mbr's `candidates` with `training.summary.holdout`."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_training_config(cfg)
    if part not in ("policy", "summary"):
        raise ValueError(f"train_policy: part must be 'policy' or 'summary', got {part!r}")
    lr, epochs = schedule_for_loop(cfg.training, loop_index)
    if part == "summary":
        check_summary_policy(cfg, init_checkpoint)
        lr, epochs = cfg.training.summary.lr, cfg.training.summary.epochs
        cfg = cfg.with_changes({"training": {"strategy": "ddp"}})
    rows = read_training_rows(cfg, dataset_path, part, candidates)
    if init_checkpoint is not None and not (Path(init_checkpoint) / "qpo_policy.json").exists():
        raise FileNotFoundError(f"init_checkpoint {init_checkpoint}: not a policy directory")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from qpo_ray.common.local_ray import connect_ray

    connect_ray(cfg.ray_address)  # loopback only when it starts a single-machine Ray

    tcfg = cfg.training
    run_name = f"train_loop{loop_index}" + ("_summary" if part == "summary" else "")
    storage = out / "ray_train"
    # A stale run of the same name would be picked up as if resuming it.
    shutil.rmtree(storage / run_name, ignore_errors=True)
    resources = {"CPU": tcfg.num_cpus_per_worker, **tcfg.resources}
    progress_file = out / "progress.json"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "cfg": cfg.to_dict(), "rows": ray.put(rows), "lr": lr, "epochs": epochs,
            "init_checkpoint": str(Path(init_checkpoint).resolve()) if init_checkpoint else None,
            "kill_driver": faults.armed_pid("train"),
            "progress_file": str(progress_file), "part": part,
        },
        scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                     resources_per_worker=resources),
        # backend=None: Ray picks NCCL for workers holding GPUs, gloo otherwise, from the
        # workers' resources (the driver may be a GPU-less head node).
        torch_config=TorchConfig(backend=None),
        run_config=RunConfig(name=run_name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    from qpo_ray.common.progress import follow_progress_file

    # The worker writes its steps to progress_file (a file every node of a cluster sees,
    # like the rest of workdir); the driver shows them while fit() blocks.
    label = f"train_{loop_index}" + (" summary" if part == "summary" else "")
    with follow_progress_file(progress_file, label, "steps"):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {storage / run_name} reported no checkpoint")

    # Never deleted first and rewritten in place: the new policy is written beside it and
    # swapped in whole, so a reader or a crash sees the old policy or the new one.
    final = out / POLICY_SUBDIR
    with result.checkpoint.as_directory() as ckpt_dir:
        ckpt = Path(ckpt_dir)
        metrics = json.loads((ckpt / METRICS_FILE).read_text())
        if tcfg.strategy == "deepspeed":
            from qpo_ray.training.deepspeed_engine import consolidate_checkpoint

            policy = initial_policy(cfg, init_checkpoint, torch.device("cpu"))
            consolidate_checkpoint(ckpt, policy)
            policy.save(final)
        else:
            with atomic_dir(final) as tmp:
                shutil.copytree(ckpt / POLICY_SUBDIR, tmp, dirs_exist_ok=True)
    write_text_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2))
    return TrainResult(checkpoint_dir=str(final), metrics=metrics,
                       ray_checkpoint=result.checkpoint.path)
