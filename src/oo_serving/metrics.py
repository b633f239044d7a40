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
import re
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from time import perf_counter
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Metric,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

from oo_serving.check import CheckReport
from oo_serving.core.features import Vector
from oo_serving.core.policy import Pooled
from oo_serving.errors import ServiceError, Unavailable
from oo_serving.store.base import (
    DecisionLookup,
    DecisionRecord,
    DecisionStats,
    HistoryEntry,
    Keyset,
    RewardFn,
    RewardWrite,
    SavedReport,
    ScoreFn,
    ScoreWrite,
    Store,
    UserExport,
    UserRecord,
)

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The names prometheus-client gives its files in that folder: `<type>_<pid>.db`, and
# `gauge_<mode>_<pid>.db`. The folder may hold other files (even the database): only
# these are read, and only these are removed at start.
METRICS_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db")
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds; from a cached read (sub-millisecond) to a store time-out (seconds).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
REWARD_BUCKETS = (-1.0, -0.5, 0.0, 0.5, 1.0)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"})
T = TypeVar("T")


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
        self.explored = Counter(
            "oo_explored_decisions",
            "Decisions that showed another candidate than the policy's own choice"
            " (OO_EXPLORATION), by policy. Divide by oo_decisions_total for the share.",
            ["policy"],
            registry=r,
        )
        self.shadow_decisions = Counter(
            "oo_shadow_decisions",
            "Choices of each shadow policy (OO_SHADOW_POLICIES) by the serving policy, and"
            " whether the shadow agreed with the serving policy's own choice.",
            ["policy", "shadow", "agreed"],
            registry=r,
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
        self.unknown_field_requests = Counter(
            "oo_requests_with_unknown_fields",
            "Requests whose body passed validation but held fields the API does not know"
            " (ignored, and named in a 200's X-Unknown-Fields header), by route. Which"
            " fields is not a label: a client chooses them.",
            ["route"],
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

        # Labelled children, looked up once: `labels()` validates and locks on every call,
        # which cost more than the increment itself on the hot path.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            if method not in HTTP_METHODS:  # a client chooses the method: keep it bounded
                method = "other"
            labels = (method, route, str(status))
            children = (self.requests.labels(*labels), self.request_seconds.labels(*labels))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def decision(self, policy: str, explored: bool = False) -> None:
        self._child(self.decisions, policy).inc()
        if explored:
            self._child(self.explored, policy).inc()

    def shadow(self, policy: str, shadow: str, agreed: bool) -> None:
        self._child(self.shadow_decisions, policy, shadow, "true" if agreed else "false").inc()

    def reward(self, join: str, learned: bool, value: float) -> None:
        self._child(self.rewards, join, "true" if learned else "false").inc()
        if learned:
            self._child(self.reward_values, join).observe(value)

    def unknown_fields(self, route: str) -> None:
        """A body held unknown fields; `route` is a route template, never client input."""
        self._child(self.unknown_field_requests, route).inc()

    def store_failed(self, op: str, exc: Exception) -> None:
        # A refusal decided by the service (unknown event, tip mismatch) is an answer, not a
        # failure of the store.
        if isinstance(exc, Unavailable) or not isinstance(exc, ServiceError):
            self._child(self.store_errors, op, type(exc).__name__).inc()

    def store_took(self, op: str, seconds: float) -> None:
        self._child(self.store_seconds, op).observe(seconds)

    def exposition(self) -> bytes:
        """The text format of every sample: this process's, or all workers' added up."""
        if self.multiprocess:
            registry = CollectorRegistry()
            registry.register(_MetricFiles(Path(os.environ[MULTIPROCESS_DIR_ENV])))
            return generate_latest(registry)
        return generate_latest(self.registry)


class _MetricFiles(Collector):
    """prometheus-client's MultiProcessCollector, reading only its own files: it reads
    every `*.db` of the folder, and a folder shared with the database broke /metrics."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def collect(self) -> Iterable[Metric]:
        files = sorted(str(f) for f in self._folder.glob("*.db") if METRICS_FILE.fullmatch(f.name))
        return multiprocess.MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-any-return,no-untyped-call]


class InstrumentedStore:
    """A Store that times each operation and counts its failures, then delegates."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.inner = store
        self._metrics = metrics

    async def _timed(self, op: str, work: Awaitable[T]) -> T:
        start = perf_counter()
        try:
            return await work
        except Exception as exc:
            self._metrics.store_failed(op, exc)
            raise
        finally:
            self._metrics.store_took(op, perf_counter() - start)

    async def open(self, migrate: bool = True) -> None:
        await self.inner.open(migrate)

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def score_tx(self, user_id: str, fn: ScoreFn) -> ScoreWrite:
        return await self._timed("score_tx", self.inner.score_tx(user_id, fn))

    async def reward_tx(self, user_id: str, lookup: DecisionLookup, fn: RewardFn) -> RewardWrite:
        return await self._timed("reward_tx", self.inner.reward_tx(user_id, lookup, fn))

    async def delete_user(self, user_id: str) -> bool:
        return await self._timed("delete_user", self.inner.delete_user(user_id))

    async def get_user(self, user_id: str) -> UserRecord | None:
        return await self._timed("get_user", self.inner.get_user(user_id))

    async def history(self, user_id: str, limit: int) -> list[HistoryEntry]:
        return await self._timed("history", self.inner.history(user_id, limit))

    @asynccontextmanager
    async def export_user(self, user_id: str) -> AsyncIterator[UserExport]:
        # Timed to the snapshot being taken; the streaming after it is the client's pace.
        start = perf_counter()
        exports = self.inner.export_user(user_id)
        try:
            export = await exports.__aenter__()
        except Exception as exc:
            self._metrics.store_failed("export_user", exc)
            raise
        finally:
            self._metrics.store_took("export_user", perf_counter() - start)
        try:
            yield export
        except BaseException as exc:
            if not await exports.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            await exports.__aexit__(None, None, None)

    async def prune_decisions(self, older_than_ms: int, batch_size: int) -> int:
        return await self._timed(
            "prune_decisions", self.inner.prune_decisions(older_than_ms, batch_size)
        )

    def decision_log(
        self, since_ms: int, until_ms: int, user_ids: Sequence[str] | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[list[DecisionRecord]]]:
        return self.inner.decision_log(since_ms, until_ms, user_ids)

    async def unrewarded(
        self, since_ms: int, until_ms: int, after: Keyset, limit: int
    ) -> list[tuple[int, str, int, str]]:
        return await self._timed(
            "unrewarded", self.inner.unrewarded(since_ms, until_ms, after, limit)
        )

    async def sweep_mark(self, name: str) -> int | None:
        return await self._timed("sweep_mark", self.inner.sweep_mark(name))

    async def set_sweep_mark(self, name: str, until_ms: int) -> None:
        await self._timed("set_sweep_mark", self.inner.set_sweep_mark(name, until_ms))

    async def add_pooled(
        self, policy: str, shard: str, count: int, stats: Vector, ts_ms: int
    ) -> None:
        await self._timed("add_pooled", self.inner.add_pooled(policy, shard, count, stats, ts_ms))

    async def pooled(self, policy: str) -> Pooled | None:
        return await self._timed("pooled", self.inner.pooled(policy))

    async def decision_stats(self, since_ms: int, until_ms: int, bucket_ms: int) -> DecisionStats:
        return await self._timed(
            "decision_stats", self.inner.decision_stats(since_ms, until_ms, bucket_ms)
        )

    async def recent_decisions(self, user_id: str, limit: int) -> list[DecisionRecord]:
        return await self._timed("recent_decisions", self.inner.recent_decisions(user_id, limit))

    async def save_report(self, kind: str, created_ms: int, body: dict[str, Any]) -> int:
        return await self._timed("save_report", self.inner.save_report(kind, created_ms, body))

    async def latest_report(self, kind: str) -> SavedReport | None:
        return await self._timed("latest_report", self.inner.latest_report(kind))

    async def check(self, *, summed_rewards: bool = False) -> CheckReport:
        # Not timed: a scan of the whole database, run by an operator, would only stretch
        # the request-latency histogram of the store.
        return await self.inner.check(summed_rewards=summed_rewards)
