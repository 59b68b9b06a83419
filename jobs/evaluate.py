"""Ray job: the test phase (policy vs baselines) of a run directory or a policy.

    ray job submit --working-dir . -- python jobs/evaluate.py --profile cpu-demo \
        --run-dir runs/cpu-demo [--target <another model>]
"""

import sys

import _common


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--run-dir", help="a finished run directory (uses its latest policy)")
    p.add_argument("--policy", help="a policy directory (instead of --run-dir)")
    p.add_argument("--target", help="another target model (cross-model transfer)")
    args = p.parse_args()

    def work():
        from qpo_ray.loop import evaluate

        cfg = _common.config(args)
        if args.target:
            cfg.target.model = args.target
        return evaluate(cfg, run_dir=args.run_dir, policy_dir=args.policy)

    return _common.run(work)


if __name__ == "__main__":
    sys.exit(main())
