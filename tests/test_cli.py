"""The command line: what `serve` and `prune` do with odd settings and inputs, and how
database URLs are shown (tests/e2e/test_migrations.py runs `migrate` with passwords).

Real processes and real SQLite files; every refusal is a message and exit code 2, never a
traceback.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from oo_serving.redact import redact_secrets, redact_url
from tests.conftest import Server
from tests.support import metric, oo_serving


def _score(server: Server, user: str) -> None:
    body = {"user_id": user, "candidates": [{"id": "t1", "content": "c", "source": "s"}]}
    with server.client() as c:
        r = c.post("/score", json=body)
        assert r.status_code == 200, r.text


def test_a_metrics_folder_shared_with_the_database_keeps_the_database(
    server_factory: Any, tmp_path: Path
) -> None:
    """Start-up once emptied OO_METRICS_DIR of every *.db: the database's folder lost it."""
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "oo.db"
    notes = folder / "notes.db"
    sqlite3.connect(notes).execute("CREATE TABLE note (text TEXT)").connection.close()
    env = {"OO_METRICS_DIR": str(folder)}

    first: Server = server_factory(workers=2, db_path=db, env=env)
    _score(first, "kept-user")
    first.stop()
    stale = folder / "counter_999999.db"  # a metrics file of a run long gone
    stale.write_bytes(b"\0" * 8)

    second: Server = server_factory(workers=2, db_path=db, env=env)
    with second.client() as c:
        assert c.get("/stats/kept-user").json()["pulls"] == 1
        # /metrics reads only its own files, not the databases beside them.
        _score(second, "another-user")
        r = c.get("/metrics")
        assert r.status_code == 200, r.text
        assert metric(r.text, "oo_decisions_total") == 1
    second.stop()
    assert db.is_file()
    assert notes.is_file()
    with sqlite3.connect(notes) as conn:
        assert conn.execute("SELECT count(*) FROM note").fetchone() == (0,)
    assert not stale.exists()  # prometheus-client's own files are still cleared


@pytest.mark.parametrize("days", ["inf", "-inf", "nan", "1e300", "1000001", "-1"])
def test_prune_refuses_days_that_are_not_a_sane_finite_number(tmp_path: Path, days: str) -> None:
    """`inf` and `1e300` once ended in a traceback; NaN compares false with any bound."""
    db = tmp_path / "oo.db"
    result = oo_serving("prune", f"--older-than-days={days}", "--database", f"sqlite:///{db}")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Invalid value for '--older-than-days'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not db.exists()  # refused before the database is opened


@pytest.mark.parametrize("days", ["0", "90", "0.5", "1000000"])
def test_prune_takes_any_number_of_days_up_to_the_bound(tmp_path: Path, days: str) -> None:
    result = oo_serving(
        "prune", "--older-than-days", days, "--database", f"sqlite:///{tmp_path}/oo.db"
    )
    assert result.returncode == 0, result.stderr
    assert "deleted 0 decisions" in result.stdout


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (
            "postgresql://oo:s3cretpw@db.internal:5432/oo",
            "postgresql://oo:***@db.internal:5432/oo",
        ),
        ("postgres://oo:s3cretpw@db/oo", "postgres://oo:***@db/oo"),
        ("postgresql://oo@db:5432/oo", "postgresql://oo@db:5432/oo"),  # no password
        ("postgresql://db/oo", "postgresql://db/oo"),
        ("postgresql://:s3cretpw@db/oo", "postgresql://:***@db/oo"),
        ("postgresql://oo:@db/oo", "postgresql://oo:***@db/oo"),
        # `@` percent-encoded, and raw `@` or `/` (which libpq would misread, but quotes)
        ("postgresql://oo:s3cret%40pw@db/oo", "postgresql://oo:***@db/oo"),
        ("postgresql://oo:s3cret@pw@db/oo", "postgresql://oo:***@db/oo"),
        ("postgresql://oo:s3/cret@db/oo", "postgresql://oo:***@db/oo"),
        (
            "postgresql://oo@db/oo?sslmode=require&password=s3cretpw&application_name=x",
            "postgresql://oo@db/oo?sslmode=require&password=***&application_name=x",
        ),
        ("postgresql://oo@db/oo?PassWord=s3cretpw", "postgresql://oo@db/oo?PassWord=***"),
        (
            "postgresql://oo:s3cretpw@db/oo?password=other#x",
            "postgresql://oo:***@db/oo?password=***#x",
        ),
        (
            "postgresql://oo:s3cretpw@[::1:5432/oo",  # malformed: masked all the same
            "postgresql://oo:***@[::1:5432/oo",
        ),
        ("mysql://u:s3cretpw@h/db", "mysql://u:***@h/db"),
        ("sqlite:///./var/oo-serving.db", "sqlite:///./var/oo-serving.db"),
        ("sqlite:////srv/a:b@c/oo.db", "sqlite:////srv/a:b@c/oo.db"),  # a path, not a user
        ("host=db user=oo password=s3cretpw", "host=db user=oo password=***"),
    ],
)
def test_redact_url_masks_the_password_and_keeps_the_rest(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
    assert redact_url(redacted) == redacted


def test_redact_secrets_masks_every_url_in_a_message() -> None:
    message = (
        'error connecting: invalid URI: "postgresql://oo:s3cretpw@[::1/oo"; tried'
        " postgres://a:s3cretpw@b/c and host=h password='s3 cret pw' dbname=x"
    )
    assert redact_secrets(message) == (
        'error connecting: invalid URI: "postgresql://oo:***@[::1/oo"; tried'
        " postgres://a:***@b/c and host=h password=*** dbname=x"
    )


def test_version_prints_the_package_version() -> None:
    from oo_serving import __version__

    done = oo_serving("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"oo-serving {__version__}"
