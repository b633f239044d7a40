"""The JSON document, the terminal report and the HTML page of `oo-serving evaluate`."""

from __future__ import annotations

import base64
import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from oo_serving.evaluation.render import table, to_json, write_html
from oo_serving.evaluation.result import (
    ESTIMATORS,
    Checkpoint,
    Difference,
    Estimate,
    EvaluationResult,
    Histogram,
    Verdict,
)

FIRST_TS_MS = 1_714_564_800_000  # 2024-05-01 12:00:00 UTC
LAST_TS_MS = 1_714_737_600_500  # 2024-05-03 12:00:00.500 UTC
NOT_ENOUGH = "not enough events to evaluate: 312 read, about 2,000 needed"
VERDICT = "greedy is better than logging; uniform is undecided"
TOP_KEYS = {
    "events",
    "users",
    "estimates",
    "verdict",
    "enough",
    "alpha",
    "first_ts",
    "last_ts",
    "differences",
    "verdicts",
    "agreement",
    "skipped",
}


def base_value(policy: str) -> float:
    """A distinct true value per policy, so rows can be told apart."""
    return {"logging": 0.3, "uniform": 0.25, "greedy": 0.3412}.get(policy, 0.2876)


def estimate(policy: str, estimator: str, events: int) -> Estimate:
    """An estimate whose interval narrows with `events` (the CS unbounded below 200)."""
    value = base_value(policy) + 0.001 * ESTIMATORS.index(estimator)
    half = 1.0 / math.sqrt(events)
    cs_half = math.inf if events < 200 else 2.5 * half
    return Estimate(
        policy=policy,
        estimator=estimator,
        value=value,
        ci_low=value - half,
        ci_high=value + half,
        cs_low=value - cs_half,
        cs_high=value + cs_half,
        ess=float(events) if policy == "logging" else events / 3.0,
    )


def difference(policy: str, estimator: str, events: int) -> Difference:
    """value(policy) − value(logging) with intervals narrowing with `events`."""
    value = base_value(policy) - base_value("logging")
    half = 0.5 / math.sqrt(events)
    cs_half = math.inf if events < 200 else 2.5 * half
    return Difference(
        policy=policy,
        estimator=estimator,
        value=value,
        ci_low=value - half,
        ci_high=value + half,
        cs_low=value - cs_half,
        cs_high=value + cs_half,
    )


def make_result(
    *,
    enough: bool = True,
    targets: tuple[str, ...] = ("uniform", "greedy"),
    alpha: float = 0.05,
    events: int = 1000,
    checkpoints: int = 10,
    propensities: bool = True,
) -> EvaluationResult:
    """A result as the estimators would make it, built by hand."""
    if not enough:
        return EvaluationResult(
            events=312,
            users=7,
            alpha=alpha,
            enough=False,
            verdict=NOT_ENOUGH,
            first_ts_ms=FIRST_TS_MS,
            last_ts_ms=LAST_TS_MS,
            skipped={"no_reward": 40},
        )
    policies = ("logging", *targets)

    def at(n: int) -> tuple[tuple[Estimate, ...], tuple[Difference, ...]]:
        estimates = tuple(estimate(p, name, n) for p in policies for name in ESTIMATORS)
        differences = tuple(difference(p, name, n) for p in targets for name in ESTIMATORS)
        return estimates, differences

    estimates, differences = at(events)
    step = events // max(checkpoints, 1)
    marks = [step * (k + 1) for k in range(checkpoints)]
    return EvaluationResult(
        events=events,
        users=100,
        alpha=alpha,
        enough=True,
        verdict=VERDICT,
        first_ts_ms=FIRST_TS_MS,
        last_ts_ms=LAST_TS_MS,
        estimates=estimates,
        differences=differences,
        checkpoints=tuple(
            Checkpoint(FIRST_TS_MS + 1000 * n, n, *at(n)) for n in marks if n <= events
        ),
        verdicts=tuple(
            Verdict(p, f"{p}: undecided after {events} events", False, None, 4000) for p in targets
        ),
        propensities=Histogram(edges=(0.0, 0.25, 0.5, 0.75, 1.0), counts=(10, 200, 500, 290))
        if propensities
        else None,
        agreement={p: 0.5 for p in targets},
        skipped={"no_reward": 40, "no_candidates": 2},
    )


