"""Ray job: the whole QPO run (Step 0, T loops, test phase), or the rest of one.

    ray job submit --working-dir . -- python jobs/qpo_loop.py --profile cpu-demo
    ray job submit --working-dir . -- python jobs/qpo_loop.py --resume runs/cpu-demo
"""

import sys

import _common

if __name__ == "__main__":
    sys.exit(_common.job_main("run", __doc__))
