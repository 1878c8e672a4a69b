"""Serve a :class:`~fasm.runtime.Runtime` from an ASGI web application (Starlette, FastAPI, or
anything that takes a ``lifespan=`` context manager).

The module uses the standard library and fasm only, so the core install does not grow; the web
framework and server are yours (``pip install 'fasm[web]'`` brings Starlette, uvicorn and httpx,
which the example and the tests use). What it gives:

* :func:`lifespan` - starts the runtime when the server starts, hands it to request handlers
  (``request.state.runtime`` in Starlette), stops it when the server stops, and when the runtime
  fails (a store down for good) stops the server and makes the process exit non-zero, so the
  process manager restarts it.
* :func:`http_error` - the HTTP answer for each fasm error (:class:`HttpError`): ``InvalidInput``
  422, ``Rejected`` 409, ``RuntimeClosed``, ``Overloaded`` and ``StoreError`` 503 with
  ``Retry-After``,
  :class:`~fasm.errors.OutcomeUnknown` 504 with ``Retry-After``, ``TransitionFailed`` 500.
* :func:`submit` and :func:`idempotency_key` - a submit with a timeout, keyed by the request's
  ``Idempotency-Key`` header, whose timeout is answered as "outcome unknown, retry with the same
  key".
* :class:`LogContext` - a :class:`logging.Filter` that makes fasm's log fields safe for standard
  format strings (``%(fasm_key)s``) and adds one ``%(fasm_context)s`` text.

docs/06_web_service.md is the guide.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from .errors import (
    DefinitionError,
    InvalidInput,
    OutcomeUnknown,
    Overloaded,
    Rejected,
    RuntimeClosed,
    StoreError,
    TransitionFailed,
)
from .runtime import Committed, Runtime

__all__ = (
    "IDEMPOTENCY_HEADER",
    "HttpError",
    "LogContext",
    "OutcomeUnknown",
    "http_error",
    "idempotency_key",
    "lifespan",
    "submit",
    "terminate_process",
)

log = logging.getLogger("fasm.web")

S = TypeVar("S")
I = TypeVar("I")
TId = TypeVar("TId")
TA = TypeVar("TA")
TR = TypeVar("TR")
U = TypeVar("U")

_AnyRuntime = Runtime[Any, Any, Any, Any, Any, Any]

IDEMPOTENCY_HEADER = "Idempotency-Key"
"""The request header :func:`idempotency_key` reads (the IETF draft's name)."""

_MAX_KEY = 255


# -- lifespan -------------------------------------------------------------------------------------


def terminate_process() -> None:
    """Send SIGTERM to this process: what :func:`lifespan` does by default when the runtime
    fails. ASGI servers (uvicorn, hypercorn) shut down gracefully on it: they stop accepting
    connections, let open requests finish, then run the lifespan's shutdown."""
    os.kill(os.getpid(), signal.SIGTERM)


def lifespan(
    factory: Callable[[], Runtime[Any, Any, Any, Any, Any, Any]],
    *,
    state_key: str = "runtime",
    shutdown_grace: float | None = None,
    stop_server: Callable[[], object] = terminate_process,
    exit_code: int | None = 1,
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """An ASGI lifespan (``Starlette(lifespan=...)``, ``FastAPI(lifespan=...)``) that runs one
    runtime for the life of the server.

    On startup it calls ``factory()`` and starts the runtime (a store that cannot be opened fails
    the startup, and uvicorn exits with status 3). The runtime is in the lifespan state under
    ``state_key``: ``request.state.runtime`` in a Starlette handler. On shutdown it stops the
    runtime gracefully (queued inputs commit, in-flight executors get ``shutdown_grace``).

    When the runtime fails while serving (its store cannot commit), it refuses input at once
    (submits raise :class:`~fasm.errors.RuntimeClosed`, answered 503 by :func:`http_error`), and
    the lifespan calls ``stop_server()`` (default: SIGTERM to this process, so the server shuts
    down gracefully). When the shutdown is over, the process exits with ``exit_code`` (after
    flushing the logs), so a process manager that restarts failed services (systemd
    ``Restart=on-failure``, Docker ``on-failure``, Kubernetes) starts it again, and the restarted
    runtime resumes from what was committed. Nothing acknowledged is lost either way.

    Shutdown time: the server first waits for open requests (uvicorn: up to
    ``--timeout-graceful-shutdown``, no limit by default), then runs this shutdown, which waits up
    to ``shutdown_grace`` for executors. The two add up: keep ``server grace + shutdown_grace``
    (plus a second for the last commit) under the process manager's stop timeout (Docker 10 s,
    Kubernetes 30 s, systemd 90 s) or it kills the process before the runtime is done (which loses
    nothing, but restore then re-sends what was in flight).

    Args:
        factory: makes the runtime (called once, on startup, on the server's event loop).
        state_key: the name of the runtime in the lifespan state.
        shutdown_grace: when given, replaces the runtime's ``shutdown_grace`` (seconds).
        stop_server: called once, from the event loop, when the runtime fails.
        exit_code: the process's exit status after a failure; None to raise the failure from the
            shutdown instead (the server reports a failed shutdown and exits as it does then;
            for a server run inside a test).

    Returns:
        The lifespan function: ``app -> async context manager`` yielding the lifespan state.

    Raises:
        DefinitionError: ``shutdown_grace`` is negative.
    """
    if shutdown_grace is not None and shutdown_grace < 0:
        raise DefinitionError(f"shutdown_grace must be >= 0, got {shutdown_grace}")

    async def watch(runtime: _AnyRuntime) -> None:
        failure = await runtime.wait_failed()
        if failure is None:
            return
        log.critical("runtime %r failed (%r); stopping the server so that it is restarted",
                     runtime.key, failure, extra={"fasm_key": runtime.key})
        try:
            stop_server()
        except Exception:
            log.exception("stop_server raised", extra={"fasm_key": runtime.key})

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[dict[str, Any]]:
        runtime = factory()
        if shutdown_grace is not None:
            runtime.shutdown_grace = shutdown_grace
        try:
            async with runtime, anyio.create_task_group() as tg:
                tg.start_soon(watch, runtime)
                try:
                    yield {state_key: runtime}
                finally:
                    tg.cancel_scope.cancel()
        except Exception:
            if runtime.failure is None or exit_code is None:
                raise
            log.critical("runtime %r stopped by %r; exiting with status %d", runtime.key,
                         runtime.failure, exit_code, extra={"fasm_key": runtime.key})
            _exit(exit_code)

    return run


def _exit(code: int) -> None:
    """End the process with ``code`` once the server has shut down. The lifespan's shutdown is
    the last thing an ASGI server runs (uvicorn then re-raises the SIGTERM, which would end the
    process with the signal's status), so exit here, after flushing what was logged."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# -- errors as HTTP answers ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpError:
    """How to answer a request that a fasm error ended.

    Attributes:
        status: the HTTP status code.
        body: a JSON object: ``error`` (the error class's name), ``message``, and for a retryable
            answer ``retry`` (what to retry with).
        headers: extra response headers (``Retry-After`` for 503 and 504).
    """

    status: int
    body: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)


def http_error(error: BaseException, *, retry_after: int = 1) -> HttpError | None:
    """The HTTP answer for a fasm error, or None for an error that is not fasm's (let the
    framework answer it, usually 500).

    ==========================  ======  ==========================================================
    error                       status  meaning for the client
    ==========================  ======  ==========================================================
    ``InvalidInput``            422     the request does not make a valid input; fix it
    ``Rejected`` (subclasses)   409     the machine refused it (name and message in the body)
    ``OutcomeUnknown``          504     no answer in time: retry with the same Idempotency-Key
    ``Overloaded``              503     too much work in flight; nothing was queued: retry later
    ``RuntimeClosed``           503     not accepting input now (stopping, or failed and about
                                        to restart): retry later
    ``StoreError``              503     the commit could not be made durable: retry with the
                                        same Idempotency-Key
    ``TransitionFailed``        500     a bug in the stf (the message stays in the server logs)
    ==========================  ======  ==========================================================

    Use it in an exception handler, e.g. Starlette's
    ``exception_handlers={FasmError: handler}`` where ``handler`` returns
    ``JSONResponse(e.body, e.status, headers=e.headers)``.

    Args:
        error: the exception a submit (or read) raised.
        retry_after: seconds for the ``Retry-After`` header of 503 and 504 answers.
    """
    name = type(error).__name__
    retry = {"Retry-After": str(retry_after)}
    if isinstance(error, InvalidInput):
        return HttpError(422, {"error": name, "message": str(error)})
    if isinstance(error, Rejected):
        return HttpError(409, {"error": name, "message": str(error)})
    if isinstance(error, OutcomeUnknown):
        return HttpError(504, {"error": name, "message": str(error),
                               "retry": "the same request with the same Idempotency-Key"}, retry)
    if isinstance(error, Overloaded):
        return HttpError(503, {"error": name, "message": "the service has too much work in "
                               "flight; nothing was done: retry later",
                               "retry": "the same request"}, retry)
    if isinstance(error, RuntimeClosed):
        return HttpError(503, {"error": name, "message": "the service is not accepting input "
                               "now; retry later", "retry": "the same request"}, retry)
    if isinstance(error, StoreError):
        return HttpError(503, {"error": name, "message": "the change could not be made durable; "
                               "it may or may not have happened",
                               "retry": "the same request with the same Idempotency-Key"}, retry)
    if isinstance(error, TransitionFailed):
        return HttpError(500, {"error": name, "message": "the request could not be processed"})
    return None


# -- submits from requests ----------------------------------------------------------------------


def idempotency_key(headers: Mapping[str, str], *, scope: str = "") -> str | None:
    """The request's ``Idempotency-Key`` header, or None when it has none.

    Args:
        headers: the request headers (Starlette's ``request.headers``, or any mapping: the name
            is matched without regard to case).
        scope: prefixed to the key (``f"{scope}:{key}"``) so that two routes, or two clients,
            using the same key do not answer each other's requests; e.g. the route and the
            authenticated client id.

    Raises:
        InvalidInput: the header is empty, longer than 255 characters, or not printable ASCII
            (answered 422 by :func:`http_error`).
    """
    value = headers.get(IDEMPOTENCY_HEADER)
    if value is None:
        wanted = IDEMPOTENCY_HEADER.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    if value is None:
        return None
    if not value or len(value) > _MAX_KEY or not (value.isascii() and value.isprintable()):
        raise InvalidInput(f"the {IDEMPOTENCY_HEADER} header must be 1 to {_MAX_KEY} printable "
                           f"ASCII characters")
    return f"{scope}:{value}" if scope else value


async def submit(
    runtime: Runtime[S, I, TId, TA, TR, U],
    value: I,
    *,
    idempotency_key: str | None,
    # A timeout parameter (not the caller's cancel scope) because its expiry is an answer of its
    # own, OutcomeUnknown, rather than a cancellation.
    timeout: float | None,  # noqa: ASYNC109
) -> Committed[TId, TA, U]:
    """Submit ``value`` and wait at most ``timeout`` seconds for it to be durable.

    A submit that is already queued is not undone by the timeout: the input may still commit.
    So the timeout is answered as :class:`~fasm.errors.OutcomeUnknown` (504 by
    :func:`http_error`): the client retries with the same idempotency key, and a transition
    already committed with it is not run again (``Committed.duplicate``).

    Args:
        runtime: the running runtime.
        value: the input.
        idempotency_key: usually :func:`idempotency_key` of the request (None: no key; a retry
            after a timeout may then run the input twice).
        timeout: seconds (real time); None waits as long as it takes.

    Returns:
        The committed outcome.

    Raises:
        OutcomeUnknown: no answer within ``timeout``.
        InvalidInput, Rejected, TransitionFailed, RuntimeClosed, StoreError: as
            :meth:`Runtime.submit <fasm.runtime.Runtime.submit>` raises them.
    """
    if timeout is None:
        return await runtime.submit(value, idempotency_key=idempotency_key)
    with anyio.move_on_after(timeout) as scope:
        return await runtime.submit(value, idempotency_key=idempotency_key)
    assert scope.cancelled_caught
    retry = ("retry with the same idempotency key" if idempotency_key is not None
             else "it had no idempotency key, so a retry may run it twice")
    raise OutcomeUnknown(f"no answer within {timeout} s; the input may still commit: {retry}",
                         idempotency_key=idempotency_key, timeout=timeout)


# -- logging --------------------------------------------------------------------------------------


_FIELDS = ("fasm_key", "fasm_seq", "fasm_action_id")


class LogContext(logging.Filter):
    """Makes fasm's log fields usable by standard formatters.

    fasm logs its context as record attributes (``extra={"fasm_key": ..., "fasm_seq": ...,
    "fasm_action_id": ...}``, and a few others such as ``fasm_input_kind``), present only where
    they apply, so a format string with ``%(fasm_key)s`` fails on every other record. This filter
    sets each of ``fasm_key``, ``fasm_seq`` and ``fasm_action_id`` that a record lacks to
    ``default``, and adds ``fasm_context``: the fasm fields the record has, as
    ``key=payments seq=12 action_id=7`` (empty when it has none). It never drops a record.

    Add it to the *handler* (``handler.addFilter(LogContext())``): a filter on a logger does not
    see records that propagate from child loggers such as ``fasm.runtime``.

    Args:
        default: what a missing field shows.
    """

    def __init__(self, default: str = "-") -> None:
        super().__init__()
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        """Fill in the fields; always True."""
        values = record.__dict__
        known = [name for name in _FIELDS if name in values]
        others = sorted(n for n in values if n.startswith("fasm_") and n not in _FIELDS
                        and n != "fasm_context")
        record.fasm_context = " ".join(f"{name[5:]}={values[name]}" for name in known + others)
        for name in _FIELDS:
            if name not in values:
                setattr(record, name, self.default)
        return True
