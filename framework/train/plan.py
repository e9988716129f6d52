"""Plan a training run on N GPUs before launching it: memory per rank, the largest micro batch,
step time, images/s, time and GPU-hours to a target, checkpoint size, data bandwidth.

    plan = make_plan(Workload.from_preset("sd2", latent=(4, 32, 32), micro_batch=32, zero_stage=2),
                     cluster("a100-80x8", nodes=8))
    plan["memory"]["peak"], plan["max_micro_batch"], plan["step"]["images_per_s"]

The model (what DeepSpeed 0.19 and ``framework.train.engine`` hold per rank; P trainable parameters, N
data-parallel ranks, w bytes per weight: 2 bf16, 4 fp32; "part" = ZeRO's flat partition, ~P/N):

| category | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 |
| --- | --- | --- | --- | --- |
| params (the module's weights) | wP | wP | wP | w part (+ the gathered working set) |
| master fp32 | bf16: 4P, fp32: 0 | 4 part | 4 part | 4 part |
| Adam m, v (fp32) | 8P | 8 part | 8 part | 8 part |
| gradients | wP (+4P bf16) | wP + 4 part | w part + 4 part | w part |
| reduce buckets | - | reduce_bucket_size x w (x2 with overlap_comm) | same | same |
| EMA (fp32, framework.train.engine.EMA) | 4P | 4P | 4P | 4 part |

Every ZeRO stage keeps its own fp32 master partition, even when the model is fp32 (measured:
ZeRO-1/2 ``.clone()`` the partition, ZeRO-3's ``fp32_partitioned_groups_flat`` is a separate
buffer too); only ZeRO-0 in fp32 (a plain torch optimizer) has no master copy. Measured against the
real engine on 1, 2 and 4 gloo ranks (fp32 and bf16) by ``tests/test_plan.py``
(``tests/plan_memory_worker.py``): weights, master, Adam state, EMA, checkpoint bytes. Gradients and
buckets follow DeepSpeed's source (stage_1_and_2.py, stage3.py); they enter the validation through
the peak (the largest micro batch against ``tools/bench.py --sections maxbatch``).

Activations per image come from a probe: one forward+backward of the UNet at two micro batches
under ``torch.distributed._tools.mem_tracker.MemTracker``, on fake tensors (``FakeTensorMode``:
nothing allocated, nothing computed, SD2 in minutes on a CPU), on real CPU tensors (small models)
or on the current CUDA device,
gradients dropped as they are produced (ZeRO-2/3 move them into buckets). The line through the two
peaks gives bytes per image and a fixed part. Results are cached in a table: the one shipped
(``framework/plan_table.json``) and a user file (``$FRAMEWORK_PLAN_CACHE`` or
``~/.cache/framework/plan_table.json``).

FLOPs per image are ``framework.train.flops.count_flops``, the count ``tools/bench.py`` reports.
Communication: ring collectives, hierarchical over nodes (see ``collective_seconds``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from framework.config import Config, UNetConfig, load_config, to_dict

__all__ = ["Cluster", "CLUSTERS", "cluster", "Workload", "make_plan", "rank_memory", "max_micro_batch",
           "collective_seconds", "comm_bytes", "checkpoint_bytes", "sample_bytes", "model_facts",
           "activation_profile", "probe_activations", "predict_rank_memory", "check_fits",
           "device_memory_bytes", "measured_peak_bytes", "proc_status", "peak_anon_bytes", "mfu_from_bench",
           "record_mfu", "frozen_bytes", "log_fields", "format_plan", "GiB"]

GiB = 2 ** 30
PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "unet")
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_table.json")

# DeepSpeed's defaults for the buckets (deepspeed/runtime/zero/config.py), which build_ds_config
# leaves alone unless the config's raw deepspeed block sets them.
DS_REDUCE_BUCKET = 500_000_000           # elements
DS_PREFETCH_BUCKET = 50_000_000          # elements, ZeRO-3 (stage3_prefetch_bucket_size)


# ---------------------------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------------------------
@dataclass
class Cluster:
    """Nodes x GPUs, memory per GPU, the bf16 dense peak, and the links. Bandwidths in GB/s (1e9)
    per direction: ``intra_gbs`` per GPU (NVLink), ``inter_gbs`` per node (all its NICs)."""
    name: str = "custom"
    nodes: int = 1
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    peak_tflops: float = 312.0          # dense, in the run's precision (bf16 on GPUs, fp32 on CPU)
    intra_gbs: float = 300.0
    inter_gbs: float = 200.0
    comm_efficiency: float = 0.8        # fraction of the link a ring collective reaches (bus bandwidth)
    runtime_gib: float = 1.0            # CUDA context + NCCL buffers (outside the allocator's count)
    alloc_overhead: float = 0.05        # on the activations: allocator rounding and fragmentation (CPU:
                                        # measured 4-5% over the tracked tensors, tiny preset)
    device: str = "cuda"                # "cuda" | "cpu" (CPU: memory is the anonymous part of the RSS;
                                        # buckets count as touched)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


# Nominal figures (vendor data sheets): H100/H200 SXM 989 TFLOP/s bf16 dense, NVLink 4 900 GB/s
# both directions (450 each), 8 x 400 Gb/s NDR per node; A100 SXM 312 TFLOP/s, NVLink 3 600 GB/s
# (300 each way), 8 x 200 Gb/s HDR per node. Memory as the device reports it (H200: 143,771 MiB).
CLUSTERS: dict[str, dict] = {
    "h200x8": dict(gpus_per_node=8, memory_gib=140.4, peak_tflops=989.0, intra_gbs=450.0, inter_gbs=400.0),
    "h100x8": dict(gpus_per_node=8, memory_gib=79.6, peak_tflops=989.0, intra_gbs=450.0, inter_gbs=400.0),
    "a100-80x8": dict(gpus_per_node=8, memory_gib=80.0, peak_tflops=312.0, intra_gbs=300.0, inter_gbs=200.0),
    "a100-40x8": dict(gpus_per_node=8, memory_gib=40.0, peak_tflops=312.0, intra_gbs=300.0, inter_gbs=200.0),
    # this kind of machine: ranks are processes; memory is each process's limit on its anonymous
    # memory (peak_anon_bytes: heap and tensors, not the shared library pages in the RSS); the peak is
    # the fp32 conv3x3 rate tools/bench.py measured on one thread (the median of 9 probes on the
    # development machine's Intel Xeon, 2026-11-30; docs/plan.md); the
    # runtime (Python, torch, DeepSpeed: their anonymous memory) is probed by cpu_runtime_bytes()
    "cpu": dict(gpus_per_node=1, memory_gib=1.0, peak_tflops=0.155, intra_gbs=5.0, inter_gbs=1.25,
                comm_efficiency=1.0, runtime_gib=0.0, device="cpu"),
}


def cluster(name: str = "a100-80x8", **over) -> Cluster:
    """A named preset (``CLUSTERS``) with fields overridden (nodes=8, memory_gib=..., ...)."""
    if name not in CLUSTERS:
        raise ValueError(f"unknown cluster {name!r}: use one of {', '.join(CLUSTERS)} or give the fields")
    fields = {f.name for f in dataclasses.fields(Cluster)}
    bad = sorted(set(over) - fields)
    if bad:
        raise ValueError(f"unknown cluster field(s) {bad}: valid are {sorted(fields)}")
    c = Cluster(name=name, **CLUSTERS[name])
    for k, v in over.items():
        if v is not None:
            setattr(c, k, type(getattr(c, k))(v))
    if c.device == "cpu" and over.get("runtime_gib") is None:
        c.runtime_gib = cpu_runtime_bytes() / GiB
    return c


# ---------------------------------------------------------------------------------------------
# What is trained
# ---------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """The run: the UNet, its input, precision, ZeRO, EMA, checkpointing, batch, data, target."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    input_shape: tuple = (3, 32, 32)       # (C, H, W) the UNet sees (latents for a latent model)
    context: tuple = (77, 384)             # (L, D) text tokens
    precision: str = "bf16"                # "bf16" | "fp32"
    zero_stage: int = 2
    ema: bool = True
    activation_checkpointing: Union[bool, str] = False
    micro_batch: int = 32
    grad_accum: int = 1
    mfu: Optional[float] = None            # of the executed FLOPs; None: the table's, else 0.40 (CUDA)
    overlap: float = 0.0                   # fraction of communication hidden behind compute
    target_images: float = 1e9
    data: str = "latents"                  # what the shards hold: "pixels" or "latents"
    pixel_size: int = 0                    # the images' side in pixels (0: H x vae_factor for latents)
    vae_factor: int = 8
    jpeg_bytes_per_pixel: float = 0.25     # 256 px JPEG q90 ~ 15.9 kB (tools/bench_data.py)
    text_tokens: int = 0                   # valid tokens stored per caption (0: all L)
    storage_gbs: float = 2.0               # aggregate checkpoint write bandwidth, GB/s
    ckpt_every: int = 0                    # steps between checkpoints (0: none in the time)
    reduce_bucket: int = DS_REDUCE_BUCKET
    overlap_comm: Optional[bool] = None    # DeepSpeed's default: True for ZeRO-3 only
    name: str = ""

    @property
    def latent(self) -> bool:
        return self.data == "latents" or self.unet.in_channels == 4

    @classmethod
    def from_preset(cls, preset: str, **kw) -> "Workload":
        """A UNet size preset (configs/unet/NAME.yaml) or a run config path; ``latent=(C, H, W)``
        or ``resolution=PIXELS`` set the input (default: the bench's shapes)."""
        path = preset if preset.endswith((".yaml", ".yml")) else os.path.join(PRESET_DIR, f"{preset}.yaml")
        if not os.path.isfile(path):
            names = sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))
            raise ValueError(f"no UNet preset or config {preset!r}: presets are {', '.join(names)}")
        cfg = load_config(path)
        if os.path.dirname(os.path.abspath(path)) == PRESET_DIR:
            # a size preset: the bench's inputs (tools/bench.py PRESETS)
            kw.setdefault("context_len", {"latent_small": 16}.get(preset, 77))
            if "latent" not in kw and "resolution" not in kw:
                hw = {"base64": 64, "latent_small": 8}.get(preset, 32)
                kw["latent"] = (cfg.unet.in_channels, hw, hw)
        return cls.from_config(cfg, name=os.path.splitext(os.path.basename(path))[0], **kw)

    @classmethod
    def from_config(cls, cfg: Config, latent: Optional[tuple] = None, resolution: Optional[int] = None,
                    context_len: Optional[int] = None, **kw) -> "Workload":
        u = cfg.unet
        c = u.in_channels
        lat = kw.pop("data", None) or ("latents" if c == 4 else "pixels")
        vf = kw.get("vae_factor", 8)
        if latent:
            shape = tuple(int(x) for x in latent)
        elif resolution:
            s = resolution // vf if lat == "latents" else resolution
            shape = (c, s, s)
        else:
            s = cfg.data.image_size
            if getattr(cfg.data, "latents", False) and s > 64:   # a pixel size given for latent shards
                s //= vf
            shape = (c, s, s)
        if shape[0] != c:
            raise ValueError(f"input has {shape[0]} channels but unet.in_channels={c}")
        e = cfg.engine
        prec = e.precision if e.precision != "auto" else "bf16"
        base = dict(unet=u, input_shape=shape, context=(context_len or cfg.text.max_length, u.context_dim),
                    precision=prec, zero_stage=e.zero_stage, ema=True,
                    activation_checkpointing=e.activation_checkpointing, micro_batch=e.micro_batch,
                    grad_accum=e.grad_accum, data=lat)
        zc = cfg.deepspeed.get("zero_optimization", {}) if isinstance(cfg.deepspeed, dict) else {}
        if "reduce_bucket_size" in zc:
            base["reduce_bucket"] = int(zc["reduce_bucket_size"])
        if "overlap_comm" in zc:
            base["overlap_comm"] = bool(zc["overlap_comm"])
        base.update(kw)
        return cls(**base)

    @property
    def weight_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def ckpt_kind(self) -> str:
        return {True: "all", False: "none", None: "none"}.get(self.activation_checkpointing,
                                                              self.activation_checkpointing)


