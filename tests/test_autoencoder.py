"""task: autoencoder: the KL autoencoder loss against its closed form, training under the real
DeepSpeed engine (python -m framework.train, gloo, 1 and 2 processes), exact resume, and the export
in diffusers' layout (AutoencoderKL.from_pretrained)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from framework.models.autoencoder import AutoencoderObjective, KLAutoencoder, autoencoder_loss, psnr
from framework.config import load_config
from tests._fixtures import write_shards
from tests._trained import env as _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The loss, closed forms
# ---------------------------------------------------------------------------------------------
def test_loss_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((3, 1, 4, 4), generator=g) * 2 - 1
    rec = torch.rand((3, 1, 4, 4), generator=g) * 2 - 1
    mu = torch.randn((3, 2, 2, 2), generator=g)
    logvar = torch.randn((3, 2, 2, 2), generator=g)
    beta = 0.5
    loss, parts = autoencoder_loss(x, rec, mu, logvar, beta, "l1")
    # KL(N(mu, s^2) || N(0,1)) = 1/2 (mu^2 + s^2 - 1 - log s^2) per element, summed over the latent
    kl = torch.tensor([sum(0.5 * (m * m + math.exp(lv) - 1 - lv)
                           for m, lv in zip(mu[b].flatten().tolist(), logvar[b].flatten().tolist()))
                       for b in range(3)])
    l1 = (x - rec).abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(parts["kl"], kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, l1 + beta * kl / 16, rtol=1e-6, atol=1e-6)
    loss2, _ = autoencoder_loss(x, rec, mu, logvar, 0.0, "l2")
    torch.testing.assert_close(loss2, (x - rec).square().mean(dim=(1, 2, 3)))
    # a standard-normal posterior has KL 0; PSNR of an error of 0.1 in [0,1] units is 20 dB
    _, p0 = autoencoder_loss(x, x, torch.zeros_like(mu), torch.zeros_like(logvar), 1.0)
    assert float(p0["kl"].abs().max()) == 0.0
    torch.testing.assert_close(psnr(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.2)),
                               torch.tensor([20.0]), rtol=1e-5, atol=1e-5)


def test_objective_uses_the_noise_stream_and_the_diffusers_model():
    """The reparameterised draw takes its eps from noise.draw (the trainer's global stream), so a
    forward with the same stream state gives the same loss; the model is diffusers' AutoencoderKL."""
    from framework.train.engine import NoiseStream    # torch only at import time
    cfg = load_config(os.path.join(ROOT, "configs", "vae", "tiny.yaml"))
    obj = AutoencoderObjective(cfg)
    torch.manual_seed(0)
    model = obj.build_model()
    assert isinstance(model, KLAutoencoder) and type(model.vae).__name__ == "AutoencoderKL"
    obj.setup("cpu", torch.float32)
    x = torch.rand((2, 1, 16, 16)) * 2 - 1
    n1, n2 = NoiseStream(0, 0, 1, torch.device("cpu")), NoiseStream(0, 0, 1, torch.device("cpu"))
    a = obj.loss(model, {"image": x}, n1)
    b = obj.loss(model, {"image": x}, n2)
    assert a.shape == (2,) and torch.equal(a, b)
    assert not torch.equal(obj.loss(model, {"image": x}, n1), a)      # the stream moved on
    assert set(obj.metrics()) == {"ae/rec", "ae/kl", "ae/psnr"}


# ---------------------------------------------------------------------------------------------
# Under the real engine
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("ae_shards")
    # 16 shards of 4, no shuffling: a 2-rank global batch at step k is the 1-rank batch of 8 at step k
    write_shards(str(d / "train"), 16, 4, size=16)
    write_shards(str(d / "test"), 2, 8, size=16, seed=1)
    return {"train": str(d / "train"), "test": str(d / "test")}


def _train(run_dir, shards, nproc=1, extra=()):
    cmd = [sys.executable, "-m", "framework.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "framework.train"]
    args = ["--config", os.path.join(ROOT, "configs", "vae", "tiny.yaml"), f"run_dir={run_dir}",
            f"data.urls=['{shards['train']}']", "data.shardshuffle=false", "data.shuffle_buffer=0",
            "data.num_workers=0", "engine.log_every=1", *extra]
    p = subprocess.run(cmd + args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")


def _losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.long
def test_trains_zero_ranks_match_resume_exact_and_export(shards, tmp_path):
    # 1 rank, ZeRO-0, global batch 8: the loss falls
    single = str(tmp_path / "single")
    _train(single, shards, 1, ["engine.zero_stage=0", "engine.micro_batch=8", "engine.steps=6",
                               "checkpoint.every=3", "checkpoint.keep_last=5"])
    ref = _losses(single)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert ref[6] < 0.9 * ref[1], ref
    # 2 ranks ZeRO-2 and ZeRO-3 (diffusers' AutoencoderKL built inside zero.Init), micro batch 4: the
    # same global batch and the same eps (global noise stream). fp32: only the order of the gradient
    # reduction differs (~1e-7 relative per sum); through 6 Adam steps of lr 1e-3 the losses stay
    # within 1e-5 relative (the diffusion engine test uses the same bound).
    for stage in (2, 3):
        d = str(tmp_path / f"z{stage}")
        _train(d, shards, 2, [f"engine.zero_stage={stage}", "engine.micro_batch=4", "engine.steps=6"])
        got = _losses(d)
        for s in ref:
            assert abs(got[s] - ref[s]) <= 1e-5 * max(1.0, abs(ref[s])), (stage, s, got, ref)

    # exact resume: a new run resuming from the step-3 checkpoint of the first one continues to step 6
    # with the same losses, bit for bit, and the same EMA weights
    part = str(tmp_path / "part")
    _train(part, shards, 1, ["engine.zero_stage=0", "engine.micro_batch=8", "engine.steps=6",
                             "checkpoint.every=3",
                             f"checkpoint.resume={os.path.join(single, 'checkpoints', 'step00000003')}"])
    got = _losses(part)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)], (got, ref)
    from framework.models.autoencoder import load_autoencoder_run
    m_ref, _, _ = load_autoencoder_run(single)
    m_res, _, _ = load_autoencoder_run(part)
    for (k, a), (_, b) in zip(m_ref.state_dict().items(), m_res.state_dict().items()):
        assert torch.equal(a, b), k

    # export: a diffusers folder, loaded by AutoencoderKL.from_pretrained and by FrozenVAE
    from diffusers import AutoencoderKL

    from framework.models.vae import FrozenVAE
    out = str(tmp_path / "vae")
    r = subprocess.run([sys.executable, "-m", "tools.export_vae", single, out, "--data", shards["test"]],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "framework_export.json")) as f:
        summary = json.load(f)
    ev = summary["evaluation"]
    assert ev["samples"] == 16 and len(ev["latent_std"]) == 4
    assert summary["scaling_factor"] == pytest.approx(1.0 / ev["latent_std_all"])
    loaded = AutoencoderKL.from_pretrained(out, low_cpu_mem_usage=False)
    assert loaded.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    x = torch.rand((2, 1, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post_ref = m_ref.vae.encode(x).latent_dist
        post = loaded.encode(x).latent_dist
        assert torch.equal(post.mean, post_ref.mean) and torch.equal(post.std, post_ref.std)
        assert torch.equal(loaded.decode(post.mean).sample, m_ref.vae.decode(post_ref.mean).sample)
    fv = FrozenVAE(out)
    assert fv.scale == pytest.approx(summary["scaling_factor"])
    z0 = fv.sample(*fv.encode(x), generator=torch.Generator().manual_seed(0))
    assert z0.shape == (2, 4, 8, 8)
