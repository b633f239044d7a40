"""What each layer of the request path costs, in µs per request, measured in-process.

    .venv/bin/python bench/layers.py

No network and no database: each layer is driven alone, the same way the server drives
it, with the body `bench/lua/score.lua` sends (10 candidates). Every case is timed in
short interleaved rounds and the best round kept, since on a shared machine the best
round is the one least disturbed by other tenants. Figures are for reading side by
side; the HTTP load figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import timeit
from collections.abc import Callable
from typing import Any

import orjson

from oo_serving.api.auth import KeyRing
from oo_serving.api.bodies import Bodies
from oo_serving.api.edge import Edge
from oo_serving.api.hot import Answer, HotRoutes
from oo_serving.logs import RequestLog, UserIdHasher, log_config
from oo_serving.metrics import Metrics
from oo_serving.settings import Settings

CANDIDATES = [
    {
        "id": f"task-{i}",
        "content": f"Task number {i}",
        "source": "todoist",
        "features": {
            "hour_of_day": 9,
            "is_overdue": i % 2 == 0,
            "task_age_days": i * 2,
            "priority": i % 4 + 1,
        },
    }
    for i in range(1, 11)
]
BODY = orjson.dumps(
    {"user_id": "user-7", "candidates": CANDIDATES, "context": {"hour_of_day": 9, "day_of_week": 2}}
)
FIELDS = {
    "method": "POST",
    "route": "/score",
    "status": 200,
    "duration_ms": 1.234,
    "request_id": "019a1f2e-8c3b-7d4e-9f00-0123456789ab",
    "user": "0123456789abcdef",
    "key": None,
}


def best_us(fn: Callable[[], object], rounds: int = 40, number: int = 400) -> float:
    return min(timeit.timeit(fn, number=number) / number * 1e6 for _ in range(rounds))


def _quiet_logging() -> None:
    """The service's own logging set-up, its stream pointed at /dev/null."""
    logging.config.dictConfig(log_config(Settings()))
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logging.getLogger("oo_serving").handlers:
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(devnull)


def main() -> None:
    _quiet_logging()
    results: dict[str, float] = {}
    loop = asyncio.new_event_loop()

    bodies = Bodies(100)
    results["body: msgspec (the fast decoder)"] = best_us(lambda: bodies.fast_score(BODY))
    results["body: orjson + pydantic (the strict decoder)"] = best_us(
        lambda: bodies.strict_score(BODY)
    )

    request_log = RequestLog()
    records = logging.getLogger("oo_serving.request")

    def fast_line() -> None:
        request_log(logging.INFO, dict(FIELDS))
        request_log.flush()

    results["request log line: RequestLog (JSON, written per loop turn)"] = best_us(fast_line)
    results["request log line: a logging record (JsonFormatter)"] = best_us(
        lambda: records.info("request", extra={"fields": dict(FIELDS)})
    )
    hasher = UserIdHasher("k" * 64)
    results["user id hash for the log (cached)"] = best_us(lambda: hasher("user-7"))

    metrics = Metrics()
    results["metrics: one request counted and timed"] = best_us(
        lambda: metrics.request("POST", "/score", 200, 0.001)
    )

    hot = HotRoutes(None, bodies, KeyRing.load("k" * 32 + ":decide", None), metrics)  # type: ignore[arg-type]
    scope: dict[str, Any] = {"headers": [(b"authorization", b"Bearer " + b"k" * 32)]}
    results["key check (one key configured)"] = best_us(lambda: hot._authorize(scope))

    answer = Answer(200, b'{"tip_id":"task-1"}', [])

    async def constant(raw: bytes, scope: Any) -> Answer:
        return answer

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not reached")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: Any) -> None:
        pass

    def edge_call(log_requests: bool) -> Callable[[], object]:
        edge = Edge(inner, {"/score": constant}, metrics, hasher, log_requests, 65536)

        def call() -> None:
            request = {
                "type": "http",
                "method": "POST",
                "path": "/score",
                "headers": [(b"content-type", b"application/json")],
            }
            loop.run_until_complete(edge(request, receive, send))

        return call

    def handler_alone() -> None:
        loop.run_until_complete(constant(BODY, {}))

    bare = best_us(handler_alone)
    results["edge: id, body, metrics, no log (over a bare call)"] = best_us(edge_call(False)) - bare
    results["edge: id, body, metrics, request log (over a bare call)"] = (
        best_us(edge_call(True)) - bare
    )

    width = max(map(len, results))
    for name, us in results.items():
        print(f"{name:<{width}}  {us:6.1f} µs")


if __name__ == "__main__":
    main()
