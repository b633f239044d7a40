"""The decision-log export (oo_serving.logexport): every column, in both formats.

The decisions are built by hand, exported to a file, and read back with orjson (JSON
Lines) and pyarrow (Parquet, the `export` extra, which `make install` includes: the
Parquet tests import it and fail without it rather than skip).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import math
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from oo_serving import logexport
from oo_serving.core.features import TaskFeatures, feature_matrix
from oo_serving.logexport import FORMATS, decision_row, export_log, parquet_schema
from oo_serving.store.base import DecisionRecord

TS_NEW = 1796117400123  # 2026-12-01T09:30:00.123Z
TS_OLD = 1796117465007  # 2026-12-01T09:31:05.007Z


def _features(*tasks: TaskFeatures) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.array(tasks, dtype=np.float64).reshape(-1, 4)


TASKS = (
    TaskFeatures(hour_of_day=9, is_overdue=True, task_age_days=2.5, priority=4),
    TaskFeatures(hour_of_day=9, is_overdue=False, task_age_days=0.0, priority=1),
    TaskFeatures(hour_of_day=9, is_overdue=False, task_age_days=40.0, priority=2),
)


def new_decision(**changes: Any) -> DecisionRecord:
    """A decision with everything the log keeps now: 3 candidates, the second chosen by
    exploration (greedy 0), rewarded by the client, two shadow policies."""
    X = feature_matrix(TASKS)
    fields: dict[str, Any] = {
        "user_id": "user-1",
        "seq": 7,
        "event_id": "evt-new",
        "ts_ms": TS_NEW,
        "tip_id": "tip-b",
        "features": TASKS[1].as_dict(),
        "x": X[1],
        "score": 0.75,
        "policy": "linucb-v1",
        "propensity": 0.25,
        "model_version": 5,
        "candidate_ids": ("tip-a", "tip-b", "tip-c"),
        "candidate_X": X,
        "candidate_features": _features(*TASKS),
        "context": {"day_of_week": 2, "hour_of_day": 9},
        "reward": 1.0,
        "rewarded_ms": TS_NEW + 60_000,
        "candidate_p": np.array([0.5, 0.25, 0.25]),
        "greedy": 0,
        "shadow": {"linucb-v2": 2, "greedy-v0": 0},
        "reward_n": 2,
        "learned": True,
        "reward_source": "client",
    }
    fields.update(changes)
    return DecisionRecord(**fields)


def old_decision(**changes: Any) -> DecisionRecord:
    """A decision as the log kept it before candidate_p, raw candidate features and the
    context: 2 candidates, the second chosen, never rewarded."""
    X = feature_matrix(TASKS[:2])
    fields: dict[str, Any] = {
        "user_id": "user-2",
        "seq": 1,
        "event_id": "evt-old",
        "ts_ms": TS_OLD,
        "tip_id": "tip-y",
        "features": TASKS[1].as_dict(),
        "x": X[1],
        "score": -0.5,
        "policy": "linucb-v1",
        "propensity": 1.0,
        "model_version": 0,
        "candidate_ids": ("tip-x", "tip-y"),
        "candidate_X": X,
        "candidate_features": None,
        "context": {},
    }
    fields.update(changes)
    return DecisionRecord(**fields)


def numbered(n: int) -> list[DecisionRecord]:
    return [old_decision(seq=i + 1, event_id=f"evt-{i + 1}") for i in range(n)]


async def pages_of(
    records: Sequence[DecisionRecord], size: int = 16
) -> AsyncIterator[list[DecisionRecord]]:
    for start in range(0, len(records), size):
        yield list(records[start : start + size])


def export(
    records: Sequence[DecisionRecord], path: Path, fmt: str, page: int = 16, **kw: Any
) -> int:
    with path.open("wb") as out:
        return asyncio.run(export_log(pages_of(records, page), out, fmt, **kw))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def pq() -> Any:
    # Imported, not skipped: `make install` includes the export extra, so a missing
    # pyarrow is a broken install that must fail the suite.
    import pyarrow.parquet

    return pyarrow.parquet


NEW_RAW = [
    {"hour_of_day": 9, "is_overdue": True, "task_age_days": 2.5, "priority": 4},
    {"hour_of_day": 9, "is_overdue": False, "task_age_days": 0.0, "priority": 1},
    {"hour_of_day": 9, "is_overdue": False, "task_age_days": 40.0, "priority": 2},
]


def expected_new() -> dict[str, Any]:
    """decision_row(new_decision()), written out by hand (ts as in JSON Lines)."""
    return {
        "event_id": "evt-new",
        "user_id": "user-1",
        "seq": 7,
        "ts": "2026-12-01T09:30:00.123Z",
        "ts_ms": TS_NEW,
        "policy": "linucb-v1",
        "model_version": 5,
        "position": 1,
        "tip_id": "tip-b",
        "propensity": 0.25,
        "score": 0.75,
        "greedy": 0,
        "reward": 1.0,
        "rewarded_ms": TS_NEW + 60_000,
        "reward_n": 2,
        "learned": True,
        "reward_source": "client",
        "context": {"hour_of_day": 9, "day_of_week": 2},
        "features": NEW_RAW[1],
        "n_candidates": 3,
        "candidate_ids": ["tip-a", "tip-b", "tip-c"],
        "candidate_p": [0.5, 0.25, 0.25],
        "candidate_features": NEW_RAW,
        "candidate_x": feature_matrix(TASKS).tolist(),
        "shadow": [{"policy": "greedy-v0", "position": 0}, {"policy": "linucb-v2", "position": 2}],
    }


def expected_old() -> dict[str, Any]:
    return {
        "event_id": "evt-old",
        "user_id": "user-2",
        "seq": 1,
        "ts": "2026-12-01T09:31:05.007Z",
        "ts_ms": TS_OLD,
        "policy": "linucb-v1",
        "model_version": 0,
        "position": 1,
        "tip_id": "tip-y",
        "propensity": 1.0,
        "score": -0.5,
        "greedy": None,
        "reward": None,
        "rewarded_ms": None,
        "reward_n": 0,
        "learned": False,
        "reward_source": None,
        "context": None,
        "features": NEW_RAW[1],
        "n_candidates": 2,
        "candidate_ids": ["tip-x", "tip-y"],
        "candidate_p": [0.0, 1.0],
        "candidate_features": None,
        "candidate_x": feature_matrix(TASKS[:2]).tolist(),
        "shadow": [],
    }


def as_parquet_reads(row: dict[str, Any]) -> dict[str, Any]:
    """An expected JSON Lines row as pyarrow reads the Parquet one: ts as a datetime, and
    context as a struct with every field."""
    ts = dt.datetime.fromtimestamp(row["ts_ms"] / 1000, tz=dt.UTC)
    context = row["context"]
    if context is not None:
        context = {
            "hour_of_day": context.get("hour_of_day"),
            "day_of_week": context.get("day_of_week"),
        }
    return row | {"ts": ts, "context": context}


# ---- decision_row ----


def test_decision_row_of_a_new_decision() -> None:
    row = decision_row(new_decision())
    assert row == expected_new()
    assert list(row) == list(expected_new())  # the documented column order
    assert list(row["context"]) == ["hour_of_day", "day_of_week"]  # the API's order


def test_decision_row_of_an_old_decision_is_one_hot_on_the_chosen() -> None:
    row = decision_row(old_decision())
    assert row == expected_old()
    assert row["candidate_p"][row["position"]] == 1.0
    assert sum(row["candidate_p"]) == 1.0


def test_candidate_p_sums_to_one_and_gives_the_propensity() -> None:
    row = decision_row(new_decision())
    assert math.isclose(sum(row["candidate_p"]), 1.0)
    assert row["candidate_p"][row["position"]] == row["propensity"]
    assert row["candidate_ids"][row["position"]] == row["tip_id"]


def test_decision_row_refuses_a_chosen_id_that_is_not_a_candidate() -> None:
    with pytest.raises(ValueError, match="tip_id 'tip-z' is not one of its candidates"):
        decision_row(new_decision(tip_id="tip-z"))


def test_decision_row_refuses_per_candidate_arrays_of_another_length() -> None:
    with pytest.raises(ValueError, match="candidate_p has 2 rows for 3 candidates"):
        decision_row(new_decision(candidate_p=np.array([0.5, 0.5])))
    with pytest.raises(ValueError, match="candidate_features has 2 rows for 3 candidates"):
        decision_row(new_decision(candidate_features=_features(*TASKS[:2])))


# ---- JSON Lines ----


def test_jsonl_has_one_line_per_decision_with_every_column(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    assert export([new_decision(), old_decision()], path, "jsonl") == 2
    assert path.read_bytes().count(b"\n") == 2
    assert read_jsonl(path) == [expected_new(), expected_old()]


def test_jsonl_writes_a_non_finite_float_as_null(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    export([new_decision(score=float("nan"), reward=float("inf"))], path, "jsonl")
    assert b"NaN" not in path.read_bytes()
    assert b"Infinity" not in path.read_bytes()
    (row,) = read_jsonl(path)
    assert row["score"] is None
    assert row["reward"] is None


def test_jsonl_keeps_a_context_key_outside_the_api(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    export([new_decision(context={"hour_of_day": 9, "season": 3})], path, "jsonl")
    assert read_jsonl(path)[0]["context"] == {"hour_of_day": 9, "season": 3}


def test_empty_jsonl_export_is_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    assert export([], path, "jsonl") == 0
    assert path.read_bytes() == b""


def test_jsonl_keeps_the_order_across_pages(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    assert export(numbered(40), path, "jsonl", page=16) == 40
    assert [row["seq"] for row in read_jsonl(path)] == list(range(1, 41))


# ---- Parquet ----


def test_parquet_has_every_column(tmp_path: Path, pq: Any) -> None:
    path = tmp_path / "log.parquet"
    assert export([new_decision(), old_decision()], path, "parquet") == 2
    table = pq.read_table(path)
    assert table.schema.equals(parquet_schema())
    assert table.to_pylist() == [as_parquet_reads(expected_new()), as_parquet_reads(expected_old())]


def test_parquet_column_types(tmp_path: Path, pq: Any) -> None:
    path = tmp_path / "log.parquet"
    export([new_decision()], path, "parquet")
    schema = pq.read_schema(path)
    assert str(schema.field("ts").type) == "timestamp[ms, tz=UTC]"
    assert str(schema.field("context").type) == "struct<hour_of_day: int64, day_of_week: int64>"
    assert str(schema.field("shadow").type) == (
        "list<element: struct<policy: string, position: int64>>"
    )
    assert str(schema.field("candidate_x").type) == "list<element: list<element: double>>"
    assert not schema.field("propensity").nullable
    assert schema.field("reward").nullable
    assert schema.field("candidate_features").nullable


def test_parquet_is_compressed_with_zstd(tmp_path: Path, pq: Any) -> None:
    path = tmp_path / "log.parquet"
    export([new_decision()], path, "parquet")
    meta = pq.ParquetFile(path).metadata
    codecs = {meta.row_group(0).column(i).compression for i in range(meta.num_columns)}
    assert codecs == {"ZSTD"}


def test_parquet_probabilities_and_one_hot(tmp_path: Path, pq: Any) -> None:
    path = tmp_path / "log.parquet"
    export([new_decision(), old_decision()], path, "parquet")
    new, old = pq.read_table(path).to_pylist()
    assert math.isclose(sum(new["candidate_p"]), 1.0)
    assert new["candidate_p"][new["position"]] == new["propensity"] == 0.25
    assert old["candidate_p"] == [0.0, 1.0]
    assert old["reward"] is None
    assert old["candidate_features"] is None
    assert old["context"] is None
    assert new["context"] == {"hour_of_day": 9, "day_of_week": 2}
    assert new["shadow"] == [
        {"policy": "greedy-v0", "position": 0},
        {"policy": "linucb-v2", "position": 2},
    ]
    assert new["candidate_features"] == NEW_RAW


def test_empty_parquet_export_has_the_schema_and_no_row(tmp_path: Path, pq: Any) -> None:
    path = tmp_path / "log.parquet"
    assert export([], path, "parquet") == 0
    table = pq.read_table(path)
    assert table.num_rows == 0
    assert table.schema.equals(parquet_schema())
    assert pq.ParquetFile(path).num_row_groups == 0


def test_parquet_writes_a_row_group_every_row_group_rows(tmp_path: Path, pq: Any) -> None:
    path = tmp_path / "log.parquet"
    assert export(numbered(25), path, "parquet", page=16, row_group_rows=10) == 25
    file = pq.ParquetFile(path)
    assert file.num_row_groups == 3
    sizes = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
    assert sizes == [10, 10, 5]
    assert pq.read_table(path).column("seq").to_pylist() == list(range(1, 26))


def test_parquet_writes_a_row_group_once_it_holds_row_group_bytes(
    tmp_path: Path, pq: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decisions with many candidates: the byte bound closes the row groups first."""
    monkeypatch.setattr(logexport, "ROW_GROUP_BYTES", 1)
    path = tmp_path / "log.parquet"
    assert export(numbered(40), path, "parquet", page=16) == 40
    file = pq.ParquetFile(path)
    sizes = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
    assert sizes == [16, 16, 8]
    assert pq.read_table(path).column("seq").to_pylist() == list(range(1, 41))


