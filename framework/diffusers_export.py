"""An export in diffusers' layouts: the UNet as ``UNet2DConditionModel`` (``unet/``) and, for a latent
model whose conditioning diffusers can express, a whole ``StableDiffusionPipeline`` folder:

    OUT/model_index.json   OUT/unet/   OUT/vae/   OUT/text_encoder/   OUT/tokenizer/   OUT/scheduler/

so ``diffusers.StableDiffusionPipeline.from_pretrained(OUT)`` loads it and, for the same DDIM settings
and initial noise, draws the images our ``Pipeline`` draws (tests/test_diffusers_export.py).

Two conventions differ and are converted here, exactly:
- Timesteps. Ours run t = 1..T (t = 0 is clean data, abar_0 = 1); diffusers' schedulers index
  k = 0..T-1 with ``alphas_cumprod[k]`` = our abar_{k+1}, and call the UNet with k. The sinusoidal
  embedding of t = k + 1 is a fixed rotation R of the embedding of k (cos(w(k+1)) = cos(wk) cos w -
  sin(wk) sin w, ...), so the exported ``time_embedding.linear_1.weight`` is ours times R: the diffusers
  UNet at k computes what ours computes at t = k + 1. Our strided DDIM (t_i = floor(T (n - i) / n), the
  last step to abar = 1) is diffusers' DDIM with ``timestep_spacing="trailing"`` and
  ``set_alpha_to_one=True`` whenever n divides T.
- Text. diffusers' pipeline pads the prompt to the tokenizer's ``model_max_length``, runs the text
  encoder without a padding mask and lets the UNet attend to every token; the negative prompt "" gives
  the unconditional branch. A model matches it when it was trained that way: ``text.mask: false``,
  ``text.null: empty``, no pooled text, no micro-conditioning, no latent shift. ``pipeline_blockers``
  names what stands in the way; ``export(..., diffusers=True)`` then writes ``unet/`` only.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch

from framework.config import Config
from framework.models.unet import diffusers_config, to_diffusers_state_dict
from framework.weights import DIFFUSERS_NAME, save_state_dict

__all__ = ["shift_time_embedding", "unet_config_json", "write_unet", "scheduler_config", "pipeline_blockers",
           "write_pipeline"]

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}     # ours -> diffusers' beta_schedule
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
TIME_KEY = "time_embedding.linear_1.weight"


def shift_time_embedding(weight: torch.Tensor, shift: int = 1, max_period: float = 10000.0) -> torch.Tensor:
    """``W`` of the first time-embedding Linear (out, dim) acting on [cos(t w_i), sin(t w_i)] ->
    ``W R`` acting on the embedding of t - ``shift`` with the same result (R rotates each frequency
    pair by ``shift * w_i``). Computed in float64, returned in ``weight``'s dtype."""
    dim = weight.shape[1]
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    # our UNet's frequencies are float32 (unet.timestep_embedding): rotate by exactly those angles
    w = w.float().double() * shift
    c, s = torch.cos(w), torch.sin(w)
    R = torch.eye(dim, dtype=torch.float64)
    i = torch.arange(half)
    R[i, i], R[i, half + i] = c, -s              # cos(a + d) = cos a cos d - sin a sin d
    R[half + i, half + i], R[half + i, i] = c, s  # sin(a + d) = sin a cos d + cos a sin d
    return (weight.double() @ R).to(weight.dtype)


def unet_config_json(cfg: Config, sample_size: int) -> dict:
    kw = diffusers_config(cfg.unet)
    out = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", "sample_size": int(sample_size)}
    out.update({k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})
    return out


def write_unet(sd: dict, cfg: Config, out_dir: str, sample_size: int, max_shard_size=0) -> list[str]:
    """``out_dir/unet/``: our state dict in diffusers' keys, the time embedding shifted to diffusers'
    0-based timesteps (module docstring), and its config.json. -> files relative to ``out_dir``."""
    dsd = to_diffusers_state_dict(sd)
    dsd[TIME_KEY] = shift_time_embedding(dsd[TIME_KEY])
    ddir = os.path.join(out_dir, "unet")
    files = save_state_dict(dsd, ddir, DIFFUSERS_NAME, max_shard_size)
    with open(os.path.join(ddir, "config.json"), "w") as f:
        json.dump(unet_config_json(cfg, sample_size), f, indent=2)
    return [f"unet/{x}" for x in files] + ["unet/config.json"]


