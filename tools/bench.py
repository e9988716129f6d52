"""Speed of the whole stack, as JSON lines: training step, CFG sampling, FLOPs, data, vs diffusers.

    python -m tools.bench                                  # CPU: tiny preset, all sections
    python -m tools.bench --presets tiny,base64,sd2        # CUDA default; on CPU give --batch small
    python -m tools.bench --presets sd2 --sections flops   # FLOPs ours vs diffusers (meta device, ~s)
    python -m tools.bench --variants base,channels_last,compile --out bench.jsonl
    python -m tools.bench --presets tiny --steps 2 --quick # smoke run (what the test runs)

Sections (``--sections``, default all):

- ``peak``: a square matmul (fp32 on CPU, bf16 on CUDA), the ceiling MFU is taken against. Every
  training/sampling record also measures its own peak right before it (the load on a shared CPU
  moves), and its ``mfu`` uses that one.
- ``flops``: FLOPs per image of one forward and one forward+backward (matmul, conv and attention
  FLOPs by ``torch.utils.flop_counter.FlopCounterMode``), ours vs diffusers' ``UNet2DConditionModel``
  with the equivalent config (``framework.models.unet.diffusers_config``), counted on the meta device. The
  SD2 preset is always counted (the issue asks ours = diffusers within 2%).
- ``train``: the step of ``framework.train.engine.train``: q_sample, eps_theta, L_simple, engine.backward,
  engine.step (DeepSpeed ZeRO-2, torch AdamW passed in (fused on CUDA), bf16 on CUDA / fp32 on CPU,
  gradient clipping 1.0), EMA update; for our UNet and for diffusers' UNet (wrapped so it takes the
  same arguments) under the SAME engine config. ``--engine torch`` runs both under plain torch
  instead (AdamW, clip, autocast bf16 on CUDA). Each ``--variants`` entry is applied to both models:
  ``base``, ``channels_last`` (the input x_t channels_last, as engine.channels_last does),
  ``compile`` (torch.compile of the engine, as engine.compile does), ``ckpt`` (activation
  checkpointing), combined with ``+`` (``channels_last+compile``). Default: CUDA
  base,channels_last,compile; CPU base,channels_last (compiling takes minutes per model there).
- ``sample``: DDIM with classifier-free guidance (cond and uncond in one batched forward,
  ``framework.diffusion.sampling.cfg_model``): images/s, ours vs diffusers (bf16 on CUDA, fp32 on CPU;
  channels_last converts weights and input, as ``framework.export.Pipeline`` does).
- ``data``: ``tools.bench_data`` (shards decoded+augmented+batched vs bare PIL decode).

Pairing. One process builds several (model, variant) runners one after the other, then times them
interleaved (round i starts at runner i, directions alternate), so a change of load on a shared
machine hits all alike; ``ratio`` (ours over diffusers at one variant) and ``variants`` (each
variant over base) records are medians of per-round ratios. ``--group preset`` (CPU default) puts
every variant of a preset in one process; ``--group variant`` (CUDA default: SD2 engines are
large) one variant, ours and diffusers, per process (variant speedups then come from separate
processes: ``"paired": false``). Each group runs in its own subprocess (``--isolate``, default; off
with ``--quick``). Peak memory per runner covers its build and warmup, above what the process held
before: CUDA ``max_memory_allocated``; CPU the peak anonymous memory (VmHWM, reset through
``/proc/self/clear_refs``, less the file-backed library pages: ``framework.train.plan.peak_anon_bytes``).
Timings: ``--warmup`` untimed steps (one more under compile), then
``--steps`` timed steps, each synchronised; the median is reported (and min, max, all).
``--threads 1`` on a shared, oversubscribed CPU (see docs/benchmarks.md).
Every record carries the machine's load average: on a shared machine compare numbers from one run.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:                 # `python tools/bench.py` as well as `python -m tools.bench`
    sys.path.insert(0, ROOT)
PRESET_DIR = os.path.join(ROOT, "configs", "unet")
RESULT_TAG = "BENCH_RESULT "

from tools._cli import entry_point  # noqa: E402  (after the sys.path line: also run as a script)

# Input shapes per preset: (C, H, W) of x_t, (L, D) of the text context (D from the preset).
PRESETS = {
    "tiny": dict(hw=32, ctx_len=77),       # 32x32 RGB pixels
    "base64": dict(hw=64, ctx_len=77),     # 64x64 RGB pixels (the pixel-space base model)
    "sd2": dict(hw=32, ctx_len=77),        # 32x32x4 latents, 77x1024 OpenCLIP tokens
    "latent_small": dict(hw=8, ctx_len=16),  # the latent demo: 8x8x4 latents, 16x384 MiniLM tokens
}
# The first stage of a latent preset (section "vae"): a diffusers AutoencoderKL of these sizes with
# random weights (speed depends on the shapes only). "sd": SD 1/2's VAE (83.7M, factor 8: 32x32x4
# latents are 256 px images); "demo": configs/vae/demo.yaml (0.68M, factor 4: 8x8x4 are 32 px).
VAE_ARCH = {
    "sd": dict(in_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
               latent_channels=4),
    "demo": dict(in_channels=1, block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                 latent_channels=4),
}
VAE_OF_PRESET = {"sd2": "sd", "latent_small": "demo"}

# Defaults per device kind; --batch / --steps / ... override. CPU numbers keep a run in minutes.
DEFAULTS = {
    "cpu": dict(presets=["tiny"], batch={"tiny": 32, "base64": 2, "sd2": 1, "latent_small": 64},
                warmup={"tiny": 2, "base64": 1, "sd2": 1, "latent_small": 2},
                steps={"tiny": 10, "base64": 2, "sd2": 2, "latent_small": 10},
                sample_batch={"tiny": 8, "base64": 1, "sd2": 1, "latent_small": 16}, sample_steps=10, sample_repeats=3,
                peak_n=2048, variants=["base", "channels_last"]),     # compile: minutes per model on CPU
    "cuda": dict(presets=["sd2", "base64", "tiny"], batch={"tiny": 256, "base64": 64, "sd2": 64, "latent_small": 512},
                 warmup={"tiny": 3, "base64": 3, "sd2": 3, "latent_small": 3},
                 steps={"tiny": 10, "base64": 10, "sd2": 10, "latent_small": 10},
                 sample_batch={"tiny": 32, "base64": 32, "sd2": 32, "latent_small": 64}, sample_steps=50, sample_repeats=2,
                 peak_n=8192, variants=["base", "channels_last", "compile"]),
}
QUICK = dict(batch=4, warmup=1, sample_batch=2, sample_steps=2, sample_repeats=1, peak_n=256)
VARIANT_PARTS = ("base", "channels_last", "compile", "cudagraphs", "ckpt", "ckpt_attn")
OURS_ONLY_PARTS = {"ckpt_attn"}             # diffusers has no attention-only checkpointing


def checkpointing(parts: frozenset):
    """engine.activation_checkpointing of a variant: ckpt -> True (every block), ckpt_attn ->
    "attention" (the transformer blocks only), else False."""
    return True if "ckpt" in parts else ("attention" if "ckpt_attn" in parts else False)


def compile_mode(parts: frozenset) -> Optional[str]:
    """torch.compile mode of a variant: ``cudagraphs`` = inductor's "reduce-overhead" (CUDA graphs;
    CPU ignores the graphs), ``compile`` = "default", else None (eager)."""
    if "cudagraphs" in parts:
        return "reduce-overhead"
    return "default" if "compile" in parts else None


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def machine_info(device_kind: str) -> dict:
    import torch
    info = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:  # pragma: no cover
        pass
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except Exception:  # pragma: no cover
        info["deepspeed"] = None
    try:
        import importlib.metadata as md
        info["diffusers"] = md.version("diffusers")
    except Exception:
        info["diffusers"] = None
    if device_kind == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def parse_variant(v: str) -> frozenset:
    parts = frozenset(p for p in v.split("+") if p and p != "base")
    bad = sorted(parts - set(VARIANT_PARTS))
    if bad:
        raise ValueError(f"unknown variant part(s) {bad} in {v!r}: use {'/'.join(VARIANT_PARTS)} joined by '+'")
    return parts


def unet_config(preset: str):
    from framework.config import load_config
    path = os.path.join(PRESET_DIR, f"{preset}.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"no preset {preset!r} in {PRESET_DIR}")
    return load_config(path).unet


def input_shapes(preset: str) -> tuple[tuple[int, int, int], tuple[int, int]]:
    cfg = unet_config(preset)
    p = PRESETS.get(preset, dict(hw=32, ctx_len=77))
    return (cfg.in_channels, p["hw"], p["hw"]), (p["ctx_len"], cfg.context_dim)


def has_diffusers() -> bool:
    import importlib.util
    return importlib.util.find_spec("diffusers") is not None


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _r(x: Optional[float], nd: int = 4) -> Optional[float]:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{x:.{nd}g}")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _diffusers_module():
    import torch

    class DiffusersUNet(torch.nn.Module):
        """diffusers' UNet2DConditionModel behind our call signature model(x, t, ctx=, ctx_mask=)."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, ctx=None, ctx_mask=None, pooled=None):
            emb = getattr(self.unet, "class_embedding", None)
            if emb is not None and pooled is None:   # a pooled-text preset fed without pooled text:
                # ours skips the pooled MLP, diffusers' needs class_labels: zeros (the same work)
                pooled = x.new_zeros((x.shape[0], emb.linear_1.in_features))
            return self.unet(x, t, encoder_hidden_states=ctx, encoder_attention_mask=ctx_mask,
                             class_labels=pooled, return_dict=False)[0]

    return DiffusersUNet


