"""From settings to the objects that serve: the policies, who gets which, the service.

Used by the app factory and by the commands that act on a database as the server would
(`oo-serving sweep`, `oo-serving evaluate`), so that both read the settings one way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from oo_serving import sweep as sweep_mod
from oo_serving.assignment import Assignment, parse_split
from oo_serving.core import exploration, registry
from oo_serving.core.policy import Policy
from oo_serving.service import Service
from oo_serving.settings import Settings, shadow_names
from oo_serving.store.base import Store


def policies_of(settings: Settings) -> dict[str, Policy]:
    """Every registered policy, with the settings the service runs it with."""
    return {
        "linucb-v1": registry.make("linucb-v1"),
        "linucb-v2": registry.make(
            "linucb-v2",
            alpha=settings.linucb_v2_alpha,
            prior_weight=settings.linucb_v2_prior_weight,
            interaction_prior_weight=settings.linucb_v2_interaction_prior_weight,
            discount=settings.linucb_v2_discount,
            population_ridge=settings.linucb_v2_population_ridge,
        ),
    }


def assignment_of(settings: Settings) -> Assignment:
    """OO_POLICY_SPLIT if set, else OO_POLICY for everyone."""
    policies = policies_of(settings)
    if settings.policy_split:
        return Assignment.split(parse_split(settings.policy_split), policies)
    return Assignment.single(policies[settings.policy])


def shadows_of(settings: Settings) -> list[Policy]:
    """OO_SHADOW_POLICIES, each with the settings the service runs it with."""
    policies = policies_of(settings)
    return [policies[name] for name in shadow_names(settings.shadow_policies)]


def service_of(settings: Settings, store: Store) -> Service:
    """The service as the settings describe it, over `store`."""
    return Service(
        store,
        assignment_of(settings),
        history_size=settings.history_size,
        decision_log_per_user=settings.decision_log_per_user,
        exploration=exploration.parse(settings.exploration),
        shadows=shadows_of(settings),
        reward_wait_ms=settings.reward_wait_ms,
        aggregation=settings.reward_aggregation,
    )


@contextlib.asynccontextmanager
async def background(service: Service, settings: Settings) -> AsyncIterator[None]:
    """What runs beside the requests: the population's prior kept fresh (read before the
    first request, so that a new user's very first /score uses it) and the sweep of
    default rewards. Stopped on exit, the population's last sums flushed."""
    population = service.population
    tasks: list[asyncio.Task[None]] = []
    if population.names:
        await population.refresh()
        tasks.append(asyncio.create_task(population.run(settings.population_refresh_s)))
    if settings.sweep_interval_s > 0:
        tasks.append(
            asyncio.create_task(
                sweep_mod.run(
                    service,
                    settings.sweep_interval_s,
                    default_reward=settings.default_reward,
                    retention_ms=settings.log_retention_ms,
                )
            )
        )
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if population.names:
            with contextlib.suppress(Exception):  # the database may have stopped us
                await population.flush()
