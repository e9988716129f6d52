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
                                     diffusers' UNet2DConditionModel layout, 0-based timesteps
    OUT/model_index.json, vae/,      (diffusers=True, a latent model trained with SD's text conventions)
      text_encoder/, tokenizer/,     a diffusers StableDiffusionPipeline folder: see
      scheduler/                     framework/diffusers_export.py

Imports: deepspeed only inside ``consolidate(weights="raw")`` for ZeRO 1-3 checkpoints
(``zero_to_fp32``); everything else, the EMA export included, runs without it. The ``Pipeline``
lives in ``framework/pipeline.py`` (re-exported here: ``from framework.export import Pipeline``).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import time
import warnings
from dataclasses import asdict
from typing import Optional, Union

import torch
import yaml

from framework.train import checkpoint as ckpt
from framework.config import Config, from_dict
from framework.train.ema import EMA
from framework.files import atomic_dir
from framework.data.latents import add_latent_config, latent_export_info, write_export_vae
from framework.diffusers_export import pipeline_blockers, write_pipeline, write_unet
from framework.pipeline import Pipeline, network_fn
from framework.weights import (DTYPES, FORMAT, WEIGHTS_NAME, load_state_dict_dir, parse_size,
                      save_state_dict, save_tensors)

__all__ = ["FORMAT", "find_checkpoint", "inspect_checkpoint", "format_inspect", "checkpoint_config",
           "load_ema", "load_raw", "consolidate", "save_state_dict", "load_state_dict_dir",
           "parse_size", "export", "write_inference_dir", "reshard", "Pipeline", "network_fn", "DTYPES"]


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
    """DeepSpeed universal checkpoint of a tag (``framework.train.checkpoint.convert_to_universal``),
    loadable on any world size. The trainer does this itself when a run resumes on another world
    size; this is for doing it ahead of time (or for other tools)."""
    tag_dir = find_checkpoint(path, tag)
    stage = int(ckpt.read_meta(tag_dir).get("zero_stage", 0))
    if stage == 0:
        raise ValueError(f"{tag_dir} is a ZeRO-0 checkpoint: it holds full weights and optimizer state "
                         f"already (no partitions to reshard)")
    return ckpt.convert_to_universal(tag_dir, stage)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _null_condition(cfg: Config):
    """The null condition exactly as training built it: from the shards' manifest when training
    read precomputed embeddings, else the frozen encoder's ``null()`` (cfg.text.null)."""
    if cfg.data.use_embeddings:
        from framework.data.loader import build_loader
        loader = build_loader(cfg.data, 1, 0, 1, cfg.seed)
        try:
            return loader.null_condition(), "shards manifest (precomputed embeddings)"
        finally:
            if hasattr(loader, "close"):
                loader.close()
    from framework.models.text import TextEncoder
    enc = TextEncoder(cfg.text, device="cpu")
    return enc.null(1), f"TextEncoder({enc.path}).null() in {str(enc.dtype).replace('torch.', '')}"


def write_inference_dir(out: str, sd: dict[str, torch.Tensor], config: dict,
                        max_shard_size: Union[int, str, None] = 0, metadata: Optional[dict] = None,
                        extra: Optional[dict] = None) -> list[str]:
    """The one writer of inference directories (diffusion model, noisy classifier): ``sd`` as
    ``model.safetensors`` (or HF-style shards), then ``extra(tmp) -> [files]`` for anything else
    (null condition, diffusers copy), then ``config.yaml`` (with ``config["export"]["files"]``); all
    into a temporary sibling renamed at the end, so ``out`` is complete or absent."""
    with atomic_dir(out) as tmp:
        files = save_state_dict(sd, tmp, WEIGHTS_NAME, max_shard_size, metadata=metadata)
        if extra is not None:
            files += extra(tmp)
        config.setdefault("export", {})["files"] = files
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False, default_flow_style=None)
        files.append("config.yaml")
    return files


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
    from framework.models.unet import UNet
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
    latent = latent_export_info(cfg)     # the VAE and scaling of a latent model; None: pixels
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
        "model": {"class": "framework.models.unet.UNet", "weights": WEIGHTS_NAME, "dtype": dtype},
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
    if latent is not None:
        add_latent_config(config, latent)
    blockers = pipeline_blockers(cfg, latent) if diffusers else []
    if diffusers:
        summary["diffusers"] = {"unet": "unet/", "pipeline": not blockers,
                                "not_a_pipeline_because": blockers}

    def extra(tmp: str) -> list[str]:
        nd = {"ctx": null.ctx.float().contiguous(), "mask": null.mask.bool().contiguous()}
        if null.pooled is not None:
            nd["pooled"] = null.pooled.float().contiguous()
        save_tensors(nd, os.path.join(tmp, "null.safetensors"), {"kind": cfg.text.null})
        files = ["null.safetensors"]
        if diffusers:                    # unet/ in diffusers' layout (0-based timesteps)
            files += write_unet(sd, cfg, tmp, config["image"]["size"], max_shard_size)
        if latent is not None:           # vae/: diffusers layout, the training scaling
            files += write_export_vae(latent, tmp)
        if diffusers and not blockers:   # + text_encoder/ tokenizer/ scheduler/ model_index.json
            from framework.models.text import TextEncoder
            files += write_pipeline(tmp, cfg, TextEncoder(cfg.text, device="cpu"))
        return files

    write_inference_dir(out, sd, config, max_shard_size,
                        metadata={"framework": FORMAT, "weights": weights, "tag": info["tag"]}, extra=extra)
    summary.update(out=out, seconds=round(time.perf_counter() - t0, 2))
    return summary


