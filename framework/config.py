"""The typed config tree: dataclasses, YAML presets, dotted command-line overrides.

One tree, one source of truth. Each component receives only its own sub-config
(``cfg.unet`` goes to the UNet, ``cfg.data`` to the data pipeline, ...).

Loading order (later wins): dataclass defaults < YAML ``base:`` chain < the YAML file < CLI overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=2e-4", "engine.zero_stage=3"])

Strict: an unknown key fails with the valid keys at that level and a "did you mean";
a wrong type fails naming the key, the expected type and the value. No torch here.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from framework.files import atomic_write_text

__all__ = [
    "Config", "BucketConfig", "DataConfig", "TextConfig", "UNetConfig", "DiffusionConfig", "OptimConfig",
    "EngineConfig", "CheckpointConfig", "SampleConfig", "LogConfig", "ClassifierConfig",
    "VAEConfig", "AutoencoderConfig", "ConfigError", "load_config", "from_dict", "to_dict",
    "apply_overrides", "save_config", "parse_cli",
]


class ConfigError(ValueError):
    """A config problem, with the dotted key it concerns in the message."""


# ---------------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------------
@dataclass
class BucketConfig:
    """Aspect-ratio buckets (framework/buckets.py); sizes in PIXELS (a latent model's buckets are
    these divided by the VAE's factor). Off: every image is resized and cropped to image_size."""
    enabled: bool = False
    sizes: list[list[int]] = field(default_factory=list)  # explicit [[h, w], ...]; empty: the rule below
    max_area: int = 0               # rule: h * w <= max_area (0: image_size ** 2)
    step: int = 64                  # rule: sides are multiples of this (of UNet x VAE factor)
    min_aspect: float = 0.5         # rule: width / height range (within [0.5, 2] the crop is < one step)
    max_aspect: float = 2.0


@dataclass
class DataConfig:
    urls: list[str] = field(default_factory=list)   # shard specs: paths, brace URLs, http(s)://, pipe:
    weights: list[float] = field(default_factory=list)  # one mixing weight per entry of urls (empty: concatenate)
    allow_pipe: bool = False        # a pipe: URL runs a shell command: opt in explicitly
    image_size: int = 32
    buckets: BucketConfig = field(default_factory=BucketConfig)   # aspect-ratio buckets (off by default)
    channels: int = 3               # 1 = grayscale, 3 = RGB
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False       # off for text-conditioned data by default (text can say "left")
    image_keys: str = "png;jpg;jpeg;webp;npy"
    caption_key: str = "txt"
    captions: Literal["auto", "one", "lines"] = "auto"   # a .txt is one caption; lines: one per line;
                                    # auto: lines only where the shards.json says so (this project's writer)
    use_embeddings: bool = False    # read precomputed text embeddings (emb.npy, mask.npy) from the shards
    label_key: str = "label"        # in the json metadata (classifier task, evaluation)
    shuffle_buffer: int = 1000
    shardshuffle: bool = True
    num_workers: int = 2
    samples_per_epoch: int = 0      # 0: from shards.json; required for resampled/infinite streams
    resampled: bool = False
    max_bad_fraction: float = 0.05  # abort when more than this fraction of samples is bad
    bad_warn_every: int = 100       # rate limit of the bad-sample warning
    bad_check_after: int = 100      # max_bad_fraction is enforced once this many samples were read
    count_cache: str = ""           # where tar counts are cached when the shards' folder is read-only
                                    # (empty: ~/.cache/framework/shard-counts)
    latents: bool = False           # read precomputed VAE posteriors (tools.precompute_latents): batch
                                    # "image" is then the scaled latent z0 = (mean + std*eps - shift) * scale
    latent_scaling_factor: float = 0.0   # 0: the scaling factor recorded in the shards' shards.json


@dataclass
class TextConfig:
    encoder: str = "minilm-l6"      # a local directory, a hub id, or the alias of a packaged model
    kind: Literal["auto", "clip", "t5"] = "auto"
    max_length: int = 32            # captions are padded to exactly this many tokens
    layer: int = -1                 # hidden state to use (-1: last)
    null: Literal["empty", "zeros"] = "empty"   # the one unconditional condition
    p_uncond: float = 0.1           # null-text dropout probability
    pooled: bool = False            # also return a pooled vector (added to the time embedding)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU
    cache_size: int = 4096          # LRU cache of caption embeddings (class-template datasets repeat)
    mask: bool = True               # False: Stable Diffusion's convention, no padding mask: the encoder runs
                                    # unmasked and the UNet attends to all max_length tokens (what diffusers'
                                    # StableDiffusionPipeline does: needed for a diffusers pipeline export)


@dataclass
class UNetConfig:
    in_channels: int = 3
    out_channels: int = 0           # 0: same as in_channels
    channels: int = 64              # base width
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    attention_levels: list[int] = field(default_factory=lambda: [1, 2])  # levels with transformer blocks
    head_dim: int = 32              # width per attention head
    num_heads: list[int] = field(default_factory=list)  # per level; empty: channels // head_dim
    transformer_depth: int = 1
    context_dim: int = 384
    pooled_dim: int = 0             # 0: no pooled-text embedding
    mid_attention: bool = True
    groups: int = 32
    dropout: float = 0.0
    linear_projection: bool = True
    scale_shift: bool = False       # ResBlock time embedding: False additive (SD), True h*(1+s)+b
    micro_conditioning: bool = False  # SDXL size/crop conditioning: forward takes size_cond (B, 6)


@dataclass
class DiffusionConfig:
    timesteps: int = 1000           # T
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: Literal["eps", "v", "x0"] = "eps"
    min_snr_gamma: float = 0.0      # 0: plain L_simple


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    fused: bool = True              # fused AdamW on CUDA when available


@dataclass
class EngineConfig:
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU
    micro_batch: int = 32
    grad_accum: int = 1
    global_batch: int = 0           # 0: micro_batch * grad_accum * world; else asserted
    steps: int = 1000
    ema_decay: float = 0.999
    ema_halflife_images: float = 0.0  # > 0 overrides ema_decay: decay = 0.5 ** (batch / halflife)
    ema_warmup_steps: int = 0       # EMA starts (copies weights) after this many steps
    activation_checkpointing: Union[bool, Literal["all", "attention", "res"]] = False  # unet.apply_activation_checkpointing
    channels_last: bool = False
    compile: bool = False           # torch.compile of the UNet inside the engine (DeepSpeed engine.compile)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"   # inductor's modes
    compile_backend: str = "inductor"   # any torch.compile backend ("aot_eager": trace-only, for debugging)
    device: str = "auto"
    max_nonfinite: int = 10         # this many non-finite losses in a row abort
    skip_nonfinite: bool = True     # skip a step whose loss is non-finite on any rank (one device read per
                                    # micro step); false: no read, a non-finite loss aborts at the next log
    log_every: int = 10
    sample_every: int = 0           # 0: no sample grids during training
    progress: bool = True


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last: int = 3
    keep_every: int = 0             # additionally keep every M-th step forever (0: none)
    resume: str = ""                # "", "auto" (latest), or a tag / path
    save_on_exit: bool = True
    # a save that cannot be written completely (disk full, quota, I/O error) leaves the previous
    # checkpoint and `latest` as they were; then "abort": exit non-zero with one line;
    # "continue": warn, keep training, try again at the next checkpoint.every
    on_write_error: Literal["abort", "continue"] = "abort"


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=list)
    guidance_scale: float = 3.0
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = 50
    eta: float = 0.0
    seed: int = 0
    rescale: float = 0.0            # CFG rescale phi (0: off)
    negative_prompt: str = ""