# ---------------------------------------------------------------------------------------------
# Model facts: parameters, FLOPs (meta device), cached per UNet config and input
# ---------------------------------------------------------------------------------------------
def _unet_key(u: UNetConfig) -> str:
    """A hash of the fields that differ from UNetConfig's defaults: a field added later with a
    default that keeps the old network leaves every recorded key valid."""
    base = to_dict(UNetConfig())
    diff = {k: v for k, v in to_dict(u).items() if base.get(k, object()) != v}
    return hashlib.sha1(json.dumps(diff, sort_keys=True).encode()).hexdigest()[:12]


_FACTS: dict = {}


def model_facts(w: Workload, flops: bool = True) -> dict:
    """params (trainable), per-parameter sizes (ZeRO-3 pads each to N), the largest block's
    parameters (ZeRO-3's gathered working set), and (flops=True) FLOPs per image: model fwd,
    fwd+bwd (the bench's count) and the fwd+bwd executed with w's activation checkpointing
    (recomputation included). Counted on the meta device; cached per UNet config and input."""
    ukey = _unet_key(w.unet)
    if ukey not in _FACTS:
        from framework.models.unet import UNet
        with torch.device("meta"):
            model = UNet(w.unet)
        numels = [p.numel() for p in model.parameters() if p.requires_grad]
        largest = max(sum(p.numel() for p in m.parameters()) for m in model.modules()
                      if type(m).__name__ in ("ResBlock", "SpatialTransformer"))
        _FACTS[ukey] = {"params": sum(numels), "numels": numels, "largest_block_params": largest}
    out = dict(_FACTS[ukey])
    if not flops:
        return out
    key = (ukey, tuple(w.input_shape), tuple(w.context), w.ckpt_kind)
    if key not in _FACTS:
        from framework.train.flops import count_flops
        from framework.models.unet import UNet, apply_activation_checkpointing
        f = count_flops(lambda: UNet(w.unet), tuple(w.input_shape), tuple(w.context))
        executed = f["fwd_bwd"]
        if w.ckpt_kind != "none":
            executed = count_flops(lambda: apply_activation_checkpointing(UNet(w.unet), w.ckpt_kind),
                                   tuple(w.input_shape), tuple(w.context))["fwd_bwd"]
        _FACTS[key] = {"flops_fwd": f["fwd"], "flops_fwd_bwd": f["fwd_bwd"], "flops_executed": executed}
    return {**out, **_FACTS[key]}


