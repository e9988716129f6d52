"""Checkpoints -> consolidated weights -> an inference directory; and the ``Pipeline`` that loads it.

A checkpoint resumes training (DeepSpeed shards + client state); an export serves inference
(DESIGN principle 10). This module reads the run layout of ``framework/checkpoint.py``:

    inspect_checkpoint(run)                       tag, step, world size, ZeRO stage, sizes
    consolidate(run, weights="raw"|"ema")         ZeRO 0-3 shards, any world size -> {name: fp32 tensor}
    export(run, out, weights="ema", dtype=...)    -> the inference directory below
    Pipeline.from_pretrained(out)(prompts, guidance_scale=3)   -> PIL images

The inference directory (no pickle anywhere: safetensors, JSON and YAML only)::

    OUT/config.yaml                  format, resolved unet / diffusion / text settings, image size,
                                     the null condition's definition, sampling defaults, provenance
    OUT/model.safetensors            the UNet state dict (or model-00001-of-0000N.safetensors + the
                                     HF-style model.safetensors.index.json when over max_shard_size)
    OUT/null.safetensors             THE null condition used in training: ctx (1,L,D), mask (1,L) bool
                                     [, pooled (1,P)]; guidance uses exactly this tensor
    OUT/unet/                        (diffusers=True) config.json + diffusion_pytorch_model*.safetensors:
                                     diffusers' UNet2DConditionModel layout

Imports: deepspeed only inside ``consolidate(weights="raw")`` for ZeRO 1-3 checkpoints
(``zero_to_fp32``); everything else, the EMA export and the Pipeline included, runs without it.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict
from typing import Callable, Optional, Sequence, Union

import torch
import yaml

from . import checkpoint as ckpt
from .config import Config, DiffusionConfig, SampleConfig, TextConfig, UNetConfig, from_dict

__all__ = ["FORMAT", "find_checkpoint", "inspect_checkpoint", "format_inspect", "checkpoint_config",
           "load_ema", "load_raw", "consolidate", "save_state_dict", "load_state_dict_dir",
           "parse_size", "export", "reshard", "Pipeline", "DTYPES"]

FORMAT = "framework-export/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS_NAME = "model"                            # model.safetensors / model-0000i-of-0000N.safetensors
DIFFUSERS_NAME = "diffusion_pytorch_model"        # diffusers' file name for a UNet


# ---------------------------------------------------------------------------------------------
# Finding and inspecting checkpoints
# ---------------------------------------------------------------------------------------------
def _checkpoints_dir(path: str) -> str:
    """A run directory, its checkpoints/ folder, or a tag directory -> the checkpoints folder."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, ckpt.MANIFEST)) or ckpt.TAG_RE.match(os.path.basename(path)):
        return os.path.dirname(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints")
    return path


def find_checkpoint(path: str, tag: Optional[str] = None) -> str:
    """The tag directory to read: ``path`` is a run directory, its ``checkpoints/`` folder or a tag
    directory; ``tag`` None -> the newest VALID tag (``latest`` first, incomplete saves skipped with a
    warning), else that tag (which must be valid)."""
    path = os.path.abspath(path)
    if tag is None and os.path.isfile(os.path.join(path, ckpt.MANIFEST)):
        reason = ckpt.validate(path)
        if reason:
            raise FileNotFoundError(f"checkpoint {path}: {reason}")
        return path
    directory = _checkpoints_dir(path)
    found = ckpt.find_resume(directory, tag or "auto")
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {directory} "
                                f"(tags: {ckpt.complete_tags(directory) or 'none'})")
    return found


def _sizes(tag_dir: str) -> dict[str, int]:
    groups = {"ema": 0, "optimizer": 0, "model_states": 0, "rank_state": 0, "other": 0}
    for name in os.listdir(tag_dir):
        full = os.path.join(tag_dir, name)
        if not os.path.isfile(full):
            continue
        n = os.path.getsize(full)
        if name.startswith("ema-rank"):
            groups["ema"] += n
        elif name.endswith("optim_states.pt"):
            groups["optimizer"] += n
        elif name.endswith("model_states.pt"):
            groups["model_states"] += n
        elif re.match(r"^rank\d+\.pt$", name):
            groups["rank_state"] += n
        else:
            groups["other"] += n
    groups["total"] = sum(groups.values())
    return groups


