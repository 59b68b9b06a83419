"""Starting Ray: join the configured cluster, or start a single-machine Ray whose servers
listen on loopback only.

A plain `ray.init()` on Linux starts the GCS, the raylet, the workers' gRPC servers and
the dashboard agent on every interface (0.0.0.0) and the runtime-env agent on the
machine's address, so anyone on the network can reach them (seen with `ss -ltnp`). On
one machine nothing needs that: when no cluster is configured (no address, no
RAY_ADDRESS, no `ray start` cluster on this machine), Ray is started with 127.0.0.1
as its node address, which makes every one of its servers bind loopback only. Ray
decides this from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what it does on macOS and
Windows by default), read by this process and inherited by the processes Ray starts.
A cluster (`ray start` on several nodes) is joined as before; cluster/README.md's
"Security" section says what it exposes.
"""

from __future__ import annotations

import os
from typing import Any, Optional

_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def existing_cluster() -> Optional[str]:
    """The cluster `ray.init(address=None)` would join: RAY_ADDRESS, else the last
    `ray start` on this machine; None when it would start a new local Ray."""
    from ray._private import services

    return services.get_ray_address_from_environment(None, None)


def connect_ray(address: Optional[str] = None, **init_kwargs: Any) -> None:
    """`ray.init(address, **init_kwargs)` unless Ray is already initialised; a new
    single-machine Ray listens on 127.0.0.1 only."""
    import ray

    if ray.is_initialized():
        return
    if address is not None or existing_cluster() is not None:
        ray.init(address=address, **init_kwargs)
        return
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    # The processes Ray starts read the variable; this one read it at `import ray`.
    os.environ[_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", **init_kwargs)
    finally:
        # Only the start needed it: a later ray.init in this process (another cluster)
        # must pick its address as usual.
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = saved_env


def worker_env() -> dict[str, str]:
    """What every Ray worker of a run gets in its environment: the driver's HF_HUB_OFFLINE
    ("0" where the driver has none, so a node's own setting cannot differ from what the
    driver checked or fetched before work started)."""
    return {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
            "TOKENIZERS_PARALLELISM": "false"}


def init_ray(address: Optional[str] = None) -> None:
    """Join the configured cluster (RAY_ADDRESS is already in the config's ray_address),
    else start a local one; a caller that initialised Ray itself is left alone."""
    connect_ray(address, log_to_driver=False, runtime_env={"env_vars": worker_env()})
