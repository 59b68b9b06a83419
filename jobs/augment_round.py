"""Ray job: one augmentation round (sample queries, generate prompts with the policy,
score them on the target, merge into the dataset).

    ray job submit --working-dir . -- python jobs/augment_round.py --profile cpu-demo \
        --policy runs/cpu-demo/loop1/checkpoint --dataset runs/cpu-demo/dataset_1.parquet \
        --round 1 --out runs/cpu-demo/dataset_2.parquet
"""

import sys
from pathlib import Path

# Self-contained: `ray submit` copies this file alone. From a checkout (`ray job submit
# --working-dir .`) the repository root makes qpo_ray importable; elsewhere the
# installed package is used (the launchers `pip install -e` the repository).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qpo_ray.run.commands import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("augment", __doc__))
