"""Ray job: the test phase (policy vs baselines) of a run directory or a policy.

    ray job submit --working-dir . -- python jobs/evaluate.py --profile cpu-demo \
        --run-dir runs/cpu-demo [--target <another model>]
"""

import sys
from pathlib import Path

# Self-contained: `ray submit` copies this file alone. From a checkout (`ray job submit
# --working-dir .`) the repository root makes qpo_ray importable; elsewhere the
# installed package is used (the launchers `pip install -e` the repository).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qpo_ray.run.commands import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("evaluate", __doc__))
