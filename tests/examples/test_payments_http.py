"""examples/payments_http over real HTTP: uvicorn subprocesses on 127.0.0.1 (free ports), an
httpx client, and a kill -9 loop against the service under concurrent POSTs.

uvicorn runs on asyncio only, and it runs in child processes here; the tests drive them with
sync httpx and, for the concurrent load, plain ``asyncio.run`` with ``httpx.AsyncClient`` (not
the anyio fixture: there is nothing to run on trio).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.payments_http.run import Server, provider_server, service_server


@dataclass
class Pair:
    provider: Server
    service: Server
    client: httpx.Client


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """One provider and one service for the module's quick tests (starting them costs ~2 s)."""
    tmp = tmp_path_factory.mktemp("payments_http")
    with provider_server(tmp / "provider.db", seed=3, failure_rate=0.2, decline_rate=0.0,
                         log=tmp / "provider.log") as provider:
        provider.start()
        with service_server(tmp / "service", provider.url, concurrency=8,
                            log=tmp / "service.log") as service:
            service.start()
            with httpx.Client(base_url=service.url, timeout=10.0) as client:
                yield Pair(provider, service, client)


def pay(client: httpx.Client, key: str, body: Any) -> httpx.Response:
    return client.post("/payments", json=body, headers={"Idempotency-Key": key})


def settled(client: httpx.Client, pid: int, timeout: float = 20.0) -> dict[str, Any]:
    """The payment once its charge has come back (polls, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        payment: dict[str, Any] = client.get(f"/payments/{pid}").json()
        if payment["status"] != "pending" or time.monotonic() > deadline:
            return payment
        time.sleep(0.05)


def test_payment_is_created_charged_and_read_back(pair: Pair) -> None:
    r = pay(pair.client, "create-1", {"account": "ada", "amount": 25})
    assert r.status_code == 201, r.text
    created = r.json()
    assert (created["account"], created["amount"], created["replayed"]) == ("ada", 25, False)
    assert created["status"] in ("pending", "confirmed")
    payment = settled(pair.client, created["id"])
    assert payment["status"] == "confirmed" and payment["txn"].startswith("txn-")
    charges = [c for c in httpx.get(pair.provider.url + "/charges").json()
               if c["payment"] == created["id"]]
    assert [(c["amount"], c["txn"]) for c in charges] == [(25, payment["txn"])]


def test_retried_post_returns_the_original_payment(pair: Pair) -> None:
    first = pay(pair.client, "retry-1", {"account": "bob", "amount": 7}).json()
    other = pay(pair.client, "retry-2", {"account": "bob", "amount": 7}).json()
    again = pay(pair.client, "retry-1", {"account": "bob", "amount": 7})
    assert again.status_code == 201
    assert again.json()["id"] == first["id"] != other["id"]
    assert again.json()["replayed"] is True and first["replayed"] is False
    settled(pair.client, first["id"])
    charged = [c for c in httpx.get(pair.provider.url + "/charges").json()
               if c["payment"] == first["id"]]
    assert len(charged) == 1, "a retried POST was charged again"


def test_key_reused_for_another_payment_is_409(pair: Pair) -> None:
    assert pay(pair.client, "reuse-1", {"account": "cyd", "amount": 5}).status_code == 201
    r = pay(pair.client, "reuse-1", {"account": "cyd", "amount": 6})
    assert r.status_code == 409 and r.json()["error"] == "KeyReused"


def test_refusal_is_409_and_changes_nothing(pair: Pair) -> None:
    before = pair.client.get("/health").json()
    r = pay(pair.client, "broke-1", {"account": "dee", "amount": 1_000})
    assert r.status_code == 409 and r.json()["error"] == "InsufficientCredit", r.text
    r = pay(pair.client, "nobody-1", {"account": "zed", "amount": 1})
    assert r.status_code == 409 and r.json()["error"] == "UnknownAccount", r.text
    assert pair.client.get("/health").json()["payments"] == before["payments"]


@pytest.mark.parametrize("body", [{"account": "ada"}, {"account": "ada", "amount": "5"},
                                  {"account": 3, "amount": 5}, [1, 2], "ada"])
def test_invalid_body_is_422(pair: Pair, body: Any) -> None:
    r = pay(pair.client, "bad-1", body)
    assert r.status_code == 422, r.text


def test_body_that_is_not_json_is_422_and_a_missing_key_400(pair: Pair) -> None:
    r = pair.client.post("/payments", content=b"{nope", headers={"Idempotency-Key": "nj"})
    assert r.status_code == 422
    assert pair.client.post("/payments", json={"account": "ada", "amount": 1}).status_code == 400


def test_unknown_payment_is_404(pair: Pair) -> None:
    assert pair.client.get("/payments/999999").status_code == 404


def test_fresh_data_directory_against_an_old_ledger_gets_keys_of_its_own(pair: Pair,
                                                                        tmp_path: Path) -> None:
    """A new data directory reuses payment ids, but not the provider's keys: every key begins
    with the store's identity, made once with the data, so the fresh service's payment 0 is
    charged under a key of its own and the old ledger's payment 0 is left as it was."""
    first = pay(pair.client, "old-ledger-1", {"account": "ada", "amount": 3}).json()
    settled(pair.client, first["id"])
    settled(pair.client, 0)
    [old] = [c for c in httpx.get(pair.provider.url + "/charges").json() if c["payment"] == 0]
    with service_server(tmp_path / "fresh", pair.provider.url, concurrency=2,
                        log=tmp_path / "fresh.log") as fresh:
        fresh.start()
        with httpx.Client(base_url=fresh.url, timeout=10.0) as client:
            r = pay(client, "fresh-1", {"account": "dee", "amount": 1})
            assert r.status_code == 201 and r.json()["id"] == 0
            payment = settled(client, 0)
    assert payment["status"] == "confirmed" and payment["txn"].startswith("txn-"), payment
    zeros = [c for c in httpx.get(pair.provider.url + "/charges").json() if c["payment"] == 0]
    assert len(zeros) == 2 and old in zeros, zeros  # the old charge is left as it was
    assert [c["account"] for c in zeros if c != old] == ["dee"], zeros