# ---------------------------------------------------------------------------------------------
# Activations: a probe, and the table that caches it
# ---------------------------------------------------------------------------------------------
def _cache_path() -> str:
    return os.environ.get("FRAMEWORK_PLAN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "framework", "plan_table.json")


def _read_table(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _act_key(w: Workload) -> str:
    c, h, wd = w.input_shape
    return f"{_unet_key(w.unet)}|{c}x{h}x{wd}|{w.context[0]}x{w.context[1]}|{w.precision}|{w.ckpt_kind}"


def probe_activations(unet: UNetConfig, input_shape: tuple, context: tuple, dtype: torch.dtype,
                      checkpointing: Union[bool, str] = False, batches: tuple = (2, 4),
                      mode: str = "fake") -> dict:
    """Peak memory of one training forward+backward above the weights, at two micro batches.
    mode "fake": FakeTensorMode on the CPU (allocates and computes nothing); "cpu": real CPU
    tensors, same tracker; "device": real tensors on the current CUDA device (max_memory_allocated). Gradients are dropped as they are
    produced (ZeRO-2/3 reduce them into buckets; those are counted separately). -> bytes_per_image,
    fixed_bytes (the line through the two peaks), peaks, mode."""
    from framework.models.unet import UNet, apply_activation_checkpointing
    peaks = []
    for b in batches:
        if mode == "device":
            peaks.append(_probe_cuda(unet, input_shape, context, dtype, checkpointing, b))
        elif mode in ("fake", "cpu"):
            peaks.append(_probe_tracked(unet, input_shape, context, dtype, checkpointing, b, mode == "fake",
                                        UNet, apply_activation_checkpointing))
        else:
            raise ValueError(f"probe mode {mode!r}: use fake, cpu or device")
    (b0, b1), (m0, m1) = batches, peaks
    slope = (m1 - m0) / (b1 - b0)
    return {"bytes_per_image": slope, "fixed_bytes": max(0.0, m0 - slope * b0), "batches": list(batches),
            "peaks": peaks, "mode": mode}


def _step(model, input_shape, context, dtype, batch, device=None):
    c, h, w = input_shape
    x = torch.randn(batch, c, h, w, dtype=dtype, device=device)
    t = torch.full((batch,), 500, device=device)
    ctx = torch.randn(batch, context[0], context[1], dtype=dtype, device=device)
    model(x, t, ctx=ctx).float().pow(2).mean().backward()


def _drop_grads(model) -> None:
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))


def _probe_tracked(unet, input_shape, context, dtype, checkpointing, batch, fake, UNet, apply_ckpt) -> float:
    """MemTracker's peak over one step, on fake tensors or real CPU tensors (the same kernels, so
    the same numbers: checked on the tiny preset, 57.88 MiB at batch 8 both ways)."""
    import contextlib
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    default = torch.get_default_dtype()
    with FakeTensorMode() if fake else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*traceable wrapper-subclass.*")
        torch.set_default_dtype(dtype)
        try:
            model = UNet(unet)
        finally:
            torch.set_default_dtype(default)
        if checkpointing:
            apply_ckpt(model, checkpointing)
        _drop_grads(model)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        mt = MemTracker()
        mt.track_external(model)
        with mt:
            _step(model, input_shape, context, dtype, batch)
        peak = sum(d.get("Total", 0) for d in mt.get_tracker_snapshot("peak").values())
    return float(peak - weights)


def _probe_cuda(unet, input_shape, context, dtype, checkpointing, batch) -> float:
    from framework.models.unet import UNet, apply_activation_checkpointing
    dev = torch.device("cuda", torch.cuda.current_device())
    with torch.device(dev):
        model = UNet(unet).to(dtype)
    if checkpointing:
        apply_activation_checkpointing(model, checkpointing)
    _drop_grads(model)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)
    _step(model, input_shape, context, dtype, batch, dev)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - start
    del model
    torch.cuda.empty_cache()
    return float(peak)


