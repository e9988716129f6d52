"""One trainer per run directory (framework/train/runlock.py): real processes holding real lock files."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from framework.train.runlock import LOCK_NAME, RunLock, RunLockError, job_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = r"""
import sys, time
from framework.train.runlock import RunLock
lock = RunLock(sys.argv[1], heartbeat_s=float(sys.argv[2])).acquire()
print("held", flush=True)
sys.stdin.read()          # hold until the test closes our stdin (or kills us)
lock.release()
print("released", flush=True)
"""


def _holder(run_dir, heartbeat_s=30.0) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(heartbeat_s)], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "held", line + p.stderr.read()
    return p


def _write_lock(run_dir, **info) -> str:
    path = os.path.join(run_dir, LOCK_NAME)
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(info, f)
    return path


def test_second_trainer_refuses_naming_the_holder_then_takes_over_when_it_dies(tmp_path):
    run = tmp_path / "run"
    p = _holder(run)
    try:
        with pytest.raises(RunLockError) as e:
            RunLock(str(run)).acquire()
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and socket.gethostname() in msg and "since 20" in msg, msg
        assert str(run) in msg
        info = json.load(open(run / LOCK_NAME))
        assert (info["host"], info["pid"]) == (socket.gethostname(), p.pid)
    finally:
        p.kill()
        p.wait()
    # the holder died without releasing: its lock is stale on this host and taken over with a warning
    assert (run / LOCK_NAME).exists()
    with pytest.warns(UserWarning, match=f"stale lock.*pid {p.pid}.*is gone"):
        lock = RunLock(str(run)).acquire()
    assert json.load(open(run / LOCK_NAME))["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_release_frees_the_directory_for_the_next_trainer(tmp_path):
    p = _holder(tmp_path)
    p.stdin.close()
    assert p.stdout.readline().strip() == "released"
    p.wait()
    with RunLock(str(tmp_path)):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    path = _write_lock(tmp_path, host="elsewhere-node17", pid=12345, start=time.time() - 3600)
    with pytest.raises(RunLockError, match="host elsewhere-node17, pid 12345"):
        RunLock(str(tmp_path), stale_s=300).acquire()
    old = time.time() - 600                      # last heartbeat 10 minutes ago
    os.utime(path, (old, old))
    with pytest.warns(UserWarning, match="no heartbeat for"):
        with RunLock(str(tmp_path), stale_s=300):
            assert json.load(open(path))["host"] == socket.gethostname()


def test_recycled_pid_is_not_the_holder(tmp_path):
    # a live pid on this host, but started after the lock was written: not the trainer that wrote it
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, host=socket.gethostname(), pid=live.pid, pid_start=1, start=time.time())
        with pytest.warns(UserWarning, match="is gone"):
            RunLock(str(tmp_path)).acquire().release()
        from framework.train.runlock import process_start_time
        _write_lock(tmp_path, host=socket.gethostname(), pid=live.pid, pid_start=process_start_time(live.pid),
                    start=time.time())
        with pytest.raises(RunLockError, match=f"pid {live.pid}"):
            RunLock(str(tmp_path)).acquire()
    finally:
        live.kill()
        live.wait()


def test_heartbeat_refreshes_the_lock(tmp_path):
    p = _holder(tmp_path, heartbeat_s=0.1)
    try:
        path = tmp_path / LOCK_NAME
        old = time.time() - 3600
        os.utime(path, (old, old))
        first = json.load(open(path))["heartbeat"]
        time.sleep(0.6)
        assert time.time() - os.stat(path).st_mtime < 5
        assert json.load(open(path))["heartbeat"] > first
    finally:
        p.kill()
        p.wait()


RACE = r"""
import sys, time
from framework.train.runlock import RunLock, RunLockError
while time.time() < float(sys.argv[2]):
    pass
try:
    lock = RunLock(sys.argv[1]).acquire()
    print("won", flush=True)
    time.sleep(1.5)
except RunLockError:
    print("refused", flush=True)
"""


def test_racing_trainers_exactly_one_wins(tmp_path):
    go = time.time() + 1.5
    ps = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(go)], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
          for _ in range(4)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in ps)
    assert outs == ["refused", "refused", "refused", "won"], outs


def test_job_lock_refusal_reaches_every_rank(tmp_path):
    """rank 0's refusal is shared (a broadcast in the trainer) so ranks 1.. raise too."""
    p = _holder(tmp_path)
    try:
        sent = []

        def share(msg):          # what the broadcast does: every rank gets rank 0's message
            sent.append(msg)
            return msg
        with pytest.raises(RunLockError, match=f"pid {p.pid}"):
            with job_lock(str(tmp_path), 0, share=share):
                pass
        assert sent and f"pid {p.pid}" in sent[0][1]
        with pytest.raises(RunLockError, match=f"pid {p.pid}"):   # rank 1 takes no lock itself
            with job_lock(str(tmp_path), 1, share=lambda msg: sent[0]):
                pass
        with job_lock(str(tmp_path), 1, share=lambda msg: None) as lock:   # rank 1 of a job that holds it
            assert lock is None
    finally:
        p.kill()
        p.wait()


def test_unwritable_run_dir_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")       # fails even for root
    from framework.train.runlock import RunDirError
    with pytest.raises(RunDirError, match="run_dir .*file/run: cannot create"):
        RunLock(str(tmp_path / "file" / "run")).acquire()
