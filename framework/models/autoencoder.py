"""task: autoencoder -- train the first stage when you have none: a KL-regularised autoencoder
(diffusers ``AutoencoderKL``, LDM's recipe without the perceptual and adversarial terms).

    objective = AutoencoderObjective(cfg)
    model = objective.build_model()                  # KLAutoencoder; inside zero.Init under ZeRO-3
    per_sample = objective.loss(forward, batch, noise)   # (B,) fp32, forward = the engine's __call__

The loss of one image x (C,H,W) in [-1,1], with q(z|x) = N(mu, sigma^2) and the reparameterised
draw z = mu + sigma * eps (eps from the trainer's global noise stream, so N ranks draw what 1 rank
draws)::

    L = mean_pixels |x - D(z)|   (or squared: autoencoder.loss=l2)
        + kl_weight * KL(q(z|x) || N(0, I)) / (C*H*W)

That is LDM's ``rec_sum + beta * KL_sum`` divided by the constant C*H*W (the same minimiser, per-pixel
magnitudes so that optim.grad_clip means what it means for the diffusion loss); beta = 1e-6 as LDM.

Evaluation (``evaluate_autoencoder``): reconstruction PSNR on held-out shards and the latent
statistics (per-channel mean and std of posterior draws; 1/std is the scaling factor). Export
(``export_autoencoder``): a diffusers folder (``AutoencoderKL.save_pretrained``) whose config.json
carries that scaling factor, loadable by ``AutoencoderKL.from_pretrained`` and as ``vae.path``.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Iterable, Optional

import torch
from diffusers import AutoencoderKL   # at import time, not in __init__: importing diffusers inside ZeRO-3's
from torch import nn                  # zero.Init (which patches torch.Tensor.__new__) fails in torch._dynamo

from framework.config import AutoencoderConfig, Config, DataConfig

__all__ = ["KLAutoencoder", "AutoencoderObjective", "autoencoder_loss", "psnr", "evaluate_autoencoder",
           "export_autoencoder", "load_autoencoder_run"]


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
class KLAutoencoder(nn.Module):
    """A diffusers ``AutoencoderKL`` (``self.vae``) with a training forward that takes its noise:
    ``forward(x (B,C,H,W), eps (B,c,h,w)) -> (reconstruction, mu, logvar)``."""

    def __init__(self, cfg: AutoencoderConfig, channels: int, sample_size: int = 32):
        super().__init__()
        n = len(cfg.block_out_channels)
        if n < 1:
            raise ValueError("autoencoder.block_out_channels is empty")
        bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
        if bad:
            raise ValueError(f"autoencoder.block_out_channels {cfg.block_out_channels} are not all multiples "
                             f"of autoencoder.norm_num_groups={cfg.norm_num_groups}")
        self.cfg = cfg
        self.vae = AutoencoderKL(
            in_channels=channels, out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
            sample_size=sample_size, mid_block_add_attention=cfg.mid_attention, scaling_factor=1.0)
        self.factor = 2 ** (n - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.cfg.latent_channels, height // self.factor, width // self.factor

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        post = self.vae.encode(x).latent_dist              # mu, logvar (B,c,h,w), logvar clamped [-30, 20]
        z = post.mean + post.std * eps                     # reparameterised draw from q(z|x)
        return self.vae.decode(z).sample, post.mean, post.logvar


def autoencoder_loss(x: torch.Tensor, rec: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                     kl_weight: float, kind: str = "l1") -> tuple[torch.Tensor, dict]:
    """Per-sample loss (B,) fp32 (see the module docstring) and its parts (B,) for the log."""
    x, rec, mu, logvar = x.float(), rec.float(), mu.float(), logvar.float()
    diff = (rec - x).abs() if kind == "l1" else (rec - x).square()
    rec_term = diff.flatten(1).mean(1)                                             # (B,)
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)       # (B,) KL(q || N(0,I))
    loss = rec_term + kl_weight * kl / x[0].numel()
    return loss, {"rec": rec_term.detach(), "kl": kl.detach()}


def psnr(x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [-1,1], on the [0,1] scale: 10 log10(1 / MSE)."""
    mse = ((rec.float().clamp(-1, 1) - x.float()) / 2).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