def inspect_checkpoint(path: str, tag: Optional[str] = None) -> dict:
    """What a checkpoint is: tag, step, images seen, world size, ZeRO stage, EMA layout, parameter
    count, bytes on disk by kind, the other tags of the run (and whether each is valid)."""
    tag_dir = find_checkpoint(path, tag)
    meta = ckpt.read_meta(tag_dir)
    shapes = meta.get("shapes", {})
    directory = os.path.dirname(tag_dir)
    tags = []
    for t in ckpt.complete_tags(directory):
        tags.append({"tag": t, "valid": ckpt.validate(os.path.join(directory, t)) is None,
                     "universal": os.path.isfile(os.path.join(directory, t + "_universal", "converted.ok"))})
    params = int(sum(math.prod(s) for s in shapes.values()))
    return {
        "path": tag_dir, "tag": os.path.basename(tag_dir), "step": meta.get("step"),
        "images_seen": meta.get("images_seen"), "world_size": meta.get("world_size"),
        "zero_stage": meta.get("zero_stage"), "task": meta.get("task", "diffusion"),
        "ema_partitioned": meta.get("ema_partitioned"), "tensors": len(shapes), "params": params,
        "fp32_bytes": 4 * params, "bytes": _sizes(tag_dir), "files": len(meta.get("files", {})),
        "tags": tags,
    }


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_inspect(info: dict) -> str:
    b = info["bytes"]
    lines = [
        f"checkpoint   {info['path']}",
        f"tag          {info['tag']}   step {info['step']}   images seen {info['images_seen']}",
        f"world size   {info['world_size']}   ZeRO stage {info['zero_stage']}   task {info['task']}",
        f"EMA          {'partitioned over ranks (ZeRO-3)' if info['ema_partitioned'] else 'full copy on rank 0'}",
        f"parameters   {info['params']:,} in {info['tensors']} tensors ({_human(info['fp32_bytes'])} as fp32)",
        f"on disk      {_human(b['total'])}: model states {_human(b['model_states'])}, optimizer "
        f"{_human(b['optimizer'])}, EMA {_human(b['ema'])}, rank state {_human(b['rank_state'])}",
        "tags         " + ", ".join(f"{t['tag']}{'' if t['valid'] else ' (INVALID)'}"
                                    f"{' +universal' if t['universal'] else ''}" for t in info["tags"]),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading the weights
# ---------------------------------------------------------------------------------------------
def _model_states_file(tag_dir: str, zero_stage: int) -> str:
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
    return os.path.join(tag_dir, name)


def checkpoint_config(tag_dir: str) -> dict:
    """The resolved config that MADE this checkpoint (DeepSpeed's client state, read without
    unpickling code: ``weights_only``, memory-mapped), else the run's config.yaml."""
    meta = ckpt.read_meta(tag_dir)
    f = _model_states_file(tag_dir, int(meta.get("zero_stage", 0)))
    try:
        states = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(states.get("config"), dict):
            return states["config"]
    except Exception as e:   # pragma: no cover - an older or foreign layout
        warnings.warn(f"could not read the config from {f} ({e}); using the run's config.yaml")
    run_cfg = os.path.join(os.path.dirname(os.path.dirname(tag_dir)), "config.yaml")
    with open(run_cfg) as fh:
        return yaml.safe_load(fh)


def load_ema(tag_dir: str) -> dict[str, torch.Tensor]:
    """The EMA weights as full fp32 tensors: ``EMA.full_state`` over the ema-rank*.pt files (one per
    rank under ZeRO-3, partitions in rank order; rank 0's full copy under ZeRO 0-2)."""
    from .engine import EMA     # torch only at import time: no deepspeed

    meta = ckpt.read_meta(tag_dir)
    if "shapes" not in meta:
        raise ValueError(f"{tag_dir}: complete.json has no EMA shapes (no EMA in this checkpoint)")
    partitioned = bool(meta.get("ema_partitioned"))
    ranks = range(int(meta["world_size"])) if partitioned else range(1)
    shards = []
    for r in ranks:
        f = ckpt.ema_file(tag_dir, r)
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} missing: an EMA partition of a {meta['world_size']}-rank "
                                    f"ZeRO-3 checkpoint")
        shards.append(torch.load(f, map_location="cpu", weights_only=True))
    full = EMA.full_state(shards, meta["shapes"], partitioned)
    return {k: v.float().contiguous() for k, v in full.items()}


