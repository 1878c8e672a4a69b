"""Child process for the kill -9 tests: a Runtime under steady load that reports every
acknowledged submit on stdout. The parent kills it at random moments and restarts it.

    python tests/persistence/kill_child.py STORE DIR SEED [--drain]

Prints ``READY <seq> <refs> <pending>`` once started, ``ACK <ref> <seq>`` after each committed
submit, and with --drain: waits until nothing is in flight and prints ``STATE <json>``.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fasm import (
    ActionsContainer,
    Input,
    Normal,
    Rejected,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
)
from fasm.persistence import FileStore, Journal, Snapshot, SQLiteStore, Store
from fasm.runtime import ActionContext, Runtime


@dataclass
class Book:
    refs: dict[int, int] = field(default_factory=dict)  # ref -> action id
    pending: dict[int, int] = field(default_factory=dict)  # action id -> ref
    done: dict[int, int] = field(default_factory=dict)  # ref -> times its result was applied
    next_id: int = 0


@dataclass(frozen=True)
class Record:
    ref: int


@dataclass(frozen=True)
class Work:
    ref: int


@dataclass(frozen=True)
class Worked:
    ref: int


class BookMachine(StateMachine[Book, Record, int, Work, Worked]):
    machine_name = "tests.kill9.book"

    async def stf(self, state: Book, input: Input[Record, int, Worked],
                  actions: ActionsContainer[int, Work, None]) -> None:
        match input:
            case Normal(Record(ref)):
                if ref in state.refs:
                    raise Rejected(f"ref {ref} recorded twice")
                aid = state.next_id
                actions.add(Tracked(aid, Work(ref)))
                state.next_id += 1
                state.refs[ref] = aid
                state.pending[aid] = ref
            case TrackedActionCompleted(aid, Worked(ref)):
                if state.pending.pop(aid, None) != ref:
                    raise Rejected(f"unexpected result {aid}")
                state.done[ref] = state.done.get(ref, 0) + 1

    async def restore(self, state: Book, actions: ActionsContainer[int, Work, None]) -> None:
        for aid, ref in state.pending.items():
            actions.add(Tracked(aid, Work(ref)))


def make_store(kind: str, data: Path) -> tuple[Store, Journal | Snapshot]:
    if kind.startswith("file"):
        store: Store = FileStore(data / "files")
    else:
        store = SQLiteStore(data / "book.db")
    durability = Snapshot() if kind.endswith("-snapshot") else Journal(checkpoint_every=50)
    return store, durability


async def main(kind: str, data: Path, seed: int, drain: bool) -> None:
    rng = random.Random(seed)

    async def work(action: Work, ctx: ActionContext) -> Worked:
        await anyio.sleep(rng.uniform(0.0, 0.03))
        return Worked(action.ref)

    store, durability = make_store(kind, data)
    rt = Runtime(BookMachine(), initial_state=Book, store=store, durability=durability,
                 executors={Work: work}, seed=seed)
    async with rt:
        print(f"READY {rt.seq} {len(rt.state.refs)} {len(rt.in_flight)}", flush=True)
        if drain:
            await rt.wait_idle()
            print("STATE " + json.dumps({"seq": rt.seq, "refs": rt.state.refs,
                                         "pending": rt.state.pending, "done": rt.state.done}),
                  flush=True)
            return
        next_ref = max(rt.state.refs, default=-1) + 1

        async def submitter(k: int) -> None:
            nonlocal next_ref
            while True:
                ref = next_ref
                next_ref += 1
                committed = await rt.submit(Record(ref))
                print(f"ACK {ref} {committed.seq}", flush=True)

        async with anyio.create_task_group() as tg:
            for k in range(8):  # concurrent submitters: group commits get killed too
                tg.start_soon(submitter, k)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), "--drain" in sys.argv)
