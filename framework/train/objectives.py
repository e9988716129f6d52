"""What a run trains, chosen once per run: the network and its per-sample loss (an ``Objective``).

The trainer's step is the same for every task: ``objective.loss(forward, batch, noise)`` -> (B,)
fp32, mean, backward, optimizer step. A task adds an objective here (or in its own module, listed
in ``build_objective``), never a branch in the loop.

    class Objective:                       # the interface (duck-typed)
        name: str                          # "diffusion" | "classifier" | ...
        def build_model(self) -> nn.Module              # called inside zero.Init under ZeRO-3
        def setup(self, device, dtype, batch_source)    # after the engine: frozen parts, null condition
        def loss(self, forward, batch, noise) -> (B,)   # forward = the engine; noise = NoiseStream
        def metrics(self) -> dict                       # extra numbers for the log line (may be {})
        def sample_grid(self, module, ema, step, rank)  # optional: images during training

No deepspeed here: the engine passes its forward in.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from framework.diffusion import process as D
from framework.data.buckets import buckets_from_config, size_cond
from framework.config import Config, ConfigError
from framework.models.text import Condition, cast_floats
from framework.models.vae import scale_latent

__all__ = ["DiffusionObjective", "ClassifierObjective", "build_objective", "check_widths"]


def check_widths(cfg: Config, dim: int, pooled_dim: int, source: str) -> None:
    """The UNet's context / pooled widths must be the text source's."""
    if cfg.unet.context_dim != dim:
        raise ConfigError(f"unet.context_dim={cfg.unet.context_dim} but the {source} gives {dim}-dim "
                          f"tokens: set unet.context_dim={dim}")
    if cfg.text.pooled and cfg.unet.pooled_dim != pooled_dim:
        raise ConfigError(f"text.pooled is on: set unet.pooled_dim={pooled_dim} (the {source}'s width), "
                          f"not {cfg.unet.pooled_dim}")


class _NoisedImages:
    """Shared by the objectives that see x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.sched = D.Schedule.from_config(cfg.diffusion)
        self.device: torch.device = torch.device("cpu")
        self.dtype = torch.float32

    def setup(self, device, dtype, batch_source) -> None:
        self.device, self.dtype = torch.device(device), dtype

    vae = None              # a FrozenVAE: images are encoded to latents on the fly

    def noised(self, batch: dict, noise):
        """-> x0 (B,C,H,W) fp32, t (B,), eps, u (B,) dropout draws, x_t in the compute dtype.
        With ``vae`` set, x0 is a posterior draw of the image's scaled latent, its eps from the
        noise stream (global: N ranks draw what 1 rank draws)."""
        x0 = batch["image"].to(self.device, non_blocking=True).float()
        if self.vae is not None:
            mean, std = self.vae.encode(x0)
            x0 = scale_latent(mean + std * noise.randn(tuple(mean.shape)), self.vae.scale, self.vae.shift)
        t, eps, u = noise.draw(tuple(x0.shape), self.sched.T)
        # forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (t is ours: no host check)
        x_t = D.q_sample(self.sched, x0, t, eps, trusted=True)
        if self.cfg.engine.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return x0, t, eps, u, x_t.to(self.dtype)

    def metrics(self) -> dict:
        return {}


