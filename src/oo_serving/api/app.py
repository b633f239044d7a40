"""The application factory. Settings come in; nothing is built at import time."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from oo_serving import __version__
from oo_serving.api import convertors
from oo_serving.api.auth import Access, KeyRing
from oo_serving.api.bodies import Bodies
from oo_serving.api.dashboard import dashboard_router
from oo_serving.api.docs import install_docs
from oo_serving.api.edge import Edge
from oo_serving.api.errors import install_error_handlers
from oo_serving.api.hot import HotRoutes
from oo_serving.api.index import index_router
from oo_serving.api.openapi import install_body_schemas
from oo_serving.api.routes import build_router
from oo_serving.api.schemas import ErrorResponse
from oo_serving.logs import UserIdHasher
from oo_serving.metrics import InstrumentedStore, Metrics
from oo_serving.settings import Settings
from oo_serving.store import open_store
from oo_serving.wiring import background, service_of

DESCRIPTION = """
Picks which tip (one of a user's tasks) the oO app shows next, and learns from what the
user does with it. Policies: `linucb-v1` (the prototype's per-user LinUCB) and
`linucb-v2` (population prior, hour × task interactions, forgetting), one for everyone or
split between users. Durable state, every decision logged with an `event_id`, its
probability and every candidate offered.

Errors are JSON: `{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}`; `loc`
names the field.
"""


class ServingApp(FastAPI):
    """FastAPI, entered through one ASGI layer (`api/edge.py`) that serves /score and
    /reward itself and observes every request; FastAPI serves the rest."""

    edge: Edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.edge(scope, receive, send)

    async def serve_cold(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    ring = KeyRing.load(settings.api_keys.get_secret_value(), settings.api_keys_file)
    access = Access.of(ring, settings.metrics_key.get_secret_value(), ErrorResponse)
    metrics = Metrics()
    store = InstrumentedStore(open_store(settings), metrics)
    service = service_of(settings, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.open()
        try:
            async with background(service, settings):
                yield
        finally:
            await store.close()

    convertors.register()
    app = ServingApp(
        title="oO ML Serving",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # The prototype's clients may send JSON without a Content-Type; read it as JSON.
        strict_content_type=False,
        # /docs and /redoc are served by api/docs.py from local files, never from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    hot = HotRoutes(service, Bodies(settings.max_candidates), ring, metrics)
    app.edge = Edge(
        app.serve_cold,
        hot.routes,
        metrics,
        user_label=UserIdHasher(
            settings.log_hash_key.get_secret_value() or secrets.token_hex(32),
            clear=settings.log_user_ids == "clear",
        ),
        log_requests=settings.access_log,
        max_bytes=settings.max_body_bytes,
    )
    router, body_models = build_router(service, hot, access, metrics)
    app.include_router(router)
    app.include_router(dashboard_router(service, settings, ring))
    install_docs(app)
    app.include_router(index_router(__version__))
    install_body_schemas(app, body_models, access.security_schemes)
    app.state.service = service
    return app


def create_app_from_env() -> FastAPI:
    """For `uvicorn --factory` worker processes: settings from OO_* variables."""
    return create_app(Settings())
