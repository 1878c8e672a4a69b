"""What the kill -9 tests share: waiting for a child's READY line, and collecting what it prints
for a while before killing it without warning."""

from __future__ import annotations

import signal
import subprocess
import threading
import time


def ready(proc: subprocess.Popen[str]) -> list[str]:
    """The child's ``READY ...`` line, split; fails the test with its stderr if it never came."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"child did not start (a torn or unreadable store?): {line!r}\n{err}")
    return line.split()


def kill_after(proc: subprocess.Popen[str], seconds: float) -> list[str]:
    """Collect the child's stdout lines for ``seconds``, then SIGKILL it; every line it wrote
    before dying."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()))
    reader.start()
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return lines
