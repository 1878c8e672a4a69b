"""Testing toolkit: deterministic simulation, fault plans, checkers, and the store conformance
suite that every :class:`~fasm.persistence.Store`, ours or a user's, runs."""

from __future__ import annotations

from ._store_suite import STORE_CHECKS as STORE_CHECKS
from ._store_suite import StoreConformance as StoreConformance
from ._store_suite import check_store as check_store

__all__ = (
    "STORE_CHECKS",
    "StoreConformance",
    "check_store",
)
