"""Ray job: one augmentation round (sample queries, generate prompts with the policy,
score them on the target, merge into the dataset).

    ray job submit --working-dir . -- python jobs/augment_round.py --profile cpu-demo \
        --policy runs/cpu-demo/loop1/checkpoint --dataset runs/cpu-demo/dataset_1.parquet \
        --round 1 --out runs/cpu-demo/dataset_2.parquet
"""

import sys

import _common

if __name__ == "__main__":
    sys.exit(_common.job_main("augment", __doc__))
