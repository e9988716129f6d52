"""One trainer per run directory: a lock file held by the job, with a heartbeat.

    with RunLock(run_dir):          # rank 0 only; the other ranks of the job take no lock
        train ...

``RUN/trainer.lock`` holds JSON: host, pid, the process's kernel start time (so a recycled pid is not
mistaken for the holder), the start time and a heartbeat that a daemon thread refreshes every
``heartbeat_s`` seconds (the file's mtime is refreshed with it). A second trainer on the same run
directory refuses with ``RunLockError`` naming the holder (host, pid, since when). A stale lock is
taken over with a warning:

- the holder ran on this host and its process is gone (pid dead, or the pid now belongs to a
  process that started later);
- the holder ran on another host and its heartbeat is older than ``stale_s`` (default 5 minutes).
  The age is measured on the file server's clock: the lock's mtime against the mtime of a file
  touched just now in the same directory, so clock skew between hosts does not matter.

A host is its hostname: two containers that share a hostname and a run directory but not a PID
namespace would each see the other's holder as gone; give them distinct hostnames.

Creation is atomic: the content is written to a private file, then ``os.link``-ed to the lock path
(fails if the path exists; atomic on local file systems and on NFS). Check and takeover run under an
``fcntl.flock`` of ``RUN/.trainer.lock.guard``, so two trainers racing for a stale lock cannot
both win. Tools that only read a run (export, inspect) take no lock.

Standard library only.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import warnings
from typing import Callable, Optional

__all__ = ["RunLock", "RunLockError", "RunDirError", "LOCK_NAME", "job_lock", "process_start_time"]

LOCK_NAME = "trainer.lock"
STALE_S = 300.0        # another host's lock without a heartbeat for this long is stale
HEARTBEAT_S = 30.0


class RunLockError(RuntimeError):
    """Another live trainer holds the run directory."""


class RunDirError(RunLockError):
    """The run directory cannot hold a lock at all (not a directory, not writable, ...)."""


def process_start_time(pid: int) -> Optional[int]:
    """The kernel start time of ``pid`` (clock ticks since boot; Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])   # field 22, after "(comm)"
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, another user's
        pass
    now = process_start_time(pid)
    return not (start is not None and now is not None and now != start)   # a recycled pid is not the holder


def _describe(info: dict) -> str:
    since = info.get("start")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {when}"


class RunLock:
    def __init__(self, run_dir: str, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.guard = os.path.join(run_dir, "." + LOCK_NAME + ".guard")
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.token = f"{self.host}:{self.pid}:{time.time_ns()}"
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the lock file ---------------------------------------------------------------------------
    def _content(self, start: float) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "pid_start": process_start_time(self.pid),
                           "start": start, "heartbeat": time.time(), "token": self.token}) + "\n"

    def _write_private(self, start: float) -> str:
        tmp = f"{self.path}.{self.host}.{self.pid}.tmp"
        with open(tmp, "w") as f:
            f.write(self._content(start))
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}           # unreadable: judged by its age alone

    @contextlib.contextmanager
    def _guarded(self):
        import fcntl
        fd = os.open(self.guard, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _age(self, guard_fd: int) -> float:
        """Seconds since the lock file was last written, on the file system's clock."""
        os.write(guard_fd, b"x")            # touch: the guard's mtime is "now" on the file server
        os.ftruncate(guard_fd, 0)
        now = os.fstat(guard_fd).st_mtime
        return now - os.stat(self.path).st_mtime

    def _stale_reason(self, info: dict, guard_fd: int) -> Optional[str]:
        """None while the holder is alive, else why the lock is stale."""
        if info.get("host") == self.host and isinstance(info.get("pid"), int):
            if info["pid"] == self.pid:
                return "left by this very process (an earlier run that did not release it)"
            if not _pid_alive(info["pid"], info.get("pid_start")):
                return f"its process {info['pid']} on this host is gone"
            return None
        age = self._age(guard_fd)
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (> {self.stale_s:.0f} s)"
        return None

    # -- acquire / release ---------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        try:
            return self._acquire()
        except OSError as e:     # e.g. an unwritable run_dir: say so in one line
            raise RunDirError(f"run_dir {self.run_dir}: cannot create {self.path} ({e.strerror or e})") from e

    def _acquire(self) -> "RunLock":
        os.makedirs(self.run_dir, exist_ok=True)
        start = time.time()
        with self._guarded() as guard_fd:
            tmp = self._write_private(start)
            try:
                for _ in range(2):
                    try:
                        os.link(tmp, self.path)       # atomic create-with-content; EEXIST if held
                        break
                    except FileExistsError:
                        info = self._read()
                        if info is None:              # vanished in between: try again
                            continue
                        reason = self._stale_reason(info, guard_fd)
                        if reason is None:
                            raise RunLockError(
                                f"run_dir {self.run_dir} is in use by another trainer ({_describe(info)}): "
                                f"one trainer per run directory. Stop that job or choose another run_dir; "
                                f"if no trainer runs there, delete {self.path}") from None
                        warnings.warn(f"taking over the stale lock {self.path} ({_describe(info)}): {reason}")
                        os.unlink(self.path)
                else:
                    raise RunLockError(f"could not create {self.path}")
            finally:
                os.unlink(tmp)
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, args=(start,), name="runlock-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def _beat(self, start: float) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._guarded():
                    info = self._read()
                    if not info or info.get("token") != self.token:
                        warnings.warn(f"{self.path} was taken over by {_describe(info or {})}: "
                                      f"this trainer no longer holds the run directory")
                        return
                    tmp = self._write_private(start)
                    os.replace(tmp, self.path)
            except OSError as e:          # a full or flaky disk must not kill training
                warnings.warn(f"could not refresh {self.path}: {e}")

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with self._guarded():
                info = self._read()
                if info and info.get("token") == self.token:
                    os.unlink(self.path)
        except OSError as e:
            warnings.warn(f"could not remove {self.path}: {e}")
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def job_lock(run_dir: str, rank: int, share: Optional[Callable[[Optional[str]], Optional[str]]] = None,
             **kw):
    """The lock for a whole job: rank 0 takes it, the other ranks none. ``share(x)`` sends rank 0's
    outcome (None, or the refusal as (error class name, message)) to every rank and returns it (a
    broadcast), so that every rank of a refused job raises instead of waiting for rank 0 in a
    collective."""
    lock, err = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir, **kw).acquire()
        except RunLockError as e:
            err = (type(e).__name__, str(e))
    if share is not None:
        err = share(err)
    if err is not None:
        if lock is not None:
            lock.release()
        raise (RunDirError if err[0] == "RunDirError" else RunLockError)(err[1])
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