class DiffusionObjective(_NoisedImages):
    """eps_theta(x_t, t, y) regressed on eps (or v / x0), L_simple or min-SNR weighted, with
    null-text dropout: where u < p_uncond the sample gets exactly THE null condition that
    classifier-free sampling uses. The frozen text encoder lives here, outside the engine."""

    name = "diffusion"

    pixel_factor = 1        # pixels per cell of x0 (a latent model: the VAE's factor)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.encoder = None
        self.null = None
        self.buckets: list = []

    def check_buckets(self) -> list:
        """data.buckets resolved and checked against the UNet's factor (x pixel_factor): -> [(h, w)] px."""
        from framework.models.unet import size_multiple
        try:
            return buckets_from_config(self.cfg.data.buckets, self.cfg.data.image_size,
                                       size_multiple(self.cfg.unet) * self.pixel_factor)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def build_model(self) -> torch.nn.Module:
        from framework.models.unet import UNet
        return UNet(self.cfg.unet)

    def setup(self, device, dtype, batch_source) -> None:
        super().setup(device, dtype, batch_source)
        cfg = self.cfg
        if cfg.vae.path and not cfg.data.latents:     # encoding on the fly: the frozen VAE on the trainer
            from framework.models.vae import FrozenVAE, check_latent_unet
            self.vae = FrozenVAE.from_config(cfg.vae, device=self.device)
            check_latent_unet(self.vae.latent_shape(cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                              cfg.unet.in_channels, f"the latents of the VAE at vae.path={cfg.vae.path}")
            self.pixel_factor = self.vae.factor
        self.buckets = self.check_buckets()
        if not cfg.data.use_embeddings:
            from framework.models.text import TextEncoder
            self.encoder = TextEncoder(cfg.text, device=self.device)
            self.null = self.encoder.null(1)
            check_widths(cfg, self.encoder.dim, self.encoder.pooled_dim, f"text encoder {self.encoder.path}")
        elif hasattr(batch_source, "null_condition"):
            self.null = batch_source.null_condition()
        if self.null is not None:
            self.null = self.null.to(self.device)

    def condition(self, batch: dict, u: torch.Tensor) -> dict:
        """Caption (or precomputed embedding) -> the UNet's ctx / ctx_mask [/ pooled] keywords, with
        null-text dropout where u < p_uncond."""
        if self.null is None:
            raise ConfigError("data.use_embeddings is on but no null condition is known: read the "
                              "shards through framework.data.loader (their manifest holds it)")
        if "ctx" in batch and batch.get("ctx_mask") is None:
            # embeddings without a mask attend to every token (as SD's CLIP conditioning does): the
            # dropout swaps in the null's tokens only
            ctx = batch["ctx"].to(self.device).float()
            ctx = torch.where((u < self.cfg.text.p_uncond)[:, None, None], self.null.ctx.to(ctx), ctx)
            return cast_floats({"ctx": ctx, "ctx_mask": None, "pooled": None}, self.dtype)
        if "ctx" in batch:
            pooled = batch.get("pooled")
            cond = Condition(ctx=batch["ctx"].to(self.device).float(), mask=batch["ctx_mask"].to(self.device),
                             pooled=pooled.to(self.device) if pooled is not None else None)
        else:
            cond = self.encoder.encode(list(batch["caption"]))
        cond = cond.where(u < self.cfg.text.p_uncond, self.null)
        return cast_floats(cond.as_kwargs(), self.dtype)

    def size_cond(self, batch: dict, x0: torch.Tensor) -> Optional[torch.Tensor]:
        """SDXL micro-conditioning (B, 6) int64 when unet.micro_conditioning is on, else None:
        ``batch["size_cond"]`` (the loader's [orig_h, orig_w, crop_top, crop_left, target_h, target_w]),
        or, without it, the batch's own shape uncropped (original = target = (H, W) x pixel_factor).
        Never dropped: null-text dropout replaces the text only (as SDXL), so the unconditional
        branch of guidance gets the same size_cond as the conditional one."""
        if not self.cfg.unet.micro_conditioning:
            return None
        sc = batch.get("size_cond")
        if sc is None:
            h, w = (int(s) * self.pixel_factor for s in x0.shape[-2:])
            sc = torch.tensor([size_cond((h, w), (0, 0), (h, w))]).expand(x0.shape[0], 6)
        return torch.as_tensor(sc).to(self.device, torch.long)

    def loss(self, forward: Callable, batch: dict, noise) -> torch.Tensor:
        x0, t, eps, u, x_t = self.noised(batch, noise)
        kw = self.condition(batch, u)
        sc = self.size_cond(batch, x0)
        if sc is not None:
            kw["size_cond"] = sc
        out = forward(x_t, t, **kw).float()
        # L_simple per sample (or the configured prediction / weighting)
        return D.training_loss(self.sched, out, x0, t, eps, prediction=self.cfg.diffusion.prediction,
                               min_snr_gamma=self.cfg.diffusion.min_snr_gamma, trusted=True)

    @torch.no_grad()
    def sample_grid(self, module: torch.nn.Module, ema, step: int, rank: int) -> Optional[str]:
        """DDIM samples of cfg.sample.prompts with the EMA weights, every rank taking part (ZeRO-3's
        forward is collective); rank 0 writes RUN/samples/stepN.png. Needs the text encoder."""
        if self.encoder is None or self.cfg.data.latents or self.vae is not None:   # latents: the Pipeline decodes
            return None
        from framework.images import save_grid
        from framework.pipeline import guided_sample, network_fn
        s, cfg = self.cfg.sample, self.cfg
        prompts = s.prompts or ["a photo"]
        cond = self.encoder.encode(prompts)
        uncond = self.encoder.encode([s.negative_prompt] * len(prompts)) if s.negative_prompt else \
            self.null.expand(len(prompts))
        g = torch.Generator(device=self.device).manual_seed(s.seed)
        x_T = torch.randn((len(prompts), cfg.unet.in_channels, cfg.data.image_size, cfg.data.image_size),
                          generator=g, device=self.device)
        ckw, ukw = cond.as_kwargs(), uncond.as_kwargs()
        sc = self.size_cond({}, x_T)
        if sc is not None:          # the same size condition in both branches
            ckw["size_cond"] = ukw["size_cond"] = sc
        was_training = module.training
        module.eval()
        with ema.swapped_in():
            x0 = guided_sample(network_fn(module, self.dtype), ckw, ukw, x_T,
                               self.sched, guidance_scale=s.guidance_scale, rescale=s.rescale, sampler="ddim",
                               steps=s.steps, eta=s.eta, generator=g, prediction=cfg.diffusion.prediction)
        module.train(was_training)
        if rank != 0:
            return None
        return save_grid(x0, os.path.join(cfg.run_dir, "samples", f"step{step:08d}.png"),
                         nrow=min(len(prompts), 10), scale=2)


class ClassifierObjective(_NoisedImages):
    """The noisy classifier p(y | x_t, t) of classifier guidance: cross-entropy on the noised image
    (labels: json ``label``, or classifier.class_names matched in the captions)."""

    name = "classifier"

    def build_model(self) -> torch.nn.Module:
        from framework.models.classifier import NoisyClassifier
        return NoisyClassifier(self.cfg.unet, self.cfg.classifier)

    def loss(self, forward: Callable, batch: dict, noise) -> torch.Tensor:
        from framework.models.classifier import batch_labels
        x0, t, eps, u, x_t = self.noised(batch, noise)
        logits = forward(x_t, t).float()
        labels = batch_labels(batch, self.cfg.classifier).to(self.device)
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def _autoencoder(cfg: Config):
    from framework.models.autoencoder import AutoencoderObjective   # imports diffusers: only for this task
    return AutoencoderObjective(cfg)


OBJECTIVES: dict[str, Any] = {"diffusion": DiffusionObjective, "classifier": ClassifierObjective,
                              "autoencoder": _autoencoder}


def build_objective(cfg: Config):
    """The objective of cfg.task."""
    try:
        make = OBJECTIVES[cfg.task]
    except KeyError:
        raise ConfigError(f"task={cfg.task!r}: expected one of {sorted(OBJECTIVES)}") from None
    return make(cfg)
