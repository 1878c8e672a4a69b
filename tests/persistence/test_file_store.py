"""FileStore under faults: torn tails, damaged records, a full disk, locks of dead processes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from fasm.errors import StoreConflict, StoreCorrupt, StoreUnavailable
from fasm.persistence import FileStore
from fasm.persistence._file_format import CKPT_HEADER, FRAME_HEADER, key_file_name
from tests.persistence._faults import check_killed_holder_frees_key, flip_file_byte

pytestmark = pytest.mark.anyio

KEY = "order/42"


def key_dir(root: Path, key: str = KEY) -> Path:
    return root / key_file_name(key)


def segment(root: Path, start: int, key: str = KEY) -> Path:
    return key_dir(root, key) / f"jrnl-{start:020d}"


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the file system is full (raises OSError)."""
    with open(path, "wb", buffering=0) as f:
        while True:
            f.write(bytes(4096))


async def opened(root: Path, **kwargs: bool) -> FileStore:
    store = FileStore(root, **kwargs)
    await store.open()
    return store


async def three_entries(root: Path) -> None:
    """Commit 0->1 (entry b"one") and 1->3 (b"two", b"three") and close."""
    store = await opened(root)
    await store.commit(KEY, expected_seq=0, seq=1, entries=[b"one"])
    await store.commit(KEY, expected_seq=1, seq=3, entries=[b"two", b"three"])
    await store.close()


# -- torn tails and corruption ---------------------------------------------------------------


async def test_truncated_tail_hides_the_whole_unfinished_commit(tmp_path: Path) -> None:
    await three_entries(tmp_path)
    path = segment(tmp_path, 1)
    full = path.stat().st_size
    assert full == 3 * FRAME_HEADER + len(b"one") + len(b"two") + len(b"three")
    # Cut inside the last frame: entry 2 is intact, but its commit (2..3) did not finish.
    os.truncate(path, full - 2)
    store = await opened(tmp_path)
    got = await store.load(KEY)
    assert got is not None
    assert (got.seq, got.journal) == (1, ((1, b"one"),))
    # The next writer cuts the torn tail off and continues from seq 1.
    await store.commit(KEY, expected_seq=1, seq=2, entries=[b"two again"])
    await store.close()
    assert path.stat().st_size == 2 * FRAME_HEADER + len(b"one") + len(b"two again")
    store = await opened(tmp_path)
    got = await store.load(KEY)
    assert got is not None
    assert got.journal == ((1, b"one"), (2, b"two again"))
    await store.close()


async def test_tail_cut_at_a_frame_boundary_hides_the_unfinished_commit(tmp_path: Path) -> None:
    await three_entries(tmp_path)
    path = segment(tmp_path, 1)
    os.truncate(path, 2 * FRAME_HEADER + len(b"one") + len(b"two"))  # frames 1 and 2 whole
    store = await opened(tmp_path)
    got = await store.load(KEY)
    assert got is not None and got.seq == 1
    await store.close()


async def test_zero_filled_tail_is_a_torn_write(tmp_path: Path) -> None:
    await three_entries(tmp_path)
    append_bytes(segment(tmp_path, 1), bytes(4096))  # blocks a crash allocated, never wrote
    store = await opened(tmp_path)
    got = await store.load(KEY)
    assert got is not None and got.seq == 3
    await store.commit(KEY, expected_seq=3, seq=4, entries=[b"four"])
    got = await store.load(KEY)
    assert got is not None and [s for s, _ in got.journal] == [1, 2, 3, 4]
    await store.close()


@pytest.mark.parametrize(("where", "what"), [
    (FRAME_HEADER + 1, "a payload byte of the first entry"),
    (8, "the length in the first frame header"),
    (2 * FRAME_HEADER + len(b"one") + len(b"two") - 1, "the last byte of entry 2"),
])
async def test_damage_before_the_tail_is_corruption(tmp_path: Path, where: int,
                                                    what: str) -> None:
    await three_entries(tmp_path)
    flip_file_byte(segment(tmp_path, 1), where)
    store = await opened(tmp_path)
    with pytest.raises(StoreCorrupt, match="order/42") as caught:
        await store.load(KEY)
    assert "jrnl-" in str(caught.value), what
    # A writer refuses to build on damaged records.
    with pytest.raises(StoreCorrupt):
        await store.commit(KEY, expected_seq=3, seq=4, entries=[b"four"])
    await store.close()