def activation_profile(w: Workload, probe: str = "auto", record: bool = True) -> Optional[dict]:
    """Bytes per image and fixed bytes of the activations for w, from the user cache, the shipped
    table, or a probe whose result is written to the user cache: "auto" (real CPU tensors for a
    model under 20M parameters, else fake tensors; never the GPU), "fake", "cpu", "device" (the
    current CUDA device). probe "off": the tables only (None when neither has it)."""
    key = _act_key(w)
    for path in (_cache_path(), TABLE_PATH):
        hit = _read_table(path).get("activations", {}).get(key)
        if hit:
            return {**hit, "source": os.path.basename(path) if path == TABLE_PATH else path}
    if probe == "off":
        return None
    mode = probe
    if probe == "auto":     # never the GPU (a trainer may be using it): real CPU tensors when small
        mode = "cpu" if model_facts(w, flops=False)["params"] < 20_000_000 else "fake"
    dtype = torch.bfloat16 if w.precision == "bf16" else torch.float32
    t0 = time.perf_counter()
    res = probe_activations(w.unet, tuple(w.input_shape), tuple(w.context), dtype,
                            False if w.ckpt_kind == "none" else w.ckpt_kind, mode=mode)
    res.update(probe_s=round(time.perf_counter() - t0, 1), torch=torch.__version__, name=w.name,
               input=list(w.input_shape), context=list(w.context), precision=w.precision,
               checkpointing=w.ckpt_kind)
    if record:
        _record(_cache_path(), "activations", key, res)
    return {**res, "source": "probe"}


def _record(path: str, section: str, key: str, value: Any) -> None:
    table = _read_table(path)
    table.setdefault(section, {})[key] = value
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


_RUNTIME_PROBE = r"""
import os, warnings
warnings.filterwarnings("ignore")
import torch, deepspeed
torch.set_num_threads(1)
from framework.train import engine as E
from framework.config import Config
E.init_distributed("cpu")
cfg = Config(); cfg.engine.zero_stage = 2; cfg.engine.micro_batch = 1; cfg.engine.device = "cpu"
model = torch.nn.Linear(8, 8)
eng, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                    config=E.build_ds_config(cfg, 1, "cpu"))
for _ in range(2):
    eng.backward(eng(torch.randn(1, 8)).pow(2).mean()); eng.step()
from framework.train.plan import peak_anon_bytes
print(peak_anon_bytes())
"""


