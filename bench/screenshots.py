"""Write docs/img/dashboard.png, docs/img/dashboard-user.png and docs/img/docs.png:
/dashboard and one user's page after a week of traffic, and the API reference at /docs,
as served with no internet.

A week is too long to wait for, so the history is made first, by the service itself: the
same Service, store, policies, split and exploration the server runs, deciding and
learning in this process on a clock that walks through the past seven days (more tips
in the day than at night). Then `oo-serving serve` starts on that database and the last
minutes of traffic go to it over HTTP. `oo-serving evaluate` reads the whole log, and its
result is saved for the dashboard. Then the system's headless Chromium (Debian's
`chromium`, or OO_CHROMIUM), with every request beyond loopback refused, takes full-page
pictures, which are reduced to 256 colours when Pillow is installed.

The simulated users act on overdue, high-priority or recent tasks, each to a degree of
their own, so that learning per user pays. The traffic is seeded; the exploration's draws
come from the event ids, which are random, so the details differ from run to run.

    .venv/bin/python bench/screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from playwright.sync_api import Route, sync_playwright

from oo_serving.core import exploration
from oo_serving.core.features import TaskFeatures
from oo_serving.evaluation import saved
from oo_serving.service import Candidate, Service
from oo_serving.settings import Settings
from oo_serving.store.factory import open_store
from oo_serving.wiring import assignment_of, shadows_of

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost"}
STARTUP_TIMEOUT_S = 30.0
ENV = {
    "OO_POLICY_SPLIT": "linucb-v1:50,linucb-v2:50",
    "OO_EXPLORATION": "epsilon:0.15",
    "OO_SHADOW_POLICIES": "",
}
USERS = 60
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
DECISIONS_PER_HOUR = 30  # at the busiest hour; a quarter of that at night
JOIN = 0.8  # share of decisions the app sends a reward for
LIVE_DECISIONS = 120


@dataclass(frozen=True)
class User:
    """How much this user cares about a task being overdue, its priority, its recency."""

    overdue: float
    priority: float
    recent: float

    def p_act(self, f: TaskFeatures) -> float:
        p = (
            0.08
            + 0.45 * self.overdue * f.is_overdue
            + 0.12 * self.priority * (f.priority - 1)
            + 0.25 * self.recent * (f.task_age_days < 3)
        )
        return min(max(p, 0.02), 0.95)


def world(seed: int) -> dict[str, User]:
    """Users of different tastes: what one acts on, another ignores."""
    rng = random.Random(seed)
    return {
        f"user-{i:02d}": User(rng.uniform(0.0, 1.4), rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.4))
        for i in range(USERS)
    }


def candidates(rng: random.Random, hour: int) -> list[Candidate]:
    return [
        Candidate(
            f"task-{rng.randrange(10_000):04d}",
            TaskFeatures(
                hour, rng.random() < 0.35, round(rng.uniform(0, 20), 1), rng.randint(1, 4)
            ),
        )
        for _ in range(rng.randint(4, 8))
    ]


def intensity(hour: int) -> float:
    """Relative traffic at an hour of the day (UTC): high by day, low at night."""
    return 0.25 + 0.75 * max(0.0, math.sin(math.pi * (hour - 6) / 16)) if 6 <= hour <= 22 else 0.25


async def history(settings: Settings, users: dict[str, User], until_ms: int, seed: int) -> int:
    """Seven days of decisions and rewards up to until_ms, made by the service on a
    walking clock; how many decisions."""
    rng = random.Random(seed)
    clock = [until_ms - 7 * DAY_MS]
    store = open_store(settings)
    await store.open()
    service = Service(
        store,
        assignment_of(settings),
        exploration=exploration.parse(settings.exploration),
        shadows=shadows_of(settings),
        reward_wait_ms=settings.reward_wait_ms,
        aggregation=settings.reward_aggregation,
        clock_ms=lambda: clock[0],
    )
    made = 0
    try:
        for start in range(until_ms - 7 * DAY_MS, until_ms, HOUR_MS):
            hour = (start // HOUR_MS) % 24
            for _ in range(round(DECISIONS_PER_HOUR * intensity(hour) * rng.uniform(0.7, 1.3))):
                user_id = rng.choice(list(users))
                offered = candidates(rng, hour)
                clock[0] = start + rng.randrange(HOUR_MS)
                result = await service.score(user_id, offered, {"hour_of_day": hour})
                made += 1
                if rng.random() < JOIN:
                    shown = next(c for c in offered if c.id == result.tip_id)
                    value = float(rng.random() < users[user_id].p_act(shown.features))
                    clock[0] += rng.randrange(60_000, 20 * 60_000)
                    await service.reward(user_id, None, value, None, result.event_id)
                if made % 50 == 0:
                    await service.population.flush()
                    await service.population.refresh()
        await service.population.flush()
    finally:
        await store.close()
    return made


def live(base_url: str, users: dict[str, User], seed: int) -> None:
    """The last minutes of traffic, over HTTP to the server."""
    rng = random.Random(seed)
    hour = time.gmtime().tm_hour
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(LIVE_DECISIONS):
            user_id = rng.choice(list(users))
            offered = candidates(rng, hour)
            body = {
                "user_id": user_id,
                "context": {"hour_of_day": hour},
                "candidates": [
                    {
                        "id": c.id,
                        "content": f"Task {c.id}",
                        "source": "todoist",
                        "features": {
                            "is_overdue": c.features.is_overdue,
                            "task_age_days": c.features.task_age_days,
                            "priority": c.features.priority,
                        },
                    }
                    for c in offered
                ],
            }
            answer = client.post("/score", json=body).raise_for_status().json()
            if rng.random() < JOIN:
                shown = next(c for c in offered if c.id == answer["tip_id"])
                value = float(rng.random() < users[user_id].p_act(shown.features))
                client.post(
                    "/reward",
                    json={"user_id": user_id, "event_id": answer["event_id"], "reward": value},
                ).raise_for_status()


def evaluate_and_save(settings: Settings) -> None:
    """`oo-serving evaluate --json` on the log, saved as the dashboard's latest evaluation."""
    command = ["oo-serving", "evaluate", "--json", "--database", settings.database_url]
    done = subprocess.run(
        [sys.executable, "-m", "oo_serving", *command[1:]],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **ENV},
    )
    result = json.loads(done.stdout)

    async def save() -> None:
        store = open_store(settings)
        await store.open(migrate=False)
        try:
            await saved.save_report(store, result, command="oo-serving evaluate --json")
        finally:
            await store.close()

    asyncio.run(save())