async def test_damaged_last_frame_is_corruption_not_a_torn_tail(tmp_path: Path) -> None:
    """The last commit returned, so its complete frame failing a check is bit rot."""
    await three_entries(tmp_path)
    path = segment(tmp_path, 1)
    flip_file_byte(path, path.stat().st_size - 1)
    store = await opened(tmp_path)
    with pytest.raises(StoreCorrupt, match="checksum"):
        await store.load(KEY)
    await store.close()


async def test_missing_checkpoint_is_a_gap(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.commit(KEY, expected_seq=0, seq=3, checkpoint=b"c3")
    await store.commit(KEY, expected_seq=3, seq=5, entries=[b"4", b"5"])
    (key_dir(tmp_path) / f"ckpt-{3:020d}").unlink()
    with pytest.raises(StoreCorrupt, match="seq 4 where 1 was expected"):
        await store.load(KEY)
    await store.close()


@pytest.mark.parametrize("damage", ["flip-payload", "flip-header", "truncate"])
async def test_damaged_checkpoint_file_is_corruption(tmp_path: Path, damage: str) -> None:
    store = await opened(tmp_path)
    await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"state" * 1000)
    await store.close()
    path = key_dir(tmp_path) / f"ckpt-{1:020d}"
    if damage == "flip-payload":
        flip_file_byte(path, CKPT_HEADER + 100)
    elif damage == "flip-header":
        flip_file_byte(path, 10)
    else:
        os.truncate(path, path.stat().st_size - 1)
    store = await opened(tmp_path)
    with pytest.raises(StoreCorrupt, match="ckpt-"):
        await store.load(KEY)
    await store.close()


async def test_checkpoint_drops_the_journal_files(tmp_path: Path) -> None:
    await three_entries(tmp_path)
    store = await opened(tmp_path)
    await store.commit(KEY, expected_seq=3, seq=4, checkpoint=b"c4")
    assert sorted(p.name for p in key_dir(tmp_path).iterdir()) == [f"ckpt-{4:020d}", "lock",
                                                                   "manifest"]
    await store.commit(KEY, expected_seq=4, seq=5, entries=[b"five"])
    assert segment(tmp_path, 5).exists()
    await store.close()


async def test_a_history_base_deletes_the_segments_it_covers(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    e = [f"e{i}".encode() for i in range(7)]
    for a in (0, 2, 4):
        await store.commit(KEY, expected_seq=a, seq=a + 2, entries=e[a + 1:a + 3],
                           checkpoint=f"c{a + 2}".encode(), keep_journal=True,
                           history_base=(2, b"c2") if a == 4 else None)
    names = sorted(p.name for p in key_dir(tmp_path).iterdir())
    assert names == [f"base-{2:020d}", f"ckpt-{6:020d}", f"jrnl-{3:020d}", f"jrnl-{5:020d}",
                     "lock", "manifest"]
    await store.close()


async def test_leftovers_of_a_crash_while_trimming_history_are_ignored(tmp_path: Path) -> None:
    """A crash after a new base is durable but before the older base and the segments it
    covers are deleted: the newest base counts and the history starts right after it."""
    store = await opened(tmp_path)
    e = [f"e{i}".encode() for i in range(9)]
    for a in (0, 2, 4):
        await store.commit(KEY, expected_seq=a, seq=a + 2, entries=e[a + 1:a + 3],
                           checkpoint=f"c{a + 2}".encode(), keep_journal=True,
                           history_base=(2, b"c2") if a == 4 else None)
    kdir = key_dir(tmp_path)
    saved = {n: (kdir / n).read_bytes() for n in (f"base-{2:020d}", f"jrnl-{3:020d}")}
    await store.commit(KEY, expected_seq=6, seq=8, entries=e[7:9], checkpoint=b"c8",
                       keep_journal=True, history_base=(4, b"c4"))
    for name, data in saved.items():  # as if the deletions never ran
        (kdir / name).write_bytes(data)
    await store.close()
    store = await opened(tmp_path)
    assert await store.history_base(KEY) == (4, b"c4")
    assert [s for s, _ in await store.history(KEY)] == [5, 6, 7, 8]
    await store.close()


async def test_leftovers_of_a_crash_between_rename_and_cleanup_are_ignored(
        tmp_path: Path) -> None:
    await three_entries(tmp_path)
    old_segment = segment(tmp_path, 1).read_bytes()
    store = await opened(tmp_path)
    await store.commit(KEY, expected_seq=3, seq=4, checkpoint=b"c4")
    await store.close()
    # As if the process died after the rename, before deleting what the checkpoint covers,
    # and while writing the next checkpoint.
    segment(tmp_path, 1).write_bytes(old_segment)
    (key_dir(tmp_path) / f"ckpt-{9:020d}.tmp").write_bytes(b"half a checkpoint")
    store = await opened(tmp_path)
    got = await store.load(KEY)
    assert got is not None
    assert (got.seq, got.checkpoint, got.checkpoint_seq, got.journal) == (4, b"c4", 4, ())
    await store.commit(KEY, expected_seq=4, seq=5, entries=[b"five"])
    got = await store.load(KEY)
    assert got is not None and got.journal == ((5, b"five"),)
    assert not list(key_dir(tmp_path).glob("*.tmp"))  # the writer cleaned up
    await store.close()


async def test_a_directory_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "important.txt").write_text("not yours")
    with pytest.raises(StoreCorrupt, match="not a fasm file store"):
        await FileStore(tmp_path).open()
    assert (tmp_path / "important.txt").read_text() == "not yours"


