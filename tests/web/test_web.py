"""fasm.web: errors as HTTP answers, Idempotency-Key, submit with a timeout, the log filter, and
the lifespan helper, driven directly (asyncio and trio), under an in-process uvicorn server with
httpx (asyncio only: uvicorn runs on asyncio), and as a real uvicorn process that must exit with
a non-zero status when its store fails."""

from __future__ import annotations

import io
import logging
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

from fasm import InvalidInput, Rejected, TransitionFailed, web
from fasm.errors import OutcomeUnknown, RuntimeClosed, StoreUnavailable
from fasm.persistence import MemoryStore
from fasm.runtime import ManualClock, Runtime
from tests._ledger import Charge, Deposit, Insufficient, Ledger, LedgerMachine, Note
from tests.runtime.test_reads_and_failure import HeldStore, ok_charge, quiet
from tests.web._app import build

ROOT = Path(__file__).resolve().parents[2]


def make(store: MemoryStore) -> Runtime[Any, Any, Any, Any, Any, Any]:
    return Runtime(LedgerMachine(), initial_state=lambda: Ledger(balances={"a": 100}),
                   store=store, executors={Charge: ok_charge}, handlers={Note: quiet},
                   clock=ManualClock())


# -- errors, keys, logging (no event loop) --------------------------------------------------------


def test_each_fasm_error_has_its_http_answer() -> None:
    table = {
        InvalidInput("not a Deposit"): (422, "InvalidInput", {}),
        Insufficient("a has 3"): (409, "Insufficient", {}),
        OutcomeUnknown("late", idempotency_key="k", timeout=1.0): (504, "OutcomeUnknown",
                                                                     {"Retry-After": "2"}),
        RuntimeClosed("stopping"): (503, "RuntimeClosed", {"Retry-After": "2"}),
        StoreUnavailable("disk gone"): (503, "StoreUnavailable", {"Retry-After": "2"}),
        TransitionFailed("bug"): (500, "TransitionFailed", {}),
    }
    for error, (status, name, headers) in table.items():
        answer = web.http_error(error, retry_after=2)
        assert answer is not None
        assert (answer.status, answer.body["error"], answer.headers) == (status, name, headers)
    rejected = web.http_error(Insufficient("a has 3"))
    assert rejected is not None and rejected.body["message"] == "a has 3"
    assert web.http_error(KeyError("not ours")) is None
    assert isinstance(Insufficient("x"), Rejected)


def test_idempotency_key_comes_from_the_header_in_any_case_and_is_checked() -> None:
    assert web.idempotency_key({"idempotency-key": "abc"}) == "abc"
    assert web.idempotency_key({"Idempotency-Key": "abc"}, scope="/pay") == "/pay:abc"
    assert web.idempotency_key({"Accept": "*/*"}) is None
    for bad in ("", "x" * 256, "caf\u00e9", "a\nb"):
        with pytest.raises(InvalidInput, match="Idempotency-Key"):
            web.idempotency_key({"Idempotency-Key": bad})


def test_log_context_makes_fasm_fields_safe_for_a_standard_formatter() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(
        "%(levelname)s %(fasm_key)s/%(fasm_seq)s/%(fasm_action_id)s [%(fasm_context)s] "
        "%(message)s"))
    handler.addFilter(web.LogContext())
    logger = logging.getLogger("tests.web.logcontext")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("plain")
        logger.warning("charged", extra={"fasm_key": "payments", "fasm_action_id": 7,
                                         "fasm_input_kind": "completed"})
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "WARNING -/-/- [] plain",
        "WARNING payments/-/7 [key=payments action_id=7 input_kind=completed] charged",
    ]


@pytest.mark.anyio
async def test_log_context_on_the_runtime_s_own_records() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(fasm_key)s %(fasm_seq)s %(message)s"))
    handler.addFilter(web.LogContext())
    logger = logging.getLogger("fasm")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        async with make(MemoryStore()) as rt:
            await rt.submit(Deposit("a", 1))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert "default 0 runtime started" in stream.getvalue().splitlines()


