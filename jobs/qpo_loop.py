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
        from qpo_ray.rundir import lock_run_dir

        cfg = None if args.resume else _common.config(args)
        # Held for the whole run: a second job on this directory fails at once.
        with lock_run_dir(args.resume or cfg.workdir):
            return run_qpo(cfg, resume_dir=args.resume)

    return _common.run(work)


if __name__ == "__main__":
    sys.exit(main())
