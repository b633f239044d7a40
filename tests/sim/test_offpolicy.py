"""The evaluation pipeline end to end on the simulator: the service writes the log
(exploration, a shadow policy, a real SQLite store), evaluate's code reads it, and each
estimate is held to the true value the simulator knows for the evaluated decisions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from oo_serving.settings import Settings
from oo_serving.sim.offpolicy import OffPolicyRun, serve_and_evaluate
from oo_serving.sim.scenarios import preset
from oo_serving.store import open_store

SEEDS = (301, 302, 303)


def run(tmp_path: Path, seed: int, epsilon: float = 0.2) -> OffPolicyRun:
    async def go() -> OffPolicyRun:
        store = open_store(
            Settings(database_url=f"sqlite:///{tmp_path}/{seed}.db", sqlite_synchronous="normal")
        )
        await store.open()
        try:
            scenario = preset("realistic", users=40, rounds=40)
            return await serve_and_evaluate(store, scenario, seed, epsilon=epsilon)
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.mark.parametrize("seed", SEEDS)
def test_every_estimate_is_within_four_standard_errors_of_the_truth(
    tmp_path: Path, seed: int
) -> None:
    out = run(tmp_path, seed)
    result = out.result
    assert result.enough
    assert set(out.truth) == {"logging", "uniform", "greedy", "linucb-v2"}
    found = {(e.policy, e.estimator) for e in result.estimates}
    assert found == {(p, e) for p in out.truth for e in ("ips", "snips", "dr")}
    for e in result.estimates:
        se = (e.ci_high - e.ci_low) / (2 * 1.959964)
        assert se > 0
        assert abs(e.value - out.truth[e.policy]) <= 4 * se, (e, out.truth[e.policy])
        assert e.cs_low <= e.value <= e.cs_high
    for d in result.differences:
        truth = out.truth[d.policy] - out.truth["logging"]
        se = (d.ci_high - d.ci_low) / (2 * 1.959964)
        assert abs(d.value - truth) <= 4 * se + 1e-12, (d, truth)


def test_the_logged_policy_s_own_value_is_its_mean_reward(tmp_path: Path) -> None:
    """IPS of the logging policy on its own log is the mean reward, and the truth it is
    compared with is not a copy of the estimate: greedy and uniform differ from it."""
    out = run(tmp_path, SEEDS[0])
    ips = {e.policy: e.value for e in out.result.estimates if e.estimator == "ips"}
    logging_dr = next(
        e for e in out.result.estimates if e.policy == "logging" and e.estimator == "dr"
    )
    assert logging_dr.ess == pytest.approx(out.result.events)
    assert abs(out.truth["uniform"] - out.truth["greedy"]) > 0.05
    assert ips["uniform"] < ips["greedy"]