# ── server and browser ───────────────────────────────────────────────────────


def chromium() -> str:
    path = os.environ.get("OO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        sys.exit("no Chromium: install Debian's chromium package or set OO_CHROMIUM")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served(database_url: str, folder: Path) -> Iterator[str]:
    """`oo-serving serve` on the database; its base URL."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "oo_serving", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--database", database_url,
    ]  # fmt: skip
    log_path = folder / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, start_new_session=True, stdout=log, stderr=log, env={**os.environ, **ENV}
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)


def offline(route: Route) -> None:
    if (urlsplit(route.request.url).hostname or "") in LOOPBACK:
        route.continue_()
    else:
        route.abort()


def screenshots(base_url: str, user_id: str, out: Path, browser_path: str) -> list[Path]:
    # (url, file, whole page?): Swagger UI draws the operations with its script, so
    # /docs is taken once they are drawn, and only the first screen of it.
    pictures = [
        (f"{base_url}/dashboard?window=7d", out / "dashboard.png", True),
        (f"{base_url}/dashboard/users/{user_id}?limit=6", out / "dashboard-user.png", True),
        (f"{base_url}/docs", out / "docs.png", False),
    ]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=browser_path, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.route("**/*", offline)
            page = context.new_page()
            out.mkdir(parents=True, exist_ok=True)
            for url, path, full_page in pictures:
                answer = page.goto(url, wait_until="load")
                if answer is None or answer.status != 200:
                    sys.exit(f"{url} answered {answer and answer.status}")
                if not full_page:
                    page.locator(".opblock-summary-path", has_text="/score").first.wait_for()
                    page.wait_for_load_state("networkidle")
                page.screenshot(path=str(path), full_page=full_page)
        finally:
            browser.close()
    return [path for _, path, _ in pictures]


def shrink(path: Path) -> None:
    """256 colours: the pages are flat colours and text, and the file a fraction of the size."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        reduced = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    reduced.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    browser_path = chromium()
    users = world(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        database_url = f"sqlite:///{folder}/oo.db"
        os.environ.update(ENV)
        settings = Settings(database_url=database_url)
        now_ms = time.time_ns() // 1_000_000
        made = asyncio.run(history(settings, users, now_ms - 10 * 60_000, args.seed))
        print(f"history: {made} decisions over 7 days")
        with served(database_url, folder) as base_url:
            live(base_url, users, args.seed + 1)
            evaluate_and_save(settings)
            busiest = max(users, key=lambda u: httpx.get(f"{base_url}/stats/{u}").json()["pulls"])
            for path in screenshots(base_url, busiest, args.out, browser_path):
                shrink(path)
                print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