# -- kill -9 over HTTP ---------------------------------------------------------------------------


@dataclass
class Load:
    """What concurrent clients were told: key -> (payment id, account, amount) for every 2xx."""

    acked: dict[str, tuple[int, str, int]] = field(default_factory=dict)
    failed: int = 0  # requests with no answer (connection refused or cut, 503): retried
    seen: dict[int, tuple[str, int]] = field(default_factory=dict)  # GET 200s: id -> payment
    top: int = -1  # the highest payment id acknowledged so far
    abort: bool = False  # the test failed: clients stop retrying


async def reader_loop(url: str, load: Load, stop: asyncio.Event) -> None:
    """GET the ids just above the highest acknowledged one, which are being committed right now:
    a read that showed a payment a crash then undid would be caught by the final check."""
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
        while not stop.is_set():
            for pid in range(load.top + 1, load.top + 4):
                try:
                    r = await client.get(f"/payments/{pid}")
                except httpx.HTTPError:
                    await asyncio.sleep(0.02)
                    continue
                if r.status_code == 200:
                    got = r.json()
                    load.seen.setdefault(pid, (got["account"], got["amount"]))


async def client_loop(url: str, load: Load, stop: asyncio.Event, rng: random.Random,
                      worker: int) -> None:
    """POST payments one after another; retry each with its key until it is acknowledged
    (through kills and restarts), as a careful client does."""
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
        n = 0
        while not stop.is_set():
            key, n = f"w{worker}-{n}", n + 1
            body = {"account": rng.choice(["ada", "bob", "cyd"]), "amount": rng.randint(1, 99)}
            for _ in range(2000):  # bounded; each failed try waits 20 ms
                if load.abort:
                    return
                try:
                    r = await client.post("/payments", json=body,
                                          headers={"Idempotency-Key": key})
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code == 201:
                    got = r.json()
                    assert (got["account"], got["amount"]) == (body["account"], body["amount"])
                    load.acked[key] = (got["id"], got["account"], got["amount"])
                    load.top = max(load.top, got["id"])
                    break
                assert r is None or r.status_code in (503, 504), r.text
                load.failed += 1
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"{key} was never acknowledged")