# ── JSON ───────────────────────────────────────────────────────────────────────


def test_to_json_shape_types_and_round_trip() -> None:
    result = make_result()
    doc = to_json(result)
    assert list(doc)[:4] == ["events", "users", "estimates", "verdict"]
    assert set(doc) == TOP_KEYS
    assert (doc["events"], doc["users"], doc["verdict"]) == (1000, 100, VERDICT)
    assert doc["enough"] is True
    assert doc["alpha"] == 0.05
    assert doc["first_ts"] == "2024-05-01T12:00:00.000Z"
    assert doc["last_ts"] == "2024-05-03T12:00:00.500Z"
    assert len(doc["estimates"]) == 3 * len(ESTIMATORS)
    for item, e in zip(doc["estimates"], result.estimates, strict=True):
        assert list(item)[:6] == ["policy", "estimator", "value", "ci_low", "ci_high", "ess"]
        assert set(item) == {*list(item)[:6], "cs_low", "cs_high"}
        assert (item["policy"], item["estimator"]) == (e.policy, e.estimator)
        assert item["estimator"] in ESTIMATORS
        for key in ("value", "ci_low", "ci_high", "ess", "cs_low", "cs_high"):
            assert isinstance(item[key], float)
            assert item[key] == getattr(e, key)
    assert {(d["policy"], d["estimator"]) for d in doc["differences"]} == {
        (p, name) for p in ("uniform", "greedy") for name in ESTIMATORS
    }
    assert doc["verdicts"][0] == {
        "policy": "uniform",
        "text": "uniform: undecided after 1000 events",
        "decided": False,
        "better": None,
        "events_needed": 4000,
    }
    assert doc["agreement"] == {"uniform": 0.5, "greedy": 0.5}
    assert doc["skipped"] == {"no_reward": 40, "no_candidates": 2}
    assert orjson.loads(orjson.dumps(doc)) == doc


def test_to_json_maps_non_finite_numbers_to_null() -> None:
    result = make_result()
    broken = replace(result.estimates[0], value=math.nan, cs_low=-math.inf, cs_high=math.inf)
    gap = replace(result.differences[0], ci_low=math.nan, cs_high=math.inf)
    result = replace(
        result,
        estimates=(broken, *result.estimates[1:]),
        differences=(gap, *result.differences[1:]),
        agreement={"uniform": math.nan},
    )
    doc = to_json(result)
    first = doc["estimates"][0]
    assert (first["value"], first["cs_low"], first["cs_high"]) == (None, None, None)
    assert isinstance(first["ci_low"], float)
    assert (doc["differences"][0]["ci_low"], doc["differences"][0]["cs_high"]) == (None, None)
    assert doc["agreement"] == {"uniform": None}
    text = json.dumps(doc, allow_nan=False)  # would raise on any NaN or infinity left
    assert json.loads(text) == orjson.loads(orjson.dumps(doc)) == doc


def test_to_json_when_not_enough() -> None:
    doc = to_json(replace(make_result(enough=False), first_ts_ms=None, last_ts_ms=None))
    assert doc["enough"] is False
    assert doc["estimates"] == doc["differences"] == doc["verdicts"] == []
    assert doc["verdict"] == NOT_ENOUGH
    assert doc["first_ts"] is None
    assert doc["last_ts"] is None
    assert orjson.loads(orjson.dumps(doc)) == doc


# ── terminal ───────────────────────────────────────────────────────────────────


def row_of(text: str, policy: str, estimator: str) -> str:
    """The one line of `text` that starts with `policy` then `estimator`."""
    lines = [
        line for line in text.splitlines() if re.match(rf"{re.escape(policy)} +{estimator} ", line)
    ]
    assert len(lines) >= 1, (policy, estimator, text)
    return lines[0]


