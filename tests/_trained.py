"""Tiny real training runs for the export / pipeline / evaluation tests, trained once per session.

Each run is a real `python -m framework.train` process (under torchrun for 2 ranks) on the tiny
config, the tiny encoder and tiny shards of tests/_fixtures.py. The data order is fixed (no shuffling,
16 shards of 4 samples, no workers) and the noise stream is global, so a 2-rank run with micro batch
4 sees exactly what a 1-rank run with micro batch 8 sees: their weights agree up to reduction order
(amplified by Adam at most lr/eps = 30 times, with optim.eps=1e-4).
"""
from __future__ import annotations

import os
import subprocess
import sys

from tests._fixtures import tiny_encoder, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
_CACHE: dict = {}


def assets(tmp_path_factory) -> dict:
    if "assets" not in _CACHE:
        d = tmp_path_factory.mktemp("export_assets")
        enc = tiny_encoder(str(d / "enc"))
        write_shards(str(d / "shards"), 16, 4, size=16)
        _CACHE["assets"] = {"enc": enc, "urls": str(d / "shards" / "data-{000000..000015}.tar"), "dir": d}
    return _CACHE["assets"]


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train(a: dict, run_dir: str, nproc: int, stage: int, extra=()) -> str:
    cmd = [sys.executable, "-m", "framework.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "framework.train"]
    args = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run_dir={run_dir}",
            f"text.encoder={a['enc']}", "unet.context_dim=32", f"data.urls=['{a['urls']}']",
            "data.shardshuffle=false", "data.shuffle_buffer=0", "data.num_workers=0", "text.p_uncond=0.25",
            f"engine.zero_stage={stage}", f"engine.micro_batch={8 // nproc}", f"engine.steps={STEPS}",
            f"checkpoint.every={STEPS}", "optim.lr=3e-3", "engine.ema_decay=0.5", "sample.steps=4",
            # Adam's eps bounds how much it amplifies a rounding-level gradient difference between
            # two equivalent runs (N ranks vs 1): at most lr/eps, 3e5 with the default 1e-8, 30 with
            # 1e-4 (see test_classifier's `adam`); the consolidation tests' weight checks rely on it
            "optim.eps=1e-4", *extra]
    p = subprocess.run(cmd + args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
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
