"""The reads of `oo-serving check`, each statement written once for both dialects.

A backend's `check` hands `scan` a function that runs one statement and returns its rows;
`scan` reads every model and decision in keyset pages ordered by primary key, so memory
stays bounded by a page whatever the database's size, and runs each cross-table check as
one aggregate statement. Every statement is a plain SELECT run on its own: each sees one
consistent snapshot, none takes a write lock, and none holds a snapshot longer than
itself, so a check can run beside a serving process. The per-row judgements are the
pure functions of `oo_serving.check`.

Statements are written with `?` placeholders; PostgreSQL's `%s` is put in by `Dialect`.
Row values (`(user_id, seq) > (?, ?)`) and window functions exist in both (SQLite 3.25+).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from oo_serving.check import MAX_EXAMPLES, CheckReport, check_decision, check_model

MODEL_PAGE = 1000
"""Model rows per page: about 250 bytes each for linucb-v1 (d = 5), 1.2 kB for
linucb-v2 (d = 11)."""

DECISION_PAGE = 200
"""Decision rows per page. A decision holds up to OO_MAX_CANDIDATES candidates (each an id
of up to 256 characters, its vector, 88 bytes at d = 11, and its 32 bytes of raw
features), so a page of 200 stays under ~80 MB even at the limits, and is a few hundred
kB for a typical log."""

Rows = Sequence[Sequence[Any]]
Fetch = Callable[[str, tuple[Any, ...]], Awaitable[Rows]]


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the backends for these reads.

    placeholder: the driver's parameter marker; json_as_text: SQLite keeps `features`,
    `candidate_ids`, `context` and `shadow` as JSON text, PostgreSQL as jsonb and text[]
    (decoded by the driver). `learned` is an integer 0/1 on SQLite, a boolean on
    PostgreSQL; the rules accept either.
    """

    placeholder: str
    json_as_text: bool

    def sql(self, statement: str) -> str:
        return statement.replace("?", self.placeholder)


SQLITE = Dialect(placeholder="?", json_as_text=True)
POSTGRES = Dialect(placeholder="%s", json_as_text=False)

_MODEL_COLUMNS = "user_id, policy, state, state_version, pulls, reward_count, cumulative_reward"
_FIRST_MODELS = f"SELECT {_MODEL_COLUMNS} FROM user_model ORDER BY user_id LIMIT ?"
_NEXT_MODELS = f"SELECT {_MODEL_COLUMNS} FROM user_model WHERE user_id > ? ORDER BY user_id LIMIT ?"
_DECISION_COLUMNS = (
    "user_id, seq, policy, tip_id, features, x, score, propensity, candidate_ids,"
    " candidate_x, candidate_features, context, reward, rewarded_ms, candidate_p, greedy,"
    " shadow, reward_n, learned, learned_at, reward_source"
)
_FIRST_DECISIONS = f"SELECT {_DECISION_COLUMNS} FROM decision ORDER BY user_id, seq LIMIT ?"
_NEXT_DECISIONS = (
    f"SELECT {_DECISION_COLUMNS} FROM decision WHERE (user_id, seq) > (?, ?)"
    " ORDER BY user_id, seq LIMIT ?"
)

# Each cross-table check: one statement answering, for at most ? users in user_id order,
# (user_id, the total count over every user). No row: nothing found.
_PER_USER = "SELECT user_id, sum(n) OVER () FROM ({}) per_user ORDER BY user_id LIMIT ?"
_AGGREGATES: tuple[tuple[str, str], ...] = (
    (
        "decision_without_model",
        _PER_USER.format(
            "SELECT d.user_id, count(*) AS n FROM decision d WHERE NOT EXISTS"
            " (SELECT 1 FROM user_model m WHERE m.user_id = d.user_id AND m.state IS NOT NULL)"
            " GROUP BY d.user_id"
        ),
    ),
    (
        "decision_seq_out_of_range",
        _PER_USER.format(
            "SELECT d.user_id, count(*) AS n FROM decision d JOIN user_model m"
            " ON m.user_id = d.user_id AND m.state IS NOT NULL"  # an unfilled row: counted above
            " WHERE d.seq < 1 OR d.seq > m.pulls GROUP BY d.user_id"
        ),
    ),
    (
        "decision_duplicate_seq",
        _PER_USER.format(
            "SELECT user_id, sum(c) AS n FROM (SELECT user_id, count(*) AS c FROM decision"
            " GROUP BY user_id, seq HAVING count(*) > 1) dup GROUP BY user_id"
        ),
    ),
    (
        "decision_duplicate_event_id",
        _PER_USER.format(
            "SELECT user_id, sum(c) AS n FROM (SELECT user_id, count(*) AS c FROM decision"
            " GROUP BY user_id, event_id HAVING count(*) > 1) dup GROUP BY user_id"
        ),
    ),
)
_AGGREGATE_DETAILS = {
    "decision_without_model": "no user_model row, or an unfilled one",
    "decision_seq_out_of_range": "seq below 1 or above the user's pulls",
    "decision_duplicate_seq": "decisions sharing their user's seq",
    "decision_duplicate_event_id": "decisions sharing their user's event_id",
}


