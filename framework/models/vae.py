"""The frozen first stage of latent diffusion: a diffusers ``AutoencoderKL``, and the latent scaling.

    vae = FrozenVAE.from_config(cfg.vae, device)   # eval, requires_grad False, no_grad; bf16 on CUDA
    mean, std = vae.encode(x)                # x (B,C,H,W) in [-1,1] -> raw posterior N(mean, std^2), fp32
    z0 = vae.sample(mean, std, generator)    # the scaled latent the diffusion model sees (B,c,H/f,W/f)
    x = vae.decode(z0)                       # scaled latent -> image (B,C,H,W), about [-1,1]

The scaling (diffusers' convention: SD 1/2/XL have a scale only, SD3/Flux also a shift)::

    z0 = (z - shift) * scale      scale_latent      (the way in: exactly once)
    z  = z0 / scale + shift       unscale_latent    (the way out: exactly once, inside decode)

Everything that enters the diffusion space goes through ``scale_latent`` (``FrozenVAE.sample`` and
the precomputed-latent data path ``LatentSpec.draw``); everything that leaves it goes through
``FrozenVAE.decode``. Nothing else in the framework multiplies by the scaling factor. ``scale`` is
1/std of the raw latents (LDM sec. 4.3.2), so z0 has unit variance; ``scale`` and ``shift`` come
from the VAE's config.json unless the config overrides them.

The VAE lives beside the text encoder: outside any DeepSpeed engine and outside ZeRO-3 ``zero.Init``
(this module never imports deepspeed or the UNet). ``LatentSpec`` is numpy only: the trainer reading
precomputed latents needs no VAE at all.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from framework.config import ConfigError, VAEConfig

__all__ = ["FrozenVAE", "LatentSpec", "LatentError", "scale_latent", "unscale_latent", "weights_digest",
           "read_vae_config", "resolve_scaling", "save_vae_dir", "load_export_vae", "decode_latents",
           "make_tiny_vae", "check_latent_unet", "LATENT_MEAN", "LATENT_STD", "VAE_DTYPES"]

VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENT_MEAN = "zmean.npy"       # tar member names of a precomputed posterior (tools.precompute_latents)
LATENT_STD = "zstd.npy"
CONFIG_NAME = "config.json"
WEIGHTS_PREFIX = "diffusion_pytorch_model"


# ---------------------------------------------------------------------------------------------
# The scaling: once in, once out
# ---------------------------------------------------------------------------------------------
def scale_latent(z, scale: float, shift: float = 0.0):
    """Raw VAE latent z -> the diffusion model's z0 = (z - shift) * scale (torch or numpy)."""
    if shift:
        z = z - shift
    return z * scale


def unscale_latent(z0, scale: float, shift: float = 0.0):
    """The diffusion model's z0 -> raw VAE latent z = z0 / scale + shift (torch or numpy)."""
    z = z0 / scale
    return z + shift if shift else z


# ---------------------------------------------------------------------------------------------
# A VAE directory (diffusers AutoencoderKL layout)
# ---------------------------------------------------------------------------------------------
def _weight_files(path: str) -> list[str]:
    names = sorted(n for n in os.listdir(path)
                   if n.startswith(WEIGHTS_PREFIX) and (n.endswith(".safetensors") or n.endswith(".bin")
                                                        or n.endswith(".index.json")))
    return names


def read_vae_config(path: str) -> dict:
    """``path/config.json`` of a diffusers AutoencoderKL directory, with a clear error otherwise."""
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"vae.path={path!r}: not a directory (expected a diffusers AutoencoderKL "
                                f"folder: config.json + {WEIGHTS_PREFIX}*.safetensors)")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"vae.path={path!r}: no config.json (expected diffusers' AutoencoderKL layout)")
    with open(cfg_file) as f:
        conf = json.load(f)
    if conf.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"vae.path={path!r}: config.json is a {conf.get('_class_name')}, not an AutoencoderKL")
    if not _weight_files(path):
        raise FileNotFoundError(f"vae.path={path!r}: no {WEIGHTS_PREFIX}*.safetensors weights")
    return conf


