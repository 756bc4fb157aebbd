"""One run at a time per OUT_DIR, and no writes from the workers of a run that is over.

A driver killed with SIGKILL leaves its Ray workers running (measured: 60 s on one machine,
finishing their units and writing outputs after the driver was dead). A `--resume` started
meanwhile would run beside them. So:

  RunLock  the driver holds an flock on OUT_DIR/.camface-run.lock for its lifetime (the kernel
           drops it when the process dies, however it dies) and writes who it is, with a fresh
           token, to OUT_DIR/.camface-run.json. A second driver on the same OUT_DIR is refused,
           naming the owner.
  Owner    what the workers get: that file's path, the token, the driver's pid and host. A
           worker publishes a file (the atomic rename) only while its run still owns OUT_DIR
           (`check`): the token is the current one and, on the driver's host, the driver lives.
           `watch` ends the worker's process within WATCH_INTERVAL_S once that stops being
           true, so orphans neither write nor hold CPUs.

The next run cleans the temporary files a dead run left, after giving its workers
ORPHAN_GRACE_S to notice, and again when it ends.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from camface.errors import OutputError
from camface.outputs import process_alive, replace_whole

log = logging.getLogger(__name__)

LOCK_NAME, OWNER_NAME = ".camface-run.lock", ".camface-run.json"
WATCH_INTERVAL_S = 0.25  # how often a worker looks whether its run still owns OUT_DIR
ORPHAN_GRACE_S = 4 * WATCH_INTERVAL_S  # what a new run waits for a dead run's workers to stop


class Superseded(OutputError):
    """This worker's run no longer owns OUT_DIR: its driver died, or another run took over."""


_alive = process_alive


@dataclass(frozen=True)
class Owner:
    """The run that owns OUT_DIR, as its workers see it (plain values: Ray pickles it)."""

    path: str  # OUT_DIR/.camface-run.json
    token: str
    pid: int
    host: str

    def why_not_current(self) -> str | None:
        """Why this run no longer owns OUT_DIR, or None while it does."""
        try:
            now = json.loads(Path(self.path).read_text())
        except (OSError, ValueError):
            return f"{self.path} is gone or unreadable"
        if now.get("token") != self.token:
            return "another run owns the output folder now" if now.get("token") else "the run has ended"
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"its driver (pid {self.pid}) is dead"
        return None

    def check(self) -> None:
        """Raise Superseded unless this run still owns OUT_DIR (before publishing a file)."""
        why = self.why_not_current()
        if why is not None:
            raise Superseded(f"not writing to {Path(self.path).parent}: {why}")

    def watch(self) -> None:
        """End this process (a Ray worker) within WATCH_INTERVAL_S once the run no longer
        owns OUT_DIR; raises Superseded at once if it already does not. One watcher per
        process and run."""
        self.check()
        with _WATCHING_LOCK:
            if self.token in _WATCHING:
                return
            _WATCHING.add(self.token)
        threading.Thread(target=self._watch, name="camface-batch-owner", daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            why = self.why_not_current()
            if why is not None:
                log.warning("camface batch worker %d: stopping: %s", os.getpid(), why)
                os._exit(3)  # mid-write too: its temporary files are never renamed into place

    @classmethod
    def of(cls, values: dict | None) -> "Owner | None":
        return None if values is None else cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


_WATCHING: set[str] = set()  # tokens watched in this process (a worker runs several stages)
_WATCHING_LOCK = threading.Lock()


class RunLock:
    """The driver's hold on OUT_DIR (`acquire`, then `release`; the kernel releases the flock
    if the process dies first). `owner` is what the workers get; `earlier` what the last run
    wrote, if it ended without releasing (killed)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir).resolve()  # workers on other nodes and folders read the owner file
        self.owner: Owner | None = None
        self.earlier: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        info = self.out_dir / OWNER_NAME
        fd = os.open(self.out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{self.out_dir} is in use by another camface batch run ({_describe(info)}); "
                              "wait for it to end, or stop it first") from None
        self._fd = fd
        try:
            earlier = json.loads(info.read_text())
        except (OSError, ValueError):
            earlier = None
        self.earlier = earlier if earlier and earlier.get("token") else None
        self.owner = Owner(str(info), uuid.uuid4().hex, os.getpid(), socket.gethostname())
        try:
            self._write({**self.owner.to_dict(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        except OutputError:
            self._close()
            raise
        return self

    def release(self) -> None:
        """Say the run has ended (its workers stop) and drop the flock. A failure to say it (a
        full disk) is logged, not raised: it must not hide the error that ended the run, and
        the workers on this host stop anyway once the driver is gone."""
        if self._fd is None:
            return
        try:
            self._write({"token": None, "ended": time.strftime("%Y-%m-%d %H:%M:%S")})
        except OutputError as exc:
            log.warning("camface batch: %s", exc)
        finally:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def _write(self, value: dict) -> None:
        """Replace the owner file whole, workers never reading half of it (OutputError naming it
        when it cannot be written: a full disk). No ownership check: only the flock's holder writes
        it, and it is what `Owner.check` reads."""
        replace_whole(self.out_dir / OWNER_NAME, lambda tmp: tmp.write_text(json.dumps(value)))


def _describe(info: Path) -> str:
    try:
        now = json.loads(info.read_text())
        return f"pid {now['pid']} on {now['host']}, since {now.get('started', '?')}"
    except (OSError, ValueError, KeyError):
        return "its owner is unknown"
