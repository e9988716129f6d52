"""Text -> images for inference: the ``Pipeline`` that loads an export directory, and the pieces the
trainer's sample grids share with it (``network_fn``, ``guided_sample``). No deepspeed, no training code.

    pipe = Pipeline.from_pretrained("runs/demo/export")
    images = pipe(["a photo of a dress", "a photo of a sneaker"], guidance_scale=3, steps=25, seed=0)
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import torch
import yaml

from framework.config import DiffusionConfig, SampleConfig, TextConfig, UNetConfig, from_dict
from framework.diffusion.process import Schedule, as_eps_model
from framework.images import to_pil, to_uint8
from framework.diffusion.sampling import cfg_model, ddim_sample, ddpm_sample
from framework.models.text import Condition, TextEncoder, cast_floats
from framework.data.buckets import size_cond
from framework.models.unet import CUDA_GRAPH_MODES, UNet, check_size, compile_for_inference
from framework.models.vae import decode_latents, load_export_vae
from framework.weights import DTYPES, FORMAT, WEIGHTS_NAME, load_state_dict_dir

__all__ = ["Pipeline", "network_fn", "guided_sample", "ModelFn"]


def _auto_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def network_fn(net: Callable, dtype: torch.dtype, channels_last: bool = False,
               cuda_graphs: bool = False) -> Callable:
    """``model(x, t, cond_kwargs) -> eps`` in float32 around a UNet (or its compiled form) computing
    in ``dtype``: what ``sampling.cfg_model`` takes. ``cuda_graphs`` (a net compiled with
    mode="reduce-overhead"): each call starts a new graph replay and copies the output out of the
    graph's buffer, which the next replay overwrites."""
    def model(x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
        x = x.to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kw = cast_floats(c, dtype)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return net(x, t, **kw).float().clone()
        return net(x, t, **kw).float().contiguous()
    return model


def guided_sample(network: Callable, cond: dict, uncond: dict, x_T: torch.Tensor, sched: Schedule, *,
                  guidance_scale: float, rescale: float = 0.0, sampler: str = "ddim", steps: int = 50,
                  eta: float = 0.0, generator: Optional[torch.Generator] = None, prediction: str = "eps",
                  clip_x0: Optional[float] = None, progress: bool = False,
                  model_wrapper: Optional[Callable[[ModelFn], ModelFn]] = None) -> torch.Tensor:
    """Classifier-free guided sampling from x_T: ``network(x, t, cond_kwargs)`` (``network_fn``),
    cond / uncond keyword dicts (``Condition.as_kwargs()``), cond and uncond in one batched forward
    per step (``sampling.cfg_model``); v / x0 networks are converted to eps first (guidance is affine,
    so the order does not matter); ``model_wrapper(fn) -> fn`` wraps the guided eps model (e.g.
    classifier guidance). sampler "ddim" (``steps`` strided steps, ``eta``) or "ddpm" (all T)."""
    fn = cfg_model(network, cond, uncond, float(guidance_scale), rescale=float(rescale))
    fn = as_eps_model(fn, sched, prediction)
    if model_wrapper is not None:
        fn = model_wrapper(fn)
    if sampler == "ddim":
        return ddim_sample(fn, x_T, sched, steps=int(steps), eta=float(eta), generator=generator,
                           clip_x0=clip_x0, progress=progress)
    if sampler == "ddpm":
        return ddpm_sample(fn, x_T, sched, generator=generator, clip_x0=clip_x0, progress=progress)
    raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")


class Pipeline:
    """Text -> images from an export directory. No deepspeed, no training code.

        pipe = Pipeline.from_pretrained("runs/demo/export")
        images = pipe(["a photo of a dress", "a photo of a sneaker"], guidance_scale=3, steps=25, seed=0)

    Guidance is classifier-free with THE null condition of training (``null.safetensors``), cond and
    uncond in one batched forward per step (``sampling.cfg_model``). Noise comes from a CPU generator
    seeded with ``seed``, so a seed gives the same images on any device (up to kernel numerics).
    """

    vae = None      # a vae.FrozenVAE for a latent model (from_pretrained sets it)

    def __init__(self, unet: torch.nn.Module, encoder, null, sched, config: dict, device: torch.device,
                 dtype: torch.dtype, channels_last: bool = False, compile: Union[bool, str] = False,
                 compile_backend: str = "inductor"):
        self.unet, self.encoder, self.null, self.sched = unet, encoder, null, sched
        self.config, self.device, self.dtype, self.channels_last = config, device, dtype, channels_last
        self.compile_mode = ("default" if compile is True else compile) or None
        self._net = unet
        if self.compile_mode:
                self._net = compile_for_inference(unet, self.compile_mode, compile_backend)
        self.image_size = int(config["image"]["size"])
        self.channels = int(config["image"]["channels"])
        self.defaults = SampleConfig(**config.get("sample", {}))
        self.prediction = config.get("diffusion", {}).get("prediction", "eps")
        self.clip_x0 = config.get("inference", {}).get("clip_x0", 1.0)

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype: Optional[Union[str, torch.dtype]] = None,
                        channels_last: Optional[bool] = None, text_encoder: Optional[str] = None,
                        compile: Union[bool, str] = False, compile_backend: str = "inductor") -> "Pipeline":
        """Load an export directory. ``device``: None/"auto" (CUDA if available), "cpu", "cuda:1", ...
        ``dtype``: compute dtype (default fp32 on CPU, the stored dtype on CUDA).
        ``channels_last``: default on for CPU (about 2x faster convolutions there).
        ``text_encoder``: override config.yaml's encoder location (a directory), e.g. on another machine.
        ``compile``: torch.compile the UNet (``unet.compile_for_inference``): True / "default", or
        "reduce-overhead" (CUDA graphs), "max-autotune", ...; the first batch pays the compilation."""
        from safetensors.torch import load_file

        with open(os.path.join(path, "config.yaml")) as f:
            config = yaml.safe_load(f)
        if config.get("format") != FORMAT:
            raise ValueError(f"{path}/config.yaml: format {config.get('format')!r}, expected {FORMAT!r}")
        device = _auto_device(device)
        stored = DTYPES[config["model"].get("dtype", "fp32")]
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else stored
        elif isinstance(dtype, str):
            dtype = DTYPES[dtype]
        if channels_last is None:
            channels_last = device.type == "cpu"

        ucfg = from_dict(config["unet"], UNetConfig)
        unet = UNet(ucfg)
        sd = load_state_dict_dir(path, config["model"].get("weights", WEIGHTS_NAME))
        unet.load_state_dict(sd, strict=True)
        unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)

        tcfg = from_dict(config["text"], TextConfig)
        if text_encoder:
            tcfg.encoder = text_encoder
        encoder = TextEncoder(tcfg, device=device)
        nd = load_file(os.path.join(path, config["null"].get("file", "null.safetensors")))
        null = Condition(nd["ctx"], nd["mask"], nd.get("pooled")).to(device)
        if null.ctx.shape[-1] != encoder.dim or null.ctx.shape[1] != tcfg.max_length:
            raise ValueError(f"null condition {tuple(null.ctx.shape)} does not fit the encoder "
                             f"({tcfg.max_length} tokens x {encoder.dim})")
        sched = Schedule.from_config(from_dict(config["diffusion"], DiffusionConfig))
        pipe = cls(unet, encoder, null, sched, config, device, dtype, channels_last, compile, compile_backend)
        pipe.vae = load_export_vae(path, config, device)    # the export's vae/, or None (pixels)
        return pipe

    # -- shapes ---------------------------------------------------------------------------------------
    @property
    def latent_factor(self) -> int:
        """Output pixels per cell of the sampled tensor: 1 in pixel space, the VAE's factor for a
        latent model (``self.vae``, where the export has one)."""
        vae = getattr(self, "vae", None)
        return int(getattr(vae, "factor", 1)) if vae is not None else 1

    @property
    def size_multiple(self) -> int:
        """height and width must be multiples of this: the UNet's 2 ** (levels - 1) x latent_factor."""
        return self.unet.size_multiple * self.latent_factor

    def check_size(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int]:
        """-> (height, width) in output pixels (default: the training image_size, square); ValueError
        naming the factor unless both are multiples of ``size_multiple``."""
        height = self.image_size * self.latent_factor if height is None else int(height)
        width = self.image_size * self.latent_factor if width is None else int(width)
        what = f"the UNet's downsampling factor {self.unet.size_multiple}" + (
            f" x the VAE's {self.latent_factor}" if self.latent_factor > 1 else "")
        check_size(height, width, self.size_multiple, what)
        return height, width

    def size_cond(self, batch: int, height: int, width: int) -> Optional[torch.Tensor]:
        """The micro-conditioning of a sample made at height x width: original = target = (h, w),
        crop (0, 0) (SDXL's default for "a whole, uncropped image"); None without micro-conditioning."""
        if not getattr(self.unet.cfg, "micro_conditioning", False):
            return None
        return torch.tensor([size_cond((height, width), (0, 0), (height, width))],
                            device=self.device).expand(batch, 6)

    # -- pieces ---------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]):
        """prompts -> Condition on the pipeline's device (fp32)."""
        return self.encoder.encode(list(prompts)).to(self.device)

    def unconditional(self, batch: int, negative_prompt: Union[str, Sequence[str], None] = None):
        """The condition guidance extrapolates away from: THE null condition (default) or the encoding
        of a negative prompt (one string, or one per sample)."""
        if negative_prompt is None or (isinstance(negative_prompt, str) and negative_prompt == ""):
            return self.null.expand(batch)
        negs = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != batch:
            raise ValueError(f"{len(negs)} negative prompts for {batch} samples")
        return self.encode(negs)

    def network(self) -> Callable:
        """``model(x, t, cond_kwargs) -> eps`` in float32, for ``sampling.cfg_model``."""
        return network_fn(self._net, self.dtype, self.channels_last,
                          cuda_graphs=self.compile_mode in CUDA_GRAPH_MODES and self.device.type == "cuda")

    def model_fn(self, cond, uncond, guidance_scale: float, rescale: float = 0.0) -> ModelFn:
        """The classifier-free guided eps model fn(x, t) for Conditions ``cond`` / ``uncond``."""
        return cfg_model(self.network(), cond.as_kwargs(), uncond.as_kwargs(), guidance_scale, rescale=rescale)

    def noise(self, batch: int, seed: int = 0, height: Optional[int] = None,
              width: Optional[int] = None) -> torch.Tensor:
        """x_T ~ N(0, I) (batch, C, h, w) from a CPU generator seeded with ``seed``; (h, w) =
        (height, width) / latent_factor (default: the training size)."""
        height, width = self.check_size(height, width)
        f = self.latent_factor
        g = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn((batch, self.channels, height // f, width // f), generator=g)

    # -- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompts: Union[str, Sequence[str]], guidance_scale: Optional[float] = None,
                 steps: Optional[int] = None, sampler: Optional[str] = None,
                 negative_prompt: Union[str, Sequence[str], None] = None, seed: int = 0,
                 rescale: Optional[float] = None, eta: Optional[float] = None,
                 x_T: Optional[torch.Tensor] = None, output_type: str = "pil", progress: bool = False,
                 model_wrapper: Optional[Callable[[ModelFn, list[str]], ModelFn]] = None,
                 clip_x0: Union[float, None, str] = "auto", height: Optional[int] = None,
                 width: Optional[int] = None):
        """Sample one image per prompt (all in one batch).

        height, width: the output size in pixels (default: the training image_size, square); any
        multiples of ``size_multiple`` (the UNet's 2 ** (levels - 1), x the VAE's factor for a latent
        model), e.g. an aspect-ratio bucket. ``x_T`` given: its shape decides (height / width unused).

        guidance_scale gamma (default: config.yaml's sample.guidance_scale): eps_hat =
        gamma eps(x, y) + (1 - gamma) eps(x, null); 0 = unconditional, 1 = conditional.
        sampler "ddim" (``steps`` strided steps, ``eta``) or "ddpm" (all T ancestral steps; ``steps``
        ignored). ``negative_prompt`` replaces the null condition. ``rescale``: CFG rescale phi.
        ``seed``: x_T and the sampler's noise come from a CPU generator seeded with it; ``x_T``
        overrides the initial noise. ``model_wrapper(fn, prompts) -> fn`` wraps the guided model
        function (e.g. classifier guidance); it receives and returns an eps model, whatever the
        network predicts (v / x0 networks are converted first). ``clip_x0``: clamp each step's x_0
        estimate to [-c, c] ("auto": config.yaml's inference.clip_x0, 1.0 for pixel data in [-1, 1],
        as improved-diffusion's clip_denoised; None: off). output_type "pil" (list of PIL images),
        "pt" (a (B,C,H,W) float tensor in [-1, 1] on the CPU) or "np" ((B,H,W,C) uint8)."""

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts")
        d = self.defaults
        guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
        steps = d.steps if steps is None else steps
        sampler = d.sampler if sampler is None else sampler
        rescale = d.rescale if rescale is None else rescale
        eta = d.eta if eta is None else eta
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        B = len(prompts)
        cond = self.encode(prompts)
        uncond = self.unconditional(B, negative_prompt if negative_prompt is not None else
                                    (d.negative_prompt or None))
        if clip_x0 == "auto":
            clip_x0 = self.clip_x0
        g = torch.Generator("cpu").manual_seed(int(seed))
        if x_T is None:
            height, width = self.check_size(height, width)
            f = self.latent_factor
            x_T = torch.randn((B, self.channels, height // f, width // f), generator=g)
        else:
            height, width = x_T.shape[-2] * self.latent_factor, x_T.shape[-1] * self.latent_factor
            self.check_size(height, width)
        x_T = x_T.to(self.device, torch.float32)
        ckw, ukw = cond.as_kwargs(), uncond.as_kwargs()
        sc = self.size_cond(B, height, width)
        if sc is not None:          # the same size condition in both branches (never part of the null)
            ckw["size_cond"] = ukw["size_cond"] = sc
        x0 = guided_sample(self.network(), ckw, ukw, x_T, self.sched,
                           guidance_scale=float(guidance_scale), rescale=float(rescale), sampler=sampler,
                           steps=int(steps), eta=float(eta), generator=g, prediction=self.prediction,
                           clip_x0=clip_x0, progress=progress,
                           model_wrapper=None if model_wrapper is None else (lambda fn: model_wrapper(fn, prompts)))
        x0 = decode_latents(self.vae, x0)     # a latent model: z0 -> images (scaling undone once)
        x0 = x0.float().clamp(-1, 1).cpu()
        if output_type == "pt":
            return x0
        if output_type == "np":
            return to_uint8(x0)
        return to_pil(x0)

    @torch.no_grad()
    def sample_grid(self, prompts: Sequence[str], guidance_scales: Sequence[float], num_per_prompt: int = 1,
                    seed: int = 0, batch_size: int = 64, progress: bool = False,
                    model_wrapper: Optional[Callable[[ModelFn, list[str]], ModelFn]] = None,
                    height: Optional[int] = None, width: Optional[int] = None, **kwargs) -> dict:
        """Rows = guidance scales (x ``num_per_prompt`` samples), columns = prompts. The same initial
        noise for every scale (x_T of sample j of prompt i is fixed by ``seed``), so a column shows what
        guidance alone changes. Batches of at most ``batch_size`` images (batch k of a row samples its
        step noise with seed + 1 + k). -> {"images": (rows*cols, C, H, W) in [-1, 1], "nrow": cols,
        "row_labels", "col_labels", "records": [{"row", "col", "prompt", "scale", "sample"}]}.
        ``kwargs`` go to ``__call__`` (steps, sampler, eta, rescale, negative_prompt); every image is
        height x width (default: the training size)."""
        prompts = list(prompts)
        cols = len(prompts)
        n = cols * num_per_prompt
        # job order within a scale: sample j of prompt i at position j * cols + i (row j, column i)
        flat_prompts = [prompts[i] for j in range(num_per_prompt) for i in range(cols)]
        x_T = self.noise(n, seed, height, width)
        rows_out, row_labels, records = [], [], []
        batches = [(s, lo) for s in guidance_scales for lo in range(0, n, batch_size)]
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(batches), desc="sampling", unit="batch")
        per_scale: dict = {}
        for k, (s, lo) in enumerate(batches):
            hi = min(n, lo + batch_size)
            x = self(flat_prompts[lo:hi], guidance_scale=float(s), seed=seed + 1 + lo // batch_size,
                     x_T=x_T[lo:hi], output_type="pt", model_wrapper=model_wrapper, **kwargs)
            per_scale.setdefault(s, []).append(x)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        for r_s, s in enumerate(guidance_scales):
            imgs = torch.cat(per_scale[s])
            rows_out.append(imgs)
            for j in range(num_per_prompt):
                row = r_s * num_per_prompt + j
                row_labels.append(f"g={s:g}" + (f" #{j}" if num_per_prompt > 1 else ""))
                for i in range(cols):
                    records.append({"row": row, "col": i, "prompt": prompts[i], "scale": float(s), "sample": j})
        return {"images": torch.cat(rows_out), "nrow": cols, "row_labels": row_labels,
                "col_labels": list(prompts), "records": records}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.unet.parameters())
        return (f"Pipeline(unet {n / 1e6:.2f}M params, {self.image_size}x{self.image_size}x{self.channels} "
                f"(any multiple of {self.size_multiple}), "
                f"encoder {self.encoder.path}, device {self.device}, dtype {self.dtype})")
