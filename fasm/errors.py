"""The whole public error hierarchy of fasm, under one root.

Errors are grouped by what the caller does about them:

* :class:`Rejected` - the machine said no (insufficient funds, slot taken). Expected; show it to
  the user. The transition did not happen.
* :class:`TransitionFailed` - the stf raised something else: a bug or an unexpected condition.
  The transition did not happen; the original exception is the ``__cause__``.
* :class:`DefinitionError` - a machine, executor table or runtime was declared wrongly. Found when
  the class is defined or the runtime is built, never deep inside a transition.
* :class:`InvalidInput` - a submitted value is not of the machine's declared input type.
* :class:`StoreError` and its branches - persistence failed; what was committed before is intact.
* :class:`NondeterminismError` - replaying committed inputs did not give the recorded result.
"""

from __future__ import annotations

__all__ = (
    "ActionsFull",
    "ConstraintViolation",
    "DefinitionError",
    "FasmError",
    "IncompatibleRecord",
    "InvalidInput",
    "MigrationFailed",
    "NondeterminismError",
    "OutcomeUnknown",
    "Overloaded",
    "Rejected",
    "RestoreFailed",
    "RuntimeClosed",
    "StoreConflict",
    "StoreCorrupt",
    "StoreError",
    "StoreUnavailable",
    "TransactionConflict",
    "TransitionFailed",
)


class FasmError(Exception):
    """Root of every error fasm raises on purpose."""


class DefinitionError(FasmError, TypeError):
    """A machine class, executor table or runtime configuration is declared wrongly.

    Raised when the class is defined or when the :class:`~fasm.runtime.Runtime` is built, with a
    message that names what is missing.
    """


class Rejected(FasmError):
    """An expected domain rejection raised by an stf: the input is refused, state is unchanged.

    Subclass it for each domain outcome (``class InsufficientFunds(Rejected)``) so callers and
    metrics can tell a refusal from a bug. ``Runtime.submit`` re-raises the rejection itself.
    """


