"""The OpenAPI schema of the bodies that FastAPI does not parse itself.

/score and /reward read their bodies in `api/bodies.py`, not through FastAPI, so their
operations declare the request model by reference (`json_body`), and `install_body_schemas`
adds the models' schemas to the components, with the security schemes that operations
name. The schema a client reads states every constraint, as if FastAPI had parsed them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra that declares `model` as the JSON request body."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install_body_schemas(
    app: FastAPI, models: list[type[BaseModel]], security_schemes: dict[str, Any]
) -> None:
    """Add the models that `json_body` declared, and the security schemes that routes name
    in their openapi_extra, to the app's OpenAPI components.

    Their nested models go in under `<name>-Input`, apart from FastAPI's own schemas of the
    same models as responses, where fields with defaults are shown as always present.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}-Input")
            for name, definition in body.pop("$defs", {}).items():
                components[f"{name}-Input"] = definition
            components[model.__name__] = body
        if security_schemes:
            schema["components"]["securitySchemes"] = security_schemes
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