def load_raw(tag_dir: str, quiet: bool = True) -> dict[str, torch.Tensor]:
    """The trained (non-EMA) weights as fp32 tensors, any ZeRO stage and world size.

    Stage 0 without a ZeRO optimizer file: the module in ``mp_rank_00_model_states.pt`` (fp32 when
    trained in fp32; a bf16 run's module is bf16, upcast). Stages 1-3 (and bf16 stage 0): DeepSpeed's
    ``zero_to_fp32`` rebuilds the fp32 master weights from the optimizer partitions."""
    meta = ckpt.read_meta(tag_dir)
    stage = int(meta.get("zero_stage", 0))
    has_zero_optim = any(n.endswith("optim_states.pt") for n in os.listdir(tag_dir))
    if stage == 0 and not has_zero_optim:
        states = torch.load(_model_states_file(tag_dir, 0), map_location="cpu", weights_only=True, mmap=True)
        module = states["module"]
        if any(v.dtype != torch.float32 for v in module.values() if v.is_floating_point()):
            warnings.warn(f"{tag_dir}: stage-0 module weights are {next(iter(module.values())).dtype}, "
                          f"not fp32 masters; upcasting")
        return {k: v.float().contiguous().clone() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        sd = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))
    return {k: v.float().contiguous().clone() for k, v in sd.items()}


