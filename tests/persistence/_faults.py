"""Helpers shared by the store tests: damaging bytes, and a process that dies holding a key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

import anyio

from fasm.errors import StoreConflict
from fasm.persistence import Store


def flip_byte(data: bytes, index: int) -> bytes:
    """``data`` with the bits of one byte inverted."""
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1:]


def flip_file_byte(path: os.PathLike[str] | str, index: int) -> None:
    """Invert one byte of a file in place, as bit rot would."""
    with open(path, "r+b") as f:
        f.seek(index)
        byte = f.read(1)
        f.seek(index)
        f.write(bytes([byte[0] ^ 0xFF]))


_HOLDER = """
import os, signal, sys, anyio
from fasm.persistence import {cls}

async def main():
    store = {make}
    await store.open()
    await store.acquire({key!r})
    print("held", flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)

anyio.run(main)
"""


async def check_killed_holder_frees_key(
    make_store: Callable[[], Store], cls: str, make: str, key: str
) -> None:
    """A child process acquires ``key`` and is SIGKILLed while holding it: the key is refused
    while the child lives and free once it is dead.

    Args:
        make_store: builds a store on the same location in this process.
        cls: the store class name the child imports from fasm.persistence.
        make: the Python expression the child evaluates to build its store.
        key: the key.
    """
    script = _HOLDER.format(cls=cls, make=make, key=key)
    async with await anyio.open_process([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE) as child:
        assert child.stdout is not None and child.stdin is not None
        line = b""
        with anyio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await child.stdout.receive(1)
        assert line == b"held\n"
        store = make_store()
        await store.open()
        try:
            try:
                await store.acquire(key)
            except StoreConflict:
                pass
            else:
                raise AssertionError("acquire succeeded while the child held the key")
            await child.stdin.send(b"go\n")
            with anyio.fail_after(30):
                code = await child.wait()
            assert code == -signal.SIGKILL
            # The kernel (or the database server) frees the lock once the process is gone; a
            # server may take a moment to notice the closed connection.
            with anyio.fail_after(10):
                while True:
                    try:
                        await store.acquire(key)
                        break
                    except StoreConflict:
                        await anyio.sleep(0.05)
        finally:
            await store.close()
