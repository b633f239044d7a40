"""The sweep: the default reward for decisions the window closed on, and log retention.

Run by `oo-serving sweep` (e.g. from cron, on any one machine or on all of them) or
inside the server every OO_SWEEP_INTERVAL_S. Both parts are safe to run from many
processes at once and to re-run:

- The default reward (OO_DEFAULT_REWARD) is given decision by decision, each in its
  user's own transaction, which gives it only to a decision still without a reward; two
  sweeps racing give it once. A mark in the database remembers how far the sweep got,
  so each run reads only the decisions whose window closed since.
- Retention (OO_LOG_RETENTION_DAYS) deletes the decisions older than the retention in
  small batches, each its own short transaction, pausing between them, so it never
  holds the write lock for long.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from oo_serving.service import Service

log = logging.getLogger("oo_serving.sweep")

PRUNE_BATCH = 500
PAUSE_S = 0.01  # between batches: serving writes go first


@dataclass(frozen=True, slots=True)
class SweepReport:
    defaults_given: int
    pruned: int


async def sweep(
    service: Service,
    *,
    default_reward: float | None,
    retention_ms: int,
    now_ms: int,
    batch_size: int = PRUNE_BATCH,
) -> SweepReport:
    """One sweep at time now_ms: default rewards first (they need the decisions that
    retention would delete), then retention."""
    given = 0
    if default_reward is not None:
        given = await service.sweep_default_rewards(
            default_reward, until_ms=now_ms, batch_size=batch_size
        )
    pruned = 0
    while deleted := await service.store.prune_decisions(now_ms - retention_ms, batch_size):
        pruned += deleted
        await asyncio.sleep(PAUSE_S)
    return SweepReport(given, pruned)


async def run(
    service: Service, period_s: float, *, default_reward: float | None, retention_ms: int
) -> None:
    """Sweep every period_s seconds until cancelled; a failed sweep is logged and tried
    again at the next period."""
    while True:
        await asyncio.sleep(period_s)
        try:
            report = await sweep(
                service,
                default_reward=default_reward,
                retention_ms=retention_ms,
                now_ms=service.now_ms(),
            )
            if report.defaults_given or report.pruned:
                log.info(
                    "sweep: gave %d default rewards, deleted %d decisions past retention",
                    report.defaults_given,
                    report.pruned,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("sweep failed, retrying in %.0f s: %s", period_s, exc)
