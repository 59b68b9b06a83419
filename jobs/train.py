"""Ray job: one ORL training stage on Ray Train.

    ray job submit --working-dir . -- python jobs/train.py --profile cpu-demo \
        --dataset runs/cpu-demo/dataset_1.parquet --out runs/cpu-demo/loop1 --loop 1
"""

import sys
from pathlib import Path

# Self-contained: `ray submit` copies this file alone. From a checkout (`ray job submit
# --working-dir .`) the repository root makes qpo_ray importable; elsewhere the
# installed package is used (the launchers `pip install -e` the repository).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qpo_ray.run.commands import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("train", __doc__))
