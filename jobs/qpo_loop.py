"""Ray job: the whole QPO run (Step 0, T loops, test phase), or the rest of one.

    ray job submit --working-dir . -- python jobs/qpo_loop.py --profile cpu-demo
    ray job submit --working-dir . -- python jobs/qpo_loop.py --resume runs/cpu-demo
"""

import sys

import _common


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    args = p.parse_args()

    def work():
        from qpo_ray.loop import run_qpo

        if args.resume:
            return run_qpo(None, resume_dir=args.resume)
        return run_qpo(_common.config(args))

    return _common.run(work)


if __name__ == "__main__":
    sys.exit(main())
