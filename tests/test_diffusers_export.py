"""The diffusers export: the time-embedding shift (closed form), the UNet in diffusers' layout at
0-based timesteps, and a latent model trained with SD's text conventions exported as a
StableDiffusionPipeline folder that diffusers loads and that draws our Pipeline's images.
Real parts only: a tiny CLIPTextModel and diffusers AutoencoderKL saved to disk, real shards,
tools.precompute_latents, a real framework.train run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from framework.config import DataConfig, UNetConfig, load_config
from framework.diffusers_export import pipeline_blockers, scheduler_config, shift_time_embedding, write_unet
from framework.models.text import make_tiny_clip
from framework.models.unet import UNet, timestep_embedding
from framework.models.vae import FrozenVAE, make_tiny_vae
from tests._fixtures import write_shards
from tests._trained import env as _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shift_time_embedding_is_the_rotation_of_one_step():
    """W R applied to emb(t - 1) equals W applied to emb(t), for t over the whole range.
    Tolerance: float32 cos/sin of t*w with t <= 1000 carry an absolute error ~ t * 2^-24 ~ 6e-5 per
    component (the argument's rounding); summed over 64 unit-size terms of W that stays < 1e-3."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(128, 64, generator=g) / 8
    t = torch.tensor([1, 2, 17, 500, 999, 1000])
    ref = timestep_embedding(t, 64) @ W.T
    got = timestep_embedding(t - 1, 64) @ shift_time_embedding(W).T
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)
    # control: without the rotation, emb(t - 1) is a different vector (the check can fail)
    assert (timestep_embedding(t - 1, 64) @ W.T - ref).abs().max() > 0.05


def _random_weights(module: torch.nn.Module, seed: int) -> None:
    """Every tensor random (the zero-initialised output layers would make eps identically 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_unet_layout_takes_zero_based_timesteps(tmp_path):
    """diffusers' UNet2DConditionModel loaded from write_unet at k gives ours at t = k + 1."""
    from diffusers import UNet2DConditionModel
    from framework.config import Config
    cfg = Config()
    cfg.unet = UNetConfig(in_channels=4, channels=16, channel_mult=[1, 2], num_res_blocks=1,
                          attention_levels=[1], head_dim=8, context_dim=32, groups=8)
    ours = UNet(cfg.unet).eval()
    _random_weights(ours, 0)
    write_unet(ours.state_dict(), cfg, str(tmp_path), 8)
    theirs = UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet").eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([1, 1000])
    with torch.no_grad():
        a = ours(x, t, ctx=ctx)
        b = theirs(x, t - 1, encoder_hidden_states=ctx).sample
        c = theirs(x, t, encoder_hidden_states=ctx).sample
    # same weights, same math, different kernels' summation order: ~1e-6 relative on O(10) outputs
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    assert (a - c).abs().max() > 1e-2 * a.abs().max()      # unshifted it would be one step off


