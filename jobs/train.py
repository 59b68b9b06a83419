"""Ray job: one ORL training stage on Ray Train.

    ray job submit --working-dir . -- python jobs/train.py --profile cpu-demo \
        --dataset runs/cpu-demo/dataset_1.parquet --out runs/cpu-demo/loop1 --loop 1
"""

import sys

import _common


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--loop", type=int, default=1, help="1 = first loop (Table 9 schedule)")
    p.add_argument("--init", help="checkpoint to continue from")
    args = p.parse_args()

    def work():
        from qpo_ray.training import train_policy

        result = train_policy(_common.config(args), dataset_path=args.dataset, out_dir=args.out,
                              loop_index=args.loop, init_checkpoint=args.init)
        return f"policy checkpoint: {result.checkpoint_dir}"

    return _common.run(work)


if __name__ == "__main__":
    sys.exit(main())