def build_model(preset: str, which: str):
    """Our UNet for the preset, or diffusers' with the equivalent config (wrapped to our signature)."""
    cfg = unet_config(preset)
    if which == "ours":
        from framework.models.unet import UNet
        return UNet(cfg)
    if which == "diffusers":
        from diffusers import UNet2DConditionModel

        from framework.models.unet import diffusers_config
        return _diffusers_module()(UNet2DConditionModel(**diffusers_config(cfg)))
    raise ValueError(f"model must be ours or diffusers, got {which!r}")


def set_checkpointing(model, which: str, kind=True) -> None:
    if which == "ours":
        from framework.models.unet import apply_activation_checkpointing
        apply_activation_checkpointing(model, kind)
    elif kind is True:
        model.unet.enable_gradient_checkpointing()
    else:
        raise ValueError(f"diffusers' UNet has no {kind!r} checkpointing")


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def count_flops(preset: str, which: str, batch: int = 1, device: str = "meta", backward: bool = True) -> dict:
    """FLOPs per image of one forward and (backward=True) one forward+backward of the MSE loss
    (``framework.train.flops.count_flops``, the count ``framework.train.plan`` uses too). On the meta device
    nothing is allocated or computed: the count costs the Python overhead only."""
    from framework.train.flops import count_flops as count
    shape, ctx = input_shapes(preset)
    return count(lambda: build_model(preset, which), shape, ctx, batch=batch, device=device, backward=backward)


def flops_record(preset: str, with_diffusers: bool) -> dict:
    (c, h, w), (L, D) = input_shapes(preset)
    rec: dict[str, Any] = {"bench": "flops", "preset": preset, "input": [c, h, w], "context": [L, D],
                           "counted_on": "meta", "per": "image"}
    t0 = time.perf_counter()
    ours = count_flops(preset, "ours")
    rec.update(ours_fwd=ours["fwd"], ours_fwd_bwd=ours["fwd_bwd"], ours_params=ours["params"])
    if with_diffusers:
        theirs = count_flops(preset, "diffusers")
        rec.update(diffusers_fwd=theirs["fwd"], diffusers_fwd_bwd=theirs["fwd_bwd"],
                   diffusers_params=theirs["params"])
        rec["rel_diff_fwd"] = _r((ours["fwd"] - theirs["fwd"]) / theirs["fwd"])
        rec["rel_diff_fwd_bwd"] = _r((ours["fwd_bwd"] - theirs["fwd_bwd"]) / theirs["fwd_bwd"])
        rec["within_2pct"] = abs(rec["rel_diff_fwd_bwd"]) < 0.02 and abs(rec["rel_diff_fwd"]) < 0.02
    rec["count_s"] = round(time.perf_counter() - t0, 2)
    return rec


