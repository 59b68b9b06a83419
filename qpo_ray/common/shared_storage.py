"""Every node of a multi-node Ray cluster must see the run directory, at the same path.

Workers load the previous loop's policy from the driver's paths, Ray Train keeps its
runs under `<workdir>/.../ray_train` (a local `storage_path`), training progress and the
default MLflow store (SQLite + mlartifacts) live in the run directory. That is Ray
Train's own requirement too (shared or cloud storage); here it is checked before any
work starts: the driver writes a marker file into the run directory and a Ray task
pinned to each alive node reads it back. A node that reads something else (another
filesystem mounted there, or none) makes the run refuse, naming the node and the path.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional

from qpo_ray.common.atomic import write_text_atomic
from qpo_ray.common.errors import ConfigError

MARKER_PREFIX = ".qpo-node-check-"


def _read_marker(path: str) -> str:
    """Run on one node: what it reads at `path` (or why it cannot)."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        return f"<{type(exc).__name__}: {exc.strerror or exc}>"


def check_shared_run_dir(run_dir: str | Path, address: Optional[str],
                         timeout_s: float = 300.0) -> int:
    """Refuse (ConfigError) unless every alive node of the Ray cluster at `address` (or
    RAY_ADDRESS / the local `ray start` cluster) reads the driver's marker in `run_dir`.
    Returns how many nodes were checked: 0 where no cluster is configured (a new
    single-machine Ray: nothing to check, and none is started here), 1 on one node."""
    from qpo_ray.common.local_ray import existing_cluster, init_ray

    if address is None and existing_cluster() is None:
        return 0
    init_ray(address)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return len(nodes)
    run_dir = Path(run_dir).resolve()
    token = uuid.uuid4().hex
    marker = run_dir / f"{MARKER_PREFIX}{token}"
    write_text_atomic(marker, token)
    read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
    try:
        refs = [read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(marker)) for n in nodes]
        seen = ray.get(refs, timeout=timeout_s)
    finally:
        marker.unlink(missing_ok=True)
    blind = [(n, s) for n, s in zip(nodes, seen) if s != token]
    if blind:
        which = "; ".join(f"node {n['NodeManagerAddress']} (id {n['NodeID'][:12]}) read "
                          f"{s[:80]!r}" for n, s in blind)
        raise ConfigError(
            f"workdir {run_dir}: not every Ray node sees the run directory ({which}). "
            f"All {len(nodes)} nodes must see it at the same path: workers load checkpoints "
            "from it, Ray Train stores its runs in it, the default MLflow store is in it. "
            "Mount shared storage (NFS, EFS, a ReadWriteMany volume) at this path on every "
            "node, or set workdir to such a mount (docs/gpu-and-cluster.md)")
    return len(nodes)
