"""Ray job: one augmentation round (sample queries, generate prompts with the policy,
score them on the target, merge into the dataset).

    ray job submit --working-dir . -- python jobs/augment_round.py --profile cpu-demo \
        --policy runs/cpu-demo/loop1/checkpoint --dataset runs/cpu-demo/dataset_1.parquet \
        --round 1 --out runs/cpu-demo/dataset_2.parquet
"""

import sys

import _common


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--policy", required=True, help="policy directory of loop `round`")
    p.add_argument("--dataset", required=True, help="D_{t-1} (Parquet with its reward scale)")
    p.add_argument("--round", type=int, default=1)
    p.add_argument("--out", required=True, help="where D_t is written")
    args = p.parse_args()

    def work():
        from qpo_ray.loop import augment_round

        return augment_round(_common.config(args), policy_dir=args.policy,
                             dataset_path=args.dataset, round_index=args.round,
                             out_path=args.out)

    return _common.run(work)


if __name__ == "__main__":
    sys.exit(main())
