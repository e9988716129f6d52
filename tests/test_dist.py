import pytest

from framework.dist import dist_env, expand_slurm_nodelist, rank_seed, setup_env


def test_no_launcher():
    d = dist_env({})
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (0, 1, 0, "none")
    assert not d.distributed


def test_torchrun_env():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234"}
    d = dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (5, 8, 1, 4, 1)
    assert (d.master_addr, d.master_port, d.launcher) == ("10.1.2.3", 1234, "torchrun")


def test_deepspeed_launcher_env():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "CROSS_RANK": "1", "LOCAL_SIZE": "2",
           "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    d = dist_env(env)
    assert (d.rank, d.local_rank, d.local_world_size, d.node_rank, d.launcher) == (3, 1, 2, 1, "deepspeed")


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[1-2],b5,c[09-10]", ["a1", "a2", "b5", "c09", "c10"]),
    ("rack1-n[8-9]-ib", ["rack1-n8-ib", "rack1-n9-ib"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def test_slurm_env(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")   # no scontrol: our own parser derives the master
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    d = dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (6, 8, 2, 4, 1)
    assert d.master_addr == "gpu07" and d.launcher == "slurm"
    out = dict(env)
    setup_env(out)
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["MASTER_ADDR"]) == ("6", "8", "2", "gpu07")
    assert out["MASTER_PORT"] == "29500"


def test_slurm_uses_scontrol(tmp_path, monkeypatch):
    stub = tmp_path / "scontrol"
    stub.write_text("#!/bin/sh\necho hostA\necho hostB\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    d = dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "weird-syntax"})
    assert d.master_addr == "hostA"


def test_torchrun_wins_over_slurm():
    # torchrun inside an sbatch allocation: torchrun's variables describe the processes
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert dist_env(env).launcher == "torchrun" and dist_env(env).world_size == 2


def test_rank_seeds_distinct():
    seeds = {rank_seed(0, r, s) for r in range(8) for s in range(3)}
    assert len(seeds) == 24
    assert rank_seed(1, 0) != rank_seed(0, 0)


# ---------------------------------------------------------------------------------------------
# No orphans: a worker dies with the launcher that started it
# ---------------------------------------------------------------------------------------------
_WORKER = r"""
import os, sys, time
from framework.dist import die_with_parent
armed = die_with_parent(method=sys.argv[1], interval=0.1) if sys.argv[1] != "none" else "none"
print(armed, os.getpid(), flush=True)
time.sleep(120)
"""
# the launcher: starts the worker in a session of its own (as torchrun does), then waits
_LAUNCHER = r"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("method", ["prctl", "watchdog", "none"])
def test_worker_dies_with_its_launcher(method):
    import os
    import signal
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _WORKER, method], cwd=root,
                                env=dict(os.environ, PYTHONPATH=root), stdout=subprocess.PIPE, text=True)
    armed, pid = launcher.stdout.readline().split()
    pid = int(pid)
    try:
        assert armed == method
        launcher.kill()                       # SIGKILL: the launcher cannot pass anything on
        launcher.wait()
        t0 = time.time()
        while time.time() - t0 < (1.5 if method == "none" else 5) and not _gone(pid):
            time.sleep(0.05)
        if method == "none":                  # without it the worker outlives its launcher
            assert not _gone(pid)
        else:
            assert _gone(pid), f"worker {pid} still alive {time.time() - t0:.1f} s after its launcher died"
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