def test_parquet_row_groups_are_written_while_the_pages_are_read(pq: Any) -> None:
    """Each row group reaches `out` as soon as it is full, before the next pages are read:
    the export never holds more than one row group."""
    out = io.BytesIO()
    written_before_page: list[int] = []

    async def pages() -> AsyncIterator[list[DecisionRecord]]:
        records = numbered(30)
        for start in range(0, 30, 5):
            written_before_page.append(len(out.getvalue()))
            yield records[start : start + 5]

    assert asyncio.run(export_log(pages(), out, "parquet", row_group_rows=10)) == 30
    # pages 0-1 fill row group 1, written before page 2 is asked for; page 3 completes
    # row group 2, written before page 4.
    header = written_before_page[0]
    assert written_before_page[2] > written_before_page[1] == header
    assert written_before_page[4] > written_before_page[3] == written_before_page[2]
    assert pq.ParquetFile(io.BytesIO(out.getvalue())).num_row_groups == 3


def test_parquet_refuses_a_context_key_it_has_no_column_for(tmp_path: Path, pq: Any) -> None:
    with pytest.raises(ValueError, match=r"context keys \['season'\] have no Parquet column"):
        export([new_decision(context={"hour_of_day": 9, "season": 3})], tmp_path / "x", "parquet")


def test_parquet_without_pyarrow_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(RuntimeError) as info:
        export([new_decision()], tmp_path / "log.parquet", "parquet")
    assert str(info.value) == "Parquet export needs pyarrow: pip install 'oo-serving[export]'"


# ---- arguments ----


def test_formats() -> None:
    assert FORMATS == ("jsonl", "parquet")


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown export format 'csv': one of jsonl, parquet"):
        export([new_decision()], tmp_path / "log.csv", "csv")


def test_row_group_rows_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="row_group_rows must be at least 1, not 0"):
        export([new_decision()], tmp_path / "log.parquet", "parquet", row_group_rows=0)
