"""Every setting of the service: one class, read from flags and OO_* variables.

Built once, by the CLI or the app factory, never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./var/oo-serving.db"


class Settings(BaseSettings):
    """Each field is also the environment variable OO_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="OO_", frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    workers: int = Field(1, ge=1, le=64, description="Worker processes sharing the database.")
    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="sqlite:///relative.db, sqlite:////absolute.db (folder created), or"
        " postgresql://user@host:port/dbname.",
    )
    policy: str = Field(
        "linucb-v1",
        description="The policy serving every user: linucb-v1 (the prototype's) or linucb-v2"
        " (population prior, hour × task interactions, forgetting).",
    )
    policy_split: str = Field(
        "",
        description="Split users between policies by a stable hash of the user id, e.g."
        " linucb-v1:50,linucb-v2:50 (weights are shares); overrides OO_POLICY. Empty: no split.",
    )
    linucb_v2_alpha: float = Field(
        0.3, ge=0, le=100, description="linucb-v2: exploration α (the bonus α·sqrt(xᵀA⁻¹x))."
    )
    linucb_v2_prior_weight: float = Field(
        3.0,
        gt=0,
        le=1e6,
        description="linucb-v2: λ, how many rewards' worth the population's weights count for"
        " on the five base features.",
    )
    linucb_v2_interaction_prior_weight: float = Field(
        30.0,
        gt=0,
        le=1e6,
        description="linucb-v2: λ on the six hour × task interactions (larger: the population,"
        " not each user, learns them).",
    )
    linucb_v2_discount: float = Field(
        0.99,
        gt=0,
        le=1,
        description="linucb-v2: γ, each reward multiplies a user's earlier evidence by γ"
        " (1: never forget).",
    )
    linucb_v2_population_ridge: float = Field(
        1.0, gt=0, le=1e6, description="linucb-v2: ridge of the population's own regression."
    )
    population_refresh_s: float = Field(
        1.0,
        ge=0.1,
        le=3600,
        description="How often each worker writes the population statistics it learned and"
        " re-reads everyone's (linucb-v2's prior).",
    )
    exploration: str = Field(
        "none",
        description="none: always the policy's own choice; epsilon:<ε>, e.g. epsilon:0.1:"
        " with probability ε a uniformly drawn candidate instead. Every decision logs each"
        " candidate's exact probability.",
    )
    shadow_policies: str = Field(
        "",
        description="Policies that also choose on every /score without affecting the answer,"
        " and learn from every reward, e.g. linucb-v2 (comma-separated). Empty: none.",
    )
    reward_wait: str = Field(
        "24h",
        description="The reward window: a reward for a decision older than this (e.g. 30m,"
        " 24h, 7d) is stored but not learned.",
    )
    default_reward: float | None = Field(
        None,
        ge=-1e6,
        le=1e6,
        description="The reward `oo-serving sweep` gives each decision not rewarded within"
        " the window. Empty: none (such decisions stay unrewarded).",
    )
    reward_aggregation: Literal["first", "latest", "sum", "max"] = Field(
        "first",
        description="Several rewards for one decision: keep the first, the latest, their"
        " sum or their max; the model is corrected exactly when the kept value changes.",
    )
    log_retention_days: float = Field(
        30.0,
        gt=0,
        le=36_500,
        description="`oo-serving sweep` deletes decisions older than this (never shorter"
        " than the reward window).",
    )
    sweep_interval_s: float = Field(
        0.0,
        ge=0,
        le=86_400,
        description="Run the sweep (default reward, retention) inside the server every"
        " this many seconds; 0: only by `oo-serving sweep`.",
    )
    max_candidates: int = Field(
        1000, ge=1, le=100_000, description="Most candidates one /score may offer."
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted; larger gets 413."
    )
    history_size: int = Field(
        100, ge=1, le=10_000, description="Decisions /features returns, newest last."
    )
    decision_log_per_user: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Decisions kept per user (at least history_size); older ones are pruned"
        " as new ones are logged.",
    )
    sqlite_busy_timeout_ms: int = Field(
        5000,
        ge=100,
        le=600_000,
        description="Longest a SQLite write may wait in all (its queue, the other workers'"
        " lock, SQLite's lock) before a 503 that wrote nothing; /ready's write check too.",
    )
    sqlite_synchronous: Literal["full", "normal", "extra"] = Field(
        "full",
        description="full: an acknowledged write survives power loss; normal: survives a"
        " process crash only, faster.",
    )
    pg_pool_min_size: int = Field(
        1, ge=0, le=1000, description="PostgreSQL connections each worker keeps open."
    )
    pg_pool_max_size: int = Field(
        10, ge=1, le=1000, description="Most PostgreSQL connections per worker."
    )
    pg_pool_timeout_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="How long a request waits for a PostgreSQL connection before a 503.",
    )
    pg_connect_timeout_s: int = Field(
        2, ge=1, le=600, description="How long opening a PostgreSQL connection may take."
    )
    pg_statement_timeout_ms: int = Field(
        5000,
        ge=1,
        le=600_000,
        description="Longest a PostgreSQL statement or row-lock wait may take before a 503."
        " A write's whole deadline, its wait behind the same user's earlier writes included,"
        " is OO_PG_POOL_TIMEOUT_S + 2 × this + 1 s.",
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="API keys as comma-separated KEY:SCOPES entries, scopes joined by +"
        " (decide, read, admin), e.g. k1:decide,k2:read+decide. Empty: no keys.",
    )
    api_keys_file: Path | None = Field(
        None, description="A file of API key entries, one KEY:SCOPES a line; # comments."
    )
    metrics_key: SecretStr = Field(
        SecretStr(""), description="If set, /metrics asks for this key as a Bearer token."
    )
    insecure: bool = Field(
        False, description="Serve without API keys on an address other than loopback."
    )
    graceful_shutdown_s: int = Field(
        30,
        ge=1,
        le=3600,
        description="After SIGTERM, how long in-flight requests may take to finish.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Server log level."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object a line; text: for a terminal."
    )
    access_log: bool = Field(True, description="Log one line per request.")
    log_user_ids: Literal["hash", "clear"] = Field(
        "hash",
        description="hash: request logs carry a keyed hash of the user id, not the id.",
    )
    log_hash_key: SecretStr = Field(
        SecretStr(""),
        description="Key of the user-id hash in logs; empty: a random key per server run.",
    )
    metrics_dir: Path | None = Field(
        None,
        description="Folder for the workers' metric files (emptied at start); empty: a"
        " temporary folder removed at exit.",
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        from oo_serving.core import registry

        if value not in registry.NAMES:
            raise ValueError(f"no policy {value!r}; policies: {', '.join(registry.NAMES)}")
        return value

    @field_validator("exploration")
    @classmethod
    def _valid_exploration(cls, value: str) -> str:
        from oo_serving.core.exploration import parse

        return parse(value).spec

    @field_validator("shadow_policies")
    @classmethod
    def _valid_shadows(cls, value: str) -> str:
        return ",".join(shadow_names(value))

    @field_validator("reward_wait")
    @classmethod
    def _valid_wait(cls, value: str) -> str:
        parse_duration_ms(value)
        return value.strip()

    @model_validator(mode="after")
    def _retention_covers_window(self) -> Settings:
        if self.log_retention_ms < self.reward_wait_ms:
            raise ValueError(
                f"log_retention_days ({self.log_retention_days:g}) must not be shorter than"
                f" the reward window ({self.reward_wait}): a reward must find its decision"
            )
        return self

    @model_validator(mode="after")
    def _memory_serves_one_process(self) -> Settings:
        from oo_serving.store.memory import MEMORY_URL, is_memory_url

        if is_memory_url(self.database_url) and self.workers > 1:
            raise ValueError(
                f"database_url {MEMORY_URL} keeps every model inside one process, and"
                f" {self.workers} workers would each have their own: serve it with one"
                " worker (OO_WORKERS=1), or use a sqlite:/// or postgresql:// database"
            )
        return self

    @property
    def reward_wait_ms(self) -> int:
        return parse_duration_ms(self.reward_wait)

    @property
    def log_retention_ms(self) -> int:
        return round(self.log_retention_days * 86_400_000)

    @field_validator("policy_split")
    @classmethod
    def _valid_split(cls, value: str) -> str:
        from oo_serving.assignment import parse_split

        if value.strip():
            parse_split(value)
        return value.strip()


_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """`90s`, `30m`, `24h`, `7d` (or `250ms`) as milliseconds; ValueError otherwise."""
    value = text.strip().lower()
    for unit in sorted(_UNITS_MS, key=len, reverse=True):
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            try:
                amount = float(number)
            except ValueError:
                break
            if not (amount > 0 and amount * _UNITS_MS[unit] < 2**53):
                raise ValueError(f"a duration must be > 0, got {text!r}")
            return round(amount * _UNITS_MS[unit])
    raise ValueError(f"a duration is a number and a unit (ms, s, m, h, d), e.g. 24h; got {text!r}")


def shadow_names(text: str) -> list[str]:
    """The policy names of OO_SHADOW_POLICIES, checked; ValueError names an unknown one."""
    from oo_serving.core import registry

    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in registry.NAMES:
            raise ValueError(f"no policy {name!r}; policies: {', '.join(registry.NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a shadow policy is named twice: {text!r}")
    return names