async def test_without_fsync_data_still_round_trips(tmp_path: Path) -> None:
    store = await opened(tmp_path, fsync=False)
    await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"c")
    await store.commit(KEY, expected_seq=1, seq=2, entries=[b"e"])
    await store.close()
    store = await opened(tmp_path)
    got = await store.load(KEY)
    assert got is not None and (got.seq, got.checkpoint, got.journal) == (2, b"c", ((2, b"e"),))
    await store.close()


# -- a full disk -----------------------------------------------------------------------------


class FillingDisk(FileStore):
    """A FileStore whose disk fills up after ``room`` more bytes, mid-write."""

    room: int | None = None

    def _write_at(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        if self.room is not None and len(data) > self.room:
            super()._write_at(fd, memoryview(data)[:self.room], offset)
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.room is not None:
            self.room -= len(data)
        super()._write_at(fd, data, offset)


async def test_disk_full_mid_append_commits_nothing(tmp_path: Path) -> None:
    store = FillingDisk(tmp_path)
    await store.open()
    await store.commit(KEY, expected_seq=0, seq=2, entries=[b"one", b"two"])
    size = segment(tmp_path, 1).stat().st_size
    store.room = FRAME_HEADER + 10  # the first new frame fits, the second does not
    with pytest.raises(StoreUnavailable, match="disk full, nothing committed") as caught:
        await store.commit(KEY, expected_seq=2, seq=4, entries=[b"three", b"four" * 100])
    assert "order/42" in str(caught.value) and "seq=4" in str(caught.value)
    assert segment(tmp_path, 1).stat().st_size == size  # the partial frames were cut off
    got = await store.load(KEY)
    assert got is not None and got.seq == 2
    store.room = None  # space freed
    await store.commit(KEY, expected_seq=2, seq=3, entries=[b"three"])
    await store.close()
    store = FillingDisk(tmp_path)
    await store.open()
    got = await store.load(KEY)
    assert got is not None and got.journal == ((1, b"one"), (2, b"two"), (3, b"three"))
    await store.close()


async def test_disk_full_mid_checkpoint_commits_nothing(tmp_path: Path) -> None:
    store = FillingDisk(tmp_path)
    await store.open()
    await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"small")
    store.room = 1000
    with pytest.raises(StoreUnavailable, match="disk full writing a checkpoint"):
        await store.commit(KEY, expected_seq=1, seq=2, checkpoint=b"x" * 5000)
    assert sorted(p.name for p in key_dir(tmp_path).iterdir()) == [f"ckpt-{1:020d}", "lock",
                                                                   "manifest"]
    store.room = None
    await store.commit(KEY, expected_seq=1, seq=2, checkpoint=b"x" * 5000)
    got = await store.load(KEY)
    assert got is not None and (got.seq, got.checkpoint) == (2, b"x" * 5000)
    await store.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs, where this process may mount one (root); skipped otherwise."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    tool = shutil.which("mount")
    if tool is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8); the injected fault tests cover it")
    done = subprocess.run([tool, "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_real_full_disk(small_tmpfs: Path) -> None:
    root = small_tmpfs / "store"
    store = await opened(root)
    await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"c" * 1000)
    await store.commit(KEY, expected_seq=1, seq=2, entries=[b"two"])
    filler = small_tmpfs / "filler"
    with pytest.raises(OSError, match="No space"):
        fill(filler)
    with pytest.raises(StoreUnavailable, match="disk full"):
        await store.commit(KEY, expected_seq=2, seq=3, entries=[b"x" * 20000])
    with pytest.raises(StoreUnavailable, match="disk full"):
        await store.commit(KEY, expected_seq=2, seq=3, checkpoint=b"y" * 20000)
    got = await store.load(KEY)
    assert got is not None and (got.seq, got.checkpoint, got.journal) == (
        2, b"c" * 1000, ((2, b"two"),))
    filler.unlink()
    await store.commit(KEY, expected_seq=2, seq=3, entries=[b"x" * 20000])
    await store.commit(KEY, expected_seq=3, seq=4, checkpoint=b"y" * 20000)
    await store.close()
    store = await opened(root)
    got = await store.load(KEY)
    assert got is not None and (got.seq, got.checkpoint) == (4, b"y" * 20000)
    await store.close()


# -- locks -----------------------------------------------------------------------------------


async def test_a_second_store_object_is_refused(tmp_path: Path) -> None:
    a, b = await opened(tmp_path), await opened(tmp_path)
    await a.acquire(KEY)
    with pytest.raises(StoreConflict, match="held by another"):
        await b.acquire(KEY)
    with pytest.raises(StoreConflict, match="held by another"):
        await b.commit(KEY, expected_seq=0, seq=1, entries=[b"sneaky"])
    await a.commit(KEY, expected_seq=0, seq=1, entries=[b"mine"])
    await a.release(KEY)
    await b.commit(KEY, expected_seq=1, seq=2, entries=[b"yours"])
    got = await a.load(KEY)
    assert got is not None and got.journal == ((1, b"mine"), (2, b"yours"))
    await a.close()
    await b.close()


async def test_a_killed_process_does_not_keep_the_key(tmp_path: Path) -> None:
    root = tmp_path / "store"
    await check_killed_holder_frees_key(lambda: FileStore(root), "FileStore",
                                        f"FileStore({str(root)!r})", KEY)


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.close()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.load(KEY)
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.commit(KEY, expected_seq=0, seq=1, entries=[b"x"])


# -- files deleted or cut behind the store's back ---------------------------------------------


async def snapshots(root: Path, upto: int = 3) -> None:
    """Commit checkpoints 0->1 .. upto-1->upto, as Snapshot() does, and close."""
    store = await opened(root)
    for seq in range(1, upto + 1):
        await store.commit(KEY, expected_seq=seq - 1, seq=seq, checkpoint=f"c{seq}".encode())
    await store.close()


async def checkpoint_and_journal(root: Path) -> None:
    """Commit a checkpoint at 3, then entries 4..6 in two commits, and close."""
    store = await opened(root)
    await store.commit(KEY, expected_seq=0, seq=3, checkpoint=b"c3")
    await store.commit(KEY, expected_seq=3, seq=4, entries=[b"4"])
    await store.commit(KEY, expected_seq=4, seq=6, entries=[b"5", b"6"])
    await store.close()


async def refused(root: Path, match: str, expected_seq: int) -> None:
    """Load raises StoreCorrupt naming the key, and a writer refuses to build on the remains."""
    store = await opened(root)
    try:
        with pytest.raises(StoreCorrupt, match=match) as caught:
            await store.load(KEY)
        assert "order/42" in str(caught.value) and type(caught.value) is StoreCorrupt
        with pytest.raises(StoreCorrupt) as caught:
            await store.commit(KEY, expected_seq=expected_seq, seq=expected_seq + 1,
                               checkpoint=b"over history")
        assert type(caught.value) is StoreCorrupt
    finally:
        await store.close()


async def test_the_only_checkpoint_deleted_is_refused_not_a_new_key(tmp_path: Path) -> None:
    """Under Snapshot a key is one checkpoint file: deleted, the key must not open at seq 0."""
    await snapshots(tmp_path)
    (key_dir(tmp_path) / f"ckpt-{3:020d}").unlink()
    await refused(tmp_path, "checkpoint and journal files are missing", 0)


@pytest.mark.parametrize("with_checkpoint", [True, False])
async def test_a_deleted_journal_segment_is_refused(tmp_path: Path,
                                                    with_checkpoint: bool) -> None:
    if with_checkpoint:
        await checkpoint_and_journal(tmp_path)
        segment(tmp_path, 4).unlink()
        await refused(tmp_path, f"jrnl-{4:020d} is missing", 3)
    else:
        await three_entries(tmp_path)
        segment(tmp_path, 1).unlink()
        await refused(tmp_path, "checkpoint and journal files are missing", 0)


async def test_checkpoint_and_segment_deleted_is_refused(tmp_path: Path) -> None:
    await checkpoint_and_journal(tmp_path)
    segment(tmp_path, 4).unlink()
    (key_dir(tmp_path) / f"ckpt-{3:020d}").unlink()
    await refused(tmp_path, "checkpoint and journal files are missing", 0)


@pytest.mark.parametrize("cut", ["to-zero", "inside-the-first-commit"])
async def test_a_segment_cut_before_its_first_acknowledged_commit_is_refused(
        tmp_path: Path, cut: str) -> None:
    await checkpoint_and_journal(tmp_path)
    os.truncate(segment(tmp_path, 4), 0 if cut == "to-zero" else FRAME_HEADER)
    await refused(tmp_path, "was cut short", 3)


@pytest.mark.parametrize("name", ["manifest", "FASM-STORE", "checkpoint"])
async def test_a_file_truncated_to_zero_bytes_is_refused(tmp_path: Path, name: str) -> None:
    await checkpoint_and_journal(tmp_path)
    path = {"manifest": key_dir(tmp_path) / "manifest", "FASM-STORE": tmp_path / "FASM-STORE",
            "checkpoint": key_dir(tmp_path) / f"ckpt-{3:020d}"}[name]
    os.truncate(path, 0)
    with pytest.raises(StoreCorrupt):
        store = await opened(tmp_path)
        try:
            await store.load(KEY)
        finally:
            await store.close()


async def test_a_new_segment_torn_before_its_first_commit_still_loads(tmp_path: Path) -> None:
    """A crash after creating the next segment, before its first commit was durable (so before
    the manifest named it): the commit never returned, and the key loads at the checkpoint."""
    store = await opened(tmp_path)
    await store.commit(KEY, expected_seq=0, seq=2, entries=[b"1", b"2"])
    await store.commit(KEY, expected_seq=2, seq=3, checkpoint=b"c3")
    await store.close()
    segment(tmp_path, 4).write_bytes(b"\0" * 100)  # allocated, never written
    store = await opened(tmp_path)
    got = await store.load(KEY)
    assert got is not None and (got.seq, got.checkpoint, got.journal) == (3, b"c3", ())
    await store.commit(KEY, expected_seq=3, seq=4, entries=[b"4"])
    await store.close()
    segment(tmp_path, 4).unlink()  # the manifest now names it: its loss is detected
    await refused(tmp_path, f"jrnl-{4:020d} is missing", 3)


async def test_a_crash_before_the_manifest_named_a_new_segment(tmp_path: Path) -> None:
    """The segment's first commit is durable, the manifest not yet rewritten: it loads, and
    the next writer brings the manifest up to date."""
    await checkpoint_and_journal(tmp_path)
    manifest = key_dir(tmp_path) / "manifest"
    store = await opened(tmp_path)
    await store.commit(KEY, expected_seq=6, seq=7, checkpoint=b"c7")
    before = manifest.read_bytes()  # names jrnl-4, which the checkpoint at 7 covers
    await store.commit(KEY, expected_seq=7, seq=8, entries=[b"8"])
    await store.close()
    manifest.write_bytes(before)  # as if the process died before replacing it
    store = await opened(tmp_path)
    got = await store.load(KEY)
    assert got is not None and got.seq == 8
    await store.acquire(KEY)
    await store.commit(KEY, expected_seq=8, seq=9, entries=[b"9"])
    await store.close()
    assert manifest.read_bytes() != before
    segment(tmp_path, 8).unlink()
    await refused(tmp_path, f"jrnl-{8:020d} is missing", 7)


async def test_a_format_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    """Format 1 had no manifest: its files load as they are, the marker is rewritten, and the
    first commit on a key writes the key's manifest, from when on lost files are detected."""
    await checkpoint_and_journal(tmp_path)
    (key_dir(tmp_path) / "manifest").unlink()  # what format 1 wrote
    (tmp_path / "FASM-STORE").write_text("fasm file store 1\n", encoding="utf-8")
    store = await opened(tmp_path)
    assert (tmp_path / "FASM-STORE").read_text(encoding="utf-8") == "fasm file store 3\n"
    got = await store.load(KEY)
    assert got is not None and (got.seq, got.checkpoint, got.journal) == (
        6, b"c3", ((4, b"4"), (5, b"5"), (6, b"6")))
    await store.commit(KEY, expected_seq=6, seq=7, entries=[b"7"])
    await store.close()
    assert (key_dir(tmp_path) / "manifest").exists()
    segment(tmp_path, 4).unlink()
    await refused(tmp_path, f"jrnl-{4:020d} is missing", 3)


# -- a second writer after the lock file was deleted -----------------------------------------


@pytest.mark.parametrize("strategy", ["journal", "snapshot"])
async def test_a_holder_whose_lock_file_was_replaced_cannot_overwrite(tmp_path: Path,
                                                                      strategy: str) -> None:
    """The lock file deleted while A holds the key lets B acquire it; whoever is stale is
    refused at commit time and no acknowledged commit is overwritten."""
    a, b = await opened(tmp_path), await opened(tmp_path)
    await a.acquire(KEY)

    async def step(store: FileStore, seq: int, what: bytes) -> None:
        if strategy == "journal":
            await store.commit(KEY, expected_seq=seq - 1, seq=seq, entries=[what])
        else:
            await store.commit(KEY, expected_seq=seq - 1, seq=seq, checkpoint=what)

    for seq in range(1, 8):
        await step(a, seq, f"a{seq}".encode())
    (key_dir(tmp_path) / "lock").unlink()
    await b.acquire(KEY)  # a new lock file: B cannot know about A
    got = await b.load(KEY)
    assert got is not None and got.seq == 7
    await step(b, 8, b"b8")
    with pytest.raises(StoreConflict, match="lock file was deleted or replaced"):
        await step(a, 8, b"a8")
    with pytest.raises(StoreConflict, match="lock file was deleted or replaced"):
        await step(a, 9, b"a9")
    await step(b, 9, b"b9")
    await a.close()
    await b.close()
    store = await opened(tmp_path)
    got = await store.load(KEY)
    assert got is not None and got.seq == 9
    if strategy == "journal":
        assert got.journal[-2:] == ((8, b"b8"), (9, b"b9"))
    else:
        assert got.checkpoint == b"b9"
    await store.close()


async def test_a_holder_whose_lock_file_was_deleted_refuses_to_commit(tmp_path: Path) -> None:
    """Deleted and not yet recreated: nobody else writes yet, but nothing stops one from
    starting, so the holder stops before writing."""
    store = await opened(tmp_path)
    await store.acquire(KEY)
    await store.commit(KEY, expected_seq=0, seq=1, entries=[b"one"])
    (key_dir(tmp_path) / "lock").unlink()
    with pytest.raises(StoreConflict, match="lock file was deleted or replaced"):
        await store.commit(KEY, expected_seq=1, seq=2, entries=[b"two"])
    await store.release(KEY)
    await store.acquire(KEY)  # a fresh lock file: writing is safe again
    await store.commit(KEY, expected_seq=1, seq=2, entries=[b"two"])
    got = await store.load(KEY)
    assert got is not None and got.journal == ((1, b"one"), (2, b"two"))
    await store.close()


_WRITER = """
import sys, anyio
from fasm.errors import StoreConflict
from fasm.persistence import FileStore

async def main():
    store = FileStore({root!r})
    await store.open()
    await store.acquire({key!r})
    for seq in range(1, 8):
        await store.commit({key!r}, expected_seq=seq - 1, seq=seq, entries=[b"child%d" % seq])
    print("committed 7", flush=True)
    sys.stdin.readline()
    try:
        await store.commit({key!r}, expected_seq=7, seq=8, entries=[b"child8"])
    except StoreConflict as e:
        print("conflict", e, flush=True)
    else:
        print("committed 8", flush=True)
    await store.close()

anyio.run(main)
"""


async def test_two_processes_after_the_lock_file_was_deleted(tmp_path: Path) -> None:
    root = tmp_path / "store"
    script = _WRITER.format(root=str(root), key=KEY)
    async with await anyio.open_process([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE) as child:
        assert child.stdout is not None and child.stdin is not None

        async def line() -> bytes:
            got = b""
            with anyio.fail_after(30):
                while not got.endswith(b"\n"):
                    got += await child.stdout.receive(1)  # type: ignore[union-attr]
            return got

        assert await line() == b"committed 7\n"
        (key_dir(root) / "lock").unlink()
        store = await opened(root)
        await store.acquire(KEY)  # the child still runs and holds its (deleted) lock file
        got = await store.load(KEY)
        assert got is not None and got.seq == 7
        await store.commit(KEY, expected_seq=7, seq=8, entries=[b"parent8"])
        await child.stdin.send(b"go\n")
        answer = await line()
        assert answer.startswith(b"conflict") and b"lock file was deleted or replaced" in answer
        with anyio.fail_after(30):
            assert await child.wait() == 0
        got = await store.load(KEY)
        assert got is not None and got.seq == 8 and got.journal[-1] == (8, b"parent8")
        await store.close()


# -- listing keys and kept history -------------------------------------------------------------


async def test_a_long_key_written_by_an_older_fasm_is_listed_after_its_next_commit(
        tmp_path: Path) -> None:
    """An h- directory holds the key's name since keys() was added; one made before (no name
    file) still loads, and is listed once it is written again."""
    long = "x" * 300
    store = await opened(tmp_path)
    await store.commit(long, expected_seq=0, seq=1, entries=[b"one"])
    await store.commit(KEY, expected_seq=0, seq=1, entries=[b"one"])
    assert await store.keys() == [KEY, long]
    await store.close()
    (key_dir(tmp_path, long) / "key").unlink()  # as an older fasm left it
    store = await opened(tmp_path)
    assert await store.keys() == [KEY]
    got = await store.load(long)
    assert got is not None and got.seq == 1
    await store.commit(long, expected_seq=1, seq=2, entries=[b"two"])
    assert await store.keys() == [KEY, long]
    await store.close()


async def test_a_key_only_acquired_is_not_listed(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.acquire(KEY)
    assert await store.keys() == []
    await store.close()


async def test_kept_segments_are_not_read_by_load(tmp_path: Path) -> None:
    """A segment a checkpoint kept is history: damage in it fails history(), never load()."""
    store = await opened(tmp_path)
    await store.commit(KEY, expected_seq=0, seq=2, entries=[b"one", b"two"])
    await store.commit(KEY, expected_seq=2, seq=3, entries=[b"three"], checkpoint=b"cp",
                       keep_journal=True)
    await store.commit(KEY, expected_seq=3, seq=4, entries=[b"four"])
    await store.close()
    flip_file_byte(segment(tmp_path, 1), FRAME_HEADER + 1)
    store = await opened(tmp_path)
    got = await store.load(KEY)
    assert got is not None and got.checkpoint == b"cp" and [s for s, _ in got.journal] == [4]
    with pytest.raises(StoreCorrupt):
        await store.history(KEY)


# -- group commits and the in-flight index -----------------------------------------------------


async def _group_left_by_a_crash(root: Path) -> None:
    """Leave a group's redo record as a crash right after the commit point leaves it: written,
    and no key touched yet (the record is the only trace of the group)."""
    from fasm.persistence import KeyCommit

    store = FileStore(root)
    await store.open()
    await store.acquire_all()
    await store.commit_many([KeyCommit("a", 0, 1, [b"a1"]), KeyCommit("b", 0, 1, [b"b1"])])
    group = [KeyCommit("a", 1, 2, [b"a2"], in_flight=True),
             KeyCommit("b", 1, 3, checkpoint=b"b@3", in_flight=True)]
    store._write_redo(group)  # the commit point, as the group's first step writes it
    await store.close()


async def test_a_recorded_group_is_applied_at_open(tmp_path: Path) -> None:
    await _group_left_by_a_crash(tmp_path)
    store = await opened(tmp_path)
    a, b = await store.load("a"), await store.load("b")
    assert a is not None and [e for _, e in a.journal] == [b"a1", b"a2"] and a.in_flight
    assert b is not None and (b.seq, b.checkpoint, b.in_flight) == (3, b"b@3", True)
    assert await store.keys_in_flight() == ["a", "b"]
    assert not (tmp_path / "FASM-STORE-REDO").exists()
    await store.close()


async def test_a_recorded_group_is_applied_by_an_open_store_at_acquire(tmp_path: Path) -> None:
    """A store opened before another process crashed with the record left applies it before it
    hands out a key of the group."""
    other = await opened(tmp_path)  # open before the record exists
    await _group_left_by_a_crash(tmp_path)
    await other.acquire("a")
    got = await other.load("a")
    assert got is not None and got.seq == 2
    await other.close()


async def test_a_torn_group_record_is_ignored(tmp_path: Path) -> None:
    """A crash while the record was written (before its rename) leaves a .tmp: nothing of the
    group is visible, and the leftover goes."""
    store = await opened(tmp_path)
    await store.commit("a", expected_seq=0, seq=1, entries=[b"a1"])
    await store.close()
    (tmp_path / "FASM-STORE-REDO.tmp").write_bytes(b"FRDO\0\1torn")
    store = await opened(tmp_path)
    got = await store.load("a")
    assert got is not None and got.seq == 1
    assert not (tmp_path / "FASM-STORE-REDO.tmp").exists()
    await store.close()


async def test_a_damaged_group_record_is_corruption(tmp_path: Path) -> None:
    await _group_left_by_a_crash(tmp_path)
    flip_file_byte(tmp_path / "FASM-STORE-REDO", 30)
    with pytest.raises(StoreCorrupt, match="FASM-STORE-REDO"):
        await FileStore(tmp_path).open()


async def test_a_format_2_store_opens_with_no_key_in_flight(tmp_path: Path) -> None:
    await checkpoint_and_journal(tmp_path)
    (tmp_path / "FASM-STORE-IN-FLIGHT").rmdir()  # what format 2 had
    (tmp_path / "FASM-STORE").write_text("fasm file store 2\n", encoding="utf-8")
    store = await opened(tmp_path)
    assert (tmp_path / "FASM-STORE").read_text(encoding="utf-8") == "fasm file store 3\n"
    got = await store.load(KEY)
    assert got is not None and got.seq == 6 and not got.in_flight
    assert await store.keys_in_flight() == []
    await store.close()


async def test_an_unacquired_commit_is_refused_while_another_object_holds_the_store(
        tmp_path: Path) -> None:
    a, b = await opened(tmp_path), await opened(tmp_path)
    await a.acquire_all()
    with pytest.raises(StoreConflict, match="acquire_all"):
        await b.commit("k", expected_seq=0, seq=1, entries=[b"x"])
    with pytest.raises(StoreConflict, match="acquire_all"):
        await b.commit("k", expected_seq=0, seq=1, entries=[b"x"], in_flight=True)
    assert await a.load("k") is None
    await a.release_all()
    await b.commit("k", expected_seq=0, seq=1, entries=[b"x"], in_flight=True)
    assert await a.keys_in_flight() == ["k"]
    await a.close()
    await b.close()


async def test_replaying_an_old_record_leaves_later_marks_alone(tmp_path: Path) -> None:
    """A record replayed after its keys moved on (say its deletion failed) changes nothing: the
    marks of later commits stand."""
    from fasm.persistence import KeyCommit

    await _group_left_by_a_crash(tmp_path)
    store = await opened(tmp_path)  # replays: a at 2 and b at 3, both in flight
    await store.commit("a", expected_seq=2, seq=3, entries=[b"a3"], in_flight=False)
    store._write_redo([KeyCommit("a", 1, 2, [b"a2"], in_flight=True),
                       KeyCommit("b", 1, 3, checkpoint=b"b@3", in_flight=True)])
    await store.close()
    store = await opened(tmp_path)
    got = await store.load("a")
    assert got is not None and got.seq == 3 and not got.in_flight
    assert await store.keys_in_flight() == ["b"]
    await store.close()
