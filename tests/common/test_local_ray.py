"""A single-machine Ray started by qpo listens on loopback only: a fresh process starts
a real Ray through qpo_ray.common.local_ray, runs a task and an actor, and lists every TCP
socket its process tree listens on (what `ss -ltnp` shows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys, time
import psutil, ray
from qpo_ray.common.local_ray import connect_ray

connect_ray(None, num_cpus=1, log_to_driver=False)

@ray.remote(num_cpus=0)
class Echo:
    def ping(self):
        return "pong"

actor = Echo.remote()
assert ray.get(actor.ping.remote()) == "pong"
assert ray.get(ray.remote(lambda: 1).options(num_cpus=0).remote()) == 1
time.sleep(2)  # let the agents open their ports
tree = [psutil.Process()] + psutil.Process().children(recursive=True)
listening = []
for proc in tree:
    try:
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append([conn.laddr.ip, conn.laddr.port, proc.name()])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
node_ip = ray.util.get_node_ip_address()
ray.shutdown()
print("RESULT " + json.dumps({"listening": listening, "node_ip": node_ip}))
"""


def _loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def test_single_machine_ray_binds_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["node_ip"] == "127.0.0.1"
    names = {name for _ip, _port, name in result["listening"]}
    # The servers the issue saw beyond loopback are all there, and all on loopback.
    assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names), names
    exposed = [entry for entry in result["listening"] if not _loopback(entry[0])]
    assert exposed == [], exposed


OFFLINE_PROBE = """
import json, os, ray
from qpo_ray.common.local_ray import init_ray

init_ray(None)

@ray.remote(num_cpus=0)
def seen():
    from huggingface_hub import constants
    return [os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE]

print("RESULT " + json.dumps(ray.get(seen.remote())))
ray.shutdown()
"""


@pytest.mark.parametrize("driver", ["1", None], ids=["offline", "unset"])
def test_ray_workers_get_the_drivers_hf_hub_offline(tmp_path, driver):
    """init_ray used to force HF_HUB_OFFLINE=1 into every worker: a vLLM actor could not
    fetch a hub model the driver was allowed to fetch."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "HF_HUB_OFFLINE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if driver is not None:
        env["HF_HUB_OFFLINE"] = driver
    proc = subprocess.run([sys.executable, "-c", OFFLINE_PROBE], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    value, offline = json.loads(line[len("RESULT "):])
    assert offline is (driver == "1")
    assert value == (driver or "0")
