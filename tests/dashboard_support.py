"""For the dashboard's tests: seeded traffic (/score and /reward over HTTP to a real
server) with a tally of what was sent, to compare with what the dashboard shows; and an
evaluation saved as `oo-serving evaluate` saves it."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from oo_serving.evaluation import saved
from oo_serving.settings import Settings
from oo_serving.store.factory import open_store

HOSTILE_TIP = "<script>alert(1)</script>"
SPLIT_ENV = {"OO_POLICY_SPLIT": "linucb-v1:50,linucb-v2:50", "OO_EXPLORATION": "epsilon:0.2"}


def reward_probability(features: dict[str, Any]) -> float:
    """The simulated user acts more on overdue, high-priority tasks."""
    return 0.15 + 0.5 * float(features["is_overdue"]) + 0.08 * (int(features["priority"]) - 1)


@dataclass
class Sent:
    """What the traffic did, per policy (as each /score answered)."""

    decisions: Counter[str] = field(default_factory=Counter)
    rewards: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    users: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    events: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    """Each user's event ids, oldest first."""

    def reward_rate(self, policy: str) -> float:
        return sum(self.rewards[policy]) / len(self.rewards[policy])


def candidates(rng: random.Random, *, hostile: bool) -> list[dict[str, Any]]:
    ids = [f"task-{i}" for i in range(4)]
    if hostile:
        ids[rng.randrange(4)] = HOSTILE_TIP
    return [
        {
            "id": tip,
            "content": f"<i>{tip}</i>",
            "source": "todoist",
            "features": {
                "is_overdue": rng.random() < 0.4,
                "task_age_days": round(rng.uniform(0, 12), 1),
                "priority": rng.randint(1, 4),
            },
        }
        for tip in ids
    ]


def drive(
    client: httpx.Client,
    *,
    decisions: int,
    users: int,
    seed: int,
    reward_share: float = 0.8,
    hostile: bool = False,
    user_prefix: str = "user",
) -> Sent:
    """`decisions` /score requests for users `{user_prefix}-00`..., each rewarded (1 or 0,
    more often 1 for overdue, high-priority tasks) with probability reward_share, by its
    event_id. hostile: one candidate of each request has the id HOSTILE_TIP."""
    rng = random.Random(seed)
    sent = Sent()
    for _ in range(decisions):
        user_id = f"{user_prefix}-{rng.randrange(users):02d}"
        offered = candidates(rng, hostile=hostile)
        context = {"hour_of_day": rng.randrange(24), "day_of_week": rng.randrange(7)}
        r = client.post(
            "/score", json={"user_id": user_id, "candidates": offered, "context": context}
        )
        assert r.status_code == 200, r.text
        answer = r.json()
        policy = answer["policy"]
        sent.decisions[policy] += 1
        sent.users[policy].add(user_id)
        sent.events[user_id].append(answer["event_id"])
        if rng.random() >= reward_share:
            continue
        shown = next(c for c in offered if c["id"] == answer["tip_id"])
        value = 1.0 if rng.random() < reward_probability(shown["features"]) else 0.0
        r = client.post(
            "/reward",
            json={"user_id": user_id, "event_id": answer["event_id"], "reward": value},
        )
        assert r.status_code == 200, r.text
        sent.rewards[policy].append(value)
    return sent


def save_evaluation(database_url: str, result: dict[str, Any], **kwargs: Any) -> None:
    """Save `result` (render.to_json's) as the latest evaluation, from this process beside
    the server, as `oo-serving evaluate` does. On a thread of its own: Playwright's sync API
    keeps an event loop running on the test's thread."""

    async def main() -> None:
        store = open_store(Settings(database_url=database_url))
        await store.open(migrate=False)
        try:
            await saved.save_report(store, result, **kwargs)
        finally:
            await store.close()

    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, main()).result()