def weights_digest(path: str) -> str:
    """The VAE's identity: sha256 over its weight files (names and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for name in _weight_files(path):
        h.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def resolve_scaling(conf: dict, scaling_factor: float = 0.0, shift_factor: Optional[float] = None
                    ) -> tuple[float, float]:
    """(scale, shift): the overrides where given (scaling_factor > 0, shift_factor not None),
    else config.json's ``scaling_factor`` / ``shift_factor`` (null or absent shift: 0)."""
    scale = float(scaling_factor) if scaling_factor and scaling_factor > 0 else float(conf.get("scaling_factor") or 0)
    if not scale > 0:
        raise ConfigError("vae.scaling_factor: the VAE's config.json has no positive scaling_factor; "
                          "set vae.scaling_factor (1/std of its latents)")
    shift = float(shift_factor) if shift_factor is not None else float(conf.get("shift_factor") or 0.0)
    return scale, shift


def _resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in VAE_DTYPES:
        raise ConfigError(f"vae.dtype: expected auto, fp32, bf16 or fp16, got {dtype!r}")
    return VAE_DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# The frozen VAE
# ---------------------------------------------------------------------------------------------
class FrozenVAE:
    """A diffusers ``AutoencoderKL`` loaded with ``from_pretrained``, frozen. Not an nn.Module on
    purpose: it never enters an engine. ``scale``/``shift`` are the latent scaling (see the module
    docstring); ``factor`` the spatial downsampling, ``latent_channels`` c: an image (C,H,W) has
    latents (c, H/factor, W/factor)."""

    def __init__(self, path: str, device=None, dtype: Union[str, torch.dtype, None] = "auto",
                 scaling_factor: float = 0.0, shift_factor: Optional[float] = None):
        from diffusers import AutoencoderKL

        self.path = os.path.abspath(os.path.expanduser(path))
        conf = read_vae_config(self.path)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.scale, self.shift = resolve_scaling(conf, scaling_factor, shift_factor)
        self.model = AutoencoderKL.from_pretrained(self.path, torch_dtype=self.dtype,
                                                   low_cpu_mem_usage=False).to(self.device)
        self.model.eval().requires_grad_(False)
        c = self.model.config
        self.latent_channels = int(c.latent_channels)
        self.in_channels = int(c.in_channels)
        self.out_channels = int(c.out_channels)
        self.factor = 2 ** (len(c.block_out_channels) - 1)
        self._digest: Optional[str] = None

    @classmethod
    def from_config(cls, cfg: VAEConfig, device=None) -> "FrozenVAE":
        if not cfg.path:
            raise ConfigError("vae.path is empty: give a diffusers AutoencoderKL directory")
        return cls(cfg.path, device, cfg.dtype, cfg.scaling_factor, cfg.shift_factor)

    # -- identity ---------------------------------------------------------------------------------
    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = weights_digest(self.path)
        return self._digest

    def identity(self) -> dict:
        """What precomputed latents record about the VAE that made them."""
        return {"path": self.path, "sha256": self.digest, "scaling_factor": self.scale,
                "shift_factor": self.shift, "latent_channels": self.latent_channels, "factor": self.factor}

    def latent_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]:
        if channels != self.in_channels:
            raise ConfigError(f"the VAE at {self.path} takes {self.in_channels}-channel images, got {channels} "
                              f"(data.channels)")
        if height % self.factor or width % self.factor:
            raise ConfigError(f"image size {height}x{width} is not a multiple of the VAE's downsampling "
                              f"factor {self.factor} (data.image_size)")
        return self.latent_channels, height // self.factor, width // self.factor

    # -- encode / sample / decode -----------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,C,H,W) in [-1,1] -> the raw (unscaled) posterior: mean, std (B,c,h,w) fp32."""
        post = self.model.encode(x.to(self.device, self.dtype)).latent_dist
        return post.mean.float(), post.std.float()

    def sample(self, mean: torch.Tensor, std: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A draw z = mean + std * eps from the raw posterior, scaled: the diffusion model's z0."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        return scale_latent(mean.float() + std.float() * eps, self.scale, self.shift)

    def encode_scaled(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                      mode: str = "sample") -> torch.Tensor:
        """x in [-1,1] -> z0 (encoding on the fly): a posterior draw ("sample") or its mean ("mean")."""
        mean, std = self.encode(x)
        if mode == "mean":
            return scale_latent(mean, self.scale, self.shift)
        if mode != "sample":
            raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
        return self.sample(mean, std, generator)

    @torch.no_grad()
    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """The diffusion model's scaled latent z0 (B,c,h,w) -> image (B,C,H,W) fp32 (the scaling
        undone here, once)."""
        z = unscale_latent(z0.float(), self.scale, self.shift)
        return self.model.decode(z.to(self.device, self.dtype)).sample.float()

    def __repr__(self) -> str:
        return (f"FrozenVAE({self.path}, {self.in_channels}->{self.latent_channels} ch, /{self.factor}, "
                f"scale {self.scale:g}, shift {self.shift:g}, {str(self.dtype).replace('torch.', '')})")


# ---------------------------------------------------------------------------------------------
# Precomputed latents: reading a posterior and drawing z0 (numpy only, for the data workers)
# ---------------------------------------------------------------------------------------------
class LatentError(ValueError):
    """A bad precomputed-latent sample; ``reason`` is the bad-sample counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class LatentSpec:
    """What a precomputed-latent dataset holds (``shards.json``'s ``latents`` entry) and the
    scaling to apply: shape (c,h,w), scale, shift, the VAE's identity."""
    shape: tuple
    scale: float
    shift: float
    vae: dict

    @classmethod
    def from_manifests(cls, manifests: Sequence[Optional[dict]], scaling_factor: float = 0.0) -> "LatentSpec":
        """From the manifests of every dataset (they must agree); ``scaling_factor`` > 0 overrides
        the recorded one (``data.latent_scaling_factor``)."""
        infos = [(m or {}).get("latents") for m in manifests]
        if any(i is None for i in infos):
            raise ConfigError("data.latents=true: the shards' shards.json has no 'latents' entry; "
                              "run tools.precompute_latents first")
        keyed = {json.dumps({k: i.get(k) for k in ("shape", "scaling_factor", "shift_factor")}, sort_keys=True)
                 for i in infos}
        keyed_vae = {(i.get("vae") or {}).get("sha256") for i in infos}
        if len(keyed) > 1 or len(keyed_vae) > 1:
            raise ConfigError(f"data.latents: the datasets were encoded differently: {sorted(keyed)} "
                              f"(VAE weights {sorted(map(str, keyed_vae))})")
        i = infos[0]
        scale = float(scaling_factor) if scaling_factor and scaling_factor > 0 else float(i["scaling_factor"])
        return cls(tuple(int(s) for s in i["shape"]), scale, float(i.get("shift_factor") or 0.0),
                   dict(i.get("vae") or {}))

    def posterior(self, sample: dict) -> tuple[np.ndarray, np.ndarray]:
        """The stored (mean, std) of a raw sample ``{ext: bytes}``, float32, checked."""
        if LATENT_MEAN not in sample or LATENT_STD not in sample:
            raise LatentError("no_latent", f"no {LATENT_MEAN}/{LATENT_STD} (run tools.precompute_latents)")
        try:
            mean = np.load(io.BytesIO(sample[LATENT_MEAN]), allow_pickle=False)
            std = np.load(io.BytesIO(sample[LATENT_STD]), allow_pickle=False)
        except Exception as e:
            raise LatentError("decode", f"latent npy: {e!r}") from None
        if mean.shape != self.shape or std.shape != self.shape:
            raise LatentError("shape", f"latent mean {mean.shape} / std {std.shape}, the manifest says {self.shape}")
        return mean.astype(np.float32), std.astype(np.float32)

    def draw(self, sample: dict, rng) -> np.ndarray:
        """z0 (c,h,w) float32 = scale_latent(mean + std * eps): eps from a numpy generator seeded by
        ``rng`` (the data pipeline's per-sample ``random.Random`` of (seed, epoch, pass, shard, key)),
        so a sample gets the same draw wherever and whenever (resume) it is read."""
        mean, std = self.posterior(sample)
        eps = np.random.default_rng(rng.getrandbits(64)).standard_normal(self.shape, dtype=np.float32)
        return scale_latent(mean + std * eps, np.float32(self.scale), np.float32(self.shift)).astype(np.float32)


def check_latent_unet(spec: Union[LatentSpec, Sequence[int]], in_channels: int,
                      source: str = "the precomputed latents") -> None:
    """A clear error when the latents (a shards' ``LatentSpec``, or a (c, h, w) shape from ``source``)
    do not fit the UNet."""
    shape = tuple(getattr(spec, "shape", spec))
    if shape[0] != in_channels:
        raise ConfigError(f"unet.in_channels={in_channels} but {source} have {shape[0]} "
                          f"channels (shape {shape}): set unet.in_channels={shape[0]}")


# ---------------------------------------------------------------------------------------------
# Exports: a self-contained vae/ folder, and the Pipeline's decode step
# ---------------------------------------------------------------------------------------------
def save_vae_dir(src: str, dst: str, scaling_factor: float, shift_factor: float = 0.0) -> list[str]:
    """Copy a diffusers AutoencoderKL directory (weights byte for byte) into ``dst`` with its
    config.json's ``scaling_factor`` / ``shift_factor`` set to the ones training used, so that
    ``AutoencoderKL.from_pretrained(dst)`` and ``FrozenVAE(dst)`` undo exactly that scaling."""
    conf = read_vae_config(src)
    os.makedirs(dst, exist_ok=True)
    files = []
    for name in _weight_files(src):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        files.append(name)
    conf = dict(conf, scaling_factor=float(scaling_factor), shift_factor=float(shift_factor) or None)
    with open(os.path.join(dst, CONFIG_NAME), "w") as f:
        json.dump(conf, f, indent=2)
    return files + [CONFIG_NAME]


def load_export_vae(export_dir: str, config: dict, device=None,
                    dtype: Union[str, torch.dtype, None] = "auto") -> Optional[FrozenVAE]:
    """The Pipeline's hook: the export's ``vae/`` when config.yaml has a ``latent`` section, else None."""
    lat = config.get("latent")
    if not lat:
        return None
    path = os.path.join(export_dir, lat.get("vae", "vae"))
    return FrozenVAE(path, device, dtype if dtype is not None else "auto",
                     float(lat["scaling_factor"]), float(lat.get("shift_factor") or 0.0))


def decode_latents(vae: Optional[FrozenVAE], x0: torch.Tensor) -> torch.Tensor:
    """The Pipeline's last step: sampled z0 -> images in [-1,1] (identity without a VAE)."""
    if vae is None:
        return x0
    return vae.decode(x0.to(vae.device)).float().clamp(-1, 1).cpu()


# ---------------------------------------------------------------------------------------------
# A tiny VAE for tests and examples (random weights, real diffusers layout)
# ---------------------------------------------------------------------------------------------
def make_tiny_vae(directory: str, in_channels: int = 1, latent_channels: int = 4,
                  block_out_channels: Sequence[int] = (8, 16), scaling_factor: float = 0.18215,
                  shift_factor: Optional[float] = None, seed: int = 0, layers_per_block: int = 1,
                  norm_num_groups: Optional[int] = None, **kw: Any) -> str:
    """A randomly initialised diffusers AutoencoderKL saved with ``save_pretrained`` (safetensors)
    (tests; and, with SD's sizes, the bench's stand-in for SD's VAE: same shapes, random weights)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    torch.manual_seed(seed)
    model = AutoencoderKL(in_channels=in_channels, out_channels=in_channels,
                          down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                          block_out_channels=tuple(block_out_channels), latent_channels=latent_channels,
                          norm_num_groups=norm_num_groups or (min(block_out_channels) // 2 or 1),
                          layers_per_block=layers_per_block,
                          sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor, **kw)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
