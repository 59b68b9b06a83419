"""A multi-node Ray cluster on this machine for tests: a head (`ray start --head
--num-cpus 0`, like a real head node) and worker nodes (`ray start --address`), each
with its own temp dir, ports and custom resources, all on 127.0.0.1. Each node is a
`ray start --block` in its own process group; stopping kills only those groups (never
`ray stop`: other clusters share the host)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import httpx
import pytest

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ray_env(**extra: str) -> dict[str, str]:
    # RAY_AUTH_MODE=disabled: the private cluster listens on 127.0.0.1 only, and Ray
    # 2.60's `ray start` otherwise enables token auth the job CLI does not send.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def _node_ports() -> list[str]:
    nm, om, agent_listen, agent_grpc, metrics, rtenv = free_ports(6)
    # Worker ports below the kernel's ephemeral range, where the ports above come from.
    lo = random.randrange(20000, 30000, 100)
    return ["--node-ip-address", "127.0.0.1", "--node-manager-port", str(nm),
            "--object-manager-port", str(om), "--dashboard-agent-listen-port", str(agent_listen),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
            "--runtime-env-agent-port", str(rtenv), "--min-worker-port", str(lo),
            "--max-worker-port", str(lo + 40), "--disable-usage-stats", "--block"]


class RayCluster:
    def __init__(self) -> None:
        self.nodes: list[tuple[subprocess.Popen, Path]] = []
        gcs, dash, client = free_ports(3)
        self.gcs = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        self._start(["--head", "--port", str(gcs), "--num-cpus", "0",
                     "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                     "--include-dashboard", "true", "--ray-client-server-port", str(client)])
        deadline = time.monotonic() + 180
        while not self._dashboard_up():
            self._check_alive(deadline, "the head")
            time.sleep(2)

    def _start(self, args: Sequence[str], wrap: Sequence[str] = ()) -> tuple[str, Path]:
        temp_dir = Path(tempfile.mkdtemp(prefix="qmn", dir="/tmp"))  # short: socket paths
        log = temp_dir / "node.log"
        command = [str(BIN / "ray"), "start", *args, *_node_ports(), "--temp-dir", str(temp_dir)]
        proc = subprocess.Popen([*wrap, *command], env=ray_env(), stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append((proc, temp_dir))
        return str(temp_dir), log

    def _dashboard_up(self) -> bool:
        try:
            return httpx.get(f"{self.dashboard}/api/version", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def _check_alive(self, deadline: float, what: str) -> None:
        for proc, temp_dir in self.nodes:
            if proc.poll() is not None or time.monotonic() > deadline:
                logs = "\n".join((t / "node.log").read_text()[-3000:] for _, t in self.nodes)
                self.stop()
                pytest.fail(f"{what} did not start:\n{logs}")

    def alive_nodes(self) -> list[dict]:
        reply = httpx.get(f"{self.dashboard}/api/v0/nodes",
                          params={"limit": 100, "detail": "true"}, timeout=30)
        rows = reply.json()["data"]["result"]["result"] if reply.status_code == 200 else []
        return [n for n in rows if n.get("state") == "ALIVE"]

    def add_node(self, num_cpus: int, resources: dict[str, float],
                 wrap: Sequence[str] = ()) -> str:
        """A worker node (`wrap`: a command it runs under, e.g. unshare) with `resources`
        (a name no other node has: it finds the node); its node id."""
        temp_dir, _ = self._start(["--address", self.gcs, "--num-cpus", str(num_cpus),
                                   "--resources", json.dumps(resources)], wrap)
        deadline = time.monotonic() + 180
        while True:
            new = [n for n in self.alive_nodes()
                   if set(resources) <= set(n.get("resources_total") or {})]
            if new:
                return new[0]["node_id"]
            self._check_alive(deadline, f"the node in {temp_dir}")
            time.sleep(2)

    def actors(self) -> list[dict]:
        reply = httpx.get(f"{self.dashboard}/api/v0/actors",
                          params={"limit": 10000, "detail": "true"}, timeout=60)
        reply.raise_for_status()
        return reply.json()["data"]["result"]["result"]

    def submit(self, entrypoint: Sequence[str], working_dir: Path,
               timeout: float = 1200) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", self.dashboard,
             "--working-dir", str(working_dir), "--", *entrypoint],
            env=ray_env(), capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """SIGTERM to each node's process group (started here), then SIGKILL what is left:
        workers first, the head last."""
        for proc, temp_dir in reversed(self.nodes):
            _kill_group(proc)
            shutil.rmtree(temp_dir, ignore_errors=True)
        self.nodes = []


def _kill_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tmpfs_over(path: Path) -> Optional[list[str]]:
    """A command prefix that runs its command in a mount namespace where `path` is an
    empty tmpfs (another filesystem than the driver's); None where that is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    seen = path / ".probe"
    seen.touch()
    try:
        for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
            probe = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs qpo-test {path} && "
                                    f"test ! -e {seen}"], capture_output=True)
            if probe.returncode == 0:
                return [*prefix, "sh", "-c", f'mount -t tmpfs qpo-test {path} && exec "$@"',
                        "sh"]
        return None
    finally:
        seen.unlink()