@dataclass
class LogConfig:
    lines: bool = True              # a text line per logged step where stderr is not a terminal (no bar)
    plan: Literal["off", "tables", "probe"] = "tables"   # the planner's memory per rank (framework/plan.py)
                                    # next to the measured peak in the first log line, and a warning before
                                    # step 0 when it says the micro batch will not fit; "probe": measure
                                    # activations of an unknown model once (seconds, cached), "tables": known only
    jsonl: bool = True
    tensorboard: bool = True        # when installed


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    class_names: list[str] = field(default_factory=list)
    pool: Literal["attention", "mean"] = "mean"


@dataclass
class VAEConfig:
    """The frozen first stage (framework/vae.py): a diffusers AutoencoderKL directory."""
    path: str = ""                  # config.json + diffusion_pytorch_model*.safetensors ("": pixel space)
    scaling_factor: float = 0.0     # 0: config.json's scaling_factor
    shift_factor: Optional[float] = None   # None: config.json's shift_factor (absent or null: 0)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU


@dataclass
class AutoencoderConfig:
    """task: autoencoder (framework/autoencoder.py): a diffusers AutoencoderKL trained as a KL
    autoencoder; in/out channels are data.channels. Presets: configs/vae/*.yaml."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # downsampling 2^(n-1)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_attention: bool = True      # self-attention in the encoder's and decoder's middle blocks
    loss: Literal["l1", "l2"] = "l1"    # reconstruction term
    kl_weight: float = 1.0e-6       # beta of LDM's KL-regularised autoencoder


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    task: Literal["diffusion", "classifier", "autoencoder"] = "diffusion"
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    deepspeed: dict = field(default_factory=dict)   # raw DeepSpeed keys that override ours (warned)


# ---------------------------------------------------------------------------------------------
# Conversion with strict checking
# ---------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int -> float only."""
    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is Union or (origin is not None and origin.__name__ == "UnionType"):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad()
    if tp is type(None):
        if value is not None:
            raise bad()
        return None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad()
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _from_dict(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _unknown_key(key: str, prefix: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(prefix + n) for n in near)}?" if near else ""
    where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
    return ConfigError(f"unknown config key '{prefix}{key}' {where}.{hint} "
                       f"Valid keys: {', '.join(sorted(valid))}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(key, prefix, list(fields))
        kwargs[key] = _coerce(value, fields[key], prefix + key)
    return cls(**kwargs)


def from_dict(data: dict, cls: type = Config) -> Any:
    """Build a config dataclass from a nested dict, strictly."""
    return _from_dict(cls, data or {})


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "deepspeed":
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    """Read a YAML preset, following its optional ``base:`` (a path or a list of paths,
    relative to the file) so that a preset lists only what differs."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config 'base' cycle: {' -> '.join(seen + (path,))}")
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, _read_yaml(os.path.join(os.path.dirname(path), b), seen + (path,)))
    return _merge(merged, data)


def _parse_value(text: str) -> Any:
    """A CLI value is YAML: 3 -> int, 2e-4 -> float, [1,2] -> list, true -> bool, else a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads 2e-4 as a string; accept it as a float
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") and value.strip() else value
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str], cls: type = Config) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict, checking each key against the tree."""
    data = _merge({}, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=2e-4)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node, tp, prefix = data, cls, ""
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(tp):
                fields = _fields(tp)
                if part not in fields:
                    raise _unknown_key(part, prefix, list(fields))
                tp = fields[part]
            else:  # a free-form dict (the raw deepspeed block)
                tp = Any
            if last:
                node[part] = _parse_value(text)
            else:
                if tp is not Any and not dataclasses.is_dataclass(tp) and tp is not dict:
                    raise ConfigError(f"'{prefix}{part}' is not a section ({_type_name(tp)}): "
                                      f"write {prefix}{part}=VALUE")
                node = node.setdefault(part, {})
            prefix += part + "."
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                cls: type = Config) -> Any:
    data = _read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []), cls)
    return from_dict(data, cls)


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config (atomically) so every run and export records what made it."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))


def parse_cli(argv: Optional[list[str]] = None, cls: type = Config) -> Any:
    """``--config x.yaml key=value ...`` -> a config tree."""
    import argparse

    p = argparse.ArgumentParser(description="config: --config FILE.yaml then key.sub=value overrides")
    p.add_argument("--config", "-c", default=None, help="YAML preset (see configs/)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4")
    args = p.parse_args(argv)
    if args.local_rank is not None:  # the deepspeed launcher passes --local_rank=N
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return load_config(args.config, args.overrides, cls)