def test_table_shows_every_row_aligned_and_the_verdict() -> None:
    result = make_result(targets=("uniform", "greedy", "linucb-v2"))
    text = table(result)
    lines = text.splitlines()
    assert lines[0] == "1,000 events · 100 users · 2024-05-01 12:00:00 → 2024-05-03 12:00:00 UTC"
    assert "no_candidates 2" in text
    header = next(line for line in lines if line.startswith("policy") and "ESS" in line)
    assert re.search(r"value +95% CI +anytime 95% CS +ESS$", header)
    for e in result.estimates:
        row = row_of(text, e.policy, e.estimator)
        assert f"{e.value:.4f}" in row
        assert f"[{e.ci_low:.4f}, {e.ci_high:.4f}]" in row
        assert f"[{e.cs_low:.4f}, {e.cs_high:.4f}]" in row
        assert len(row) == len(header)  # right-aligned to the same width
    assert "0.3412" in row_of(text, "greedy", "ips")  # 4 decimals
    assert "+0.0412" in text  # greedy − logging
    assert "50.0%" in text  # agreement
    # One line per policy, each said once: not again as the joined summary.
    assert "\nverdict:\n" in text
    assert "linucb-v2: undecided after 1000 events" in text
    assert VERDICT not in text
    for v in result.verdicts:
        assert f"  {v.text}" in lines
    assert text.endswith("\n")


def test_table_names_the_level_from_alpha_and_marks_unbounded_and_missing() -> None:
    result = make_result(alpha=0.1)
    nan = replace(result.estimates[0], value=math.nan, cs_low=-math.inf, cs_high=math.inf)
    text = table(replace(result, estimates=(nan, *result.estimates[1:])))
    assert "90% CI" in text
    assert "anytime 90% CS" in text
    assert "95%" not in text
    row = row_of(text, "logging", "ips")
    assert "n/a" in row
    assert "[−∞, +∞]" in row


def test_table_when_not_enough_has_header_and_verdict_only() -> None:
    text = table(make_result(enough=False))
    assert text.splitlines()[0].startswith("312 events · 7 users · 2024-05-01 12:00:00")
    assert NOT_ENOUGH in text
    assert "ESS" not in text
    assert "CI" not in text
    for name in ESTIMATORS:
        assert not re.search(rf"\b{name}\b", text)
    assert not re.search(r"\d\.\d{4}", text)


# ── page ───────────────────────────────────────────────────────────────────────


def images(page: str) -> list[bytes]:
    """The PNGs the page carries, decoded."""
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [base64.b64decode(data) for data in found]


def assert_self_contained(page: str) -> None:
    assert 'src="http' not in page
    assert 'href="http' not in page
    assert "://" not in page
    assert "<link" not in page
    assert "<script" not in page


def test_write_html_is_self_contained_with_three_pictures(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(make_result(), path, command="oo-serving evaluate --db 'a<b' --html report.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "greedy: undecided after" in page
    assert "oo-serving evaluate --db &#x27;a&lt;b&#x27; --html report.html" in page
    pictures = images(page)
    assert len(pictures) == 3
    assert page.count("data:image/png;base64,") == 3
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pictures)
    assert_self_contained(page)
    for text in ("IPS", "SNIPS", "DR", "anytime-valid", "ESS", "anytime 95% CS", "0.3412"):
        assert text in page
    assert "uniform: undecided after 1000 events" in page


def test_write_html_escapes_policy_names(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(make_result(targets=("<b>evil</b>", "greedy")), path)
    page = path.read_text(encoding="utf-8")
    assert "&lt;b&gt;evil&lt;/b&gt;" in page
    assert "<b>evil" not in page
    assert len(images(page)) == 3


def test_write_html_draws_from_the_final_figures_without_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(make_result(checkpoints=0), path)
    assert len(images(path.read_text(encoding="utf-8"))) == 3
    write_html(make_result(propensities=False), path)
    assert len(images(path.read_text(encoding="utf-8"))) == 2


def test_write_html_when_not_enough_has_no_pictures(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(make_result(enough=False), path, command="oo-serving evaluate")
    page = path.read_text(encoding="utf-8")
    assert NOT_ENOUGH in page
    assert "too small" in page
    assert "data:image/png;base64," not in page
    assert "<table" not in page
    assert "<pre>oo-serving evaluate</pre>" in page
    assert_self_contained(page)


def test_write_html_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    path = tmp_path / "report.html"
    with pytest.raises(RuntimeError, match=re.escape("pip install 'oo-serving[report]'")):
        write_html(make_result(), path)
    assert not path.exists()
    write_html(make_result(enough=False), path)  # nothing to draw: no matplotlib needed
    assert NOT_ENOUGH in path.read_text(encoding="utf-8")