async def kill_loop(service: Server, load: Load, *, kills: int, clients: int,
                    seed: int) -> None:
    """Run ``clients`` client loops and two readers while killing the service at random moments
    and restarting it, ``kills`` times."""
    rng = random.Random(seed)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(client_loop(service.url, load, stop, random.Random(seed + i), i))
             for i in range(clients)]
    tasks += [asyncio.create_task(reader_loop(service.url, load, stop)) for _ in range(2)]
    try:
        for _ in range(kills):
            before = len(load.acked)
            for _ in range(500):  # wait for some traffic after the (re)start, bounded
                if len(load.acked) >= before + 5:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(rng.uniform(0.05, 0.8))  # a random moment under load
            service.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.2))
            await asyncio.to_thread(service.start)
        await asyncio.sleep(0.3)
    except BaseException:
        load.abort = True
        raise
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)


@pytest.mark.slow
def test_kill9_under_concurrent_posts_loses_nothing_and_charges_once(tmp_path: Path) -> None:
    """Every payment acknowledged with 2xx, or shown by a GET, survives 4 kill -9s; after the
    service drains, none is pending, every payment id belongs to exactly one request, and the
    provider charged each payment once, with the outcome the service recorded."""
    with provider_server(tmp_path / "provider.db", seed=5, failure_rate=0.1, decline_rate=0.05,
                         log=tmp_path / "provider.log") as provider:
        provider.start()
        with service_server(tmp_path / "service", provider.url, concurrency=16,
                            log=tmp_path / "service.log") as service:
            service.start()
            load = Load()
            asyncio.run(kill_loop(service, load, kills=4, clients=12, seed=11))
            assert len(load.acked) > 50, "too little traffic to mean anything"

            with httpx.Client(base_url=service.url, timeout=10.0) as client:
                deadline = time.monotonic() + 30
                while (health := client.get("/health").json())["pending"] and \
                        time.monotonic() < deadline:
                    time.sleep(0.1)
                assert health["pending"] == 0, f"charges still pending after draining: {health}"
                payments = {pid: client.get(f"/payments/{pid}").json()
                            for pid in range(health["payments"])}
                # a retry of an acknowledged key, after all the restarts, answers the same payment
                for key, (pid, account, amount) in list(load.acked.items())[::7]:
                    again = client.post("/payments", json={"account": account, "amount": amount},
                                        headers={"Idempotency-Key": key}).json()
                    assert (again["id"], again["replayed"]) == (pid, True)
            charges = httpx.get(provider.url + "/charges").json()

    # every acknowledged payment is on record, as acknowledged; no id went to two requests
    pids = [pid for pid, _, _ in load.acked.values()]
    assert len(set(pids)) == len(pids), "one payment id acknowledged to two requests"
    for key, (pid, account, amount) in load.acked.items():
        assert pid in payments, f"{key}: payment {pid} acknowledged, then lost"
        assert (payments[pid]["account"], payments[pid]["amount"]) == (account, amount), key
    # every payment a GET showed is on record as shown: reads never saw an undone transition
    for pid, shown in load.seen.items():
        assert pid in payments and (payments[pid]["account"], payments[pid]["amount"]) == shown, \
            f"GET showed payment {pid} as {shown}, a crash undid it: {payments.get(pid)}"
    # every payment on record was acknowledged (clients retry until they are), none is pending
    assert set(payments) == set(pids)
    assert {p["status"] for p in payments.values()} <= {"confirmed", "declined"}
    # the provider charged each payment exactly once, with the outcome the service recorded
    by_payment: dict[int, list[dict[str, Any]]] = {}
    for c in charges:
        by_payment.setdefault(c["payment"], []).append(c)
    assert set(by_payment) == set(payments), "a charge without a payment, or a payment never sent"
    for pid, payment in payments.items():
        assert len(by_payment[pid]) == 1, f"payment {pid} charged twice: {by_payment[pid]}"
        [charge] = by_payment[pid]
        if payment["status"] == "confirmed":
            assert charge["ok"] and charge["txn"] == payment["txn"], (pid, payment, charge)
        else:
            assert not charge["ok"], (pid, payment, charge)
    resent = sum(c["requests"] - 1 for c in charges)
    print(f"{len(load.acked)} acknowledged, {load.failed} failed tries retried, {resent} charges "
          f"re-sent, {sum(c['ok'] for c in charges)} charged, {len(load.seen)} read ahead")
    assert resent > 0, "no charge was ever re-sent: the retries and kills tested nothing"
