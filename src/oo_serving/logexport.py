"""The decision log as a file: one row per decision, joined with its reward.

`oo-serving export` writes it as JSON Lines or as Parquet, for offline evaluation of other
policies (pandas, polars, Open Bandit Pipeline); docs/export.md describes every column.
Both formats are written as the store's pages are read, so an export holds at most one
page of decisions (JSON Lines) or one row group (Parquet) in memory, whatever the size of
the log. pyarrow, needed for Parquet only, is imported when a Parquet export starts.

The two formats have the same columns, with the same nesting; they differ in one type:
`ts` is an ISO-8601 string in JSON Lines and a timestamp (milliseconds, UTC) in Parquet.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, BinaryIO

import orjson

from oo_serving.api.schemas import Context, format_ts_ms
from oo_serving.store.base import RAW_FEATURES, DecisionRecord

FORMATS = ("jsonl", "parquet")
"""The formats export_log writes."""

CONTEXT_FIELDS: tuple[str, ...] = tuple(Context.model_fields)
"""The keys of a request's context, in the API's order: the fields of the `context`
struct in Parquet."""

PARQUET_COMPRESSION = "zstd"

ROW_GROUP_BYTES = 64 * 1024 * 1024
"""A Parquet row group is written once it holds this many bytes of Arrow data, even with
fewer than `row_group_rows` decisions: with 1000 candidates (OO_MAX_CANDIDATES' default) a
decision takes 90 to 140 kB, so 10,000 of them would be over a GB."""

_MISSING_PYARROW = "Parquet export needs pyarrow: pip install 'oo-serving[export]'"


def decision_row(d: DecisionRecord) -> dict[str, Any]:
    """One decision as one flat row, the columns in docs/export.md's order.

    `position` is the chosen candidate's index in `candidate_ids`. A decision logged before
    the log kept the candidates' probabilities gets `candidate_p` one-hot on the chosen
    candidate (the serving policy was deterministic then); one logged before it kept the
    raw features gets `candidate_features` null. `context` is null when none was logged.
    `shadow` lists each shadow policy's choice as {policy, position}, by policy name.
    ValueError if the record contradicts itself (the chosen id is not a candidate, or
    the per-candidate arrays do not have one row per candidate).
    """
    n = len(d.candidate_ids)
    try:
        position = d.candidate_ids.index(d.tip_id)
    except ValueError:
        raise ValueError(
            f"decision {d.event_id}: tip_id {d.tip_id!r} is not one of its candidates"
        ) from None
    for name, rows in (
        ("candidate_X", d.candidate_X),
        ("candidate_features", d.candidate_features),
        ("candidate_p", d.candidate_p),
    ):
        if rows is not None and len(rows) != n:
            raise ValueError(
                f"decision {d.event_id}: {name} has {len(rows)} rows for {n} candidates"
            )
    if d.candidate_p is None:
        candidate_p = [0.0] * n
        candidate_p[position] = 1.0
    else:
        candidate_p = [float(p) for p in d.candidate_p.tolist()]
    return {
        "event_id": d.event_id,
        "user_id": d.user_id,
        "seq": int(d.seq),
        "ts": format_ts_ms(d.ts_ms),
        "ts_ms": int(d.ts_ms),
        "policy": d.policy,
        "model_version": int(d.model_version),
        "position": position,
        "tip_id": d.tip_id,
        "propensity": float(d.propensity),
        "score": float(d.score),
        "greedy": None if d.greedy is None else int(d.greedy),
        "reward": None if d.reward is None else float(d.reward),
        "rewarded_ms": None if d.rewarded_ms is None else int(d.rewarded_ms),
        "reward_n": int(d.reward_n),
        "learned": bool(d.learned),
        "reward_source": d.reward_source,
        "context": _context(d.context),
        "features": _raw_features(d.features),
        "n_candidates": n,
        "candidate_ids": list(d.candidate_ids),
        "candidate_p": candidate_p,
        "candidate_features": (
            None
            if d.candidate_features is None
            else [_raw_row(row) for row in d.candidate_features.tolist()]
        ),
        "candidate_x": d.candidate_X.tolist(),
        "shadow": [
            {"policy": name, "position": int(index)} for name, index in sorted(d.shadow.items())
        ],
    }


def _context(context: dict[str, int]) -> dict[str, int] | None:
    """The context with the API's keys first, in its order; None for an empty one."""
    if not context:
        return None
    return {k: context[k] for k in CONTEXT_FIELDS if k in context} | context


def _raw_row(row: list[float]) -> dict[str, Any]:
    """One row of candidate_features (columns RAW_FEATURES) with its fields' own types."""
    hour, overdue, age, priority = row
    return {
        "hour_of_day": int(hour),
        "is_overdue": bool(overdue),
        "task_age_days": float(age),
        "priority": int(priority),
    }


def _raw_features(features: dict[str, int | bool | float]) -> dict[str, Any]:
    """The chosen candidate's logged raw features with the same fields and types as a row
    of candidate_features (a field the row lacks is null)."""
    kinds = {"hour_of_day": int, "is_overdue": bool, "task_age_days": float, "priority": int}
    return {
        name: None if features.get(name) is None else kinds[name](features[name])
        for name in RAW_FEATURES
    }


async def export_log(
    pages: AsyncIterator[list[DecisionRecord]],
    out: BinaryIO,
    fmt: str,
    *,
    row_group_rows: int = 10_000,
) -> int:
    """Write the decisions of `pages` to `out` in format `fmt` (one of FORMATS), as they
    are read; return how many were written.

    jsonl: one JSON object a line (decision_row; a non-finite float is written as null).
    parquet: PARQUET_COMPRESSION-compressed, schema parquet_schema(), a row group every
    `row_group_rows` decisions or ROW_GROUP_BYTES, whichever comes first; only the row
    group being filled is held in memory. An empty log gives an empty file (jsonl) or a
    Parquet file with the schema and no rows.
    The writes to `out` are blocking; `out` is left open (and not flushed).
    ValueError for an unknown format, RuntimeError if Parquet is asked and pyarrow is not
    installed. If this raises once writing has begun, `out` holds part of the log (a Parquet
    one is even closed into a readable file of the row groups written so far): the caller
    must discard it, e.g. by writing to a temporary file renamed only on success.
    """
    if fmt == "jsonl":
        return await _export_jsonl(pages, out)
    if fmt == "parquet":
        if row_group_rows < 1:
            raise ValueError(f"row_group_rows must be at least 1, not {row_group_rows}")
        return await _export_parquet(pages, out, row_group_rows)
    raise ValueError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")


async def _export_jsonl(pages: AsyncIterator[list[DecisionRecord]], out: BinaryIO) -> int:
    rows = 0
    async for page in pages:
        out.write(
            b"".join(orjson.dumps(decision_row(d), option=orjson.OPT_APPEND_NEWLINE) for d in page)
        )
        rows += len(page)
    return rows


def _pyarrow() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet, imported now; RuntimeError if they are not installed.

    They are imported by name: pyarrow ships no type information, and this way the type
    check passes the same with or without it installed.
    """
    try:
        return importlib.import_module("pyarrow"), importlib.import_module("pyarrow.parquet")
    except ImportError as exc:
        raise RuntimeError(_MISSING_PYARROW) from exc


def parquet_schema() -> Any:
    """The Arrow schema of a Parquet export (a pyarrow.Schema); docs/export.md explains it."""
    pa, _ = _pyarrow()
    raw = pa.struct(
        [
            ("hour_of_day", pa.int64()),
            ("is_overdue", pa.bool_()),
            ("task_age_days", pa.float64()),
            ("priority", pa.int64()),
        ]
    )

    def required(name: str, kind: Any) -> Any:
        return pa.field(name, kind, nullable=False)

    return pa.schema(
        [
            required("event_id", pa.string()),
            required("user_id", pa.string()),
            required("seq", pa.int64()),
            required("ts", pa.timestamp("ms", tz="UTC")),
            required("ts_ms", pa.int64()),
            required("policy", pa.string()),
            required("model_version", pa.int64()),
            required("position", pa.int64()),
            required("tip_id", pa.string()),
            required("propensity", pa.float64()),
            required("score", pa.float64()),
            pa.field("greedy", pa.int64()),
            pa.field("reward", pa.float64()),
            pa.field("rewarded_ms", pa.int64()),
            required("reward_n", pa.int64()),
            required("learned", pa.bool_()),
            pa.field("reward_source", pa.string()),
            pa.field("context", pa.struct([(k, pa.int64()) for k in CONTEXT_FIELDS])),
            required("features", raw),
            required("n_candidates", pa.int64()),
            required("candidate_ids", pa.list_(pa.string())),
            required("candidate_p", pa.list_(pa.float64())),
            pa.field("candidate_features", pa.list_(raw)),
            required("candidate_x", pa.list_(pa.list_(pa.float64()))),
            required(
                "shadow", pa.list_(pa.struct([("policy", pa.string()), ("position", pa.int64())]))
            ),
        ]
    )


def _parquet_rows(page: list[DecisionRecord]) -> Iterator[dict[str, Any]]:
    """The page's rows as the Parquet schema takes them: `ts` as Unix milliseconds, and a
    ValueError for a context key the `context` struct has no field for."""
    for d in page:
        row = decision_row(d)
        row["ts"] = row["ts_ms"]
        unknown = sorted(set(d.context) - set(CONTEXT_FIELDS))
        if unknown:
            raise ValueError(
                f"decision {d.event_id}: context keys {unknown} have no Parquet column"
                f" (context has {', '.join(CONTEXT_FIELDS)}); export as jsonl to keep them"
            )
        yield row


async def _export_parquet(
    pages: AsyncIterator[list[DecisionRecord]], out: BinaryIO, row_group_rows: int
) -> int:
    pa, pq = _pyarrow()
    schema = parquet_schema()
    rows = 0
    pending: list[Any] = []  # record batches of the row group being filled
    pending_rows = pending_bytes = 0
    writer = pq.ParquetWriter(out, schema, compression=PARQUET_COMPRESSION)
    try:
        async for page in pages:
            if not page:
                continue
            batch = pa.RecordBatch.from_pylist(list(_parquet_rows(page)), schema=schema)
            pending.append(batch)
            pending_rows += batch.num_rows
            pending_bytes += batch.nbytes
            rows += batch.num_rows
            while pending_rows >= row_group_rows or (
                pending_rows and pending_bytes >= ROW_GROUP_BYTES
            ):
                size = min(pending_rows, row_group_rows)
                table = pa.Table.from_batches(pending, schema=schema)
                writer.write_table(table.slice(0, size), row_group_size=size)
                rest = table.slice(size)
                pending, pending_rows = rest.to_batches(), rest.num_rows
                pending_bytes = sum(b.nbytes for b in pending)
        if pending_rows:
            table = pa.Table.from_batches(pending, schema=schema)
            writer.write_table(table, row_group_size=row_group_rows)
    finally:
        writer.close()
    return rows
