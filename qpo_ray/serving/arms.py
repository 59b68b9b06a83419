"""The policies a replica serves: arm "a" (serve.policy_uri) and, for an A/B test, arm
"b" (serve.ab_policy_uri) with ab_traffic_percent of the requests.

Each arm follows its URI on its own: a registry alias is polled, and a new version is
loaded in a worker thread while the old one keeps serving; the swap is one attribute
assignment of (policy, ref), so every request sees one whole policy and the version
it names is the one that wrote its prompt.

Which arm a request gets: with a client key, a hash of the key (the same on every
replica and after restarts, so a client always sees one version); raising the B share
only moves clients from A to B, never back. Without a key, a fair coin at that share.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional

from qpo_ray.serving import policy_source

logger = logging.getLogger("ray.serve")

# Buckets of the client-key hash: shares are honoured to 0.01 percent.
_BUCKETS = 10_000


def bucket_of(client_key: str) -> int:
    """A stable bucket in [0, 10000) for a client key (sha256, not Python's salted hash)."""
    return int(hashlib.sha256(client_key.encode("utf-8")).hexdigest()[:12], 16) % _BUCKETS


class Arm:
    """One served policy URI and the version loaded for it."""

    def __init__(self, name: str, uri: str) -> None:
        self.name = name
        self.uri = uri
        # (policy, ref, how it is decoded), replaced as a whole by a swap.
        self.loaded: Optional[tuple[Any, policy_source.PolicyRef,
                                    policy_source.ServedDecoding]] = None
        self.loaded_at = 0.0
        # Registry freshness for /healthz: last successful resolve, last failure since.
        self.registry_ok_at = 0.0
        self.registry_error: Optional[str] = None
        # Serving the last good copy from local disk (the registry was down at start).
        self.from_local_copy = False

    @property
    def version(self) -> str:
        return self.loaded[1].version if self.loaded else ""

    @property
    def decoding(self) -> Optional[policy_source.ServedDecoding]:
        return self.loaded[2] if self.loaded else None

    def describe(self) -> dict[str, Any]:
        return {"arm": self.name, "policy_version": self.version, "policy_uri": self.uri,
                "loaded_at_unix_s": self.loaded_at,
                **(self.decoding.describe() if self.decoding else {})}


class PolicyArms:
    """Arm a, optional arm b, the split, and the loop that follows registry aliases.
    `on_swap(versions)` is called after any arm loads a new version (the prompt cache
    drops the versions no longer served)."""

    def __init__(self, tracking_uri: str, experiment: str, stale_after_s: float,
                 on_swap: Callable[[set[str]], None], decoding: Optional[str] = None,
                 mbr_temperature: Optional[float] = None,
                 last_good_dir: Optional[Path] = None) -> None:
        self._tracking_uri = tracking_uri
        self._last_good_dir = last_good_dir
        # serve.decoding / serve.mbr_temperature: overrides of each version's own tags.
        self._decoding, self._mbr_temperature = decoding, mbr_temperature
        # version -> how it was decoded (a cache hit names the decoding of its version).
        self.decodings: dict[str, policy_source.ServedDecoding] = {}
        self._experiment = experiment
        self._stale_after_s = stale_after_s
        self._on_swap = on_swap
        self.arms: dict[str, Arm] = {}
        self.percent_b = 0.0
        self.poll_interval_s = 0.0
        self._poll_task: Optional[asyncio.Task] = None
        # Serialises loads: a reconfigure and a poll never load two policies at once.
        self._lock = asyncio.Lock()

    async def configure(self, uri_a: str, uri_b: Optional[str], percent_b: float,
                        poll_interval_s: float) -> None:
        """Load what the URIs point at (an arm whose URI is unchanged keeps its policy),
        then switch to the new arms and split in one assignment each."""
        arms = {"a": self._reuse("a", uri_a)}
        if uri_b:
            arms["b"] = self._reuse("b", uri_b)
        for arm in arms.values():
            await self._refresh(arm)
        self.arms, self.percent_b = arms, (percent_b if uri_b else 0.0)
        self.poll_interval_s = poll_interval_s
        self._on_swap(self.versions())
        if self._poll_task is None:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    def _reuse(self, name: str, uri: str) -> Arm:
        current = self.arms.get(name)
        return current if current is not None and current.uri == uri else Arm(name, uri)

    def versions(self) -> set[str]:
        return {arm.version for arm in self.arms.values()}

    def pick(self, client_key: Optional[str]) -> Arm:
        arms = self.arms
        if "b" not in arms:
            return arms["a"]
        if client_key is not None:
            in_b = bucket_of(client_key) < self.percent_b * _BUCKETS / 100
        else:
            in_b = random.random() * 100 < self.percent_b
        return arms["b" if in_b else "a"]

    async def _refresh(self, arm: Arm) -> None:
        """Load the version the arm's URI points at now, if it is not the one loaded (a
        directory is read once: write a new policy to a new directory)."""
        async with self._lock:
            copy = self._copy_dir(arm)
            try:
                ref = await asyncio.to_thread(policy_source.resolve, arm.uri,
                                              self._tracking_uri, self._experiment)
            except Exception as exc:  # noqa: BLE001 - maybe a last good copy can serve
                fallback = policy_source.last_good(copy, arm.uri) if copy else None
                if arm.loaded is not None or fallback is None:
                    raise
                policy = await asyncio.to_thread(policy_source.load_policy, fallback, None)
                policy.eval()
                served = policy_source.served_decoding(fallback, self._decoding,
                                                       self._mbr_temperature)
                self.decodings[fallback.version] = served
                arm.loaded, arm.loaded_at = (policy, fallback, served), time.time()
                arm.from_local_copy = True
                arm.registry_error = f"{type(exc).__name__}: {exc}"[:500]
                logger.error("registry unreachable at start: arm %s serves its last good "
                             "copy of %s", arm.name, fallback.version)
                return
            if arm.loaded is not None and ref == arm.loaded[1]:
                arm.registry_ok_at, arm.registry_error = time.time(), None
                return
            served = policy_source.served_decoding(ref, self._decoding, self._mbr_temperature)
            policy = await asyncio.to_thread(policy_source.load_policy, ref,
                                             self._tracking_uri, None, copy)
            if served.decoding == "mbr" and policy.mbr_table is None:
                raise FileNotFoundError(policy_source.NO_MBR_TABLE.format(version=ref.version))
            if served.recorded:
                logger.warning("policy %s was chosen with %s decoding, which Serve cannot run: "
                               "serving it greedy", ref.version, served.recorded)
            policy.eval()
            self.decodings[ref.version] = served
            arm.loaded, arm.loaded_at = (policy, ref, served), time.time()
            arm.registry_ok_at, arm.registry_error = arm.loaded_at, None
            arm.from_local_copy = False
            logger.info("arm %s serves policy %s (%s)", arm.name, ref.version, served.describe())
        if arm in self.arms.values():
            self._on_swap(self.versions())

    async def _poll(self) -> None:
        """Follow registry aliases: a failed poll (registry briefly unreachable) keeps the
        arm's current policy and tries again at the next tick."""
        while True:
            interval = self.poll_interval_s
            await asyncio.sleep(interval if interval > 0 else 1.0)
            if interval <= 0:
                continue
            for arm in list(self.arms.values()):
                if not policy_source.is_registry_uri(arm.uri):
                    continue
                try:
                    await self._refresh(arm)
                except Exception as exc:  # noqa: BLE001 - keep serving the policy we have
                    arm.registry_error = f"{type(exc).__name__}: {exc}"[:500]
                    logger.exception("policy refresh from %s failed", arm.uri)

    def _copy_dir(self, arm: Arm) -> Optional[Path]:
        """Where a registry arm keeps its last good version (one per URI)."""
        if self._last_good_dir is None or not policy_source.is_registry_uri(arm.uri):
            return None
        return policy_source.last_good_path(self._last_good_dir, self._tracking_uri, arm.uri)

    def registry_health(self, arm: Arm) -> Optional[dict[str, Any]]:
        """How fresh the arm's policy is, for a registry alias (a directory or a pinned
        version cannot go stale): stale once no poll succeeded for the configured time."""
        if not policy_source.is_registry_uri(arm.uri) or self.poll_interval_s <= 0:
            return None
        limit = self._stale_after_s or 3 * self.poll_interval_s
        age = time.time() - arm.registry_ok_at
        return {"uri": arm.uri, "last_ok_unix_s": arm.registry_ok_at,
                "seconds_since_ok": round(age, 1), "stale_after_s": limit,
                "stale": age > limit or arm.from_local_copy, "last_error": arm.registry_error,
                "from_local_copy": arm.from_local_copy}