def consolidate(path: str, tag: Optional[str] = None, weights: str = "raw",
                quiet: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """ZeRO shards (any stage, any world size) -> one fp32 state dict. ``weights``: "raw" (the
    trained weights) or "ema". -> (state dict, inspect_checkpoint info)."""
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
    tag_dir = find_checkpoint(path, tag)
    info = inspect_checkpoint(tag_dir)
    sd = load_ema(tag_dir) if weights == "ema" else load_raw(tag_dir, quiet=quiet)
    return sd, info


def reshard(path: str, tag: Optional[str] = None) -> str:
    """DeepSpeed universal checkpoint of a tag (``framework.checkpoint.convert_to_universal``),
    loadable on any world size. The trainer does this itself when a run resumes on another world
    size; this is for doing it ahead of time (or for other tools)."""
    tag_dir = find_checkpoint(path, tag)
    stage = int(ckpt.read_meta(tag_dir).get("zero_stage", 0))
    if stage == 0:
        raise ValueError(f"{tag_dir} is a ZeRO-0 checkpoint: it holds full weights and optimizer state "
                         f"already (no partitions to reshard)")
    return ckpt.convert_to_universal(tag_dir, stage)


# ---------------------------------------------------------------------------------------------
# safetensors files, HF-style sharding
# ---------------------------------------------------------------------------------------------
def parse_size(text: Union[str, int, None]) -> int:
    """'2GB', '500MB', '10KiB', 123456 -> bytes (decimal units as HF: 1GB = 10^9; KiB/MiB/GiB binary).
    0 / None / '' -> 0 (no sharding)."""
    if text is None or text == "" or text == 0:
        return 0
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 2GB, 500MB, 100000)")
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _save_file(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    """safetensors' save_file, then the usual permissions (it creates files 0600)."""
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_state_dict(sd: dict[str, torch.Tensor], out_dir: str, name: str = WEIGHTS_NAME,
                    max_shard_size: Union[int, str, None] = 0,
                    metadata: Optional[dict[str, str]] = None) -> list[str]:
    """Write ``sd`` as ``{name}.safetensors``, or, when larger than ``max_shard_size`` bytes, as
    ``{name}-00001-of-0000N.safetensors`` ... + ``{name}.safetensors.index.json``
    (``{"metadata": {"total_size"}, "weight_map": {tensor: file}}``, the Hugging Face convention).
    Tensors keep their order; a tensor larger than the limit gets a shard of its own.
    Returns the file names written."""
    limit = parse_size(max_shard_size)
    meta = {"format": "pt", **(metadata or {})}
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    total = sum(_nbytes(v) for v in sd.values())
    os.makedirs(out_dir, exist_ok=True)
    if not limit or total <= limit:
        fname = f"{name}.safetensors"
        _save_file(sd, os.path.join(out_dir, fname), meta)
        return [fname]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        if shards[-1] and size + _nbytes(v) > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += _nbytes(v)
    n = len(shards)
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"{name}-{i + 1:05d}-of-{n:05d}.safetensors"
        _save_file(shard, os.path.join(out_dir, fname), meta)
        files.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, f"{name}.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return files + [f"{name}.safetensors.index.json"]


def load_state_dict_dir(directory: str, name: str = WEIGHTS_NAME, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read ``{name}.safetensors`` or the shards listed in ``{name}.safetensors.index.json``."""
    from safetensors.torch import load_file

    single = os.path.join(directory, f"{name}.safetensors")
    index = os.path.join(directory, f"{name}.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single, device=device)
    if not os.path.isfile(index):
        raise FileNotFoundError(f"neither {single} nor {index} exists")
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    sd: dict[str, torch.Tensor] = {}
    for fname in dict.fromkeys(weight_map.values()):
        sd.update(load_file(os.path.join(directory, fname), device=device))
    missing = set(weight_map) - set(sd)
    if missing:
        raise KeyError(f"{index} lists tensors absent from its shards: {sorted(missing)[:5]}")
    return {k: sd[k] for k in weight_map}


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _null_condition(cfg: Config):
    """The null condition exactly as training built it: from the shards' manifest when training
    read precomputed embeddings, else the frozen encoder's ``null()`` (cfg.text.null)."""
    if cfg.data.use_embeddings:
        from .data import build_loader
        loader = build_loader(cfg.data, 1, 0, 1, cfg.seed)
        try:
            return loader.null_condition(), "shards manifest (precomputed embeddings)"
        finally:
            if hasattr(loader, "close"):
                loader.close()
    from .text import TextEncoder
    enc = TextEncoder(cfg.text, device="cpu")
    return enc.null(1), f"TextEncoder({enc.path}).null() in {str(enc.dtype).replace('torch.', '')}"


def _diffusers_json(cfg: Config) -> dict:
    from .unet import diffusers_config
    kw = diffusers_config(cfg.unet)
    out = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0",
           "sample_size": cfg.data.image_size}
    out.update({k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})
    return out


def export(path: str, out: str, tag: Optional[str] = None, weights: str = "ema", dtype: str = "fp32",
           max_shard_size: Union[int, str, None] = 0, diffusers: bool = False, overwrite: bool = False,
           quiet: bool = True) -> dict:
    """A training run (ZeRO 0-3, any world size; the newest valid tag or ``tag``) -> the inference
    directory ``out`` (see the module docstring). ``weights``: "ema" (default) or "raw";
    ``dtype``: fp32 | bf16 | fp16; ``max_shard_size``: e.g. "2GB" (0: one file);
    ``diffusers``: also write ``out/unet/`` in diffusers' UNet2DConditionModel layout.
    Written into a temporary sibling and renamed, so ``out`` is complete or absent.
    Returns a summary dict (also the ``export`` section of config.yaml)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite)")
    t0 = time.perf_counter()
    tag_dir = find_checkpoint(path, tag)
    meta = ckpt.read_meta(tag_dir)
    if meta.get("task", "diffusion") != "diffusion":
        raise ValueError(f"{tag_dir} is a {meta.get('task')!r} checkpoint; export serves diffusion models")
    cfg = from_dict(checkpoint_config(tag_dir))
    sd, info = consolidate(tag_dir, weights=weights, quiet=quiet)

    # the state dict must be exactly the UNet's (EMA covers every trainable tensor; the UNet has no buffers)
    from .unet import UNet
    with torch.device("meta"):
        ref = UNet(cfg.unet).state_dict()
    missing, unexpected = set(ref) - set(sd), set(sd) - set(ref)
    if missing or unexpected:
        raise KeyError(f"{weights} weights of {tag_dir} do not match UNet(cfg.unet): missing "
                       f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for k, v in ref.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(sd[k].shape)} != model {tuple(v.shape)}")
    sd = {k: sd[k].to(DTYPES[dtype]) if sd[k].is_floating_point() else sd[k] for k in ref}

    null, null_source = _null_condition(cfg)
    from .latents import add_latent_config, latent_export_info, write_export_vae   # [latent path]
    latent = latent_export_info(cfg)     # [latent path] the VAE and scaling of a latent model; None: pixels
    summary = {
        "weights": weights, "dtype": dtype, "tag": info["tag"], "step": info["step"],
        "images_seen": info["images_seen"], "world_size": info["world_size"],
        "zero_stage": info["zero_stage"], "params": info["params"], "checkpoint": tag_dir,
        "run_dir": os.path.dirname(os.path.dirname(tag_dir)),
        "ema": {"decay": cfg.engine.ema_decay, "halflife_images": cfg.engine.ema_halflife_images,
                "warmup_steps": cfg.engine.ema_warmup_steps},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    config = {
        "format": FORMAT,
        "model": {"class": "framework.unet.UNet", "weights": WEIGHTS_NAME, "dtype": dtype},
        "image": {"size": cfg.data.image_size, "channels": cfg.unet.in_channels},
        "unet": asdict(cfg.unet),
        "diffusion": asdict(cfg.diffusion),
        "text": asdict(cfg.text),
        "null": {"kind": cfg.text.null, "file": "null.safetensors", "source": null_source,
                 "shape": {"ctx": list(null.ctx.shape), "mask": list(null.mask.shape),
                           "pooled": None if null.pooled is None else list(null.pooled.shape)},
                 "note": "the unconditional input of null-text dropout and of guidance; "
                         "'empty' = encoder(\"\"), 'zeros' = zero tokens with only token 0 unmasked"},
        "sample": asdict(cfg.sample),
        "inference": {"clip_x0": 1.0},     # images live in [-1, 1]: clamp each step's x_0 estimate
        "classifier": {"class_names": list(cfg.classifier.class_names)},
        "export": summary,
    }
    if latent is not None:               # [latent path]
        add_latent_config(config, latent)

    with ckpt.atomic_dir(out) as tmp:
        files = save_state_dict(sd, tmp, WEIGHTS_NAME, max_shard_size,
                                metadata={"framework": FORMAT, "weights": weights, "tag": info["tag"]})
        nd = {"ctx": null.ctx.float().contiguous(), "mask": null.mask.bool().contiguous()}
        if null.pooled is not None:
            nd["pooled"] = null.pooled.float().contiguous()
        _save_file(nd, os.path.join(tmp, "null.safetensors"), {"kind": cfg.text.null})
        files.append("null.safetensors")
        if diffusers:
            from .unet import to_diffusers_state_dict
            ddir = os.path.join(tmp, "unet")
            dfiles = save_state_dict(to_diffusers_state_dict(sd), ddir, DIFFUSERS_NAME, max_shard_size)
            with open(os.path.join(ddir, "config.json"), "w") as f:
                json.dump(_diffusers_json(cfg), f, indent=2)
            files += [f"unet/{x}" for x in dfiles] + ["unet/config.json"]
        if latent is not None:           # [latent path] vae/: diffusers layout, the training scaling
            files += write_export_vae(latent, tmp)
        summary["files"] = files
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False, default_flow_style=None)
        files.append("config.yaml")
    summary.update(out=out, seconds=round(time.perf_counter() - t0, 2))
    return summary


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------
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
        kw = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in c.items()}
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return net(x, t, **kw).float().clone()
        return net(x, t, **kw).float().contiguous()
    return model


class Pipeline:
    """Text -> images from an export directory. No deepspeed, no training code.

        pipe = Pipeline.from_pretrained("runs/demo/export")
        images = pipe(["a photo of a dress", "a photo of a sneaker"], guidance_scale=3, steps=25, seed=0)

    Guidance is classifier-free with THE null condition of training (``null.safetensors``), cond and
    uncond in one batched forward per step (``sampling.cfg_model``). Noise comes from a CPU generator
    seeded with ``seed``, so a seed gives the same images on any device (up to kernel numerics).
    """

    vae = None      # [latent path] a vae.FrozenVAE for a latent model (from_pretrained sets it)

    def __init__(self, unet: torch.nn.Module, encoder, null, sched, config: dict, device: torch.device,
                 dtype: torch.dtype, channels_last: bool = False, compile: Union[bool, str] = False,
                 compile_backend: str = "inductor"):
        self.unet, self.encoder, self.null, self.sched = unet, encoder, null, sched
        self.config, self.device, self.dtype, self.channels_last = config, device, dtype, channels_last
        self.compile_mode = ("default" if compile is True else compile) or None
        self._net = unet
        if self.compile_mode:
            from .unet import compile_for_inference
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
        from .diffusion import Schedule
        from .text import Condition, TextEncoder
        from .unet import UNet
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
        from .vae import load_export_vae
        pipe.vae = load_export_vae(path, config, device)    # [latent path] the export's vae/, or None
        return pipe

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
        from .unet import CUDA_GRAPH_MODES
        return network_fn(self._net, self.dtype, self.channels_last,
                          cuda_graphs=self.compile_mode in CUDA_GRAPH_MODES and self.device.type == "cuda")

    def model_fn(self, cond, uncond, guidance_scale: float, rescale: float = 0.0) -> ModelFn:
        """The classifier-free guided eps model fn(x, t) for Conditions ``cond`` / ``uncond``."""
        from .sampling import cfg_model
        return cfg_model(self.network(), cond.as_kwargs(), uncond.as_kwargs(), guidance_scale, rescale=rescale)

    def noise(self, batch: int, seed: int = 0) -> torch.Tensor:
        """x_T ~ N(0, I) (batch, C, H, W) from a CPU generator seeded with ``seed``."""
        g = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn((batch, self.channels, self.image_size, self.image_size), generator=g)

    # -- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompts: Union[str, Sequence[str]], guidance_scale: Optional[float] = None,
                 steps: Optional[int] = None, sampler: Optional[str] = None,
                 negative_prompt: Union[str, Sequence[str], None] = None, seed: int = 0,
                 rescale: Optional[float] = None, eta: Optional[float] = None,
                 x_T: Optional[torch.Tensor] = None, output_type: str = "pil", progress: bool = False,
                 model_wrapper: Optional[Callable[[ModelFn, list[str]], ModelFn]] = None,
                 clip_x0: Union[float, None, str] = "auto"):
        """Sample one image per prompt (all in one batch).

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
        from .diffusion import as_eps_model
        from .images import to_pil, to_uint8
        from .sampling import ddim_sample, ddpm_sample

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
        fn = self.model_fn(cond, uncond, float(guidance_scale), float(rescale))
        fn = as_eps_model(fn, self.sched, self.prediction)     # guidance of v / x0 outputs is affine: same
        if model_wrapper is not None:
            fn = model_wrapper(fn, prompts)
        if clip_x0 == "auto":
            clip_x0 = self.clip_x0
        g = torch.Generator("cpu").manual_seed(int(seed))
        if x_T is None:
            x_T = torch.randn((B, self.channels, self.image_size, self.image_size), generator=g)
        x_T = x_T.to(self.device, torch.float32)
        if sampler == "ddim":
            x0 = ddim_sample(fn, x_T, self.sched, steps=int(steps), eta=float(eta), generator=g,
                             clip_x0=clip_x0, progress=progress)
        elif sampler == "ddpm":
            x0 = ddpm_sample(fn, x_T, self.sched, generator=g, clip_x0=clip_x0, progress=progress)
        else:
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        from .vae import decode_latents
        x0 = decode_latents(self.vae, x0)     # [latent path] z0 -> images (scaling undone once); else as is
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
                    **kwargs) -> dict:
        """Rows = guidance scales (x ``num_per_prompt`` samples), columns = prompts. The same initial
        noise for every scale (x_T of sample j of prompt i is fixed by ``seed``), so a column shows what
        guidance alone changes. Batches of at most ``batch_size`` images (batch k of a row samples its
        step noise with seed + 1 + k). -> {"images": (rows*cols, C, H, W) in [-1, 1], "nrow": cols,
        "row_labels", "col_labels", "records": [{"row", "col", "prompt", "scale", "sample"}]}.
        ``kwargs`` go to ``__call__`` (steps, sampler, eta, rescale, negative_prompt)."""
        prompts = list(prompts)
        cols = len(prompts)
        n = cols * num_per_prompt
        # job order within a scale: sample j of prompt i at position j * cols + i (row j, column i)
        flat_prompts = [prompts[i] for j in range(num_per_prompt) for i in range(cols)]
        x_T = self.noise(n, seed)
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
        return (f"Pipeline(unet {n / 1e6:.2f}M params, {self.image_size}x{self.image_size}x{self.channels}, "
                f"encoder {self.encoder.path}, device {self.device}, dtype {self.dtype})")
