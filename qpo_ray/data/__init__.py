"""The QPO offline dataset: schema, Step 0 pairs, rewards and the expert filter, the
import of the paper's published data, Parquet I/O and summary statistics.

Import the submodules directly (`qpo_ray.data.rewards`, `qpo_ray.data.pairs`, ...).
"""
