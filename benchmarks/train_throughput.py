"""Ray Train overhead on policy training: samples/s of `train_policy` with one worker vs
a bare single-process PyTorch loop running the same engine on the same rows and model.

Both sides use `TorchEngine` + `run_epoch` from `qpo_ray.training.trainer` (Ray adds the worker
process, the object-store hand-off of the rows, per-epoch `ray.train.report` and the
checkpoint), the same seed, batch, backbone cut and torch thread count. Steady state =
the mean samples/s of every epoch after the first (which pays for warm-up).

    .venv/bin/python benchmarks/train_throughput.py --rows 128 --epochs 3 --layers 2

Note: Ray starts its workers at nice 15; on a machine busy with other work the Ray side
then gets less CPU than the bare loop and the ratio overstates Ray's own overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAPER_JSON = "qpo_offline/tweet_emotion_llama7b_few_shot_expert.json"
SHARED_DATA = Path(os.environ.get("QPO_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_config(args: argparse.Namespace):
    from qpo_ray.config import load_config

    return load_config(None, {
        "seed": 0,
        "policy": {"backbone": args.backbone, "backbone_num_layers": args.layers,
                   "max_query_tokens": 40, "max_prompt_tokens": 40},
        "training": {"num_workers": 1, "num_cpus_per_worker": args.threads,
                     "batch_size_global": args.batch, "epochs_first_loop": args.epochs,
                     "lr_first_loop": 1e-4},
    })


def write_sample(rows: int, out: Path) -> Path:
    from qpo_ray.data.importer import import_paper_json
    from qpo_ray.data.io import write_dataset

    frame, scale = import_paper_json(SHARED_DATA / PAPER_JSON)
    return write_dataset(frame.sample(n=rows, random_state=0), out, scale)


def bare_loop(cfg, dataset: Path) -> list[float]:
    """The same steps in this process: no Ray, no DDP wrapper, no reports."""
    from qpo_ray.common.device import configure_cpu_threads, get_device
    from qpo_ray.training.trainer import TorchEngine, read_training_rows, build_loader, initial_policy, run_epoch

    configure_cpu_threads(cfg.training.num_cpus_per_worker)
    policy = initial_policy(cfg, None, get_device(prefer_gpu=False))
    loader, sampler = build_loader(policy, read_training_rows(cfg, str(dataset)),
                                   cfg.training.batch_size_global, 0, 1, cfg.seed)
    engine = TorchEngine(policy, cfg.training, cfg.training.lr_first_loop)
    rates = []
    for epoch in range(cfg.training.epochs_first_loop):
        sampler.set_epoch(epoch)
        out = run_epoch(engine, loader, None)
        engine.end_epoch()
        rates.append(out["samples"] / out["seconds"])
    return rates


def ray_loop(cfg, dataset: Path, out_dir: Path) -> list[float]:
    from qpo_ray.training.trainer import train_policy

    result = train_policy(cfg, str(dataset), str(out_dir), loop_index=1)
    return [m["samples_per_s"] for m in result.metrics]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is warm-up)")

    import ray

    cfg = make_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_sample(args.rows, Path(tmp) / "rows.parquet")
        # bare, Ray, bare again: comparing Ray with the mean of the two bare runs cancels
        # a load on the machine that drifts during the benchmark.
        start = time.perf_counter()
        bare_before = bare_loop(cfg, dataset)
        bare_wall = time.perf_counter() - start
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads),
                                           "HF_HUB_OFFLINE": "1"}})
        start = time.perf_counter()
        with_ray = ray_loop(cfg, dataset, Path(tmp) / "ray")
        ray_wall = time.perf_counter() - start
        ray.shutdown()
        bare_after = bare_loop(cfg, dataset)

    steady_bare = statistics.mean(bare_before[1:] + bare_after[1:])
    steady_ray = statistics.mean(with_ray[1:])
    print(f"\nbackbone {args.backbone} ({args.layers} layers), {args.rows} rows, batch "
          f"{args.batch}, {args.threads} threads, {args.epochs} epochs")
    print(f"{'epoch':>5} {'bare (before)':>14} {'Ray Train':>10} {'bare (after)':>13}  samples/s")
    for i, row in enumerate(zip(bare_before, with_ray, bare_after), start=1):
        print(f"{i:>5} {row[0]:>14.2f} {row[1]:>10.2f} {row[2]:>13.2f}")
    print(f"steady state (epochs 2..{args.epochs}): bare {steady_bare:.2f}, Ray Train "
          f"{steady_ray:.2f} samples/s; Ray/bare = {steady_ray / steady_bare:.3f} "
          f"(overhead {100 * (1 - steady_ray / steady_bare):+.1f}%)")
    print(f"wall clock incl. model load: bare {bare_wall:.1f} s, Ray Train {ray_wall:.1f} s "
          f"(incl. Ray worker start-up and checkpoint)")


if __name__ == "__main__":
    main()
