"""Tiny real training runs for the export / pipeline / evaluation tests, trained once per session.

Each run is a real `python -m framework.train` process (under torchrun for 2 ranks) on the tiny
config, the tiny encoder and tiny shards of tests/_fixtures.py. The data order is fixed (no shuffling,
16 shards of 4 samples, no workers) and the noise stream is global, so a 2-rank run with micro batch
4 sees exactly what a 1-rank run with micro batch 8 sees: their weights agree up to reduction order
(amplified by Adam at most lr/eps = 30 times, with optim.eps=1e-4).

The job helpers below (command line, arguments, run, start, metrics, wait) are shared with the
engine and robustness tests, which start their own jobs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests._fixtures import engine_assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
_CACHE: dict = {}


def assets(tmp_path_factory) -> dict:
    """tests/_fixtures.py's engine_assets (tiny encoder, 16 shards of 4), built once per session; read only."""
    if "assets" not in _CACHE:
        _CACHE["assets"] = engine_assets(tmp_path_factory.mktemp("train_assets"))
    return _CACHE["assets"]


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


TRAIN = ("-m", "framework.train")


def job_cmd(nproc: int, entry=TRAIN) -> list[str]:
    """``python ENTRY`` for one process, under ``torchrun --standalone`` for nproc ranks."""
    if nproc == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry]


def tiny_args(a: dict, run_dir, *overrides: str) -> list[str]:
    """The tiny config on the assets ``a`` (tiny encoder, 16 shards of 4), read in a fixed order (no
    shuffling, no workers: what the equivalence tests rely on), then ``overrides``."""
    return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run_dir={run_dir}",
            f"text.encoder={a['enc']}", "unet.context_dim=32", f"data.urls=['{a['urls']}']",
            "data.shardshuffle=false", "data.shuffle_buffer=0", "data.num_workers=0", "text.p_uncond=0.25",
            *overrides]


def run_job(argv: list[str], check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a job to its end in a clean launcher environment; a failure (with ``check``) raises with
    the end of its output."""
    p = subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def start_job(argv: list[str], **popen) -> subprocess.Popen:
    """Start a job in its own session (a test can kill its whole process group)."""
    return subprocess.Popen(argv, cwd=ROOT, env=env(), start_new_session=True, **popen)


def metrics(run_dir) -> list[dict]:
    """metrics.jsonl; a line cut short by a SIGKILL is skipped."""
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def losses(run_dir) -> dict[int, float]:
    """step -> loss; a resumed run appends, later lines win."""
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def wait_for(cond, timeout=180, what="", proc=None):
    """Poll ``cond`` until it holds; fail after ``timeout`` s, or as soon as ``proc`` has ended."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended ({proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def train(a: dict, run_dir: str, nproc: int, stage: int, extra=()) -> str:
    run_job(job_cmd(nproc) + tiny_args(
        a, run_dir, f"engine.zero_stage={stage}", f"engine.micro_batch={8 // nproc}", f"engine.steps={STEPS}",
        f"checkpoint.every={STEPS}", "optim.lr=3e-3", "engine.ema_decay=0.5", "sample.steps=4",
        # Adam's eps bounds how much it amplifies a rounding-level gradient difference between
        # two equivalent runs (N ranks vs 1): at most lr/eps, 3e5 with the default 1e-8, 30 with
        # 1e-4 (see test_classifier's `adam`); the consolidation tests' weight checks rely on it
        "optim.eps=1e-4", *extra), timeout=300)
    return run_dir


def trained_run(tmp_path_factory, nproc: int, stage: int) -> str:
    """A finished 6-step run (checkpoint at step 6, EMA decay 0.5), trained once per session."""
    key = (nproc, stage)
    if key not in _CACHE:
        a = assets(tmp_path_factory)
        d = tmp_path_factory.mktemp(f"run_n{nproc}_z{stage}")
        _CACHE[key] = train(a, str(d / "run"), nproc, stage)
    return _CACHE[key]


def exported(tmp_path_factory, nproc: int, stage: int, **kw) -> str:
    """An export of trained_run(nproc, stage) with export(**kw), made once per session."""
    key = ("export", nproc, stage, tuple(sorted(kw.items())))
    if key not in _CACHE:
        from framework.export import export
        run = trained_run(tmp_path_factory, nproc, stage)
        out = str(tmp_path_factory.mktemp("export") / "out")
        export(run, out, **kw)
        _CACHE[key] = out
    return _CACHE[key]


# A subprocess prelude that makes `import deepspeed` fail (as if it were not installed) and records
# every attempt, so a test can assert that loading and sampling never tried.
BLOCK_DEEPSPEED = r"""
import sys, importlib.abc
ATTEMPTS = []
class _NoDeepSpeed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            ATTEMPTS.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _NoDeepSpeed())
"""
