"""Ranks from any launcher: torchrun, the deepspeed launcher, SLURM, or none at all.

No model, data or deepspeed here. ``dist_env()`` reads the environment only; ``setup_env()``
fills the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from
SLURM's when a job was started by ``srun`` directly, so every later consumer (torch.distributed,
DeepSpeed, webdataset) sees one convention.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = ["DistEnv", "dist_env", "setup_env", "expand_slurm_nodelist", "print0", "seed_everything",
           "rank_seed", "is_main", "StopFlag", "die_with_parent"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"   # "torchrun" | "deepspeed" | "slurm" | "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list without scontrol: "gpu[01-03,07],cpu5" ->
    ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]. Zero padding is kept."""
    hosts: list[str] = []
    # split on commas that are not inside brackets
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def _slurm_first_host(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:  # scontrol knows every SLURM syntax; fall back to our parser where it is absent
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_slurm_nodelist(nodelist)[0]


def dist_env(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read rank and world size from the environment of whichever launcher started us."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:   # torchrun, or deepspeed's launcher (sets the same)
        launcher = "deepspeed" if "CROSS_RANK" in env or "DS_LAUNCHER" in env else "torchrun"
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", 1)))
        return DistEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                       local_rank=int(env.get("LOCAL_RANK", 0)), local_world_size=local_world,
                       node_rank=int(env.get("GROUP_RANK", env.get("CROSS_RANK", env.get("NODE_RANK", 0)))),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port,
                       launcher=launcher)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per process
        ntasks = int(env["SLURM_NTASKS"])
        nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", 1)))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "")
        m = re.match(r"(\d+)", per_node)
        local_world = int(m.group(1)) if m else max(1, ntasks // max(1, nnodes))
        return DistEnv(rank=int(env["SLURM_PROCID"]), world_size=ntasks,
                       local_rank=int(env.get("SLURM_LOCALID", 0)), local_world_size=local_world,
                       node_rank=int(env.get("SLURM_NODEID", 0)),
                       master_addr=env.get("MASTER_ADDR") or _slurm_first_host(env),
                       master_port=port, launcher="slurm")
    return DistEnv()


def setup_env(env: Optional[dict] = None) -> DistEnv:
    """Export the torchrun convention (RANK, WORLD_SIZE, ...) derived from whatever launcher ran us."""
    target = os.environ if env is None else env
    if env is None:
        die_with_launcher()      # a worker whose launcher dies exits within seconds (no orphans)
    d = dist_env(target)
    if d.launcher == "slurm":
        target.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      LOCAL_WORLD_SIZE=str(d.local_world_size), MASTER_ADDR=d.master_addr,
                      MASTER_PORT=str(d.master_port))
    return d


_PARENT_WATCH: dict = {}
PR_SET_PDEATHSIG = 1


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent: Optional[int] = None, method: str = "auto", interval: float = 1.0) -> str:
    """Exit (SIGKILL) as soon as the launcher that started this process dies: no orphaned trainers.

    torchrun starts each worker in a session of its own, so a SIGKILL of the torchrun agent alone
    (or its OOM kill) used to leave the workers training and writing checkpoints into the run
    directory, beside any restarted job. A SIGKILL keeps the run directory consistent: checkpoints
    are atomic (checkpoint.py), the newest complete one stays ``latest``.

    method "auto": Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (the kernel sends the signal when the
    parent dies), with a watchdog thread polling ``os.getppid()`` every ``interval`` seconds
    as well (and alone where prctl is missing: another OS, no libc). "prctl" / "watchdog": one of them.
    Caveat of PDEATHSIG: the kernel fires it when the parent *thread* that forked us exits, not
    the parent process. torchrun (torch.distributed.elastic) and DeepSpeed's launcher start workers
    from their main thread, which lives as long as the agent; a launcher that forks from a
    short-lived thread needs ``FW_DIE_WITH_PARENT=watchdog``. Idempotent; returns what was armed
    ("" when the parent is already init, i.e. the launcher is gone or there is none)."""
    method = os.environ.get("FW_DIE_WITH_PARENT", method)
    if method in ("0", "off", "none"):
        return ""
    parent = os.getppid() if parent is None else parent
    if _PARENT_WATCH.get("parent") == parent:
        return _PARENT_WATCH["armed"]
    if parent <= 1:
        return ""
    armed = []
    if method in ("auto", "prctl") and sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                armed.append("prctl")
        except (OSError, AttributeError):
            pass
    if method in ("auto", "watchdog") or not armed:
        def watch():
            while True:
                if os.getppid() != parent:
                    _kill_self()
                threading.Event().wait(interval)
        threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
        armed.append("watchdog")
    if os.getppid() != parent:      # it died before prctl took effect
        _kill_self()
    _PARENT_WATCH.update(parent=parent, armed="+".join(armed))
    return _PARENT_WATCH["armed"]


def die_with_launcher() -> str:
    """``die_with_parent`` for workers started by a launcher agent (torchrun, the deepspeed launcher),
    whose parent is that agent. Not for a plain ``python -m framework.train``: its parent is a shell,
    which may exit on purpose (nohup) while training goes on."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or "DS_LAUNCHER" in env or "CROSS_RANK" in env:
        return die_with_parent()
    return ""


def is_main() -> bool:
    return dist_env().rank == 0


def print0(*args, **kwargs) -> None:
    """print on global rank 0 only."""
    if dist_env().rank == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def rank_seed(seed: int, rank: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, rank, stream)."""
    return (seed * 1_000_003 + rank * 7_919 + stream * 104_729) % (2 ** 63 - 1)


def seed_everything(seed: int, rank: Optional[int] = None) -> int:
    """Seed python, numpy and torch for this rank; returns the seed used."""
    rank = dist_env().rank if rank is None else rank
    s = rank_seed(seed, rank)
    random.seed(s)
    try:
        import numpy as np
        np.random.seed(s % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch
        torch.manual_seed(s)
    except ImportError:  # pragma: no cover
        pass
    return s


class StopFlag:
    """SIGTERM / SIGUSR1 (SLURM preemption) record the signal instead of killing the process; the
    training loop checks ``signum`` after each step (agreed across ranks), checkpoints and exits 0.
    Install it as early as possible (the entry point does, before the heavy imports)."""

    def __init__(self):
        self.signum = 0
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread: signals stay with their default handlers
                pass

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
