"""The application factory. Settings come in; nothing is built at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from oo_serving import __version__
from oo_serving.api.body_limit import BodyLimitMiddleware
from oo_serving.api.errors import install_error_handlers
from oo_serving.api.routes import build_router, install_body_schemas
from oo_serving.service import Service
from oo_serving.settings import Settings
from oo_serving.store import open_store

DESCRIPTION = """
Picks which tip (one of a user's tasks) the oO app shows next, and learns from what the
user does with it. Per-user LinUCB (`linucb-v1`), durable state, every decision logged
with an `event_id` and its probability.

Errors are JSON: `{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}`; `loc`
names the field.
"""


def create_app(settings: Settings) -> FastAPI:
    store = open_store(settings)
    service = Service(
        store,
        history_size=settings.history_size,
        decision_log_per_user=settings.decision_log_per_user,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.open()
        try:
            yield
        finally:
            await store.close()

    app = FastAPI(
        title="oO ML Serving",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # The prototype's clients may send JSON without a Content-Type; read it as JSON.
        strict_content_type=False,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    router, body_models = build_router(service, settings.max_candidates)
    app.include_router(router)
    install_body_schemas(app, body_models)
    app.state.service = service
    return app


def create_app_from_env() -> FastAPI:
    """For `uvicorn --factory` worker processes: settings from OO_* variables."""
    return create_app(Settings())
