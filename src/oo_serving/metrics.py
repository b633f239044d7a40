"""Prometheus metrics: what the service did, how fast, and how its database fares.

With several workers each process writes its samples to files in the folder named by
PROMETHEUS_MULTIPROC_DIR (set by `oo-serving serve` before the workers start), and
/metrics, answered by any worker, adds up the files of all of them. With one process
the samples stay in memory. prometheus-client picks the mode when it is first imported,
which is why the folder must be named before that.

Every label takes values from a small, fixed set (a route template, not a path; a status
code; an operation name), so the number of series stays bounded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from oo_serving.errors import ServiceError, Unavailable
from oo_serving.store.base import (
    DecisionLookup,
    HistoryEntry,
    RewardFn,
    RewardWrite,
    ScoreFn,
    ScoreWrite,
    Store,
    UserExport,
    UserRecord,
)

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds; from a cached read (sub-millisecond) to a store time-out (seconds).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
REWARD_BUCKETS = (-1.0, -0.5, 0.0, 0.5, 1.0)


class Metrics:
    """The service's metrics, in a registry of their own (none at import time)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = MULTIPROCESS_DIR_ENV in os.environ
        r = self.registry
        self.requests = Counter(
            "oo_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "oo_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "oo_decisions", "Decisions made and logged, by policy.", ["policy"], registry=r
        )
        self.rewards = Counter(
            "oo_rewards",
            "Rewards acknowledged. join: event_id (matched the decision it names),"
            " latest_decision (no event_id; matched the user's latest decision for the tip),"
            " request_features (no decision matched; learned on the request's features)."
            " learned: false for a repeat of a reward already learned.",
            ["join", "learned"],
            registry=r,
        )
        self.reward_values = Histogram(
            "oo_reward_value",
            "Values of the rewards learned; _sum is their sum, _count their number.",
            ["join"],
            buckets=REWARD_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "oo_store_operation_duration_seconds",
            "Time a store operation took, waiting for the database included.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "oo_store_errors",
            "Store operations that failed: the database was unreachable, failed or busy.",
            ["op", "error"],
            registry=r,
        )

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method, route, str(status))
        self.requests.labels(*labels).inc()
        self.request_seconds.labels(*labels).observe(seconds)

    def decision(self, policy: str) -> None:
        self.decisions.labels(policy).inc()

    def reward(self, join: str, learned: bool, value: float) -> None:
        self.rewards.labels(join, "true" if learned else "false").inc()
        if learned:
            self.reward_values.labels(join).observe(value)

    @contextmanager
    def store_operation(self, op: str) -> Iterator[None]:
        start = perf_counter()
        try:
            yield
        except Exception as exc:
            # A refusal decided by the service (unknown event, tip mismatch) is an answer,
            # not a failure of the store.
            if isinstance(exc, Unavailable) or not isinstance(exc, ServiceError):
                self.store_errors.labels(op, type(exc).__name__).inc()
            raise
        finally:
            self.store_seconds.labels(op).observe(perf_counter() - start)

    def exposition(self) -> bytes:
        """The text format of every sample: this process's, or all workers' added up."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


class InstrumentedStore:
    """A Store that times each operation and counts its failures, then delegates."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.inner = store
        self._timed = metrics.store_operation

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        with self._timed("ping"):
            await self.inner.ping()

    async def score_tx(self, user_id: str, fn: ScoreFn) -> ScoreWrite:
        with self._timed("score_tx"):
            return await self.inner.score_tx(user_id, fn)

    async def reward_tx(self, user_id: str, lookup: DecisionLookup, fn: RewardFn) -> RewardWrite:
        with self._timed("reward_tx"):
            return await self.inner.reward_tx(user_id, lookup, fn)

    async def delete_user(self, user_id: str) -> bool:
        with self._timed("delete_user"):
            return await self.inner.delete_user(user_id)

    async def get_user(self, user_id: str) -> UserRecord | None:
        with self._timed("get_user"):
            return await self.inner.get_user(user_id)

    async def history(self, user_id: str, limit: int) -> list[HistoryEntry]:
        with self._timed("history"):
            return await self.inner.history(user_id, limit)

    async def export_user(self, user_id: str) -> UserExport:
        with self._timed("export_user"):
            return await self.inner.export_user(user_id)

    async def prune_decisions(self, older_than_ms: int, batch_size: int) -> int:
        with self._timed("prune_decisions"):
            return await self.inner.prune_decisions(older_than_ms, batch_size)
