"""Persistence of user models and the decision log, one implementation per database."""

from oo_serving.store.base import Store
from oo_serving.store.factory import open_store

__all__ = ["Store", "open_store"]