def proc_status(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (VmHWM, VmRSS, RssAnon, RssFile, RssShmem, ...); a field
    the kernel does not report is absent."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                k, _, v = ln.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except OSError:  # pragma: no cover  (not Linux)
        pass
    return out


def peak_anon_bytes() -> float:
    """The process's peak anonymous memory (heap, tensors, thread stacks) since start or since the
    last reset of the peak (``echo 5 > /proc/self/clear_refs``): VmHWM less the file-backed and
    shared pages resident now. This, not the peak RSS, is the memory a CPU job holds and the kernel
    cannot reclaim: the RSS also counts pages of the shared libraries (torch's: ~450 MB on disk),
    which are shared between processes, reclaimable, and resident in a number that depends on the
    page cache, not on the job (measured after `import torch, deepspeed`: 80 MiB of them in one
    venv, 141 MiB in a freshly installed one; the anonymous part 161.6 MiB in both). Exact when the
    file-backed pages resident now are those resident at the peak; otherwise off by their change
    (after a warm-up step nothing new is mapped, and the kernel drops library pages only under
    memory pressure)."""
    s = proc_status("VmHWM", "RssFile", "RssShmem")
    if "VmHWM" not in s:  # pragma: no cover
        return float("nan")
    return float(s["VmHWM"] - s.get("RssFile", 0) - s.get("RssShmem", 0))


def cpu_runtime_bytes() -> float:
    """The peak anonymous memory (``peak_anon_bytes``) of a training process around a model of
    nothing: Python, torch, DeepSpeed and the framework imported, gloo initialised, a DeepSpeed
    ZeRO-2 engine over an 8x8 Linear stepped twice (what ``tools/bench.py --sections maxbatch``
    counts in its peaks besides the model). From the table, or measured once in a subprocess and
    cached. (Keyed "anon-": a cached peak RSS from before would count library pages.)"""
    key = f"anon-torch-{torch.__version__}"
    for path in (_cache_path(), TABLE_PATH):
        hit = _read_table(path).get("cpu_runtime", {}).get(key)
        if hit:
            return float(hit["bytes"])
    import subprocess
    import sys
    env = dict(os.environ, DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_=str(256 * 1024))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    try:
        rss = float(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"the CPU runtime probe failed ({p.returncode}): {p.stderr[-2000:]}") from None
    _record(_cache_path(), "cpu_runtime", key, {"bytes": rss})
    return rss


# ---------------------------------------------------------------------------------------------
# Memory per rank
# ---------------------------------------------------------------------------------------------
def _partition(numels: list[int], world: int, stage: int) -> int:
    """Elements of this rank's partition: ZeRO-3 pads every parameter to a multiple of N; ZeRO-1/2
    split one flat buffer (aligned) into N equal parts."""
    if stage == 3:
        return sum(math.ceil(n / world) for n in numels)
    return math.ceil(sum(numels) / world)


def rank_memory(w: Workload, world: int, facts: dict, act: Optional[dict], device: str = "cuda",
                micro_batch: Optional[int] = None, alloc_overhead: float = 0.05) -> dict:
    """Bytes per rank by category (see the module docstring) and ``peak``: static + the larger of
    the activations (x (1 + alloc_overhead)) and the after-backward transients."""
    P, numels = facts["params"], facts["numels"]
    s, wb, fp32 = w.zero_stage, w.weight_bytes, w.precision == "fp32"
    part = _partition(numels, world, s) if s >= 1 else P
    B = w.micro_batch if micro_batch is None else micro_batch
    m: dict[str, float] = {}
    m["params"] = wb * (part if s == 3 else P)
    if s == 3:      # gathered for the module running now and the prefetched ones
        m["params_gathered"] = wb * min(P, DS_PREFETCH_BUCKET + 2 * facts["largest_block_params"])
    if s == 0:
        m["master_fp32"] = 0 if fp32 else 4 * P
    else:
        m["master_fp32"] = 4 * part                 # a separate buffer even in fp32 (measured)
    m["optimizer"] = 8 * part                       # Adam m and v, fp32
    if s == 0:
        m["grads"] = wb * P + (0 if fp32 else 4 * P)
    elif s == 1:
        m["grads"] = wb * P + 4 * part
    elif s == 2:
        m["grads"] = wb * part + 4 * part
    else:
        m["grads"] = wb * part
    if s >= 1:
        overlap = w.overlap_comm if w.overlap_comm is not None else s == 3
        bucket = w.reduce_bucket * wb * (2 if overlap else 1)
        m["buckets"] = bucket if device == "cuda" else min(bucket, wb * P)   # CPU: pages touched
    m["ema"] = (4 * (part if s == 3 else P)) if w.ema else 0
    act_b = (act["fixed_bytes"] + B * act["bytes_per_image"]) * (1 + alloc_overhead) if act else None
    if act_b is not None:
        m["activations"] = act_b
    # after the backward, with the activations freed: the EMA update's fp32 copies of bf16 weights
    m["transient_after_backward"] = 4 * P if (w.ema and not fp32 and s < 3) else 0
    static = sum(v for k, v in m.items() if k not in ("activations", "transient_after_backward"))
    m["static"] = static
    m["peak"] = static + max(act_b or 0.0, m["transient_after_backward"])
    return m


def _usable(c: Cluster) -> float:
    return c.memory_gib * GiB - c.runtime_gib * GiB


def max_micro_batch(w: Workload, c: Cluster, facts: dict, act: Optional[dict]) -> Optional[int]:
    """Largest micro batch whose peak fits in the usable memory (0: not even 1; None: unknown)."""
    if not act or act["bytes_per_image"] <= 0:
        return None
    m = rank_memory(w, c.world, facts, act, c.device, micro_batch=0, alloc_overhead=c.alloc_overhead)
    k = 1 + c.alloc_overhead
    room = _usable(c) - m["static"] - k * act["fixed_bytes"]
    return max(0, int(room // (k * act["bytes_per_image"])))


# ---------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------
def collective_seconds(nbytes: float, c: Cluster, kind: str) -> dict:
    """A ring collective over all ranks, hierarchical over nodes (n nodes x g GPUs): reduce-scatter
    and all-gather move (g-1)/g x S through each GPU's intra-node link, then (n-1)/n x S/g per GPU
    across nodes, which the node's NICs carry together: (n-1)/n x S over inter_gbs. All-reduce is
    a reduce-scatter plus an all-gather. Bandwidths x comm_efficiency; latency ignored."""
    n, g = c.nodes, c.gpus_per_node
    k = 2 if kind == "all_reduce" else 1
    intra = k * (g - 1) / g * nbytes / (c.intra_gbs * 1e9 * c.comm_efficiency) if g > 1 else 0.0
    inter = k * (n - 1) / n * nbytes / (c.inter_gbs * 1e9 * c.comm_efficiency) if n > 1 else 0.0
    return {"intra_s": intra, "inter_s": inter, "s": intra + inter}


def comm_bytes(w: Workload, P: int) -> dict:
    """Bytes each collective carries per optimizer step (before the ring's (N-1)/N): ZeRO-0 an
    all-reduce of the gradients; ZeRO-1 a reduce-scatter of the accumulated gradients and an
    all-gather of the updated weights; ZeRO-2 the reduce-scatter at every micro step; ZeRO-3
    per micro step an all-gather of the weights in the forward and again in the backward and a
    reduce-scatter of the gradients (1.5x ZeRO-2's volume)."""
    S = w.weight_bytes * P
    a = w.grad_accum
    return {0: {"all_reduce": S},
            1: {"reduce_scatter": S, "all_gather": S},
            2: {"reduce_scatter": a * S, "all_gather": S},
            3: {"reduce_scatter": a * S, "all_gather": 2 * a * S}}[w.zero_stage]


# ---------------------------------------------------------------------------------------------
# Checkpoints and data
# ---------------------------------------------------------------------------------------------
CKPT_BYTES_PER_TENSOR = 380     # torch.save's pickle per tensor entry (measured: tiny UNet, 324 tensors)


def checkpoint_bytes(w: Workload, P: int, world: int = 1, n_tensors: int = 0) -> dict:
    """On disk per checkpoint (all ranks together): the module's weights (ZeRO-0-2:
    mp_rank_00_model_states.pt; ZeRO-3 saves partitions only, stage3_gather_16bit_weights_on_model_save
    is off), the optimizer partitions (fp32 master + Adam m, v: 12 bytes per parameter; ZeRO-0 8
    in fp32, the weights being the master), the EMA (fp32) and the export (bf16 safetensors).
    Files that hold a dict of n_tensors tensors (the module's states and the EMA: once, or on every
    rank under ZeRO-3) add CKPT_BYTES_PER_TENSOR each."""
    wb = w.weight_bytes
    s = w.zero_stage
    model = wb * P if s < 3 else 0
    optim = (12 if (s >= 1 or w.precision == "bf16") else 8) * P
    ema = 4 * P if w.ema else 0
    files = (1 + bool(w.ema)) * (world if s == 3 else 1)
    meta = files * n_tensors * CKPT_BYTES_PER_TENSOR
    return {"model": model, "optimizer": optim, "ema": ema, "metadata": meta, "total": model + optim + ema + meta,
            "export_bf16": 2 * P}


def sample_bytes(w: Workload) -> dict:
    """Bytes per training sample in the shards: pixels (JPEG, ~jpeg_bytes_per_pixel, + caption
    and json ~0.5 kB) or precomputed latents (posterior mean and std, fp16) + text embeddings
    (fp16, valid tokens only, + the mask)."""
    c, h, wd = w.input_shape
    px = w.pixel_size or (h * w.vae_factor if w.latent else h)
    L, D = w.context
    tokens = w.text_tokens or L
    pixels = w.jpeg_bytes_per_pixel * px * px + 512
    latents = 2 * c * h * wd * 2 + tokens * D * 2 + L + 256
    return {"pixel_side": px, "pixels": pixels, "latents_embeddings": latents,
            "used": latents if w.data == "latents" else pixels}


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
def _table_mfu(w: Workload, c: Cluster) -> Optional[float]:
    key = f"{w.name}|{c.device}|{c.name}"
    for path in (_cache_path(), TABLE_PATH):
        hit = _read_table(path).get("mfu", {}).get(key)
        if hit:
            return float(hit["mfu"])
    return None


def mfu_from_bench(records: list[dict], c: Cluster, variant: str = "base", model: str = "ours") -> dict[str, dict]:
    """MFU table entries (key ``preset|device|cluster``) from ``tools/bench.py --sections train``
    records of one or more runs: each preset's achieved TFLOP/s at its fastest step (the median
    over runs) over the cluster's ``peak_tflops``, the number ``make_plan`` multiplies the MFU
    with, so that the plan gives back the measured step time.

    The fastest step, not the median: on a shared machine the median moves with the neighbours
    (measured on the 2-core development machine, three runs: the base64/tiny ratio of median steps
    31.5 to 44.8, of the fastest steps 39.8 to 43.2); on a dedicated GPU the two agree. And not the
    bench's own ``mfu`` field, which is against the best peak probe of each process (matmul in one,
    conv3x3 in another, moving with the load): it would carry the ratio of two probes into the ratio
    of two presets' step times (8% between two processes of one run)."""
    train = [r for r in records if r.get("bench") == "train" and r.get("model") == model
             and r.get("variant") == variant and r.get("flops_per_image") and r.get("step_s_min")]
    if not train:
        raise ValueError(f"no train records of model {model!r}, variant {variant!r} with a FLOP count: run "
                         "tools.bench with --sections train (the count comes with it)")
    dev = {r.get("device", "cpu") for r in train}
    if dev != {c.device}:
        raise ValueError(f"the records were measured on {sorted(dev)}, cluster {c.name!r} is {c.device}")
    machines = sorted({m.get("gpu") or m.get("cpu_model") or "?" for m in
                       (r.get("machine") or {} for r in records if r.get("bench") == "env")})
    out: dict[str, dict] = {}
    for preset in sorted({r["preset"] for r in train}):
        rs = [r for r in train if r["preset"] == preset]
        med = statistics.median(r["flops_per_image"] * r["batch"] / r["step_s_min"] / 1e12 for r in rs)
        out[f"{preset}|{c.device}|{c.name}"] = {
            "mfu": round(med / c.peak_tflops, 4), "tflops": med, "peak_tflops": c.peak_tflops,
            "runs": len(rs), "batch": sorted({r["batch"] for r in rs}), "precision": rs[0].get("precision"),
            "machine": machines, "date": time.strftime("%Y-%m-%d"),
            "source": f"tools/bench.py train records, {model} {variant}: the fastest step, median of {len(rs)} run(s)"}
    return out


def record_mfu(entries: dict[str, dict], path: Optional[str] = None) -> str:
    """Write mfu_from_bench's entries to a table (default: the user cache the planner reads first)."""
    path = path or _cache_path()
    for k, v in entries.items():
        _record(path, "mfu", k, v)
    return path


def make_plan(w: Workload, c: Cluster, probe: str = "auto", act: Optional[dict] = None) -> dict:
    """Everything the planner says about w on c, as one JSON-able dict."""
    if w.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: expected 0, 1, 2 or 3, got {w.zero_stage}")
    if w.precision not in ("bf16", "fp32"):
        raise ValueError(f"precision: expected bf16 or fp32, got {w.precision!r}")
    facts = model_facts(w)
    P, N = facts["params"], c.world
    act = act if act is not None else activation_profile(w, probe)
    mem = rank_memory(w, N, facts, act, c.device, alloc_overhead=c.alloc_overhead)
    usable = _usable(c)

    # largest micro batch, without and with checkpointing (every block), and attention-only
    maxb = {}
    for kind in ("none", "all", "attention"):       # the static memory is the same for every kind
        wk = dataclasses.replace(w, activation_checkpointing=False if kind == "none" else kind)
        a = act if wk.ckpt_kind == w.ckpt_kind else activation_profile(wk, probe)
        maxb[kind] = max_micro_batch(wk, c, facts, a)

    # step time: compute at MFU (of the executed FLOPs) + exposed communication + data stalls
    mfu_src = "given"
    mfu = w.mfu
    if mfu is None:
        mfu = _table_mfu(w, c)
        mfu_src = "table"
    if mfu is None:
        mfu, mfu_src = (0.40, "assumed") if c.device == "cuda" else (0.35, "assumed (bench, tiny)")
    B, A = w.micro_batch, w.grad_accum
    compute = A * B * facts["flops_executed"] / (c.peak_tflops * 1e12 * mfu)
    vols = comm_bytes(w, P) if N > 1 else {}
    comm = {}
    for kind, nbytes in vols.items():
        comm[kind] = {"bytes": nbytes, **collective_seconds(nbytes, c, kind)}
    comm_s = sum(v["s"] for v in comm.values())
    exposed = (1 - w.overlap) * comm_s
    step = compute + exposed
    global_batch = B * A * N
    ips = global_batch / step
    sb = sample_bytes(w)
    node_mbs = ips / c.nodes * sb["used"] / 1e6
    ck = checkpoint_bytes(w, P, N, len(facts["numels"]))
    ck_write = ck["total"] / (w.storage_gbs * 1e9)
    steps = math.ceil(w.target_images / global_batch)
    run_s = steps * step + ((steps // w.ckpt_every) * ck_write if w.ckpt_every else 0.0)
    fits = mem["peak"] <= usable if "activations" in mem else None

    return {
        "workload": {"name": w.name, "input": list(w.input_shape), "context": list(w.context),
                     "precision": w.precision, "zero_stage": w.zero_stage, "ema": w.ema,
                     "activation_checkpointing": w.ckpt_kind, "micro_batch": B, "grad_accum": A,
                     "global_batch": global_batch, "data": w.data, "target_images": w.target_images},
        "cluster": dataclasses.asdict(c) | {"world": N},
        "model": {"params": P, "flops_fwd_per_image": facts["flops_fwd"],
                  "flops_fwd_bwd_per_image": facts["flops_fwd_bwd"],
                  "flops_executed_per_image": facts["flops_executed"]},
        "activations": None if act is None else {k: act.get(k) for k in
                                                 ("bytes_per_image", "fixed_bytes", "source", "mode")},
        "memory": {**{k: float(v) for k, v in mem.items()}, "device": c.memory_gib * GiB,
                   "runtime": c.runtime_gib * GiB, "usable": usable, "fits": fits,
                   "headroom": usable - mem["peak"] if fits is not None else None},
        "max_micro_batch": maxb,
        "step": {"compute_s": compute, "comm": comm, "comm_s": comm_s, "overlap": w.overlap,
                 "exposed_comm_s": exposed,
                 "step_s": step, "step_s_full_overlap": max(compute, comm_s), "mfu": mfu,
                 "mfu_source": mfu_src, "model_mfu": A * B * facts["flops_fwd_bwd"] / step /
                 (c.peak_tflops * 1e12), "images_per_s": ips, "images_per_s_per_gpu": ips / N},
        "run": {"steps": steps, "hours": run_s / 3600, "days": run_s / 86400,
                "gpu_hours": run_s / 3600 * N},
        "checkpoint": {**{k: float(v) for k, v in ck.items()}, "write_s": ck_write,
                       "storage_gbs": w.storage_gbs},
        "data": {**sb, "mb_per_s_per_node": node_mbs,
                 "mb_per_s_per_node_pixels": ips / c.nodes * sb["pixels"] / 1e6,
                 "mb_per_s_per_node_latents": ips / c.nodes * sb["latents_embeddings"] / 1e6},
    }


# ---------------------------------------------------------------------------------------------
# For the trainer
# ---------------------------------------------------------------------------------------------
def device_memory_bytes(device: Union[str, torch.device], local_world: int = 1) -> float:
    """What one rank may use: the CUDA device's total memory, or on CPU the machine's memory
    (MemTotal) shared by the ranks on it."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("MemTotal:"):
                return int(ln.split()[1]) * 1024 / max(1, local_world)
    return float("inf")  # pragma: no cover


def _workload_for(cfg: Config, device: torch.device) -> Workload:
    prec = cfg.engine.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" else "fp32"
    w = Workload.from_config(cfg, precision=prec)
    w.name = "run"
    return w


def _stored_numel(path: str) -> Optional[int]:
    """Elements in a model folder's safetensors files (one file or its shards), read from their
    headers (nothing loaded); None when the folder has none. Variants (``*.fp16.safetensors``, which
    Hub folders of SD's VAE and CLIP carry next to the full-precision file) are not what
    ``from_pretrained`` loads by default and are left out."""
    import glob
    from safetensors import safe_open
    files = sorted(f for f in glob.glob(os.path.join(path, "*.safetensors"))
                   if "." not in os.path.basename(f)[:-len(".safetensors")])
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return n


def frozen_bytes(cfg: Config, device: Union[str, torch.device]) -> dict[str, float]:
    """The frozen models a diffusion trainer holds on every rank beside the UNet: the text encoder
    when captions are encoded on the fly (``data.use_embeddings`` false), the VAE when images are
    (``vae.path`` without ``data.latents``); their stored parameter count in the dtype they are
    loaded in (``text.dtype``, ``vae.dtype``; auto: bf16 on CUDA, fp32 on CPU). A model whose
    weights are not in a local folder of safetensors files is left out."""
    if cfg.task != "diffusion":
        return {}
    device = torch.device(device)
    size = {"fp32": 4, "bf16": 2, "fp16": 2, "auto": 2 if device.type == "cuda" else 4}
    out: dict[str, float] = {}
    if not cfg.data.use_embeddings:
        from framework.models.text import resolve_encoder
        try:
            path = resolve_encoder(cfg.text.encoder)
        except Exception:                        # the trainer names that error; the plan does without
            path = ""
        n = _stored_numel(path) if os.path.isdir(path) else None
        if n:
            out["text_encoder"] = float(n * size.get(cfg.text.dtype, 4))
    if cfg.vae.path and not cfg.data.latents:
        path = os.path.expanduser(cfg.vae.path)
        n = _stored_numel(path) if os.path.isdir(path) else None
        if n:
            out["vae"] = float(n * size.get(cfg.vae.dtype, 4))
    return out


def predict_rank_memory(cfg: Config, world_size: int, device: Union[str, torch.device],
                        probe: str = "auto") -> dict:
    """Bytes per rank by category (params, master_fp32, optimizer, grads, buckets, ema, frozen,
    activations, ..., static, peak) for the run cfg on world_size ranks on ``device``, as the
    trainer will hold them. probe: "auto" (table, else a fake-tensor probe, cached), "off".
    ``frozen``: the text encoder and VAE when the trainer runs them (``frozen_bytes``)."""
    device = torch.device(device)
    w = _workload_for(cfg, device)
    facts = model_facts(w, flops=False)
    act = activation_profile(w, probe)
    m = rank_memory(w, world_size, facts, act, "cuda" if device.type == "cuda" else "cpu")
    frozen = sum(frozen_bytes(cfg, device).values())
    m["frozen"] = frozen
    m["static"] += frozen
    m["peak"] += frozen
    return m


def check_fits(cfg: Config, world_size: int, device: Union[str, torch.device],
               memory: Optional[dict] = None, local_world: int = 1, probe: str = "auto") -> Optional[str]:
    """A warning when the plan says engine.micro_batch will not fit on ``device`` (None when it
    does or the activations are unknown). ``memory``: predict_rank_memory's result, if at hand."""
    device = torch.device(device)
    mem = memory if memory is not None else predict_rank_memory(cfg, world_size, device, probe)
    if "activations" not in mem:
        return None
    total = device_memory_bytes(device, local_world)
    runtime = 1.0 * GiB if device.type == "cuda" else cpu_runtime_bytes()   # CUDA context + NCCL / the process
    usable = total - runtime
    if mem["peak"] <= usable:
        return None
    w = _workload_for(cfg, device)
    c = Cluster(name=str(device), nodes=1, gpus_per_node=world_size, memory_gib=total / GiB,
                runtime_gib=runtime / GiB, device="cuda" if device.type == "cuda" else "cpu")
    facts = model_facts(w, flops=False)
    best = max_micro_batch(w, c, facts, activation_profile(w, probe))
    hint = f"engine.micro_batch={best} fits" if best else "even micro batch 1 does not fit"
    other = []
    if w.ckpt_kind == "none":
        other.append("engine.activation_checkpointing=true")
    if w.zero_stage < 3:
        other.append(f"engine.zero_stage={w.zero_stage + 1}")
    return (f"plan: engine.micro_batch={w.micro_batch} needs ~{mem['peak'] / GiB:.1f} GiB per rank "
            f"(static {mem['static'] / GiB:.1f} GiB + activations {mem['activations'] / GiB:.1f} GiB) but "
            f"{device} has ~{usable / GiB:.1f} GiB usable: {hint}"
            + (f"; or try {', '.join(other)}" if other else ""))


def measured_peak_bytes(device: Union[str, torch.device]) -> float:
    """The peak the plan's ``peak`` is compared with: CUDA ``max_memory_allocated`` (plus nothing
    outside the allocator), on CPU the process's peak anonymous memory (``peak_anon_bytes``, which
    includes the runtime)."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return peak_anon_bytes()


def log_fields(memory: dict, measured_peak: float, device: Union[str, torch.device] = "cpu") -> dict:
    """Metrics for the trainer's first log line: the plan's categories (GiB) next to the measured
    peak. On CPU the measured peak includes the runtime the plan keeps apart: it is added here."""
    device = torch.device(device)
    out = {f"plan/{k}_gib": v / GiB for k, v in memory.items()}
    out["memory/peak_gib"] = measured_peak / GiB
    if "activations" not in memory:     # unknown (log.plan=tables, a model not in them): no peak to compare
        return out
    runtime = cpu_runtime_bytes() if device.type == "cpu" else 0.0
    planned = memory["peak"] + runtime
    out.update({"plan/peak_with_runtime_gib": planned / GiB,
                "plan/peak_over_measured": planned / measured_peak if measured_peak else float("nan")})
    return out


# ---------------------------------------------------------------------------------------------
# A readable table
# ---------------------------------------------------------------------------------------------
def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:,.2f} GiB"


def format_plan(p: dict) -> str:
    w, c, m, s = p["workload"], p["cluster"], p["memory"], p["step"]
    lines = [f"plan: {w['name'] or 'unet'} {'x'.join(map(str, w['input']))} ctx {w['context'][0]}x{w['context'][1]}, "
             f"{w['precision']}, ZeRO-{w['zero_stage']}, EMA {'on' if w['ema'] else 'off'}, "
             f"checkpointing {w['activation_checkpointing']}, micro batch {w['micro_batch']} x accum "
             f"{w['grad_accum']} x {c['world']} ranks = {w['global_batch']}",
             f"cluster: {c['name']}: {c['nodes']} node(s) x {c['gpus_per_node']}, {c['memory_gib']:.1f} GiB, "
             f"{c['peak_tflops']:g} TFLOP/s peak, links {c['intra_gbs']:g} / {c['inter_gbs']:g} GB/s "
             f"(intra per GPU / inter per node) x {c['comm_efficiency']:g}",
             f"model: {p['model']['params']:,} parameters; {p['model']['flops_fwd_bwd_per_image'] / 1e9:,.2f} "
             f"GFLOP per image fwd+bwd ({p['model']['flops_executed_per_image'] / 1e9:,.2f} executed)",
             "", "memory per rank"]
    order = ["params", "params_gathered", "master_fp32", "optimizer", "grads", "buckets", "ema", "activations",
             "transient_after_backward", "static", "peak"]
    for k in order:
        if k in m:
            lines.append(f"  {k:<26}{_gib(m[k]):>14}")
    lines.append(f"  {'runtime (outside)':<26}{_gib(m['runtime']):>14}")
    lines.append(f"  {'usable':<26}{_gib(m['usable']):>14}   fits: {m['fits']}"
                 + (f", headroom {_gib(m['headroom'])}" if m["headroom"] is not None else ""))
    a = p["activations"]
    if a:
        lines.append(f"  activations: {a['bytes_per_image'] / 2 ** 20:,.1f} MiB per image + "
                     f"{a['fixed_bytes'] / 2 ** 20:,.1f} MiB ({a['source']})")
    mb = p["max_micro_batch"]
    lines.append(f"largest micro batch: {mb['none']} (no checkpointing), {mb['all']} (every block), "
                 f"{mb['attention']} (attention only)")
    lines += ["", "step",
              f"  compute     {s['compute_s']:.3f} s at {s['mfu']:.2f} of peak ({s['mfu_source']})"]
    for k, v in s["comm"].items():
        lines.append(f"  {k:<11} {v['s']:.3f} s  ({v['bytes'] / 1e9:,.2f} GB; intra {v['intra_s']:.3f} s, "
                     f"inter {v['inter_s']:.3f} s)")
    lines += [f"  step        {s['step_s']:.3f} s ({s['overlap']:.0%} of the communication overlapped); "
              f"full overlap {s['step_s_full_overlap']:.3f} s",
              f"  throughput  {s['images_per_s']:,.1f} images/s ({s['images_per_s_per_gpu']:,.2f} per GPU), "
              f"model FLOPs utilisation {s['model_mfu']:.2f}",
              f"run: {w['target_images']:,.0f} images = {p['run']['steps']:,} steps: {p['run']['hours']:,.1f} h "
              f"({p['run']['days']:,.2f} days), {p['run']['gpu_hours']:,.0f} GPU-hours"]
    ck = p["checkpoint"]
    lines.append(f"checkpoint: {ck['total'] / 1e9:,.2f} GB on disk (model {ck['model'] / 1e9:,.2f}, "
                 f"optimizer {ck['optimizer'] / 1e9:,.2f}, EMA {ck['ema'] / 1e9:,.2f}), "
                 f"{ck['write_s']:,.1f} s at {ck['storage_gbs']:g} GB/s; export (bf16) "
                 f"{ck['export_bf16'] / 1e9:,.2f} GB")
    d = p["data"]
    lines.append(f"data: {d['used'] / 1e3:,.1f} kB per sample ({w['data']}): {d['mb_per_s_per_node']:,.1f} MB/s "
                 f"per node; pixels ({d['pixel_side']} px JPEG) {d['mb_per_s_per_node_pixels']:,.1f} MB/s, "
                 f"latents+embeddings {d['mb_per_s_per_node_latents']:,.1f} MB/s")
    return "\n".join(lines)
