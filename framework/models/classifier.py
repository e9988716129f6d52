"""The noisy classifier p(y | x_t, t) for classifier guidance (lecture "Classifier guidance").

    logits = head(encoder(x_t, t)),   log p(y | x_t) = log_softmax(logits)[y]

Network: the UNet's encoder half, built from the same pieces (``framework.models.unet``) with the same
widths and key names (``time_embed``, ``conv_in``, ``down.*``, ``mid.*``), then a pooled head:

    time embedding -> conv_in -> down levels [ResBlock (+ self-attention)] x n, Downsample
                   -> mid ResBlock (+ self-attention, ResBlock)
                   -> GroupNorm, SiLU, pool ("mean": spatial mean; "attention": the mean token
                      attends over [mean; pixels]) -> Linear(C, num_classes) (zero-initialised)

The classifier never sees text: its transformer blocks are self-attention only (context_dim = 0).
The zero init lives in the output layer's own ``reset_parameters`` (``unet.ZeroLinear``), so it holds
under ZeRO-3 ``zero.Init``. Trained by the same trainer and engine (``task: classifier``): cross-entropy
of ``model(x_t, t)`` against the labels (json ``label`` or ``classifier.class_names`` matched in the
captions: ``batch_labels``).

Guidance side (no deepspeed here): ``load_classifier`` (a run directory: its newest checkpoint's EMA
weights via ``framework.export.consolidate``; or a directory written by ``export_classifier``),
``ClassifierGuide`` (``log_prob_fn(x_t, t, y)``, the gradient, the eps-correction model function, the
ancestral mean shift for ``ddpm_sample`` or as a model wrapper, a prompt -> class wrapper for
``Pipeline``), ``accuracy_by_t`` (held-out accuracy on noised images, by t),
``classifier_guidance_sweep`` / ``ClassifierGuidanceMethod`` (``framework.evaluate``'s guided-accuracy
sweep over the classifier scale, a curve next to classifier-free guidance). See
docs/classifier_guidance.md.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from framework.config import ClassifierConfig, UNetConfig
from framework.models.unet import (Attention, ZeroLinear, build_encoder_half, level_heads, run_encoder_half,
                   timestep_embedding)

__all__ = ["NoisyClassifier", "AttentionPool", "class_patterns", "labels_from_captions", "batch_labels",
           "class_index", "load_classifier", "run_weights", "export_classifier", "ClassifierGuide",
           "accuracy_by_t", "held_out", "classifier_guidance_sweep", "ClassifierGuidanceMethod"]


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
class AttentionPool(nn.Module):
    """(B, C, H, W) -> (B, C): the mean token is the query over [mean; pixels] (CLIP/ADM-style
    attention pooling, without a positional embedding so any image size works)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention pool: {channels} channels do not split into {heads} heads")
        self.attn = Attention(channels, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        tokens = rearrange(h, "b c h w -> b (h w) c")                  # (B, N, C)
        mean = tokens.mean(dim=1, keepdim=True)                         # (B, 1, C)
        out = self.attn(mean, torch.cat([mean, tokens], dim=1))         # (B, 1, C)
        return out[:, 0]


class NoisyClassifier(nn.Module):
    """p(y | x_t, t): ``forward(x (B,C,H,W), t (B,) int) -> logits (B, num_classes)``."""

    def __init__(self, unet_cfg: UNetConfig, cls_cfg: ClassifierConfig):
        super().__init__()
        if cls_cfg.num_classes < 2:
            raise ValueError(f"classifier.num_classes must be >= 2, got {cls_cfg.num_classes}")
        if cls_cfg.class_names and len(cls_cfg.class_names) != cls_cfg.num_classes:
            raise ValueError(f"classifier.class_names has {len(cls_cfg.class_names)} names but "
                             f"classifier.num_classes={cls_cfg.num_classes}")
        if cls_cfg.pool not in ("mean", "attention"):
            raise ValueError(f"classifier.pool must be 'mean' or 'attention', got {cls_cfg.pool!r}")
        self.cfg, self.cls_cfg = unet_cfg, cls_cfg
        # the UNet's down path and mid block, same widths and key names; self-attention only
        # (context_dim 0): the classifier is not text-conditioned
        c, _ = build_encoder_half(self, unet_cfg, context_dim=0)
        g, heads = unet_cfg.groups, level_heads(unet_cfg)

        # pooled head: GroupNorm, SiLU, pool, Linear (zero-init in its own reset_parameters)
        self.norm_out = nn.GroupNorm(g, c, eps=1e-5)
        self.pool = AttentionPool(c, heads[-1]) if cls_cfg.pool == "attention" else None
        self.head = ZeroLinear(c, cls_cfg.num_classes)

    @property
    def num_classes(self) -> int:
        return self.cls_cfg.num_classes

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) -> pooled features (B, C_last)."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        temb = F.silu(self.time_embed(timestep_embedding(t, self.conv_in.out_channels).to(x.dtype)))
        h = run_encoder_half(self, x, temb)
        h = F.silu(self.norm_out(h))                                    # (B, C, h, w)
        return self.pool(h) if self.pool is not None else h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, H, W), t (B,) int in 1..T -> logits (B, num_classes)."""
        return self.head(self.features(x, t))


# ---------------------------------------------------------------------------------------------
# Labels: json `label`, or the class name a caption contains
# ---------------------------------------------------------------------------------------------
def class_patterns(class_names: Sequence[str]) -> list[re.Pattern]:
    """One case-insensitive pattern per class. A name may list alternatives separated by "/" or "|"
    ("T-shirt/top"); each matches as a whole word (letters, digits and "-" count as word
    characters, so "shirt" does not match inside "t-shirt"), plural "s"/"es" allowed."""
    pats = []
    for name in class_names:
        alts = [a.strip() for a in re.split(r"[/|]", name) if a.strip()]
        if not alts:
            raise ValueError(f"classifier.class_names: empty class name {name!r}")
        body = "|".join(re.escape(a).replace(r"\ ", r"\s+") for a in sorted(alts, key=len, reverse=True))
        pats.append(re.compile(rf"(?<![\w-])(?:{body})(?:e?s)?(?![\w-])", re.IGNORECASE))
    return pats


def labels_from_captions(captions: Sequence[str], class_names: Sequence[str],
                         patterns: Optional[list] = None) -> list[int]:
    """Each caption -> the index of the one class name it contains. A caption naming no class, or
    two different classes, raises ValueError naming it."""
    pats = patterns or class_patterns(class_names)
    out = []
    for cap in captions:
        found = {i for i, p in enumerate(pats) if p.search(cap)}
        if len(found) != 1:
            what = "names no class" if not found else \
                f"names several classes ({', '.join(class_names[i] for i in sorted(found))})"
            raise ValueError(f"caption {cap!r} {what} of classifier.class_names={list(class_names)}: "
                             f"give the sample a json 'label' or fix the class names")
        out.append(found.pop())
    return out


_PATTERN_CACHE: dict = {}


def batch_labels(batch: dict, cls_cfg: ClassifierConfig) -> torch.Tensor:
    """The (B,) int64 class labels of a training batch: its ``label`` (from the shard json; -1 where
    absent), with the -1 entries derived from the captions when ``cls_cfg.class_names`` is set.
    Raises ValueError (naming the sample) when a sample still has no label or one out of range."""
    labels = torch.as_tensor(batch["label"], dtype=torch.int64).clone()
    missing = (labels < 0).nonzero().flatten().tolist()
    if missing and cls_cfg.class_names:
        key = tuple(cls_cfg.class_names)
        pats = _PATTERN_CACHE.setdefault(key, class_patterns(cls_cfg.class_names))
        caps = [batch["caption"][i] for i in missing]
        labels[missing] = torch.tensor(labels_from_captions(caps, cls_cfg.class_names, pats))
    elif missing:
        keys = batch.get("key") or [str(i) for i in range(len(labels))]
        raise ValueError(f"task=classifier: sample {keys[missing[0]]!r} has no label (no json "
                         f"'label' in the shard) and classifier.class_names is empty: add labels or "
                         f"set classifier.class_names to map captions to classes")
    bad = ((labels < 0) | (labels >= cls_cfg.num_classes)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"task=classifier: label {int(labels[bad[0]])} outside 0..{cls_cfg.num_classes - 1} "
                         f"(classifier.num_classes={cls_cfg.num_classes})")
    return labels


def class_index(y: Union[int, str], class_names: Sequence[str], num_classes: int) -> int:
    """A class given as an index or a name (case-insensitive; a name matching one class pattern)."""
    if isinstance(y, str) and y.strip().lstrip("-").isdigit():
        y = int(y)
    if isinstance(y, int):
        if not 0 <= y < num_classes:
            raise ValueError(f"class {y} outside 0..{num_classes - 1}")
        return y
    exact = [i for i, n in enumerate(class_names) if n.lower() == y.strip().lower()]
    if exact:
        return exact[0]
    if class_names:
        return labels_from_captions([y], class_names)[0]
    raise ValueError(f"class {y!r}: this classifier has no class names, give an index 0..{num_classes - 1}")


# ---------------------------------------------------------------------------------------------
# Loading a trained classifier (no deepspeed)
# ---------------------------------------------------------------------------------------------
def run_weights(run_dir: str, checkpoint: Optional[str] = None, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The consolidated weights of a run's checkpoint (None: the newest valid one; or a tag / path):
    ``framework.export.consolidate`` (EMA by default; ZeRO 0-3, any world size)."""
    from framework.export import consolidate
    sd, _ = consolidate(run_dir, tag=None if checkpoint in (None, "", "auto") else checkpoint, weights=weights)
    return sd


