"""How many /score writes per second the PostgreSQL store commits, before and after.

Drives the service in process (no HTTP): N asyncio tasks each call `service.score` for
one of 1,000 users with 10 candidates, as fast as the store answers, on a throwaway
database made on the server given and dropped afterwards. With `--before FILE` (an
earlier postgres.py, e.g. `git show HEAD~1:src/oo_serving/store/postgres.py > /tmp/old.py`)
that store runs too, and the two alternate in rounds, so that machine drift hits both
alike; the table gives the median writes/s of each and their ratio. Usage:

    .venv/bin/python bench/postgres_write_path.py [--before FILE] [--concurrency 1,16,64]
        [--seconds 3] [--rounds 3] [postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from oo_serving.core.features import TaskFeatures
from oo_serving.service import Candidate, Service
from oo_serving.settings import Settings
from oo_serving.store.base import Store
from oo_serving.store.postgres import PostgresStore
from oo_serving.wiring import service_of

USERS = 1000
CANDIDATES = [
    Candidate(id=f"tip-{i}", features=TaskFeatures(i % 24, i % 2 == 0, i * 0.5, i % 5))
    for i in range(10)
]


def store_class(path: Path) -> Callable[..., Store]:
    """PostgresStore from another copy of postgres.py, imported under its own name."""
    spec = importlib.util.spec_from_file_location("oo_bench_before_postgres", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cls: Callable[..., Store] = module.PostgresStore
    return cls


def make_store(cls: Callable[..., Store], settings: Settings) -> Store:
    """A store as the factory makes one, from `cls`."""
    return cls(
        settings.database_url,
        pool_min_size=settings.pg_pool_min_size,
        pool_max_size=settings.pg_pool_max_size,
        pool_timeout_s=settings.pg_pool_timeout_s,
        connect_timeout_s=settings.pg_connect_timeout_s,
        statement_timeout_ms=settings.pg_statement_timeout_ms,
    )


async def measure(service: Service, concurrency: int, seconds: float) -> tuple[float, int]:
    """Writes per second over `seconds`, with `concurrency` tasks; and the errors seen."""
    done = errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done, errors
        n = 0
        while time.perf_counter() < deadline:
            try:
                await service.score(f"bench-{(w * 7919 + n * 31) % USERS}", CANDIDATES)
                done += 1
            except Exception:
                errors += 1
            n += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.perf_counter() - start), errors


async def main(args: argparse.Namespace) -> None:
    admin_url: str = args.admin_url
    name = f"oo_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    settings = Settings(database_url=url)
    classes: dict[str, Callable[..., Store]] = {}
    if args.before:
        classes["before"] = store_class(Path(args.before))
    classes["after"] = PostgresStore
    stores: dict[str, Store] = {}
    try:
        for label, cls in classes.items():
            stores[label] = make_store(cls, settings)
            await stores[label].open()  # the first creates the schema
        services = {label: service_of(settings, s) for label, s in stores.items()}
        for service in services.values():  # warm-up: every user has a row and a model
            await measure(service, 16, 1.0)
        header = " | ".join(f"{label} (writes/s)" for label in services)
        ratio = " | after ÷ before |" if len(services) == 2 else " |"
        print(f"| concurrency | {header}{ratio}")
        print("|---" * (len(services) + 1 + (len(services) == 2)) + "|")
        for c in args.concurrency:
            results: dict[str, list[float]] = {label: [] for label in services}
            failed: dict[str, int] = {label: 0 for label in services}
            for _ in range(args.rounds):
                for label, service in services.items():
                    rate, errors = await measure(service, c, args.seconds)
                    results[label].append(rate)
                    failed[label] += errors
            medians = {label: statistics.median(v) for label, v in results.items()}
            cells = " | ".join(f"{m:,.0f}" for m in medians.values())
            extra = ""
            if len(medians) == 2:
                extra = f" | {medians['after'] / medians['before']:.2f}"
            print(f"| {c} | {cells}{extra} |")
            for label, n in failed.items():
                if n:
                    print(f"  ({label}: {n} writes failed at concurrency {c})")
    finally:
        for s in stores.values():
            await s.close()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("admin_url", nargs="?", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--before", help="an earlier postgres.py to measure beside this one")
    p.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[1, 16, 64],
        help="comma-separated task counts (default 1,16,64)",
    )
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="alternations per cell (default 3)")
    return p.parse_args(argv)


def _run(argv: list[str] | None = None) -> Any:
    return asyncio.run(main(parse_args(argv)))


if __name__ == "__main__":
    _run()
