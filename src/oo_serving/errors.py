"""The service's errors. The API maps each class to one HTTP status, in `api/errors.py`.

    ServiceError                  anything the service refuses or cannot do
    ├── NotFound                  404: a referenced thing does not exist
    │   └── UnknownEvent          event_id is not a decision of this user
    ├── Conflict                  409: the request contradicts what is stored
    │   └── TipMismatch           tip_id is not the tip that event_id chose
    └── Unavailable               503: try again later; nothing was written
        ├── StoreBusy             the user's row stayed locked past the lock timeout
        └── StoreUnavailable      the database cannot be reached or refused the work
    SchemaError                   at start-up: the database schema cannot be used
    ├── SchemaTooNew              written by a newer release than this one
    └── SchemaNotCurrent          older than this release, and not to be migrated now

Every request error names the field it is about (`loc`, as in a validation error),
so a client sees the same shape whether pydantic or the service refused it.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of request errors. `loc` names the field, e.g. ("body", "event_id")."""

    code = "service_error"

    def __init__(self, message: str, loc: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc


class NotFound(ServiceError):
    code = "not_found"


class UnknownEvent(NotFound):
    code = "unknown_event"


class Conflict(ServiceError):
    code = "conflict"


class TipMismatch(Conflict):
    code = "tip_mismatch"


class Unavailable(ServiceError):
    code = "unavailable"


class StoreBusy(Unavailable):
    code = "store_busy"


class StoreUnavailable(Unavailable):
    code = "store_unavailable"


class SchemaError(Exception):
    """The database's schema cannot be used by this release."""


class SchemaTooNew(SchemaError):
    pass


class SchemaNotCurrent(SchemaError):
    pass