# ---------------------------------------------------------------------------------------------
# The Objective the trainer calls
# ---------------------------------------------------------------------------------------------
class AutoencoderObjective:
    """``task: autoencoder`` for the trainer: build_model / setup / loss / metrics."""

    name = "autoencoder"

    def __init__(self, cfg: Config):
        if cfg.autoencoder.loss not in ("l1", "l2"):
            raise ValueError(f"autoencoder.loss must be 'l1' or 'l2', got {cfg.autoencoder.loss!r}")
        self.cfg = cfg
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self._last: dict = {}
        factor = 2 ** (len(cfg.autoencoder.block_out_channels) - 1)
        if cfg.data.image_size % factor:
            raise ValueError(f"data.image_size={cfg.data.image_size} is not a multiple of the autoencoder's "
                             f"downsampling factor {factor} (2^(len(autoencoder.block_out_channels)-1))")
        self.latent = (cfg.autoencoder.latent_channels, cfg.data.image_size // factor, cfg.data.image_size // factor)

    def build_model(self) -> nn.Module:
        return KLAutoencoder(self.cfg.autoencoder, self.cfg.data.channels, self.cfg.data.image_size)

    def setup(self, device, dtype, batch_source=None) -> None:
        self.device, self.dtype = torch.device(device), dtype

    def loss(self, forward, batch: dict, noise) -> torch.Tensor:
        x = batch["image"].to(self.device, non_blocking=True).float()                   # (B,C,H,W)
        if x.shape[-1] != self.cfg.data.image_size:
            raise ValueError(f"batch images {tuple(x.shape)} do not match data.image_size={self.cfg.data.image_size}")
        _, eps, _ = noise.draw((x.shape[0],) + self.latent, 1)                          # (B,c,h,w)
        xin = x.to(self.dtype)
        if self.cfg.engine.channels_last:       # convolutions run channels_last (about 2x on CPU)
            xin = xin.contiguous(memory_format=torch.channels_last)
        rec, mu, logvar = forward(xin, eps.to(self.dtype))
        a = self.cfg.autoencoder
        per_sample, parts = autoencoder_loss(x, rec, mu, logvar, a.kl_weight, a.loss)
        # kept on the device: read only when a log line asks (no host sync inside the step)
        self._last = {"ae/rec": parts["rec"].detach().mean(), "ae/kl": parts["kl"].detach().mean(),
                      "ae/psnr": psnr(x, rec.detach()).mean()}
        return per_sample

    def metrics(self) -> dict:
        return {k: float(v) for k, v in self._last.items()}


# ---------------------------------------------------------------------------------------------
# Evaluation: reconstruction PSNR and latent statistics on held-out shards
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_autoencoder(vae, urls, data_cfg: DataConfig, max_samples: int = 1000, batch_size: int = 64,
                         seed: int = 0, device="cpu") -> dict:
    """A diffusers ``AutoencoderKL`` (or a ``KLAutoencoder``) on the images of ``urls`` (read in
    order, center crop, no flip): PSNR of the reconstruction D(mu) (dataset level, from the mean MSE,
    and the mean of per-image PSNRs), and per-channel mean/std of posterior draws z = mu + sigma*eps
    (raw, unscaled); ``scaling_factor`` = 1/std over all latent elements (LDM 4.3.2)."""
    from framework.data.latents import iter_images

    model = vae.vae if isinstance(vae, KLAutoencoder) else vae
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    n, mse_sum, psnr_sum = 0, 0.0, 0.0
    zs: list[torch.Tensor] = []
    dtype = next(model.parameters()).dtype
    try:
        for chunk in _batches(iter_images(urls, data_cfg, limit=max_samples), batch_size):
            x = torch.from_numpy(chunk).to(device)                                   # (B,C,H,W) in [-1,1]
            post = model.encode(x.to(dtype)).latent_dist
            rec = model.decode(post.mean).sample.float()
            mse = ((rec.clamp(-1, 1) - x) / 2).square().flatten(1).mean(1)
            mse_sum += float(mse.sum())
            psnr_sum += float((10 * torch.log10(1.0 / mse.clamp(min=1e-10))).sum())
            eps = torch.randn(post.mean.shape, generator=g).to(device)
            zs.append((post.mean.float() + post.std.float() * eps).cpu())
            n += x.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError(f"evaluate_autoencoder: no readable images in {urls}")
    z = torch.cat(zs)                                                                # (N,c,h,w)
    per_c = z.transpose(0, 1).flatten(1)
    std_all = float(z.std())
    return {"samples": n, "psnr": 10 * math.log10(1.0 / max(mse_sum / n, 1e-10)), "psnr_mean": psnr_sum / n,
            "mse": mse_sum / n, "latent_shape": list(z.shape[1:]),
            "latent_mean": [float(v) for v in per_c.mean(1)], "latent_std": [float(v) for v in per_c.std(1)],
            "latent_mean_all": float(z.mean()), "latent_std_all": std_all, "scaling_factor": 1.0 / std_all}


def _batches(it: Iterable, size: int):
    import numpy as np
    buf = []
    for item in it:
        buf.append(item["image"])
        if len(buf) == size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


# ---------------------------------------------------------------------------------------------
# Loading a run, exporting in diffusers' layout
# ---------------------------------------------------------------------------------------------
def load_autoencoder_run(path: str, checkpoint: Optional[str] = None, weights: str = "ema"
                         ) -> tuple[KLAutoencoder, Config, dict]:
    """A task=autoencoder run directory (its newest valid checkpoint, or ``checkpoint``) ->
    (KLAutoencoder with the consolidated weights, fp32, eval; the config that made it; the
    checkpoint summary). ZeRO 0-3, any world size."""
    from framework.config import from_dict
    from framework.export import checkpoint_config, consolidate, find_checkpoint

    tag_dir = find_checkpoint(path, None if checkpoint in (None, "", "auto") else checkpoint)
    cfg = from_dict(checkpoint_config(tag_dir))
    if cfg.task != "autoencoder":
        raise ValueError(f"{tag_dir}: task={cfg.task!r}, not an autoencoder (train it with task=autoencoder)")
    sd, info = consolidate(tag_dir, weights=weights)
    model = KLAutoencoder(cfg.autoencoder, cfg.data.channels, cfg.data.image_size)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise KeyError(f"{tag_dir}: weights do not match KLAutoencoder(cfg.autoencoder): missing "
                       f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval().requires_grad_(False), cfg, dict(info, checkpoint=tag_dir)


def export_autoencoder(path: str, out: str, data_urls=None, checkpoint: Optional[str] = None,
                       weights: str = "ema", max_samples: int = 1000, scaling_factor: float = 0.0,
                       overwrite: bool = False) -> dict:
    """A task=autoencoder run -> ``out``: a diffusers AutoencoderKL folder (``save_pretrained``:
    config.json + diffusion_pytorch_model.safetensors) with ``scaling_factor`` = 1/std of its latents
    measured on ``data_urls`` (default: the run's data.urls; or the given ``scaling_factor``), plus
    ``framework_export.json`` (provenance, PSNR, latent statistics). Written into a temporary sibling
    and renamed. Returns the summary."""
    from framework.files import atomic_dir

    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite)")
    t0 = time.perf_counter()
    model, cfg, info = load_autoencoder_run(path, checkpoint, weights)
    urls = data_urls or list(cfg.data.urls)
    ev = evaluate_autoencoder(model, urls, cfg.data, max_samples=max_samples, seed=cfg.seed)
    scale = float(scaling_factor) if scaling_factor and scaling_factor > 0 else ev["scaling_factor"]
    model.vae.register_to_config(scaling_factor=scale, shift_factor=None)
    summary = {"checkpoint": info["checkpoint"], "tag": info["tag"], "step": info["step"],
               "weights": weights, "scaling_factor": scale, "evaluated_on": urls, "evaluation": ev,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_dir(out) as tmp:
        model.vae.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "framework_export.json"), "w") as f:
            json.dump(summary, f, indent=1)
    summary.update(out=out, seconds=round(time.perf_counter() - t0, 2))
    return summary
