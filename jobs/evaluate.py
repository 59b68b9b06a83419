"""Ray job: the test phase (policy vs baselines) of a run directory or a policy.

    ray job submit --working-dir . -- python jobs/evaluate.py --profile cpu-demo \
        --run-dir runs/cpu-demo [--target <another model>]
"""

import sys

import _common

if __name__ == "__main__":
    sys.exit(_common.job_main("evaluate", __doc__))
