"""The Trainer's step in one process (real DeepSpeed engine, world of one, gloo): it reads nothing
back from the device except what the policy needs, its log says where it is without a terminal,
and the deferred non-finite check aborts with a clear message."""
from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from framework.train import engine as E
from framework.config import load_config
from framework.models.text import Condition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_CODE = (os.sep + "deepspeed" + os.sep, os.sep + "torch" + os.sep + "optim" + os.sep)


class HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (what ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``
    dispatch to: a device -> host read, i.e. a synchronisation on a GPU), split into the
    framework's and those of DeepSpeed / torch.optim (their optimizer steps read the step count and
    the gradient norm; not ours to remove)."""

    def __init__(self):
        super().__init__()
        self.ours, self.engines = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            stack = traceback.extract_stack()
            if any(any(m in f.filename for m in ENGINE_CODE) for f in stack):
                self.engines += 1
            else:
                self.ours.append(" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in stack[-6:-1][::-1]))
        return func(*args, **(kwargs or {}))


class Feed:
    """Batches of precomputed caption embeddings (no text encoder), one fixed batch."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch

    def null_condition(self):
        return Condition(torch.zeros(1, 8, 32), torch.ones(1, 8, dtype=torch.bool))


def trainer(tmp_path, *overrides, batch=None) -> E.Trainer:
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      [f"run_dir={tmp_path}", "unet.context_dim=32", "engine.micro_batch=4",
                       "data.use_embeddings=true", "engine.log_every=2", "checkpoint.every=0", *overrides])
    g = torch.Generator().manual_seed(0)
    if batch is None:
        batch = {"image": torch.randn(4, cfg.unet.in_channels, 16, 16, generator=g),
                 "ctx": torch.randn(4, 8, 32, generator=g), "ctx_mask": torch.ones(4, 8, dtype=torch.bool)}
    return E.Trainer(cfg, data=Feed(batch))


@pytest.mark.parametrize("stage", [2, 3])
def test_train_step_reads_nothing_back_from_the_device(tmp_path, stage):
    tr = trainer(tmp_path, f"engine.zero_stage={stage}", "engine.skip_nonfinite=false", "engine.grad_accum=2",
                 "diffusion.min_snr_gamma=5", "diffusion.prediction=v")
    tr.train_step()                                     # the first step creates the optimizer state
    with HostReads() as reads:
        loss = tr.train_step()
    assert reads.ours == [], reads.ours                 # t is trusted, the loss stays on the device
    assert torch.isfinite(loss)

    # the counter sees a read put back into the step (the control: without it the test proves nothing)
    objective_loss = tr.objective.loss

    def with_item(forward, batch, noise):
        out = objective_loss(forward, batch, noise)
        float(out.mean())                               # e.g. a loss.item() for a progress bar
        return out
    tr.objective.loss = with_item
    with HostReads() as reads:
        tr.train_step()
    assert len(reads.ours) == 2                         # one per micro step


def test_skip_nonfinite_reads_one_flag_per_micro_step(tmp_path):
    tr = trainer(tmp_path, "engine.zero_stage=2", "engine.skip_nonfinite=true", "engine.grad_accum=3")
    tr.train_step()
    with HostReads() as reads:
        tr.train_step()
    assert len(reads.ours) == 3, reads.ours             # whether to run backward, agreed by all ranks


def test_deferred_nonfinite_check_aborts_at_the_log(tmp_path):
    bad = {"image": torch.full((4, 1, 16, 16), float("nan")), "ctx": torch.zeros(4, 8, 32),
           "ctx_mask": torch.ones(4, 8, dtype=torch.bool)}
    tr = trainer(tmp_path, "engine.skip_nonfinite=false", "engine.steps=6", batch=bad)
    with pytest.raises(E.NonFiniteLossError, match="between steps 1 and 2.*skip_nonfinite"):
        tr.fit()


def test_log_lines_without_a_terminal(tmp_path, capsys):
    tr = trainer(tmp_path, "engine.steps=4", "log.tensorboard=false")
    result = tr.fit()
    out = capsys.readouterr().out.splitlines()
    lines = [l for l in out if l.startswith("step ")]
    assert [l.split()[1] for l in lines] == ["2/4", "4/4"], out
    assert "loss " in lines[0] and "img/s" in lines[0] and "eta" in lines[0] and "data wait" in lines[0]
    assert len(result["losses"]) == 4 and all(isinstance(x, float) for x in result["losses"])
    # the first logged metrics carry the planner's memory per rank next to the measured peak
    with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["plan/static_gib"] > 0 and first["memory/peak_gib"] > 0


@pytest.mark.slow
def test_log_lines_through_a_pipe(tmp_path):
    """What a SLURM / nohup log shows: `python -m framework.train` with stdout a pipe prints a line
    per logged step (step/total, loss, img/s, data wait, bad fraction, ETA); metrics.jsonl has the
    data wait as a number."""
    import subprocess
    import sys

    from tests._fixtures import tiny_encoder, write_shards
    from tests._trained import env
    enc = tiny_encoder(str(tmp_path / "enc"))
    write_shards(str(tmp_path / "shards"), 2, 8, size=16)
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "framework.train", "--config",
                        os.path.join(ROOT, "configs", "tiny.yaml"), f"run_dir={run}", f"text.encoder={enc}",
                        "unet.context_dim=32", f"data.urls=['{tmp_path / 'shards'}']", "data.num_workers=0",
                        "engine.micro_batch=4", "engine.steps=4", "engine.log_every=2", "checkpoint.every=0"],
                       cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [l for l in p.stdout.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in lines] == ["2/4", "4/4"], p.stdout
    assert all(k in lines[-1] for k in ("loss", "img/s", "data wait", "bad", "eta"))
    with open(run / "metrics.jsonl") as f:
        rows = [json.loads(l) for l in f]
    assert all(0.0 <= r["data/wait_frac"] <= 1.0 for r in rows)


@pytest.mark.gpu
def test_step_runs_under_cuda_sync_debug_error(tmp_path):
    """On a GPU the objective's part of the step (draws, q_sample, forward, loss, the agreed flags)
    issues no synchronising call: torch raises on any under sync debug mode "error"."""
    tr = trainer(tmp_path, "engine.device=cuda", "engine.zero_stage=2", "engine.skip_nonfinite=false")
    tr.train_step()
    batch = {k: v.cuda() for k, v in tr.batches.batch.items()}
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = tr.objective.loss(tr.engine, batch, tr.noise).mean()
        torch.stack([loss.detach().double(), (~torch.isfinite(loss.detach())).double()])
    finally:
        torch.cuda.set_sync_debug_mode(0)