# ---------------------------------------------------------------------------------------------
# Peak matmul rate and memory
# ---------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakProbe:
    """The ceiling MFU is taken against, measured in the same process and, interleaved with the
    timed steps (one probe per round), under the same load: a square n x n x n matmul in ``dtype``
    and, on CPU, a channels_last 3x3 convolution (oneDNN; on AMD CPUs MKL's sgemm reaches less than
    oneDNN's convolutions, so the matmul alone would understate the ceiling). ``tflops`` is the
    larger of the two medians."""

    def __init__(self, device, dtype, n: int):
        import torch
        self.device, self.dtype, self.n = device, dtype, n
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.inner = 10 if device.type == "cuda" else 1
        self.rates: dict[str, list[float]] = {"matmul": []}
        self.conv = None
        if device.type == "cpu":
            ch = max(16, min(256, n // 8))
            self.conv = torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False).to(dtype=dtype)
            self.x = torch.randn(4, ch, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
            self.conv_flops = 2 * 4 * ch * ch * 9 * 32 * 32
            self.rates["conv3x3"] = []

    def __call__(self) -> None:
        import torch
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(self.inner):
            torch.mm(self.a, self.b)
        _sync(self.device)
        self.rates["matmul"].append(2 * self.n ** 3 * self.inner / (time.perf_counter() - t0) / 1e12)
        if self.conv is not None:
            with torch.no_grad():
                t0 = time.perf_counter()
                self.conv(self.x)
            self.rates["conv3x3"].append(self.conv_flops / (time.perf_counter() - t0) / 1e12)

    def result(self) -> dict:
        med = {k: _median(v) for k, v in self.rates.items() if v}
        best = max(med, key=med.get)
        return {"dtype": str(self.dtype).replace("torch.", ""), "n": self.n, "tflops": _r(med[best]),
                "kind": best, **{f"{k}_tflops": _r(v) for k, v in med.items()},
                "probes": len(self.rates["matmul"])}


def matmul_peak(device, dtype, n: int, warmup: int = 2, repeats: int = 5) -> dict:
    """PeakProbe, `repeats` probes after `warmup` (the standalone ``peak`` section)."""
    probe = PeakProbe(device, dtype, n)
    for _ in range(warmup):
        probe()
    probe.rates = {k: [] for k in probe.rates}
    for _ in range(repeats):
        probe()
    return probe.result()


class PeakMemory:
    """Peak memory of a block above what was in use when it began: CUDA max_memory_allocated, or
    on CPU the peak anonymous memory (``framework.train.plan.peak_anon_bytes``: the peak RSS, reset
    through /proc/self/clear_refs, less the file-backed library pages, whose resident count depends
    on the page cache, not on the model; without clear_refs, ru_maxrss growth, which misses a peak
    below an earlier one)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_max_memory_allocated"
            return self
        from framework.train.plan import proc_status
        self.start = proc_status("RssAnon").get("RssAnon")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                       # reset the peak RSS (VmHWM) to the current RSS
            self.kind = "anon_peak_above_start"
        except OSError:
            import resource
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.kind = "ru_maxrss_growth"
        return self

    def __exit__(self, *exc):
        return False

    def peak(self) -> float:
        """The absolute peak in bytes: all the process held (CUDA: the allocator's)."""
        import torch
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "ru_maxrss_growth":
            import resource
            return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        from framework.train.plan import peak_anon_bytes
        return peak_anon_bytes()

    def result(self) -> dict:
        return {"peak_mem_mb": round(max(0, self.peak() - (self.start or 0)) / 2 ** 20, 1), "mem_kind": self.kind}


# ---------------------------------------------------------------------------------------------
# Measurement groups: one preset x one variant, both models built in one process, steps interleaved
# ---------------------------------------------------------------------------------------------
def _device(kind: str):
    import torch
    if kind == "cuda":
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _trim() -> None:
    """Give freed heap back to the OS (glibc), so the next model's RSS growth is its own."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # pragma: no cover - not glibc
        pass


def _bench_config(preset: str, batch: int, parts: frozenset, device_kind: str):
    from framework.config import Config
    cfg = Config()
    cfg.unet = unet_config(preset)
    cfg.engine.micro_batch = batch
    cfg.engine.zero_stage = 2
    cfg.engine.channels_last = "channels_last" in parts
    cfg.engine.compile = "compile" in parts
    cfg.engine.activation_checkpointing = checkpointing(parts)
    cfg.engine.device = device_kind
    cfg.optim.warmup_steps = 0
    return cfg


def _key(model: str, variant: str) -> str:
    return f"{model}/{variant}"


def _interleaved(fns: dict[str, Callable[[], Any]], n: int, device) -> dict[str, list[float]]:
    """n timed calls of each fn, round i starting at runner i (mod k) and alternating direction,
    so every runner takes every position equally often and a change of machine load hits all."""
    names = list(fns)
    times = {m: [] for m in names}
    k = len(names)
    for i in range(n):
        order = names[i % k:] + names[:i % k]
        for m in (order if i % 2 == 0 else order[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            fns[m]()
            _sync(device)
            times[m].append(time.perf_counter() - t0)
    return times


def _pair(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, min, max over rounds of b_i / a_i: speed of a over b from times measured in the same round."""
    rs = [y / x for x, y in zip(a, b) if x > 0]
    return _median(rs), min(rs), max(rs)


def _paired_summaries(spec: dict, times: dict[str, list[float]], per_run: int) -> list[dict]:
    """From one group's interleaved times: ours over diffusers at each variant, and each variant over
    base for each model (median of per-round ratios)."""
    out = []
    variants = list(dict.fromkeys(k.split("/", 1)[1] for k in times))
    for v in variants:
        o, d = times.get(_key("ours", v)), times.get(_key("diffusers", v))
        if o and d:
            med, lo, hi = _pair(o, d)
            out.append({"bench": "ratio", "what": spec["bench"], "preset": spec["preset"], "variant": v,
                        "ours_images_per_s": _r(per_run / _median(o)),
                        "diffusers_images_per_s": _r(per_run / _median(d)),
                        "ours_over_diffusers": _r(med), "ours_over_diffusers_min_max": [_r(lo), _r(hi)],
                        "pairs": min(len(o), len(d)), "paired": True})
    for m in ("ours", "diffusers"):
        base = times.get(_key(m, "base"))
        if not base:
            continue
        speed, spread = {}, {}
        for v in variants:
            tv = times.get(_key(m, v))
            if v != "base" and tv:
                med, lo, hi = _pair(tv, base)
                speed[v], spread[v] = _r(med), [_r(lo), _r(hi)]
        if speed:
            best = max(speed, key=speed.get)
            out.append({"bench": "variants", "what": spec["bench"], "preset": spec["preset"], "model": m,
                        "base_images_per_s": _r(per_run / _median(base)), "speedup_vs_base": speed,
                        "speedup_min_max": spread, "best": best if speed[best] > 1.0 else "base",
                        "paired": True})
    return out


def _runners(spec: dict) -> list[tuple[str, str]]:
    """(model, variant) pairs of a group, in spec order."""
    return [(m, v) for m, v in spec["runners"]]


def _engine_setup(cfg, kind: str, engine_kind: str):
    """(DeepSpeed config or None, weight/input dtype, precision label) of the bench's engine."""
    import torch

    from framework.train import engine as E
    if engine_kind == "deepspeed":
        denv = E.init_distributed(kind)
        ds_config = E.build_ds_config(cfg, denv.world_size, kind)
        dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
        return ds_config, dtype, "bf16" if dtype == torch.bfloat16 else "fp32"
    # plain torch: fp32 weights, autocast bf16 on CUDA
    return None, torch.float32, "autocast-bf16" if kind == "cuda" else "fp32"


def _extra_warmup(parts: frozenset) -> int:
    """Untimed calls a variant needs beyond --warmup: compilation (1), CUDA-graph recording (3)."""
    return {None: 0, "default": 1, "reduce-overhead": 3}[compile_mode(parts)]


class _Feed:
    """The batches a bench step trains on: the one set by ``TrainStep.step`` (precomputed caption
    embeddings, as training from embedding shards), and a zero null condition for the dropout."""

    def __init__(self, L: int, D: int):
        self.batch: dict = {}
        self.L, self.D = L, D

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.batch

    def null_condition(self):
        import torch

        from framework.models.text import Condition
        return Condition(torch.zeros(1, self.L, self.D), torch.ones(1, self.L, dtype=torch.bool))


class TrainStep:
    """One (model, variant) trained as ``framework.train.engine.Trainer`` trains: engine "deepspeed" times
    ``Trainer.train_step`` itself (q_sample, eps_theta, L_simple with null-text dropout,
    engine.backward, engine.step) plus the EMA update, with the model swapped in through the
    Trainer's model_factory; engine "torch" is a plain-PyTorch reference step (no DeepSpeed, autocast
    bf16 on CUDA) for comparison. Any batch size (the engine does not fix it). Without --mask the
    embeddings carry no mask (every token attended, as SD's CLIP conditioning)."""

    def __init__(self, preset: str, which: str, parts: frozenset, device, engine_kind: str, cfg,
                 ds_config: Optional[dict], ema: bool = True):
        import copy
        import tempfile

        import torch

        from framework.train import engine as E
        self.engine_kind, self.parts, self.device = engine_kind, parts, device
        self.use_ema = ema
        self._losses: list = []
        (_, _, _), (L, Dc) = input_shapes(preset)
        kind = checkpointing(parts)

        def factory():
            model = build_model(preset, which)
            if kind:
                set_checkpointing(model, which, kind)
            return model

        mode = compile_mode(parts)
        if engine_kind == "deepspeed":
            cfg = copy.deepcopy(cfg)
            cfg.run_dir = tempfile.mkdtemp(prefix="bench-run-")
            cfg.checkpoint.every = 0
            cfg.checkpoint.resume = ""
            cfg.data.use_embeddings = True
            cfg.engine.channels_last = "channels_last" in parts
            cfg.engine.compile = mode is not None
            cfg.engine.compile_mode = mode or "default"
            cfg.engine.activation_checkpointing = False      # set by the factory (ours or diffusers')
            self.feed = _Feed(L, Dc)
            self.trainer = E.Trainer(cfg, data=self.feed, model_factory=factory)
            self.module = self.trainer.engine.module
            self.optimizer = self.trainer.engine.optimizer
            while not isinstance(self.optimizer, torch.optim.Optimizer) and hasattr(self.optimizer, "optimizer"):
                self.optimizer = self.optimizer.optimizer
            self.ema = self.trainer.ema if ema else None
        else:
            from framework.diffusion import process as D
            from framework.train.ema import EMA
            self.sched = D.Schedule.from_config(cfg.diffusion)
            self.grad_clip = cfg.optim.grad_clip
            torch.manual_seed(0)
            with torch.device(device):          # initialise on the GPU: seconds, not a minute, at SD2
                model = factory()
            self.model = self.module = model.to(device)
            self.optimizer = E.build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], device)
            self.forward = torch.compile(model, mode=mode) if mode else model
            self.ema = EMA(self.module, zero3=False) if ema else None
            self.gen = torch.Generator(device=device).manual_seed(3)
        self.module.train()
        self.params = sum(p.numel() for p in self.module.parameters())
        self.optimizer_name = type(self.optimizer).__name__ + \
            ("(fused)" if self.optimizer.defaults.get("fused") else "")

    @property
    def losses(self) -> list[float]:
        """The losses so far (read back here, not in the timed steps: the loop reads them per log)."""
        return [float(x) for x in self._losses]

    def step(self, x0, ctx, mask=None) -> None:
        import torch

        if self.engine_kind == "deepspeed":
            self.feed.batch = {"image": x0, "ctx": ctx, "ctx_mask": mask}
            self._losses.append(self.trainer.train_step())
            if self.ema is not None:
                self.ema.update(0.999)
            return
        from framework.diffusion import process as D
        B = x0.shape[0]
        t = torch.randint(1, self.sched.T + 1, (B,), generator=self.gen, device=self.device)
        eps = torch.randn(x0.shape, generator=self.gen, device=self.device)
        x_t = D.q_sample(self.sched, x0, t, eps, trusted=True)
        if "channels_last" in self.parts:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        if compile_mode(self.parts) == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        ac = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with ac:
            out = self.forward(x_t, t, ctx=ctx, ctx_mask=mask).float()
        loss = D.training_loss(self.sched, out, x0, t, eps, trusted=True).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(0.999)
        self._losses.append(loss.detach())


def _throughput(flops_per_image: float, images_per_s: float, peak: dict) -> dict:
    """FLOPs per image, achieved TFLOP/s and MFU against the peak probe of the same run."""
    tflops = flops_per_image * images_per_s / 1e12
    return {"flops_per_image": flops_per_image, "tflops": _r(tflops), "peak_tflops": peak["tflops"],
            "peak_kind": f'{peak["kind"]} {peak["dtype"]}',
            "peak_tflops_by_kind": {k[:-len("_tflops")]: v for k, v in peak.items()
                                    if k.endswith("_tflops") and k != "tflops"},
            "mfu": _r(tflops / peak["tflops"]) if peak["tflops"] else None}


def run_train(spec: dict) -> list[dict]:
    """Training step of each (model, variant) in spec['runners'] at one preset, built in this process
    one after the other (peak memory per runner: build + warmup), then timed interleaved.
    spec = {preset, runners, batch, warmup, steps, device, engine ('deepspeed'|'torch'), ema, mask,
    peak_n, flops_per_image: {model: fwd+bwd FLOPs}}."""
    import torch

    kind, preset = spec["device"], spec["preset"]
    B = int(spec["batch"])
    device = _device(kind)
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = _bench_config(preset, B, frozenset(), kind)
    engine_kind = spec.get("engine", "deepspeed")
    probe = PeakProbe(device, torch.bfloat16 if kind == "cuda" else torch.float32, spec["peak_n"])
    probe()                                     # warm
    probe.rates = {k: [] for k in probe.rates}
    ds_config, dtype, precision = _engine_setup(cfg, kind, engine_kind)
    (c, h, w), (L, Dc) = input_shapes(preset)
    g = torch.Generator(device=device).manual_seed(1)
    x0 = torch.randn(B, c, h, w, generator=g, device=device)                   # one batch, reused
    ctx = torch.randn(B, L, Dc, generator=g, device=device).to(dtype)
    mask = None
    if spec.get("mask"):
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        mask[:, L // 2:] = False

    def build(which: str, parts: frozenset):
        r = TrainStep(preset, which, parts, device, engine_kind, cfg, ds_config, ema=spec.get("ema", True))
        return (lambda: r.step(x0, ctx, mask)), r.losses, r.params, r.ema is not None, r.optimizer_name

    runners = {}
    for which, variant in _runners(spec):
        parts = parse_variant(variant)
        _trim()
        with PeakMemory(device) as mem:         # build + warmup: weights, optimizer state, activations
            step, losses, n_params, has_ema, opt_name = build(which, parts)
            warm = _interleaved({"w": step}, spec["warmup"] + _extra_warmup(parts), device)["w"]
        runners[_key(which, variant)] = dict(model=which, variant=variant, step=step, losses=losses,
                                             params=n_params, ema=has_ema, optimizer=opt_name, warm=warm,
                                             mem=mem.result())
    times = _interleaved({**{k: r["step"] for k, r in runners.items()}, "peak": probe}, spec["steps"], device)
    times.pop("peak")
    peak = probe.result()

    recs = []
    for k, r in runners.items():
        ts = times[k]
        med = _median(ts)
        ips = B / med
        rec = {"bench": "train", "preset": preset, "model": r["model"], "variant": r["variant"],
               "engine": "deepspeed-zero2" if engine_kind == "deepspeed" else "torch",
               "precision": precision, "optimizer": r["optimizer"], "batch": B, "input": [c, h, w],
               "context": [L, Dc], "mask": mask is not None, "ema": r["ema"], "params": r["params"],
               "warmup": len(r["warm"]), "steps": spec["steps"],
               "step_s_median": _r(med), "step_s_min": _r(min(ts)), "step_s_max": _r(max(ts)),
               "step_s_all": [_r(x) for x in ts], "first_step_s": _r(r["warm"][0]) if r["warm"] else None,
               "images_per_s": _r(ips), "loss_finite": all(math.isfinite(x) for x in r["losses"])}
        fpi = (spec.get("flops_per_image") or {}).get(r["model"])
        if fpi:
            rec.update(_throughput(fpi, ips, peak))
        rec.update(r["mem"])
        recs.append(rec)
    return recs + _paired_summaries(spec, times, B)


def run_vae(spec: dict) -> list[dict]:
    """The first stage of a latent preset (VAE_OF_PRESET): the VAE's encode rate (images/s, what
    tools.precompute_latents can reach per device) and the training step from precomputed latents vs
    encoding on the fly (``vae.path`` without ``data.latents``: the frozen VAE on the trainer), for
    each model of spec['runners'], timed interleaved. spec = {preset, runners, batch, encode_batch,
    warmup, steps, device}."""
    import tempfile

    import torch

    from framework.models.vae import FrozenVAE, make_tiny_vae
    kind, preset = spec["device"], spec["preset"]
    if preset not in VAE_OF_PRESET:
        raise ValueError(f"section vae: preset {preset!r} is not a latent preset ({sorted(VAE_OF_PRESET)})")
    arch = dict(VAE_ARCH[VAE_OF_PRESET[preset]])
    factor = 2 ** (len(arch["block_out_channels"]) - 1)
    B, EB = int(spec["batch"]), int(spec.get("encode_batch") or spec["batch"])
    device = _device(kind)
    (c, h, w), (L, Dc) = input_shapes(preset)
    C, H, W = arch["in_channels"], h * factor, w * factor
    vae_dir = make_tiny_vae(tempfile.mkdtemp(prefix="bench-vae-"), **arch)
    vae = FrozenVAE(vae_dir, device=device)
    n_vae = sum(p.numel() for p in vae.model.parameters())
    g = torch.Generator(device=device).manual_seed(1)
    images = torch.rand(max(B, EB), C, H, W, generator=g, device=device) * 2 - 1
    fns: dict[str, Callable] = {"encode": lambda: vae.encode(images[:EB])}
    recs_meta = {}
    for which, variant in _runners(spec):
        for mode in ("latents", "on_the_fly"):
            cfg = _bench_config(preset, B, frozenset(), kind)
            if mode == "on_the_fly":
                cfg.vae.path = vae_dir
                cfg.data.channels, cfg.data.image_size = C, H
            ds_config, dtype, precision = _engine_setup(cfg, kind, "deepspeed")
            r = TrainStep(preset, which, parse_variant(variant), device, "deepspeed", cfg, ds_config)
            x = images[:B] if mode == "on_the_fly" else torch.randn(B, c, h, w, generator=g, device=device)
            ctx = torch.randn(B, L, Dc, generator=g, device=device).to(dtype)
            key = f"{which}/{mode}"
            fns[key] = (lambda r=r, x=x, ctx=ctx: r.step(x, ctx))
            recs_meta[key] = dict(model=which, mode=mode, params=r.params, precision=precision, losses=r.losses)
    _interleaved(fns, spec["warmup"], device)
    times = _interleaved(fns, spec["steps"], device)
    enc = _median(times["encode"])
    out = [{"bench": "vae_encode", "preset": preset, "vae": VAE_OF_PRESET[preset], "vae_params": n_vae,
            "image": [C, H, W], "latent": [c, h, w], "batch": EB, "dtype": str(vae.dtype).replace("torch.", ""),
            "step_s_median": _r(enc), "images_per_s": _r(EB / enc)}]
    for key, m in recs_meta.items():
        med = _median(times[key])
        out.append({"bench": "train_latent", "preset": preset, "model": m["model"], "mode": m["mode"],
                    "vae": VAE_OF_PRESET[preset], "batch": B, "input": [C, H, W] if m["mode"] == "on_the_fly" else [c, h, w],
                    "params": m["params"], "precision": m["precision"], "steps": spec["steps"],
                    "step_s_median": _r(med), "images_per_s": _r(B / med)})
    for which in {m["model"] for m in recs_meta.values()}:
        a, b = _median(times[f"{which}/latents"]), _median(times[f"{which}/on_the_fly"])
        out.append({"bench": "train_latent_ratio", "preset": preset, "model": which,
                    "precomputed_over_on_the_fly": _r(b / a)})
    return out


def sampling_net(preset: str, which: str, parts: frozenset, device, dtype) -> Callable:
    """``model(x, t, cond_kwargs) -> eps`` (fp32) of an eval UNet in ``dtype``, as
    ``framework.export.Pipeline`` builds it: channels_last weights and input, torch.compile by
    ``unet.compile_for_inference`` (ours: one graph, static shapes; diffusers: the same without
    insisting on one graph), CUDA graphs for ``cudagraphs``."""
    import torch

    from framework.export import network_fn
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(preset, which)
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    if "channels_last" in parts:
        model = model.to(memory_format=torch.channels_last)
    mode = compile_mode(parts)
    net = model
    if mode and which == "ours":
        from framework.models.unet import compile_for_inference
        net = compile_for_inference(model, mode)
    elif mode:
        net = torch.compile(model, mode=mode, dynamic=False)
    return network_fn(net, dtype, "channels_last" in parts,
                      cuda_graphs=mode == "reduce-overhead" and device.type == "cuda")


def run_sample(spec: dict) -> list[dict]:
    """DDIM with classifier-free guidance (cond + uncond in one forward) for each (model, variant)
    in spec['runners'], timed interleaved. spec = {preset, runners, batch, sample_steps, repeats,
    device, peak_n, flops_fwd_per_image: {model: forward FLOPs}}."""
    import torch

    from framework.diffusion import process as D
    from framework.diffusion.sampling import cfg_model, ddim_sample

    kind, preset = spec["device"], spec["preset"]
    B, S = int(spec["batch"]), int(spec["sample_steps"])
    device = _device(kind)
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    probe = PeakProbe(device, dtype, spec["peak_n"])
    probe()                                     # warm
    probe.rates = {k: [] for k in probe.rates}
    (c, h, w), (L, Dc) = input_shapes(preset)
    sched = D.Schedule.from_config(_bench_config(preset, B, frozenset(), kind).diffusion)
    g = torch.Generator(device=device).manual_seed(2)
    cond = {"ctx": torch.randn(B, L, Dc, generator=g, device=device).to(dtype)}
    uncond = {"ctx": torch.zeros(1, L, Dc, device=device, dtype=dtype)}     # one null text, broadcast
    x_T = torch.randn(B, c, h, w, generator=g, device=device)

    def build(which: str, parts: frozenset):
        model_fn = sampling_net(preset, which, parts, device, dtype)
        fn = cfg_model(model_fn, cond, uncond, 7.5)
        outs = []

        def sample(steps: int = S) -> None:
            with torch.no_grad():
                outs.append(bool(torch.isfinite(ddim_sample(fn, x_T, sched, steps=steps)).all()))
        return sample, outs

    runners = {}
    for which, variant in _runners(spec):
        _trim()
        parts = parse_variant(variant)
        with PeakMemory(device) as mem:
            sample, outs = build(which, parts)
            t0 = time.perf_counter()
            sample(min(2 + _extra_warmup(parts), S))     # warmup (compiles, records CUDA graphs)
            _sync(device)
            warm_s = time.perf_counter() - t0
        runners[_key(which, variant)] = dict(model=which, variant=variant, sample=sample, outs=outs,
                                             warm_s=warm_s, mem=mem.result())
    times = _interleaved({**{k: r["sample"] for k, r in runners.items()}, "peak": probe}, spec["repeats"], device)
    times.pop("peak")
    peak = probe.result()

    recs = []
    for k, r in runners.items():
        med = _median(times[k])
        ips = B / med
        rec = {"bench": "sample", "preset": preset, "model": r["model"], "variant": r["variant"],
               "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "sampler": "ddim",
               "guidance": 7.5, "cfg_batched": True, "batch": B, "forward_batch": 2 * B, "sample_steps": S,
               "input": [c, h, w], "context": [L, Dc], "repeats": spec["repeats"], "warmup_s": _r(r["warm_s"]),
               "s_per_batch_median": _r(med), "s_per_batch_all": [_r(x) for x in times[k]],
               "images_per_s": _r(ips), "finite": all(r["outs"])}
        fwd = (spec.get("flops_fwd_per_image") or {}).get(r["model"])
        if fwd:
            rec.update(_throughput(2 * fwd * S, ips, peak))     # cond + uncond forward at every step
        rec.update(r["mem"])
        recs.append(rec)
    return recs + _paired_summaries(spec, times, B)


# ---------------------------------------------------------------------------------------------
# Largest micro batch that fits
# ---------------------------------------------------------------------------------------------
def find_max_batch(probe: Callable[[int], tuple[bool, Optional[float]]], start: int, limit_mb: float,
                   tol: float = 0.03, max_probes: int = 10) -> dict:
    """Largest B with probe(B) -> (fits, peak_mb) true, to within ``tol`` (relative) or 1.

    Memory grows linearly in B (weights, gradients and optimizer state fixed; activations per image),
    so after two probes (start, 4 x start) a least-squares line through every measured peak predicts
    where ``limit_mb`` is reached. Without a failure yet, the next probe aims a little past the line
    (so one soon brackets the limit); then it aims a little below the smallest failure, or, right
    after a guess that failed, bisects the gap once. Without peaks (out-of-memory errors report
    none) it doubles / bisects. Typically 4-7 probes to 3%."""
    probes: list[dict] = []
    lo, hi = 0, None
    peaks: dict[int, float] = {}            # every measured peak, fitting or not: points of the line

    def run(b: int) -> bool:
        nonlocal lo, hi
        ok, peak = probe(b)
        probes.append({"batch": b, "fits": bool(ok), "peak_mb": round(peak, 1) if peak is not None else None})
        if peak is not None:
            peaks[b] = peak
        if ok:
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        return ok

    def predict() -> Optional[int]:
        if len(peaks) < 2:
            return None
        xs, ys = zip(*sorted(peaks.items()))
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        return int((limit_mb - (my - slope * mx)) / slope) if slope > 0 else None

    b = max(1, int(start))
    while not run(b):                       # a start that fits
        if b == 1 or len(probes) >= max_probes:
            break
        b = max(1, b // 2)
    if lo > 0 and hi is None and len(probes) < max_probes:
        run(4 * lo)                         # the second point of the line, far enough for its slope
    pred, bisect = None, False
    while lo > 0 and len(probes) < max_probes and (hi is None or hi - lo > max(1, int(tol * lo))):
        p = predict()
        pred = p if p is not None else pred
        if hi is None:                      # overshoot the line a little, so a probe soon brackets it
            cand = max(p, int(lo * (1 + 2 * tol)) + 1) if p is not None else 2 * lo
            cand = min(cand, 64 * lo)
        elif p is not None and not bisect and lo < p < hi:
            cand = max(lo + 1, min(p, hi - max(1, int(tol * hi / 2))))
        else:                               # no line, or the line's last guess failed: halve the gap
            cand = (lo + hi) // 2
        if cand <= lo or (hi is not None and cand >= hi):
            break
        fitted = run(cand)
        bisect = not fitted and not bisect  # after a failed guess, one bisection step
    out = {"max_batch": lo, "first_fail": hi, "limit_mb": _r(limit_mb), "probes": probes,
           "predicted": pred, "resolution": (hi - lo) if hi is not None else None}
    fits_at = sorted((p["batch"], p["peak_mb"]) for p in probes if p["fits"] and p["peak_mb"] is not None)
    if len(fits_at) >= 2:
        (b0, m0), (b1, m1) = fits_at[0], fits_at[-1]
        out.update(mb_per_image=_r((m1 - m0) / (b1 - b0)), fixed_mb=_r(m0 - (m1 - m0) / (b1 - b0) * b0))
    return out


def run_maxbatch(spec: dict) -> list[dict]:
    """Largest micro batch for one (model, variant) and spec['what'] ('train': the TrainStep under
    DeepSpeed ZeRO-2 with EMA, as run_train; 'sample': one CFG step, cond + uncond batched, so the
    network sees 2B). A probe at B runs two training steps (the second timed) or one sampling step:
    it fits if none runs out of memory (CUDA) and the peak stays within spec['limit_mb'] (default:
    the device's memory; on CPU the peak anonymous memory of the process, so give a limit). After an
    out-of-memory error the runner is rebuilt."""
    import torch

    from framework.diffusion.sampling import cfg_model
    kind, preset, what = spec["device"], spec["preset"], spec["what"]
    (which, variant), = spec["runners"]
    parts = parse_variant(variant)
    device = _device(kind)
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True
        total_mb = torch.cuda.get_device_properties(device).total_memory / 2 ** 20
    else:
        total_mb = None
    limit = spec.get("limit_mb") or total_mb
    if not limit:
        raise ValueError("maxbatch on CPU needs --mem-limit-mb (the peak anonymous memory a probe may reach)")
    cfg = _bench_config(preset, 1, frozenset(), kind)
    if what == "train":
        ds_config, dtype, _ = _engine_setup(cfg, kind, "deepspeed")
    else:
        dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    (c, h, w), (L, Dc) = input_shapes(preset)
    state: dict = {}
    times: dict[int, float] = {}

    def build() -> None:
        state.clear()
        _trim()
        if kind == "cuda":
            torch.cuda.empty_cache()
        if what == "train":
            state["r"] = TrainStep(preset, which, parts, device, "deepspeed", cfg, ds_config, ema=True)
        else:
            state["r"] = sampling_net(preset, which, parts, device, dtype)

    def once(B: int) -> None:
        g = torch.Generator(device=device).manual_seed(B)
        x = torch.randn(B, c, h, w, generator=g, device=device)
        ctx = torch.randn(B, L, Dc, generator=g, device=device).to(dtype)
        if what == "train":
            state["r"].step(x, ctx)
        else:
            fn = cfg_model(state["r"], {"ctx": ctx}, {"ctx": torch.zeros(1, L, Dc, device=device, dtype=dtype)}, 7.5)
            with torch.no_grad():
                fn(x, torch.full((B,), 500, device=device, dtype=torch.long))

    def probe(B: int) -> tuple[bool, Optional[float]]:
        if "r" not in state:
            build()
            once(1)                              # optimizer state exists before any measurement
        _trim()
        with PeakMemory(device) as mem:
            try:
                if what == "train":              # a forward alone costs little; a second step would
                    once(B)                      # double the search time at large sampling batches
                    _sync(device)
                t0 = time.perf_counter()
                once(B)
                _sync(device)
                times[B] = time.perf_counter() - t0
            except torch.OutOfMemoryError:
                state.clear()                    # the engine's buffers are in an unknown state
                return False, None
        peak = mem.peak() / 2 ** 20              # absolute: all the process holds
        return peak <= limit, peak

    res = find_max_batch(probe, int(spec.get("start", 8)), float(limit), float(spec.get("tol", 0.03)),
                         int(spec.get("max_probes", 10)))
    rec = {"bench": "maxbatch", "what": what, "preset": preset, "model": which, "variant": variant,
           "engine": "deepspeed-zero2" if what == "train" else "inference",
           "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "input": [c, h, w], "context": [L, Dc],
           "mem_kind": "cuda_max_memory_allocated" if kind == "cuda" else "anon_peak", **res}
    if total_mb:
        rec["device_mb"] = _r(total_mb)
    B = res["max_batch"]
    if B in times:
        rec.update(step_s_at_max=_r(times[B]), images_per_s_at_max=_r(B / times[B]))
    return [rec]


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------
def _run_worker(spec: dict) -> list[dict]:
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")
    if spec.get("threads"):
        import torch
        torch.set_num_threads(int(spec["threads"]))
    fn = {"train": run_train, "sample": run_sample, "maxbatch": run_maxbatch, "vae": run_vae}[spec["bench"]]
    return fn(spec)


def _run_isolated(spec: dict, timeout: Optional[float]) -> list[dict]:
    cmd = [sys.executable, "-m", "tools.bench", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cuda" if spec["device"] == "cuda" else "cpu")
    if spec["bench"] == "maxbatch" and spec["device"] == "cpu":
        # a fixed mmap threshold: freed tensors go back to the OS, so one probe's peak is not
        # inflated by heap an earlier, larger probe left behind (glibc's default threshold adapts
        # upwards after the first large free, and the heap then keeps that memory)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)                          # each worker is its own world of one
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"timed out after {timeout} s"}]
    for ln in p.stdout.splitlines():
        if ln.startswith(RESULT_TAG):
            return json.loads(ln[len(RESULT_TAG):])
    tail = (p.stderr + p.stdout).strip().splitlines()[-15:]
    return [{"error": f"worker exited {p.returncode}", "log_tail": tail}]


def _measure(spec: dict, isolate: bool, timeout: Optional[float]) -> list[dict]:
    t0 = time.perf_counter()
    if isolate:
        recs = _run_isolated(spec, timeout)
    else:
        try:
            recs = _run_worker(spec)
        except Exception as e:  # keep going: one failing variant must not hide the others
            recs = [{"error": f"{type(e).__name__}: {e}"}]
        finally:
            _trim()
    if len(recs) == 1 and "error" in recs[0]:
        recs = [{"bench": spec["bench"], "preset": spec["preset"], "runners": spec["runners"], **recs[0]}]
    wall = round(time.perf_counter() - t0, 1)
    return [{**r, "group_wall_s": wall} for r in recs]


def _per_preset(value: Optional[str], default: dict, presets: list[str], cast=int) -> dict:
    """'8' -> every preset 8; 'tiny=32,sd2=1' -> those, the rest from default."""
    out = {p: default.get(p, default.get("tiny")) for p in presets}
    if value:
        for item in value.split(","):
            if "=" in item:
                k, v = item.split("=", 1)
                out[k.strip()] = cast(v)
            else:
                out = {p: cast(item) for p in presets}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--presets", default=None, help="comma list of tiny,base64,sd2 (CPU default: tiny; "
                   "CUDA: sd2,base64,tiny)")
    p.add_argument("--preset", action="append", default=None, help="one preset (repeatable; as --presets)")
    p.add_argument("--sections", default="peak,flops,train,sample,data",
                   help="comma list of peak,flops,train,sample,data,maxbatch,vae (maxbatch, vae: on request; vae: "
                        "latent presets, e.g. --presets latent_small or sd2)")
    p.add_argument("--variants", default=None, help="comma list; parts base/channels_last/compile/ckpt "
                   "joined by '+' (default base,channels_last,compile; --quick: base)")
    p.add_argument("--diffusers-variants", default="same",
                   help="'same' (every --variants entry), 'none', or a comma list")
    p.add_argument("--no-diffusers", action="store_true", help="ours only, even when diffusers is installed")
    p.add_argument("--engine", choices=["deepspeed", "torch"], default="deepspeed",
                   help="deepspeed: our engine's ZeRO-2 step (default); torch: plain AdamW loop, both models")
    p.add_argument("--batch", default=None, help="training micro batch: N, or preset=N,... ")
    p.add_argument("--warmup", default=None, help="untimed steps: N, or preset=N,...")
    p.add_argument("--steps", default=None, help="timed training steps: N, or preset=N,...")
    p.add_argument("--sample-batch", default=None, help="sampling batch (images, before the CFG doubling)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (CPU 10, CUDA 50)")
    p.add_argument("--sample-repeats", type=int, default=None)
    p.add_argument("--mask", action="store_true", help="pass a text mask (half the tokens) to both models")
    p.add_argument("--no-ema", action="store_true", help="leave the EMA update out of the step")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak rate")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default). On a shared, oversubscribed CPU "
                        "use 1: with more threads than free cores each op waits for a descheduled thread")
    p.add_argument("--maxbatch", default="train,sample", help="maxbatch: what to size (train, sample)")
    p.add_argument("--maxbatch-variants", default="base,ckpt",
                   help="maxbatch: variants (ckpt: activation checkpointing; training only)")
    p.add_argument("--maxbatch-start", default=None, help="maxbatch: first probe, N or preset=N (default 8)")
    p.add_argument("--maxbatch-tol", type=float, default=0.03, help="maxbatch: relative resolution")
    p.add_argument("--maxbatch-probes", type=int, default=10, help="maxbatch: most probes per search")
    p.add_argument("--mem-limit-mb", type=float, default=None,
                   help="maxbatch: memory a probe may use (CUDA default: the device's; CPU: required, "
                        "the peak anonymous memory (heap, tensors) of the probing process)")
    p.add_argument("--data-args", default=None, help="arguments for tools.bench_data (one string)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 4, 1 warmup, 2 DDIM steps, tiny data, in-process, variant base")
    p.add_argument("--group", choices=["auto", "preset", "variant"], default="auto",
                   help="what one process measures interleaved: every variant of a preset (CPU default: "
                        "paired variant speedups), or one variant (CUDA default: SD2 engines are large)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each measurement in its own process (default on; --quick: off)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per isolated measurement")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; measurements that would start after it are skipped (0: no limit)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def run(argv: Optional[list[str]] = None) -> list[dict]:
    # JSON lines go to the real stdout; everything else that writes to fd 1 (DeepSpeed's logger,
    # compiler output) is sent to stderr, so stdout stays parseable. Only when run as a program.
    json_out = sys.stdout
    if argv is None:
        json_out = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stdout.flush()
        os.dup2(2, 1)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.worker:
        spec = json.loads(args.worker)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec["device"] == "cuda" else "cpu")
        recs = _run_worker(spec)
        json_out.write(RESULT_TAG + json.dumps(recs) + "\n")
        json_out.flush()
        return recs

    import torch
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("DS_ACCELERATOR", kind)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = DEFAULTS[kind]
    presets = args.preset or (args.presets.split(",") if args.presets else list(d["presets"]))
    presets = [p.strip() for p in presets if p.strip()]
    for p in presets:
        unet_config(p)                              # a typo fails now, not after minutes
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    bad = sections - {"peak", "flops", "train", "sample", "data", "maxbatch", "vae"}
    if bad:
        raise SystemExit(f"unknown section(s) {sorted(bad)}")
    q = args.quick
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else \
        (["base"] if q else list(d["variants"]))
    for v in variants:
        parse_variant(v)
    with_diff = has_diffusers() and not args.no_diffusers
    if not with_diff or args.diffusers_variants == "none":
        diff_variants = []
    elif args.diffusers_variants == "same":
        diff_variants = list(variants)
    else:
        diff_variants = [v.strip() for v in args.diffusers_variants.split(",")]
    batch = _per_preset(args.batch, {p: QUICK["batch"] for p in presets} if q else d["batch"], presets)
    warmup = _per_preset(args.warmup, {p: QUICK["warmup"] for p in presets} if q else d["warmup"], presets)
    steps = _per_preset(args.steps, d["steps"], presets)
    sbatch = _per_preset(args.sample_batch, {p: QUICK["sample_batch"] for p in presets} if q
                         else d["sample_batch"], presets)
    sample_steps = args.sample_steps or (QUICK["sample_steps"] if q else d["sample_steps"])
    repeats = args.sample_repeats or (QUICK["sample_repeats"] if q else d["sample_repeats"])
    peak_n = args.peak_n or (QUICK["peak_n"] if q else d["peak_n"])
    isolate = (not q) if args.isolate is None else args.isolate
    out_file = open(args.out, "a") if args.out else None
    t_start = time.perf_counter()
    results: list[dict] = []

    def emit(rec: dict) -> None:
        rec = {**rec, "device": kind, "loadavg": _loadavg()}
        results.append(rec)
        line = json.dumps(rec)
        json_out.write(line + "\n")
        json_out.flush()
        if out_file:
            out_file.write(line + "\n")
            out_file.flush()

    def over_budget(what: dict) -> bool:
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            emit({"bench": "skipped", **what, "reason": f"--time-budget {args.time_budget} s spent"})
            return True
        return False

    emit({"bench": "env", "machine": machine_info(kind), "presets": presets, "sections": sorted(sections),
          "variants": variants, "diffusers_variants": diff_variants, "engine": args.engine,
          "threads": torch.get_num_threads(), "isolate": isolate, "quick": q,
          "group": args.group if args.group != "auto" else ("preset" if kind == "cpu" else "variant"),
          "argv": sys.argv[1:] if argv is None else list(argv)})

    # ---- peak matmul rate ------------------------------------------------------------------------
    if "peak" in sections:
        dev = _device(kind)
        emit({"bench": "peak", **matmul_peak(dev, torch.bfloat16 if kind == "cuda" else torch.float32, peak_n)})
        if kind == "cpu":
            emit({"bench": "peak", **matmul_peak(dev, torch.bfloat16, min(peak_n, 1024), 1, 3)})
        else:
            torch.cuda.empty_cache()                  # the workers need the memory, not this process

    # ---- FLOPs per image (meta device), SD2 always ------------------------------------------------
    flops: dict[tuple[str, str], dict] = {}
    flop_presets = list(presets)
    if "flops" in sections and not q and "sd2" not in flop_presets:
        flop_presets.append("sd2")
    if {"flops", "train", "sample"} & sections:
        for p in flop_presets:
            try:
                rec = flops_record(p, with_diff)
            except Exception as e:  # pragma: no cover - keep the timing sections running
                rec = {"bench": "flops", "preset": p, "error": f"{type(e).__name__}: {e}"}
            if "error" not in rec:
                flops[(p, "ours")] = {"fwd": rec["ours_fwd"], "fwd_bwd": rec["ours_fwd_bwd"]}
                if with_diff:
                    flops[(p, "diffusers")] = {"fwd": rec["diffusers_fwd"], "fwd_bwd": rec["diffusers_fwd_bwd"]}
            if "flops" in sections:
                emit(rec)

    group = args.group if args.group != "auto" else ("preset" if kind == "cpu" else "variant")

    def summarize(bench: str, preset: str, recs: dict) -> None:
        """Across groups (separate processes, so not paired): each variant over base per model, and
        ours' best variant over diffusers at base."""
        base_d = recs.get(("diffusers", "base"), {}).get("images_per_s")
        if group == "variant":
            for m in ("ours", "diffusers"):
                b = recs.get((m, "base"), {}).get("images_per_s")
                if not b:
                    continue
                speed = {v: _r(recs[(m, v)]["images_per_s"] / b) for v in variants
                         if v != "base" and recs.get((m, v), {}).get("images_per_s")}
                if speed:
                    best = max(speed, key=speed.get)
                    emit({"bench": "variants", "what": bench, "preset": preset, "model": m,
                          "base_images_per_s": b, "speedup_vs_base": speed,
                          "best": best if speed[best] > 1.0 else "base", "paired": False})
        if base_d and len(variants) > 1:
            best_o = max(((v, r["images_per_s"]) for (m, v), r in recs.items()
                          if m == "ours" and r.get("images_per_s")), key=lambda x: x[1], default=None)
            if best_o:
                emit({"bench": "ratio_best", "what": bench, "preset": preset, "ours_variant": best_o[0],
                      "ours_images_per_s": best_o[1], "diffusers_base_images_per_s": base_d,
                      "ours_best_over_diffusers_base": _r(best_o[1] / base_d), "paired": group == "preset"})

    def summarize_maxbatch(preset: str, what: str) -> None:
        """ours over diffusers in largest micro batch, per variant."""
        got = {(r["model"], r["variant"]): r["max_batch"] for r in results
               if r.get("bench") == "maxbatch" and r.get("preset") == preset and r.get("what") == what
               and "max_batch" in r}
        for (m, v), b in sorted(got.items()):
            d = got.get(("diffusers", v))
            if m == "ours" and d:
                emit({"bench": "ratio", "what": f"maxbatch/{what}", "preset": preset, "variant": v,
                      "ours_max_batch": b, "diffusers_max_batch": d, "ours_over_diffusers": _r(b / d)})

    # ---- training step and CFG sampling: groups of (model, variant) runners ----------------------
    for bench in ("train", "sample"):
        if bench not in sections:
            continue
        for p in presets:
            recs: dict[tuple[str, str], dict] = {}
            runs = []
            for v in variants:
                if bench == "sample" and checkpointing(parse_variant(v)):
                    continue                          # checkpointing does nothing without backward
                with_d = v in diff_variants and not (parse_variant(v) & OURS_ONLY_PARTS)
                runs.append([["ours", v]] + ([["diffusers", v]] if with_d else []))
            groups = [sum(runs, [])] if group == "preset" else runs
            for runners in groups:
                if not runners:
                    continue
                what = {"what": bench, "preset": p, "runners": runners}
                if over_budget(what):
                    continue
                models = sorted({m for m, _ in runners})
                spec = {"bench": bench, "device": kind, "preset": p, "runners": runners,
                        "peak_n": peak_n, "threads": args.threads}
                if bench == "train":
                    spec.update(batch=batch[p], warmup=warmup[p], steps=steps[p], engine=args.engine,
                                ema=not args.no_ema, mask=args.mask,
                                flops_per_image={m: flops[(p, m)]["fwd_bwd"] for m in models if (p, m) in flops})
                else:
                    spec.update(batch=sbatch[p], sample_steps=sample_steps, repeats=repeats,
                                flops_fwd_per_image={m: flops[(p, m)]["fwd"] for m in models if (p, m) in flops})
                for rec in _measure(spec, isolate, args.timeout):
                    if rec.get("bench") == bench and "model" in rec:
                        recs[(rec["model"], rec["variant"])] = rec
                    emit(rec)
            summarize(bench, p, recs)

    # ---- the first stage: VAE encode rate, training from latents vs encoding on the fly -------------
    if "vae" in sections:
        for p in presets:
            if p not in VAE_OF_PRESET:
                emit({"bench": "skipped", "what": "vae", "preset": p, "reason": "not a latent preset"})
                continue
            info = {"what": "vae", "preset": p}
            if over_budget(info):
                continue
            runners = [["ours", "base"]] + ([["diffusers", "base"]] if with_diff else [])
            spec = {"bench": "vae", "device": kind, "preset": p, "runners": runners, "batch": batch[p],
                    "encode_batch": sbatch[p], "warmup": warmup[p], "steps": steps[p], "threads": args.threads}
            for rec in _measure(spec, isolate, args.timeout):
                emit(rec)

    # ---- largest micro batch: one process per (what, model, variant) ------------------------------
    if "maxbatch" in sections:
        if kind == "cpu" and not args.mem_limit_mb:
            raise SystemExit("--sections maxbatch on CPU needs --mem-limit-mb")
        mb_start = _per_preset(args.maxbatch_start, {p: 8 for p in presets}, presets)
        mb_variants = [v.strip() for v in args.maxbatch_variants.split(",") if v.strip()]
        for v in mb_variants:
            parse_variant(v)
        for what in [w.strip() for w in args.maxbatch.split(",") if w.strip()]:
            if what not in ("train", "sample"):
                raise SystemExit(f"--maxbatch: train and/or sample, not {what!r}")
            for p in presets:
                for v in mb_variants:
                    if what == "sample" and checkpointing(parse_variant(v)):
                        continue
                    with_d = with_diff and not (parse_variant(v) & OURS_ONLY_PARTS)
                    for m in ["ours"] + (["diffusers"] if with_d else []):
                        info = {"what": f"maxbatch/{what}", "preset": p, "runners": [[m, v]]}
                        if over_budget(info):
                            continue
                        spec = {"bench": "maxbatch", "what": what, "device": kind, "preset": p,
                                "runners": [[m, v]], "limit_mb": args.mem_limit_mb, "start": mb_start[p],
                                "tol": args.maxbatch_tol, "max_probes": args.maxbatch_probes,
                                "threads": args.threads}
                        for rec in _measure(spec, isolate, args.timeout):
                            emit(rec)
                summarize_maxbatch(p, what)

    # ---- data loading -----------------------------------------------------------------------------
    if "data" in sections and not over_budget({"what": "data"}):
        if args.data_args:
            data_argv = args.data_args.split()
        elif q:
            data_argv = ["--which", "fmnist", "--workers", "0", "--seconds", "0.5", "--n-fmnist", "64",
                         "--n-jpeg", "8"]
        elif kind == "cpu":
            data_argv = ["--which", "all", "--workers", "0", "2", "--seconds", "3", "--n-fmnist", "2048",
                         "--n-jpeg", "128"]
        else:
            data_argv = ["--which", "jpeg", "--workers", "0", "8", "--seconds", "3", "--n-jpeg", "256"]
        try:
            from tools import bench_data
            with contextlib.redirect_stdout(sys.stderr):   # it prints its own lines; ours are tagged
                data_recs = bench_data.main(data_argv)
            for r in data_recs:
                r = dict(r)
                r.pop("machine", None)
                emit({"bench": "data", **r})
        except Exception as e:
            emit({"bench": "data", "error": f"{type(e).__name__}: {e}", "args": data_argv})

    emit({"bench": "done", "wall_s": round(time.perf_counter() - t_start, 1),
          "errors": sum(1 for r in results if "error" in r)})
    if out_file:
        out_file.close()
    return results


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