class ConstraintViolation(Rejected):
    """The database refused a write made by an stf because it breaks one of its constraints
    (unique, exclusion, foreign key, check, not null): the input is rejected and the transaction
    is as it was before it. The driver's error is the ``__cause__``.

    This is how a constraint becomes a domain rule the database enforces: catch it in the stf to
    raise your own :class:`Rejected` subclass (``raise SlotTaken(...) from e``), or let it reach
    the submitter as it is. The stf cannot go on using the transaction after it: whatever it does
    next, the input is rejected.

    Attributes:
        constraint: the constraint's name when the database reports it (PostgreSQL does; SQLite
            reports the columns instead, e.g. ``"bookings.dentist, bookings.slot"``), else None.
    """

    def __init__(self, message: str, *, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class TransitionFailed(FasmError):
    """An stf raised an exception that is not a :class:`Rejected`; state is unchanged.

    The original exception is chained as ``__cause__``.
    """


class RestoreFailed(FasmError):
    """``restore`` raised, or emitted something restore may not emit (an untracked action)."""


class ActionsFull(FasmError):
    """A bounded :class:`~fasm.ActionsContainer` refused an ``add`` because it is full."""


class InvalidInput(FasmError, ValueError):
    """A submitted value is not of the machine's declared input type. Nothing was run."""


class RuntimeClosed(FasmError):
    """The runtime is not running (not started, stopping, stopped, or stopped by a store fault).

    Inputs submitted now are refused; nothing is lost that a previous ``submit`` acknowledged.
    """


class OutcomeUnknown(FasmError):
    """A submit did not answer within its timeout (:func:`fasm.web.submit`): the input may still
    commit, or may never have been queued. Retrying with the same idempotency key is safe: a
    transition already committed with it is not run again.

    Attributes:
        idempotency_key: the key to retry with (None: the submit had none, and a retry may run
            the input twice).
        timeout: the seconds that passed.
    """

    def __init__(self, message: str, *, idempotency_key: str | None, timeout: float) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key
        self.timeout = timeout


class NondeterminismError(FasmError):
    """Re-running a committed input did not reproduce what was recorded: the stf is not
    deterministic (it read a clock, randomness, or something outside ``state``)."""


class StoreError(FasmError):
    """A store operation failed. Committed data is intact.

    Attributes:
        store: a short description of the store (backend and location).
        key: the machine key, when the failure concerns one.
        seq: the sequence number involved, when known.
    """

    def __init__(
        self, message: str, *, store: str = "", key: str | None = None, seq: int | None = None
    ) -> None:
        parts = [message]
        where = ", ".join(
            p
            for p in (
                f"store={store}" if store else "",
                f"key={key!r}" if key is not None else "",
                f"seq={seq}" if seq is not None else "",
            )
            if p
        )
        if where:
            parts.append(f"({where})")
        super().__init__(" ".join(parts))
        self.message = message
        self.store = store
        self.key = key
        self.seq = seq


    def located(self, *, store: str, key: str | None) -> StoreError:
        """The same error (same class, same seq) with the store and key filled in."""
        located = type(self)(self.message, store=store, key=key, seq=self.seq)
        located.__cause__ = self.__cause__
        return located


class StoreUnavailable(StoreError):
    """The store cannot be reached or written now (database down, disk full, locked)."""


class StoreConflict(StoreError):
    """Another writer owns the key, or the store's sequence is not the one the writer expected
    (a stale writer). The write was refused."""


class TransactionConflict(StoreError):
    """The database kept aborting a group of transitions (serialization failure, deadlock, lock
    timeout, SQLite busy) and the runtime gave up after its bounded number of fresh attempts.
    Nothing of the group was committed. Unlike other store errors it does not stop the runtime:
    it is contention, not a fault, so submit again later.

    Attributes:
        attempts: how many times the group was run.
    """

    def __init__(self, message: str, *, store: str = "", key: str | None = None,
                 seq: int | None = None, attempts: int = 0) -> None:
        super().__init__(message, store=store, key=key, seq=seq)
        self.attempts = attempts

    def located(self, *, store: str, key: str | None) -> StoreError:
        """The same error with the store and key filled in."""
        located = TransactionConflict(self.message, store=store, key=key, seq=self.seq,
                                      attempts=self.attempts)
        located.__cause__ = self.__cause__
        return located


class StoreCorrupt(StoreError):
    """A stored record failed its checks: bad checksum, truncated, or written for another
    machine type. It is never loaded silently."""


class IncompatibleRecord(StoreCorrupt):
    """A record does not fit this code: written by a newer format or schema version, older
    than the machine's migrations reach, or holding fields the declared types no longer have
    (loading it would silently drop data; write a migration, or declare the drop in
    ``StateMachine.dropped_fields``)."""


class MigrationFailed(IncompatibleRecord):
    """A migration step raised while a stored checkpoint was being brought up to date. The
    original exception is the ``__cause__``; nothing was loaded and nothing was written.

    Attributes:
        from_version: the step that raised: ``migrations[from_version]``, from that schema
            version to the next.
    """

    def __init__(self, message: str, *, store: str = "", key: str | None = None,
                 seq: int | None = None, from_version: int = 0) -> None:
        super().__init__(message, store=store, key=key, seq=seq)
        self.from_version = from_version

    def located(self, *, store: str, key: str | None) -> StoreError:
        """The same error with the store and key filled in."""
        located = MigrationFailed(self.message, store=store, key=key, seq=self.seq,
                                  from_version=self.from_version)
        located.__cause__ = self.__cause__
        return located


class Overloaded(FasmError):
    """A submit was not admitted: too many tracked actions are in flight (the runtime's
    ``max_pending_actions``, or an executor's ``max_pending``) and no room was made within the
    submit's ``admission_timeout``. Nothing was queued and nothing ran, so retrying later is
    safe, with or without an idempotency key.

    Attributes:
        pending: tracked actions in flight when it gave up (timers not counted).
        limit: which limit was reached (``"max_pending_actions"`` or
            ``"<ActionClass>.max_pending"``).
    """

    def __init__(self, message: str, *, pending: int, limit: str) -> None:
        super().__init__(message)
        self.pending = pending
        self.limit = limit