def scheduler_config(cfg: Config, clip_x0: Optional[float]) -> dict:
    """diffusers' ``DDIMScheduler`` config equal to our schedule and strided DDIM sampler
    (``steps_offset`` only moves "leading" timesteps; 1 is what StableDiffusionPipeline insists on)."""
    d = cfg.diffusion
    return {"_class_name": "DDIMScheduler", "_diffusers_version": "0.30.0",
            "num_train_timesteps": int(d.timesteps), "beta_start": float(d.beta_start),
            "beta_end": float(d.beta_end), "beta_schedule": SCHEDULES[d.schedule],
            "prediction_type": PREDICTIONS[d.prediction], "clip_sample": clip_x0 is not None,
            "clip_sample_range": float(clip_x0 or 1.0), "set_alpha_to_one": True, "steps_offset": 1,
            "timestep_spacing": "trailing", "thresholding": False, "rescale_betas_zero_snr": False}


def pipeline_blockers(cfg: Config, latent: Optional[dict]) -> list[str]:
    """Why this model cannot be a ``StableDiffusionPipeline`` folder (empty: it can)."""
    why = []
    if latent is None:
        why.append("a pixel-space model (StableDiffusionPipeline decodes latents with a VAE)")
    elif latent.get("shift_factor"):
        why.append(f"the latent shift {latent['shift_factor']} (StableDiffusionPipeline only divides by "
                   f"scaling_factor)")
    if cfg.text.mask:
        why.append("text.mask is true (StableDiffusionPipeline attends to every token: train with "
                   "text.mask=false)")
    if cfg.text.null != "empty":
        why.append(f"text.null={cfg.text.null} (the pipeline's unconditional branch is the prompt \"\")")
    if cfg.text.pooled or cfg.unet.pooled_dim:
        why.append("pooled text (text.pooled / unet.pooled_dim)")
    if cfg.unet.micro_conditioning:
        why.append("unet.micro_conditioning")
    if cfg.text.layer != -1:
        why.append(f"text.layer={cfg.text.layer} (the pipeline takes the last hidden state)")
    return why


def write_pipeline(out_dir: str, cfg: Config, encoder) -> list[str]:
    """The rest of a ``StableDiffusionPipeline`` folder next to ``unet/`` and ``vae/`` (written by the
    caller): ``text_encoder/`` and ``tokenizer/`` (the frozen encoder, its tokenizer padding to
    text.max_length), ``scheduler/`` and ``model_index.json``. ``encoder``: a ``TextEncoder``."""
    files = []
    tdir, kdir = os.path.join(out_dir, "text_encoder"), os.path.join(out_dir, "tokenizer")
    encoder.model.float().save_pretrained(tdir)
    encoder.tokenizer.save_pretrained(kdir)
    tok_conf = os.path.join(kdir, "tokenizer_config.json")
    with open(tok_conf) as f:
        conf = json.load(f)
    conf["model_max_length"] = int(cfg.text.max_length)     # the pipeline pads prompts to this length
    with open(tok_conf, "w") as f:
        json.dump(conf, f, indent=2)
    for sub in ("text_encoder", "tokenizer"):
        files += [f"{sub}/{x}" for x in sorted(os.listdir(os.path.join(out_dir, sub)))]
    sdir = os.path.join(out_dir, "scheduler")
    os.makedirs(sdir, exist_ok=True)
    with open(os.path.join(sdir, "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config(cfg, None), f, indent=2)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", type(encoder.model).__name__],
             "tokenizer": ["transformers", type(encoder.tokenizer).__name__],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False}
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return files + ["scheduler/scheduler_config.json", "model_index.json"]
