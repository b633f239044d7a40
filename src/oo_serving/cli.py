"""The `oo-serving` command: serve, migrate.

Every flag has an OO_* environment variable; a flag given wins over the variable.
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError

from oo_serving.errors import SchemaError, StoreUnavailable
from oo_serving.settings import Settings
from oo_serving.store import open_store

app = typer.Typer(
    name="oo-serving",
    help="oO ML Serving: pick the next tip to show, learn from what the user does.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DatabaseOption = Annotated[
    str | None,
    typer.Option("--database", help="sqlite:///path.db [env: OO_DATABASE_URL]", show_default=False),
]


def _settings(**overrides: Any) -> Settings:
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _export(settings: Settings) -> None:
    """Put the resolved settings where worker processes will read them."""
    for name, value in settings.model_dump().items():
        os.environ[f"OO_{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )


async def _migrate(settings: Settings) -> None:
    store = open_store(settings)
    await store.open()  # applies pending migrations, refuses a newer schema
    await store.close()


def _migrate_or_exit(settings: Settings) -> None:
    try:
        asyncio.run(_migrate(settings))
    except (SchemaError, StoreUnavailable, ValueError) as exc:
        typer.echo(f"oo-serving: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="[env: OO_HOST] default 127.0.0.1", show_default=False)
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="[env: OO_PORT] default 8000", show_default=False)
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="[env: OO_WORKERS] default 1", show_default=False)
    ] = None,
    database: DatabaseOption = None,
) -> None:
    """Serve the HTTP API."""
    settings = _settings(host=host, port=port, workers=workers, database_url=database)
    _migrate_or_exit(settings)
    _export(settings)
    uvicorn.run(
        "oo_serving.api.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=settings.access_log,
        loop="uvloop",
        http="httptools",
    )


@app.command()
def migrate(database: DatabaseOption = None) -> None:
    """Create or upgrade the database schema; a no-op when it is current."""
    settings = _settings(database_url=database)
    _migrate_or_exit(settings)
    typer.echo(f"oo-serving: schema of {settings.database_url} is current")


def main() -> None:
    app()