def test_scheduler_config_is_our_schedule_and_ddim_steps():
    from diffusers import DDIMScheduler
    from framework.config import Config
    from framework.diffusion.process import Schedule
    from framework.diffusion.sampling import timesteps
    for kind in ("linear", "cosine"):
        cfg = Config()
        cfg.diffusion.schedule = kind
        sched = Schedule.from_config(cfg.diffusion)
        d = DDIMScheduler.from_config(scheduler_config(cfg, None))
        # diffusers builds betas and their cumulative product in float32: each of the <= 1000
        # multiplications rounds by <= 2^-24 relative, so abar agrees to 1000 * 2^-24 ~ 6e-5
        np.testing.assert_allclose(d.alphas_cumprod.double().numpy(), sched.abar[1:].numpy(), rtol=1000 * 2**-24)
        for n in (10, 20, 50, 1000):
            d.set_timesteps(n)
            assert [int(k) + 1 for k in d.timesteps] == timesteps(1000, n)[:-1]


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A tiny latent model with SD's text conventions, trained 4 steps and exported with diffusers=True."""
    from framework.data.latents import precompute_latents
    from framework.export import export
    d = tmp_path_factory.mktemp("sd")
    write_shards(str(d / "src"), 2, 8, size=16)
    vae = make_tiny_vae(str(d / "vae"), in_channels=1, scaling_factor=0.5)
    precompute_latents(str(d / "src"), str(d / "lat"), FrozenVAE(vae), DataConfig(image_size=16, channels=1),
                       rank=0, world_size=1, batch_size=16, wait_s=30)
    clip = make_tiny_clip(str(d / "clip"))
    run = str(d / "run")
    cmd = [sys.executable, "-m", "framework.train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
           f"run_dir={run}", f"text.encoder={clip}", "text.mask=false", "text.max_length=12",
           "unet.context_dim=32", "unet.in_channels=4", f"data.urls=['{d / 'lat'}']", "data.latents=true",
           "data.shardshuffle=false", "engine.steps=4", "checkpoint.every=4", f"vae.path={vae}"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    out = str(d / "export")
    summary = export(run, out, diffusers=True)
    return {"dir": d, "run": run, "out": out, "summary": summary, "clip": clip, "vae": vae}


def _both(out: str, prompts, steps: int, gamma: float):
    """Our Pipeline and diffusers' StableDiffusionPipeline from the same folder, the same x_T."""
    from diffusers import StableDiffusionPipeline
    from framework.pipeline import Pipeline
    ours = Pipeline.from_pretrained(out, device="cpu", channels_last=False)
    theirs = StableDiffusionPipeline.from_pretrained(out)
    theirs.set_progress_bar_config(disable=True)
    x_T = ours.noise(len(prompts), seed=3)
    a = ours(prompts, guidance_scale=gamma, steps=steps, x_T=x_T, output_type="pt")
    b = theirs(prompts, height=16, width=16, num_inference_steps=steps, guidance_scale=gamma,
               latents=x_T.clone(), output_type="pt").images
    return a * 0.5 + 0.5, b.float(), ours       # ours in [-1, 1], diffusers' in [0, 1]


def test_export_is_a_stable_diffusion_pipeline_folder(sd_run):
    s = sd_run["summary"]
    assert s["diffusers"]["pipeline"], s["diffusers"]
    names = set(os.listdir(sd_run["out"]))
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= names
    index = json.load(open(os.path.join(sd_run["out"], "model_index.json")))
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    prompts = ["a photo of a bag", "a photo of a dress"]
    a, b, _ = _both(sd_run["out"], prompts, 10, 3.0)
    assert a.shape == b.shape == (2, 1, 16, 16)
    # fp32 end to end, 10 DDIM steps through the same weights: kernel-order rounding ~1e-6 per step
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_pipeline_folder_matches_with_random_weights(sd_run, tmp_path):
    """The trained tiny model is nearly silent after 4 steps; with every weight random the images
    depend strongly on prompt, guidance and timestep, and diffusers still draws ours."""
    import shutil

    from safetensors.torch import load_file, save_file

    from framework.config import from_dict
    from framework.models.unet import UNet
    out = str(tmp_path / "rand")
    shutil.copytree(sd_run["out"], out)
    import yaml
    conf = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    unet = UNet(from_dict(conf["unet"], UNetConfig))
    unet.load_state_dict(load_file(os.path.join(out, "model.safetensors")))
    _random_weights(unet, 7)
    sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    save_file(sd, os.path.join(out, "model.safetensors"))
    shutil.rmtree(os.path.join(out, "unet"))
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["unet.context_dim=32", "unet.in_channels=4"])
    cfg.unet = from_dict(conf["unet"], UNetConfig)
    write_unet(sd, cfg, out, conf["image"]["size"])
    prompts = ["a photo of a bag", "a photo of a dress"]
    a, b, ours = _both(out, prompts, 10, 3.0)
    assert (a[0] - a[1]).abs().max() > 0.05          # the prompt matters: the comparison has teeth
    # random weights make eps O(1) with cancellation in guidance (gamma 3 amplifies differences 5x)
    torch.testing.assert_close(b, a, rtol=0, atol=2e-3)


def test_pipeline_blockers_name_the_setting(sd_run):
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [])
    why = pipeline_blockers(cfg, None)
    assert any("pixel-space" in w for w in why) and any("text.mask" in w for w in why)
    cfg.text.mask, cfg.text.pooled = False, True
    assert pipeline_blockers(cfg, {"shift_factor": 0.0}) == ["pooled text (text.pooled / unet.pooled_dim)"]