async def scan(
    report: CheckReport,
    fetch: Fetch,
    dialect: Dialect,
    *,
    model_page: int = MODEL_PAGE,
    decision_page: int = DECISION_PAGE,
    summed_rewards: bool = False,
) -> None:
    """Read every model and decision, and run the cross-table checks, into `report`.

    summed_rewards: rewards are summed per decision (OO_REWARD_AGGREGATION=sum), so a
    decision's reward is bounded by its reward_n and a user's total by nothing.
    """
    report.summed_rewards = summed_rewards
    if summed_rewards:
        report.skipped["cumulative_reward_bound"] = (
            "rewards are summed (OO_REWARD_AGGREGATION=sum): a user's cumulative_reward"
            " may exceed reward_count"
        )
    await _scan_models(report, fetch, dialect, model_page, summed_rewards)
    await _scan_decisions(report, fetch, dialect, decision_page, summed_rewards)
    for kind, statement in _AGGREGATES:
        rows = await fetch(dialect.sql(statement), (MAX_EXAMPLES,))
        if rows:
            examples = [str(r[0]) for r in rows]
            report.add(kind, int(rows[0][1]), examples, _AGGREGATE_DETAILS[kind])


async def _scan_models(
    report: CheckReport, fetch: Fetch, dialect: Dialect, page: int, summed: bool
) -> None:
    rows = await fetch(dialect.sql(_FIRST_MODELS), (page,))
    while rows:
        for user_id, policy, state, version, pulls, reward_count, cumulative in rows:
            problems = check_model(
                policy, state, version, pulls, reward_count, cumulative, summed=summed
            )
            report.record(user_id, problems)
        report.models += len(rows)
        if len(rows) < page:
            break
        rows = await fetch(dialect.sql(_NEXT_MODELS), (rows[-1][0], page))


async def _scan_decisions(
    report: CheckReport, fetch: Fetch, dialect: Dialect, page: int, summed: bool
) -> None:
    rows = await fetch(dialect.sql(_FIRST_DECISIONS), (page,))
    while rows:
        for r in rows:
            features, candidate_ids, context, shadow = r[4], r[8], r[11], r[16]
            if dialect.json_as_text:
                features, candidate_ids = _json(features), _json(candidate_ids)
                context = None if context is None else _json(context)
                shadow = None if shadow is None else _json(shadow)
            problems = check_decision(
                policy=r[2], tip_id=r[3], features=features, x=r[5], score=r[6],
                propensity=r[7], candidate_ids=candidate_ids, candidate_x=r[9],
                candidate_features=r[10], context=context, reward=r[12], rewarded_ms=r[13],
                candidate_p=r[14], greedy=r[15], shadow=shadow, reward_n=r[17],
                learned=r[18], learned_at=r[19], reward_source=r[20], summed=summed,
            )  # fmt: skip
            report.record(r[0], problems, f"seq {r[1]}")
        report.decisions += len(rows)
        if len(rows) < page:
            break
        rows = await fetch(dialect.sql(_NEXT_DECISIONS), (rows[-1][0], rows[-1][1], page))


_NOT_JSON = object()
"""What unreadable JSON text parses to: a value no JSON column may hold, NULL included."""


def _json(text: object) -> object:
    """Parsed JSON text; _NOT_JSON when it is not JSON text."""
    if not isinstance(text, str | bytes):
        return _NOT_JSON
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _NOT_JSON
