"""Every policy the service can run, by name, and how to make one with its settings.

A policy's settings are its dataclass fields; `make("linucb-v2", alpha=0.2)` checks them.
Adding a policy is one module in core/ and one line here; the per-policy test module
(tests/core/test_policies.py) then runs every shared check on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from oo_serving.core.linucb_v1 import LinUCBV1
from oo_serving.core.linucb_v2 import LinUCBV2
from oo_serving.core.policy import Policy

_CLASSES: Mapping[str, type[Any]] = MappingProxyType(
    {LinUCBV1.name: LinUCBV1, LinUCBV2.name: LinUCBV2}
)
NAMES: tuple[str, ...] = tuple(_CLASSES)

DEFAULTS: Mapping[str, Policy] = MappingProxyType({name: cls() for name, cls in _CLASSES.items()})
"""Each policy with its default settings: what decodes and checks stored states."""


def parameters(name: str) -> dict[str, float]:
    """The settings `name` takes, with their defaults."""
    cls = _class(name)
    return {f.name: float(f.default) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def make(name: str, **settings: float) -> Policy:
    """The policy `name` with `settings` (the rest default); ValueError names what is wrong."""
    cls = _class(name)
    known = parameters(name)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(
            f"{name} has no setting {', '.join(unknown)}; its settings: {', '.join(known) or 'none'}"
        )
    policy: Policy = cls(**{k: float(v) for k, v in settings.items()})
    return policy


def _class(name: str) -> type[Any]:
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"no policy {name!r}; policies: {', '.join(NAMES)}") from None
