"""`python -m qpo_ray.cli` = `qpo`."""

import sys

from qpo_ray.cli.main import main

sys.exit(main())
