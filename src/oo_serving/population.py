"""What every user teaches a policy that learns from the population (linucb-v2's θₚ).

Each process adds the increment `policy.pool(x, r)` of every reward it learns (after the
reward's transaction committed) into a pending sum in memory, and every `refresh_s`
seconds it flushes that sum into its own row of the `pooled` table (one row per policy
and process, so no row is written by two processes and none is hot), then reads the sum
of every row and recomputes the policy's prior once. Requests only read the cached
prior: the hot path pays nothing but the in-memory addition.

So the prior survives restarts, is the same for every replica (within one refresh
period), and a new user's very first /score uses it. What a process had not yet flushed
when it was killed (at most refresh_s seconds of rewards) is missing from the sums: the
prior is an estimate pooled over many users, and a few seconds fewer of its evidence
change it by little; every user's own model is written with the reward itself and is
never lost. On a clean shutdown the pending sums are flushed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Iterable
from typing import Any

from oo_serving.core.features import TaskFeatures, Vector
from oo_serving.core.policy import Policy
from oo_serving.store.base import Store

log = logging.getLogger("oo_serving.population")


def new_shard() -> str:
    """This process's row name: host, pid and a random suffix (pids are reused)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(4)}"


class Population:
    """Pending sums and cached priors of the pooling policies among `policies`."""

    def __init__(self, store: Store, policies: Iterable[Policy], *, clock_ms: Any) -> None:
        self._store = store
        self._clock_ms = clock_ms
        self._policies = {p.name: p for p in policies if p.pooled_size > 0}
        self._priors: dict[str, Any] = {n: p.prior(None) for n, p in self._policies.items()}
        self._counts: dict[str, int] = dict.fromkeys(self._policies, 0)
        self._pending: dict[str, tuple[int, Vector]] = {}
        self.shard = new_shard()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._policies)

    def prior(self, name: str) -> Any:
        """The cached prior of policy `name` (None for a policy that does not pool)."""
        return self._priors.get(name)

    def version(self, name: str) -> int:
        """How many rewards the cached prior of `name` was computed from."""
        return self._counts.get(name, 0)

    def learn(self, features: TaskFeatures, reward: float) -> None:
        """Count one learned reward for every pooling policy."""
        for name, policy in self._policies.items():
            x = policy.features([features])[0]
            increment = policy.pool(x, reward)
            self._merge(name, 1, increment)

    def correct(self, features: TaskFeatures, old: float, new: float) -> None:
        """A learned reward's value changed from `old` to `new` (an aggregation rule):
        replace its increment, counting no new reward."""
        for name, policy in self._policies.items():
            x = policy.features([features])[0]
            self._merge(name, 0, policy.pool(x, new) - policy.pool(x, old))

    async def flush(self) -> None:
        """Write the pending sums to this process's rows; what a failed write leaves
        unwritten stays pending for the next flush."""
        pending, self._pending = self._pending, {}
        unwritten = dict(pending)
        try:
            for name, (count, stats) in pending.items():
                await self._store.add_pooled(name, self.shard, count, stats, self._clock_ms())
                del unwritten[name]
        finally:
            for name, (count, stats) in unwritten.items():
                self._merge(name, count, stats)

    def _merge(self, name: str, count: int, stats: Vector) -> None:
        if name in self._pending:
            c, s = self._pending[name]
            self._pending[name] = (c + count, s + stats)
        else:
            self._pending[name] = (count, stats)

    async def refresh(self) -> None:
        """Flush, then recompute every prior from the sum of all processes' rows."""
        await self.flush()
        for name, policy in self._policies.items():
            pooled = await self._store.pooled(name)
            self._priors[name] = policy.prior(pooled)
            self._counts[name] = pooled.count if pooled is not None else 0

    async def run(self, period_s: float) -> None:
        """Refresh every period_s seconds until cancelled; a failed refresh is logged and
        retried at the next period (the cached priors stay in use meanwhile)."""
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("population refresh failed, retrying in %.0f s: %s", period_s, exc)
