"""Ray job: one ORL training stage on Ray Train.

    ray job submit --working-dir . -- python jobs/train.py --profile cpu-demo \
        --dataset runs/cpu-demo/dataset_1.parquet --out runs/cpu-demo/loop1 --loop 1
"""

import sys

import _common

if __name__ == "__main__":
    sys.exit(_common.job_main("train", __doc__))