def export_classifier(run_dir: str, out: str, checkpoint: Optional[str] = None, weights: str = "ema",
                      overwrite: bool = False) -> dict:
    """A task=classifier run -> an inference directory like ``framework.export.export``'s:
    ``out/model.safetensors`` (the NoisyClassifier state dict, fp32) and ``out/config.yaml``
    (format, model class, image, unet, diffusion, classifier, export provenance). Written into a
    temporary sibling and renamed. Returns the export summary."""
    from framework.config import from_dict, to_dict
    from framework.export import FORMAT, checkpoint_config, consolidate, find_checkpoint, write_inference_dir
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True)")
    tag_dir = find_checkpoint(run_dir, None if checkpoint in (None, "", "auto") else checkpoint)
    cfg = from_dict(checkpoint_config(tag_dir))
    if cfg.task != "classifier":
        raise ValueError(f"{tag_dir}: task={cfg.task!r}, not a classifier")
    sd, info = consolidate(tag_dir, weights=weights)
    with torch.device("meta"):
        ref = NoisyClassifier(cfg.unet, cfg.classifier).state_dict()
    if set(ref) != set(sd):
        raise KeyError(f"{tag_dir}: weights do not match NoisyClassifier(cfg): missing "
                       f"{sorted(set(ref) - set(sd))[:5]}, unexpected {sorted(set(sd) - set(ref))[:5]}")
    summary = {"weights": weights, "tag": info["tag"], "step": info["step"], "checkpoint": tag_dir}
    d = to_dict(cfg)
    config = {"format": FORMAT, "task": "classifier",
              "model": {"class": "framework.models.classifier.NoisyClassifier", "weights": "model", "dtype": "fp32"},
              "image": {"size": cfg.data.image_size, "channels": cfg.unet.in_channels},
              "unet": d["unet"], "diffusion": d["diffusion"], "classifier": d["classifier"], "export": summary}
    write_inference_dir(out, {k: sd[k].float() for k in ref}, config, metadata={"task": "classifier"})
    return dict(summary, out=out)