def test_fasm_web_imports_no_web_framework() -> None:
    code = ("import sys, fasm.web; bad = {'starlette', 'uvicorn', 'httpx'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- submit with a timeout, the lifespan driven directly (asyncio and trio) -----------------------


@pytest.mark.anyio
async def test_a_submit_timeout_is_outcome_unknown_and_the_retry_is_answered_once() -> None:
    store = HeldStore()
    async with make(store) as rt:
        store.holding = True
        with pytest.raises(OutcomeUnknown, match="same idempotency key") as late:
            await web.submit(rt, Deposit("a", 5), idempotency_key="k1", timeout=0.01)
        assert store.waiting == 1  # its commit is still held: the outcome is unknown
        assert late.value.idempotency_key == "k1"
        store.holding = False
        store.let_one_commit()  # the timed-out input commits after all
        again = await web.submit(rt, Deposit("a", 5), idempotency_key="k1", timeout=None)
        assert again.duplicate and again.seq == 1
        assert await rt.read(lambda s: s.balances["a"]) == 105


@pytest.mark.anyio
async def test_lifespan_stops_the_server_when_the_runtime_fails() -> None:
    store = MemoryStore()
    stopped: list[bool] = []
    run = web.lifespan(lambda: make(store), shutdown_grace=0.5,
                       stop_server=lambda: stopped.append(True), exit_code=None)
    with pytest.raises(StoreUnavailable):
        async with run(object()) as state:
            rt = state["runtime"]
            assert rt.running and rt.shutdown_grace == 0.5
            await rt.submit(Deposit("a", 1))
            store.fail_next_commits = 1
            with pytest.raises(StoreUnavailable):
                await rt.submit(Deposit("a", 1))
            await rt.wait_failed()
            await anyio.wait_all_tasks_blocked()
            assert stopped == [True]  # the server was told to stop; requests still get answers
            with pytest.raises(RuntimeClosed):
                await rt.submit(Deposit("a", 1))
    async with run(object()) as state:  # a normal start and stop does not stop the server
        await state["runtime"].submit(Deposit("a", 1))
    assert stopped == [True]


def test_lifespan_refuses_a_negative_grace() -> None:
    from fasm.errors import DefinitionError

    with pytest.raises(DefinitionError, match="shutdown_grace"):
        web.lifespan(lambda: make(MemoryStore()), shutdown_grace=-1)


# -- a real Starlette app under an in-process uvicorn (asyncio only) -----------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_http_answers_and_failure_under_uvicorn() -> None:
    store = MemoryStore()
    told = anyio.Event()
    app = build(store, stop_server=told.set, exit_code=None)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="critical")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
            await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/balance")).json() == {"a": 100}
            key = {"Idempotency-Key": "k1"}
            first = await http.post("/deposit", json={"amount": 5}, headers=key)
            again = await http.post("/deposit", json={"amount": 5}, headers=key)
            assert first.json() == {"seq": 1, "duplicate": False}
            assert again.json() == {"seq": 1, "duplicate": True}
            assert (await http.get("/balance")).json() == {"a": 105}
            refused = await http.post("/pay", json={"amount": 1000})
            assert refused.status_code == 409
            assert refused.json() == {"error": "Insufficient", "message": "a has 105"}
            bad = await http.post("/deposit", json={"amount": 1}, headers={"Idempotency-Key": ""})
            assert bad.status_code == 422

            await http.post("/break")
            down = await http.post("/deposit", json={"amount": 1},
                                   headers={"Idempotency-Key": "k2"})
            assert down.status_code == 503 and down.json()["error"] == "StoreUnavailable"
            await told.wait()
            closed = await http.post("/deposit", json={"amount": 1})
            assert closed.status_code == 503 and closed.headers["Retry-After"] == "1"
            assert closed.json()["error"] == "RuntimeClosed"
        server.should_exit = True  # what SIGTERM does


# -- a real uvicorn process --------------------------------------------------------------------


class Served:
    """``uvicorn tests.web._app:app`` on a free port, its log collected."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.web._app:app", "--host", "127.0.0.1",
             "--port", "0", "--timeout-graceful-shutdown", "2"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                break
        else:
            raise AssertionError(f"uvicorn did not start:\n{''.join(self.lines)}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        self.lines.extend(self.process.stderr)

    def wait(self) -> int:
        try:
            code = self.process.wait(timeout=60)  # a hang guard, not a timing assertion
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self._reader.join()
        return code

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self._reader.join()
        assert self.process.stderr is not None
        self.process.stderr.close()

    @property
    def log(self) -> str:
        return "".join(self.lines)


@pytest.mark.slow
def test_a_server_whose_store_fails_exits_with_a_non_zero_status() -> None:
    served = Served()
    try:
        with httpx.Client(base_url=served.url) as http:
            assert http.post("/deposit", json={"amount": 5}).json()["seq"] == 1
            http.post("/break")
            down = http.post("/deposit", json={"amount": 1})
            assert down.status_code == 503
        code = served.wait()
    finally:
        served.close()
    assert code == 1, served.log
    assert "stopping the server so that it is restarted" in served.log
    assert "exiting with status 1" in served.log


@pytest.mark.slow
def test_a_server_stopped_normally_does_not_exit_with_the_failure_status() -> None:
    served = Served()
    try:
        with httpx.Client(base_url=served.url) as http:
            assert http.post("/deposit", json={"amount": 5}).status_code == 200
        served.process.send_signal(signal.SIGTERM)
        code = served.wait()
    finally:
        served.close()
    # uvicorn re-raises the SIGTERM it handled once it has shut down: death by the signal.
    assert code in (0, -signal.SIGTERM), served.log
    assert "Application shutdown complete" in served.log
