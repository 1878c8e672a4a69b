"""FileStore under faults: torn tails, damaged records, a full disk, locks of dead processes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fasm.errors import StoreConflict, StoreCorrupt, StoreUnavailable
from fasm.persistence import FileStore
from fasm.persistence._file import CKPT_HEADER, FRAME_HEADER, key_file_name
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