def load_classifier(path: str, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float32, checkpoint: Optional[str] = None):
    """A trained NoisyClassifier, frozen (eval, requires_grad False), and its config.

    path: a task=classifier run directory (the EMA weights of its newest valid checkpoint, or of
    `checkpoint`) or an exported directory (``export_classifier``). Returns (model, cfg) with cfg a
    ``Config`` (from an export: its unet, diffusion and classifier sections)."""
    import yaml

    from framework.config import Config, DiffusionConfig, from_dict
    cfg_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.yaml (expected a run or an exported directory)")
    with open(cfg_path) as f:
        raw = yaml.safe_load(f) or {}
    if "format" in raw:                                   # an export directory
        if raw.get("task") != "classifier":
            raise ValueError(f"{path}: an export of a {raw.get('task', 'diffusion')!r} model, not a classifier")
        from framework.weights import load_state_dict_dir
        cfg = Config(task="classifier", unet=from_dict(raw["unet"], UNetConfig),
                     diffusion=from_dict(raw["diffusion"], DiffusionConfig),
                     classifier=from_dict(raw["classifier"], ClassifierConfig))
        sd = load_state_dict_dir(path, raw["model"].get("weights", "model"))
    else:                                                 # a run directory
        cfg = from_dict(raw)
        if cfg.task != "classifier":
            raise ValueError(f"{path}: task={cfg.task!r}, not a classifier (train it with task=classifier)")
        sd = run_weights(path, checkpoint)
    model = NoisyClassifier(cfg.unet, cfg.classifier)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path}: weights do not match NoisyClassifier(cfg): missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, cfg


# ---------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------
class ClassifierGuide:
    """A frozen classifier as the pieces ``framework.diffusion.sampling`` takes.

    - ``log_prob_fn(x_t, t, y) -> (B,)`` = log_softmax(logits)[y]; y an int, a class name or (B,).
    - ``grad_fn(y)`` -> fn(x, t) = grad_x log p(y | x, t) (gradient w.r.t. x only; the classifier's
      parameters have requires_grad False and never receive a .grad).
    - ``eps_model(model_fn, y, scale, sched)``: the eps-correction form
      eps_hat = eps - scale sqrt(1 - abar_t) grad log p(y | x_t) (``sampling.classifier_guided_model``);
      wraps any model function, e.g. a classifier-free guided one (``sampling.cfg_model``).
    - the mean-shift form: ``ddpm_sample(fn, x_T, sched, classifier_grad=guide.grad_fn(y),
      classifier_scale=scale)``; ``sample(...)`` dispatches on form "eps" / "mean".
    """

    def __init__(self, model: nn.Module, class_names: Sequence[str] = (), diffusion=None):
        self.model = model.eval().requires_grad_(False)
        self.class_names = list(class_names)
        self.diffusion = diffusion            # the DiffusionConfig it was trained with (if known)
        self.num_classes = model.num_classes if hasattr(model, "num_classes") else None
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device

    @classmethod
    def load(cls, path: str, device="cpu", dtype=torch.float32, checkpoint: Optional[str] = None) -> "ClassifierGuide":
        model, cfg = load_classifier(path, device, dtype, checkpoint)
        return cls(model, cfg.classifier.class_names, cfg.diffusion)

    def check_schedule(self, sched) -> None:
        """Raise if the classifier was trained on other noise levels than ``sched`` (t indexes abar_t:
        the same t must mean the same noise level for the classifier and the diffusion model)."""
        d = self.diffusion
        if d is None:
            return
        mine = (d.timesteps, d.schedule) + ((d.beta_start, d.beta_end) if d.schedule == "linear" else ())
        theirs = (sched.T, sched.kind) + ((sched.beta_start, sched.beta_end) if sched.kind == "linear" else ())
        if tuple(map(str, mine)) != tuple(map(str, theirs)):
            raise ValueError(f"the classifier was trained on the schedule {mine} (timesteps, kind[, beta_start, "
                             f"beta_end]) but the diffusion model uses {theirs}: train the classifier with the "
                             f"model's diffusion settings")

    def labels(self, y, batch: int) -> torch.Tensor:
        """y (int, name, list or tensor) -> (batch,) int64 on the classifier's device."""
        if isinstance(y, (int, str)):
            y = [class_index(y, self.class_names, self.num_classes)] * batch
        elif isinstance(y, (list, tuple)):
            y = [class_index(v, self.class_names, self.num_classes) for v in y]
        y = torch.as_tensor(y, dtype=torch.int64, device=self.device)
        if y.ndim == 0:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"labels: expected {batch} labels, got shape {tuple(y.shape)}")
        return y

    def logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device, self.dtype), t.to(self.device)).float()

    def log_prob_fn(self, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        """log p(y | x_t, t), (B,) float32 (differentiable w.r.t. x)."""
        lp = F.log_softmax(self.logits(x, t), dim=-1)                   # (B, K)
        y = self.labels(y, x.shape[0])
        return lp.gather(1, y[:, None])[:, 0].to(x.device)

    def grad_fn(self, y) -> Callable:
        from framework.diffusion.sampling import classifier_grad_fn
        return classifier_grad_fn(self.log_prob_fn, y)

    def eps_model(self, model_fn: Callable, y, scale: float, sched) -> Callable:
        from framework.diffusion.sampling import classifier_guided_model
        return classifier_guided_model(model_fn, self.log_prob_fn, y, scale, sched)

    def mean_shift_model(self, model_fn: Callable, y, scale: float, sched) -> Callable:
        """The lecture's ancestral mean shift as a model function, for samplers that take only a
        model function (``Pipeline(model_wrapper=...)``): with mu = mu_theta(x_t, t) and
        g = grad log p(y | x_{t-1} = mu) at noise level t - 1 (``ddpm_sample``'s convention),

            mu_hat = mu + scale * beta_tilde_t * g  <=>  eps_hat = eps - scale * beta_tilde_t * g / (r_t e_t)

        (mu_theta = r_t (x_t - e_t eps) is linear in eps; r_t = 1/sqrt(alpha_t),
        e_t = beta_t/sqrt(1 - abar_t)). Exact under ``ddpm_sample`` (all T steps, no clip_x0): it
        then equals ``ddpm_sample(model_fn, ..., classifier_grad=grad_fn(y), classifier_scale=scale)``.
        Not the mean shift under DDIM's strided steps, nor with clip_x0 (the clamp of x_0 is not linear
        in eps): use the eps form there."""
        from framework.diffusion.process import check_schedule, check_t, p_mean_from_eps
        from framework.diffusion.sampling import check_scale
        check_schedule(sched)
        scale = check_scale("classifier scale", scale)
        grad = self.grad_fn(y)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = model_fn(x, t)
            if scale == 0.0:
                return eps
            t = check_t(sched, t, x)
            var = sched.gather(sched.beta_tilde, t, x)                                  # (B,1,1,1)
            if not bool((var > 0).any()):                                              # t = 1: no shift
                return eps
            mu = p_mean_from_eps(eps.to(x.dtype), x, t, sched)                          # mu_theta(x_t, t)
            g = grad(mu, (t - 1).clamp(min=1))                                         # at level t - 1
            coef = sched.gather(sched.recip_sqrt_alpha, t, x) * sched.gather(sched.eps_coef, t, x)
            return eps - (scale * var / coef * g).to(eps.dtype)

        return fn

    def prompt_wrapper(self, scale: float, sched, form: str = "eps", y=None) -> Callable:
        """``wrap(model_fn, prompts) -> model_fn`` for ``Pipeline(model_wrapper=...)`` /
        ``evaluate.guidance_sweep``: classifier guidance on top of the (classifier-free guided or
        null-conditioned) model function, towards class ``y`` (an index or name, a list, or None:
        the class each prompt names, through the classifier's class_names)."""
        if form not in ("eps", "mean"):
            raise ValueError(f"classifier guidance form must be 'eps' or 'mean', got {form!r}")

        def wrap(model_fn: Callable, prompts) -> Callable:
            labels = y
            if labels is None:
                if not self.class_names:
                    raise ValueError("this classifier has no class_names: give the class explicitly")
                labels = labels_from_captions(list(prompts), self.class_names)
            elif isinstance(labels, (int, str)):
                labels = [labels] * len(prompts)
            labels = self.labels(list(labels), len(prompts))
            if form == "eps":
                return self.eps_model(model_fn, labels, scale, sched)
            return self.mean_shift_model(model_fn, labels, scale, sched)

        return wrap

    def sample(self, model_fn: Callable, x_T: torch.Tensor, sched, y, scale: float, form: str = "eps",
               sampler: str = "ddpm", steps: int = 50, eta: float = 0.0,
               generator: Optional[torch.Generator] = None, **kw) -> torch.Tensor:
        """Guided sampling: form "eps" (eps correction, any sampler) or "mean" (the lecture's
        ancestral mean shift; DDPM only). model_fn(x, t) -> eps (unconditional, or CFG-wrapped)."""
        from framework.diffusion.sampling import ddim_sample, ddpm_sample
        if form not in ("eps", "mean"):
            raise ValueError(f"classifier guidance form must be 'eps' or 'mean', got {form!r}")
        if form == "mean":
            if sampler != "ddpm":
                raise ValueError("the mean-shift form of classifier guidance is ancestral: use sampler='ddpm'")
            return ddpm_sample(model_fn, x_T, sched, generator=generator, classifier_grad=self.grad_fn(y),
                               classifier_scale=scale, **kw)
        fn = self.eps_model(model_fn, y, scale, sched)
        if sampler == "ddpm":
            return ddpm_sample(fn, x_T, sched, generator=generator, **kw)
        return ddim_sample(fn, x_T, sched, steps=steps, eta=eta, generator=generator, **kw)


# ---------------------------------------------------------------------------------------------
# Accuracy on noisy held-out images, by t
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy_by_t(model: Callable, images: torch.Tensor, labels: torch.Tensor, sched,
                  ts: Sequence[int], batch_size: int = 256, seed: int = 0) -> dict[int, float]:
    """Top-1 accuracy of model(x_t, t) on x_t = q_sample(x0, t, eps) for each t in ts.
    images (N, C, H, W) in [-1, 1], labels (N,). Returns {t: accuracy}."""
    from framework.diffusion.process import q_sample
    p = next(model.parameters()) if isinstance(model, nn.Module) else None
    device = p.device if p is not None else images.device
    dtype = p.dtype if p is not None else torch.float32
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t_int in ts:
        correct = 0
        for i in range(0, len(images), batch_size):
            x0 = images[i:i + batch_size].float()
            eps = torch.randn(x0.shape, generator=g)
            x_t = q_sample(sched, x0, int(t_int), eps)
            t = torch.full((len(x0),), int(t_int), dtype=torch.int64)
            pred = model(x_t.to(device, dtype), t.to(device)).argmax(-1).cpu()
            correct += int((pred == labels[i:i + batch_size].cpu()).sum())
        out[int(t_int)] = correct / max(1, len(images))
    return out


def held_out(data_cfg, n: int, cls_cfg: Optional[ClassifierConfig] = None, batch_size: int = 100,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n samples of a shard set (no shuffling, one process): images (n, C, H, W) in
    [-1, 1] and labels (n,) (json ``label``, or captions -> ``cls_cfg.class_names``)."""
    import dataclasses
    from framework.data.loader import build_loader
    dc = dataclasses.replace(data_cfg, shardshuffle=False, shuffle_buffer=0, num_workers=0,
                             use_embeddings=False, random_flip=False)
    cls_cfg = cls_cfg or ClassifierConfig()
    loader = build_loader(dc, min(batch_size, n), 0, 1, seed)
    xs, ys = [], []
    try:
        for _ in range(min(-(-n // loader.batch_size), loader.steps_per_epoch)):   # one epoch at most
            b = next(loader)
            xs.append(b["image"])
            ys.append(batch_labels(b, cls_cfg))
    finally:
        loader.close()
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


# ---------------------------------------------------------------------------------------------
# The guided-accuracy sweep over classifier scales (framework.evaluate's, one curve per form)
# ---------------------------------------------------------------------------------------------
def classifier_guidance_sweep(pipe, eval_model, guide: ClassifierGuide, scales: Sequence[float], real: dict,
                              form: str = "eps", cfg_scale: float = 0.0, name: Optional[str] = None,
                              cache: Optional[dict] = None, **sweep_kwargs) -> dict:
    """``evaluate.guidance_sweep`` with classifier guidance on top: for each classifier scale s, the
    pipeline's model at classifier-free scale ``cfg_scale`` (0: THE null condition, i.e. an
    unconditional model), corrected towards each prompt's class (form "eps" or "mean"; "mean" needs
    sampler="ddpm"), evaluated by the independent ``eval_model``. Points carry x = s under "gamma"
    (so ``evaluate.plot_sweep`` draws it next to a CFG curve) and "classifier_scale", "cfg_scale".
    ``cache``: a dict shared between calls: the unguided s = 0 point (same CFG scale and clipping) is
    computed once for both forms.
    -> {"name", "points", "curve", "grids"} as ``guidance_sweep``."""
    from framework.evaluate import guidance_sweep
    guide.check_schedule(pipe.sched)
    if form == "mean":   # the lecture's mean shift is exact on the plain (unclipped) ancestral sampler
        if sweep_kwargs.get("sampler", "ddim") != "ddpm":
            raise ValueError("the mean-shift form of classifier guidance is ancestral: use sampler='ddpm'")
        if sweep_kwargs.setdefault("clip_x0", None) is not None:
            raise ValueError("the mean-shift form needs the unclipped sampler (clip_x0=None)")
    name = name or f"classifier guidance ({form}{', CFG %g' % cfg_scale if cfg_scale else ''})"
    points, grids = [], {}
    for s in scales:
        key = (float(cfg_scale), float(s), repr(sweep_kwargs.get("clip_x0", "auto")))
        if s == 0 and cache is not None and key in cache:
            pt, grid = cache[key]
        else:
            wrapper = None if s == 0 else guide.prompt_wrapper(float(s), pipe.sched, form=form)
            res = guidance_sweep(pipe, eval_model, [float(cfg_scale)], real, name=name,
                                 model_wrapper=wrapper, **sweep_kwargs)
            pt, grid = res["points"][0], res["grids"][float(cfg_scale)]
            if s == 0 and cache is not None:
                cache[key] = (pt, grid)
        pt = dict(pt, gamma=float(s), classifier_scale=float(s), cfg_scale=float(cfg_scale), form=form)
        points.append(pt)
        grids[float(s)] = grid
    curve = {"name": name, "points": points}
    settings = {k: v for k, v in sweep_kwargs.items() if isinstance(v, (int, float, str))}
    settings.update(form=form, cfg_scale=float(cfg_scale), classifier_scales=[float(s) for s in scales])
    return {"name": name, "points": points, "curve": curve, "grids": grids, "settings": settings}


class ClassifierGuidanceMethod:
    """A named curve of ``tools/evaluate.py`` that sweeps the CLASSIFIER scale (at a fixed
    classifier-free scale, 0 = the null condition): ``method.sweep(pipe, eval_model, scales, real,
    name=..., **guidance_sweep kwargs)`` -> ``classifier_guidance_sweep``'s result."""

    def __init__(self, guide: ClassifierGuide, form: str = "eps", cfg_scale: float = 0.0):
        if form not in ("eps", "mean"):
            raise ValueError(f"classifier guidance form must be 'eps' or 'mean', got {form!r}")
        self.guide, self.form, self.cfg_scale = guide, form, float(cfg_scale)
        self.cache: dict = {}

    def sweep(self, pipe, eval_model, scales: Sequence[float], real: dict, name: Optional[str] = None,
              model_wrapper=None, **kw) -> dict:
        if model_wrapper is not None:
            raise ValueError("classifier guidance builds its own model wrapper")
        return classifier_guidance_sweep(pipe, eval_model, self.guide, scales, real, form=self.form,
                                         cfg_scale=self.cfg_scale, name=name, cache=self.cache, **kw)
