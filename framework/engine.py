"""Training under DeepSpeed ZeRO. The only module that imports deepspeed.

``train(cfg)`` is the loop, top to bottom in comment-headed phases. Around it:
``build_ds_config`` (our config -> DeepSpeed JSON), ``EMA`` (sharded like the parameters under
ZeRO-3), ``NoiseStream`` (the diffusion randomness, indexed by global sample position so that a
run on N ranks draws exactly what a run on 1 rank draws), and checkpoint save/load with client
state (see ``framework/checkpoint.py`` for the layout and the atomic protocol).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Optional

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, save_config, to_dict
from .dist import StopFlag, dist_env, print0, rank_seed, setup_env

__all__ = ["build_ds_config", "EMA", "NoiseStream", "init_distributed", "train", "TrainResult",
           "NonFiniteLossError"]

warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")


class NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Distributed setup
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_kind: str):
    """Init torch.distributed through DeepSpeed for any launcher (or none: a world of one)."""
    import deepspeed
    import torch.distributed as dist

    setup_env()
    if "RANK" not in os.environ:      # plain `python -m framework.train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device_kind == "cpu":
        # the shared-memory comm op JIT-compiles for minutes on first use; gloo needs none of it
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device_kind == "cpu" else "nccl",
                                   auto_mpi_discovery=False)
    return dist_env()


def _device(cfg_device: str, local_rank: int) -> torch.device:
    if cfg_device == "auto":
        cfg_device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg_device == "cuda":
        # one GPU per task (SLURM --gpus-per-task) shows each process a single device
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(cfg_device)


# ---------------------------------------------------------------------------------------------
# DeepSpeed config from ours
# ---------------------------------------------------------------------------------------------
def _deep_update(base: dict, over: dict, path: str = "") -> list[str]:
    changed = []
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            changed += _deep_update(base[k], v, f"{path}{k}.")
        else:
            if base.get(k, object()) != v:
                changed.append(f"{path}{k}: {base.get(k, '<unset>')!r} -> {v!r}")
            base[k] = v
    return changed


def build_ds_config(cfg: Config, world_size: int, device_kind: str, load_universal: bool = False) -> dict:
    """DeepSpeed's JSON, generated from our config. Asserts global = micro x accum x world once."""
    e, o = cfg.engine, cfg.optim
    if e.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage: expected 0, 1, 2 or 3, got {e.zero_stage}")
    global_batch = e.micro_batch * e.grad_accum * world_size
    if e.global_batch and e.global_batch != global_batch:
        raise ConfigError(
            f"engine.global_batch={e.global_batch} but engine.micro_batch ({e.micro_batch}) x "
            f"engine.grad_accum ({e.grad_accum}) x world size ({world_size}) = {global_batch}")
    bf16 = e.precision == "bf16" or (e.precision == "auto" and device_kind == "cuda")
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False,
                    stage3_param_persistence_threshold=0)
    ds = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": e.micro_batch,
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    for line in _deep_update(ds, cfg.deepspeed):
        warnings.warn(f"deepspeed block overrides generated key {line}")
    return ds


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the trained weights, in fp32.

    ZeRO 0-2: a full copy on every rank. ZeRO-3: each rank holds the EMA of its own partition of
    each parameter (the same flat slice DeepSpeed gives it), updated from the fp32 master
    partition, so no rank ever holds the whole EMA. ``full_state(shards)`` re-assembles.
    """

    def __init__(self, module: torch.nn.Module, zero3: bool):
        self.zero3 = zero3
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [t.detach().clone().float() for t in self._current()]

    def _current(self) -> list[torch.Tensor]:
        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param
            return [safe_get_local_fp32_param(p).detach().flatten() for _, p in self.named]
        return [p.detach().float() for _, p in self.named]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.shadow, self._current(), 1.0 - decay)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        for s, c in zip(self.shadow, self._current()):
            s.copy_(c)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.cpu() for (n, _), s in zip(self.named, self.shadow)}

    def meta(self) -> dict[str, Any]:
        shapes = {}
        for n, p in self.named:
            shapes[n] = list(p.ds_shape) if self.zero3 else list(p.shape)
        return {"ema_partitioned": self.zero3, "shapes": shapes}

    @staticmethod
    def full_state(shards: list[dict[str, torch.Tensor]], shapes: dict[str, list[int]],
                   partitioned: bool) -> dict[str, torch.Tensor]:
        """Rank files (in rank order) -> full tensors. Partitions are contiguous flat slices."""
        if not partitioned:
            return {n: shards[0][n] for n in shapes}
        out = {}
        for n, shape in shapes.items():
            numel = math.prod(shape)
            out[n] = torch.cat([s[n].flatten() for s in shards])[:numel].view(shape).clone()
        return out

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor], rank: int, world: int) -> None:
        """Take this rank's part of full tensors (any saved world size -> the current one)."""
        missing = [n for n, _ in self.named if n not in full]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for (n, p), s in zip(self.named, self.shadow):
            src = full[n].float().flatten()
            if self.zero3:
                part = s.numel()
                chunk = src[rank * part:(rank + 1) * part]
                s.zero_()
                s[:chunk.numel()].copy_(chunk.to(s.device))
            else:
                s.copy_(src.view_as(s).to(s.device))

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily run the module with EMA weights (all ranks must enter together)."""
        if self.zero3:
            saved = [p.ds_tensor.data.clone() for _, p in self.named]
            for (_, p), s in zip(self.named, self.shadow):
                p.ds_tensor.data.copy_(s.view_as(p.ds_tensor).to(p.ds_tensor.dtype))
        else:
            saved = [p.data.clone() for _, p in self.named]
            for (_, p), s in zip(self.named, self.shadow):
                p.data.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            for (_, p), b in zip(self.named, saved):
                (p.ds_tensor if self.zero3 else p).data.copy_(b)


def ema_decay_for(cfg: Config, step: int, global_batch: int) -> float:
    e = cfg.engine
    if step < e.ema_warmup_steps:
        return 0.0
    if e.ema_halflife_images > 0:
        return 0.5 ** (global_batch / e.ema_halflife_images)
    return e.ema_decay


# ---------------------------------------------------------------------------------------------
# The diffusion randomness
# ---------------------------------------------------------------------------------------------
class NoiseStream:
    """t, eps and the null-text dropout draws for one micro step.

    mode "global" (default): every rank runs the same generator and draws the whole global micro
    batch (world x B samples), then keeps its own slice. The noise a sample gets depends on its
    global position only, so N ranks reproduce 1 rank exactly, and a resume on another world size
    continues the same stream. The extra draws cost O(global batch) random numbers per step.
    mode "rank": each rank draws only its own B samples from a rank-seeded generator.
    """

    def __init__(self, seed: int, rank: int, world: int, device: torch.device, mode: str = "global"):
        self.rank, self.world, self.mode, self.device = rank, world, mode, device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(rank_seed(seed, 0 if mode == "global" else rank, stream=1))

    def draw(self, shape: tuple, timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> t (B,) int64 in 1..T, eps (B,C,H,W), u (B,) uniform for dropout."""
        b = shape[0]
        n = b * self.world if self.mode == "global" else b
        lo = self.rank * b if self.mode == "global" else 0
        t = torch.randint(1, timesteps + 1, (n,), generator=self.gen, device=self.device)[lo:lo + b]
        eps = torch.randn((n,) + tuple(shape[1:]), generator=self.gen, device=self.device)[lo:lo + b]
        u = torch.rand((n,), generator=self.gen, device=self.device)[lo:lo + b]
        return t, eps, u

    def state_dict(self) -> dict:
        return {"mode": self.mode, "state": self.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["state"])


# ---------------------------------------------------------------------------------------------
# Pieces the loop uses
# ---------------------------------------------------------------------------------------------
def _lr_lambda(cfg: Config) -> Callable[[int], float]:
    o, steps = cfg.optim, cfg.engine.steps

    def f(step: int) -> float:
        if o.warmup_steps > 0 and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            p = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        return 1.0
    return f


def compile_stats() -> dict:
    """What torch.compile made of the model so far: graphs compiled and graph breaks (each break
    splits the step into more graphs and, under CUDA graphs, more launches)."""
    from torch._dynamo.utils import counters
    return {"compile/unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "compile/graph_breaks": int(sum(counters["graph_break"].values()))}


def compile_kwargs(ecfg) -> dict:
    """torch.compile keyword arguments for engine.compile_mode / compile_backend (mode is inductor's)."""
    return {"mode": ecfg.compile_mode} if ecfg.compile_backend == "inductor" else {}


def _optimizer(cfg: Config, params, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if device.type == "cuda" and o.fused:
        kw["fused"] = True
    return torch.optim.AdamW(params, **kw)


class _Logger:
    def __init__(self, run_dir: str, cfg: Config, rank: int, total: int, start: int):
        self.rank = rank
        self.f = open(os.path.join(run_dir, "metrics.jsonl"), "a") if rank == 0 and cfg.log.jsonl else None
        if self.f and self.f.tell() > 0:   # [ckpt-errors] a line cut short by a kill: end it, start anew
            with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self.f.write("\n")
        self.tb = None
        if rank == 0 and cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except Exception:   # tensorboard not installed: JSONL only
                self.tb = None
        self.bar = None
        if rank == 0 and cfg.engine.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            disable=None, file=sys.stderr)

    def log(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        if self.f:
            try:
                self.f.write(json.dumps({"step": step, **metrics}) + "\n")
                self.f.flush()
            except OSError as e:     # [ckpt-errors] a full disk must not kill rank 0 mid-step
                warnings.warn(f"metrics.jsonl: {e}; metrics of step {step} are not logged")
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar:
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                 img_s=f"{metrics.get('images_per_s', 0):.1f}")

    def advance(self, n: int = 1) -> None:
        if self.bar:
            self.bar.update(n)

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()
        if self.bar:
            self.bar.close()


def memory_stats(engine, zero3: bool) -> dict:
    """Elements this rank holds: parameters (its ZeRO-3 partitions, or full copies) and optimizer
    state (Adam's moments over its partition). Measured from the tensors, not from a formula."""
    params = list(engine.module.parameters())
    total = sum(p.ds_numel if zero3 else p.numel() for p in params)
    local = sum(p.ds_tensor.numel() if zero3 else p.numel() for p in params)
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    optim_local = sum(v.numel() for st in opt.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.ndim > 0)
    return {"memory/params_total": total, "memory/params_local": local, "memory/optim_local": optim_local}


def _checkpoint_meta(cfg: Config, denv, step: int, images: int, ema: Optional[EMA]) -> dict:
    return {"world_size": denv.world_size, "zero_stage": cfg.engine.zero_stage, "step": step,
            "images_seen": images, "task": cfg.task, **(ema.meta() if ema else {})}


def _broadcast_from_rank0(obj):
    """rank 0's ``obj`` on every rank (a collective: every rank calls it)."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(engine, cfg: Config, denv, step: int, images: int, ema: Optional[EMA],
                    rank_state: dict) -> str:
    """Every rank calls this (a rank-0-only save hangs DeepSpeed). Atomic: see checkpoint.py.

    A write that fails on any rank (disk full, quota, I/O error) is recorded, not raised, so that
    the rank still takes part in every collective of the save; then the ranks vote. If any rank
    failed, rank 0 removes the temporary directory and every rank raises ``CheckpointWriteError``:
    the previous checkpoint and ``latest`` are untouched."""
    import torch.distributed as dist
    directory = ckpt.ckpt_dir(cfg.run_dir)
    tmp_tag = ckpt.tmp_tag_for(step)
    tmp_dir = os.path.join(directory, tmp_tag)
    client = {"step": step, "images_seen": images, "config": to_dict(cfg),
              "world_size": denv.world_size}
    rec = ckpt.WriteRecorder(denv.rank)
    if denv.rank == 0:   # leftovers of a save killed at this step; DeepSpeed's first barrier orders it
        ckpt.discard_tmp(directory, step)
    # DeepSpeed (0.19) writes through checkpoint_engine.makedirs/save and copies its recovery
    # scripts between a barrier before and one after; recording their failures keeps this rank
    # in step with those barriers.
    ce = engine.checkpoint_engine
    ce_save, ce_makedirs = ce.save, ce.makedirs
    ce.save = rec.wrap("writing a DeepSpeed file", ce_save)
    ce.makedirs = rec.wrap("creating the checkpoint directory", ce_makedirs)
    engine._copy_recovery_script = rec.wrap("copying DeepSpeed's recovery scripts",
                                            engine._copy_recovery_script)
    try:
        engine.save_checkpoint(directory, tag=tmp_tag, client_state=client, save_latest=False)
    finally:
        ce.save, ce.makedirs = ce_save, ce_makedirs
        del engine._copy_recovery_script
    rec.run("writing the RNG/data state", torch.save, rank_state, ckpt.rank_file(tmp_dir, denv.rank))
    if ema is not None and (ema.zero3 or denv.rank == 0):
        rec.run("writing the EMA", torch.save, ema.state_dict(), ckpt.ema_file(tmp_dir, denv.rank))
    # -- the vote (it is the barrier too): every rank learns every rank's failure
    errors: list = [None] * denv.world_size
    dist.all_gather_object(errors, rec.error)
    failed = [e for e in errors if e]
    final = os.path.join(directory, ckpt.tag_for(step))
    if not failed and denv.rank == 0:   # seal: manifest, rename, latest
        rec.run("sealing the checkpoint", ckpt.finalize, directory, step,
                _checkpoint_meta(cfg, denv, step, images, ema))
        failed = [rec.error] if rec.error else []
    failed = _broadcast_from_rank0(failed)
    if failed:
        if denv.rank == 0:
            ckpt.discard_tmp(directory, step)
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise ckpt.CheckpointWriteError(
            f"checkpoint at step {step} could not be written to {directory}: {failed[0]}{more}; "
            f"the previous checkpoint and 'latest' are kept")
    if denv.rank == 0:
        try:
            ckpt.prune(directory, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
        except OSError as e:
            warnings.warn(f"pruning old checkpoints in {directory} failed: {e}")
    return final


def checkpoint_or_report(save: Callable[[], str], cfg: Config, step: int, pending: dict) -> Optional[str]:
    """One checkpoint of the loop, timed. Its numbers (``checkpoint/step``, ``checkpoint/write_s``,
    ``checkpoint/failed``) go into ``pending``, which the next logged step's metrics line takes (one
    line per logged step stays the format of metrics.jsonl). A failed write raises
    (checkpoint.on_write_error=abort) or is reported and training goes on (continue)."""
    t0 = time.perf_counter()
    try:
        path = save()
    except ckpt.CheckpointWriteError as e:
        if cfg.checkpoint.on_write_error == "abort":
            raise
        pending.update({"checkpoint/step": step, "checkpoint/write_s": time.perf_counter() - t0,
                        "checkpoint/failed": 1})
        nxt = f", next try at step {step + cfg.checkpoint.every}" if cfg.checkpoint.every else ""
        print0(f"warning: {e}; training goes on (checkpoint.on_write_error=continue){nxt}")
        return None
    dt = time.perf_counter() - t0
    pending.update({"checkpoint/step": step, "checkpoint/write_s": dt, "checkpoint/failed": 0})
    print0(f"checkpoint {os.path.basename(path)} written in {dt:.2f} s")
    return path


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class TrainResult(dict):
    """step, images_seen, losses (per logged step), stopped_by_signal, checkpoint."""


# [runlock] >>> one trainer per run directory: rank 0 holds RUN/trainer.lock for the whole run
def train(cfg: Config, data: Optional[Iterable] = None, model_factory=None,
          stop: Optional[StopFlag] = None) -> TrainResult:
    from .runlock import job_lock
    device_kind = cfg.engine.device if cfg.engine.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    denv = init_distributed(device_kind)
    _device(device_kind, denv.local_rank)      # the current CUDA device, for the broadcast
    with job_lock(cfg.run_dir, denv.rank, share=_broadcast_from_rank0):
        return _train(cfg, data, model_factory, stop)
# [runlock] <<<


def _train(cfg: Config, data: Optional[Iterable] = None, model_factory=None,
           stop: Optional[StopFlag] = None) -> TrainResult:
    import deepspeed
    import torch.distributed as dist

    from . import diffusion as D

    # ---- 1. processes, devices, run directory --------------------------------------------------
    stop = stop or StopFlag()      # SIGTERM/SIGUSR1: finish the step, checkpoint, exit 0
    device_kind = cfg.engine.device if cfg.engine.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    denv = init_distributed(device_kind)
    rank, world = denv.rank, denv.world_size
    device = _device(device_kind, denv.local_rank)
    torch.manual_seed(rank_seed(cfg.seed, 0))           # identical initial weights on all ranks
    os.makedirs(cfg.run_dir, exist_ok=True)
    if rank == 0:
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    directory = ckpt.ckpt_dir(cfg.run_dir)

    # ---- 2. what to resume from (decided before the engine: a new world size needs universal) ---
    resume_dir = ckpt.find_resume(directory, cfg.checkpoint.resume)
    if world > 1:   # every rank must see the same checkpoint: run_dir has to be on a shared file system
        seen: list = [None] * world
        dist.all_gather_object(seen, os.path.basename(resume_dir) if resume_dir else None)
        if len(set(seen)) > 1:
            raise RuntimeError(f"ranks found different checkpoints to resume from ({seen}): put run_dir "
                               f"({cfg.run_dir}) on a file system that every node shares")
    resume_meta = ckpt.read_meta(resume_dir) if resume_dir else None
    reshard = bool(resume_meta and resume_meta["world_size"] != world)
    load_dir = resume_dir
    if reshard:
        if rank == 0:
            print0(f"resuming {resume_dir} (world size {resume_meta['world_size']}) on {world} ranks "
                   f"through a universal checkpoint")
            ckpt.convert_to_universal(resume_dir, resume_meta["zero_stage"])
        dist.barrier()
        load_dir = resume_dir.rstrip("/") + "_universal"
    ds_config = build_ds_config(cfg, world, device_kind, load_universal=reshard)
    global_batch = ds_config["train_batch_size"]
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32

    # ---- 3. frozen text encoder: outside the engine and outside zero.Init ------------------------
    encoder, null = None, None
    if cfg.task == "diffusion":
        from .text import TextEncoder
        if not cfg.data.use_embeddings:
            encoder = TextEncoder(cfg.text, device=device)
            null = encoder.null(1)
            _check_widths(cfg, encoder.dim, encoder.pooled_dim, f"text encoder {encoder.path}")

    # ---- 4. the trained network: inside zero.Init under ZeRO-3 (no rank holds all of it) --------
    if model_factory is None:
        model_factory = build_model_factory(cfg)
    # dtype comes from ds_config (passing it hits a precedence bug that picks bf16 on CPU);
    # mem_efficient_linear=False: don't monkey-patch F.linear globally (the encoder uses it too)
    init_ctx = deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False) \
        if cfg.engine.zero_stage == 3 else contextlib.nullcontext()
    with init_ctx:
        model = model_factory()
    if cfg.engine.activation_checkpointing:
        from .unet import apply_activation_checkpointing
        apply_activation_checkpointing(model, cfg.engine.activation_checkpointing)
    # engine.channels_last: only the input x_t goes channels_last (below, in the loop); convolutions
    # then run channels_last (as fast as with converted weights). Converting the weights here breaks
    # deepspeed.initialize: its broadcast does p.data.view(torch.uint8), which needs stride(-1) == 1.
    optimizer = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad], device)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_sched,
                                           config=ds_config)
    if cfg.engine.compile:
        # DeepSpeed's engine.compile compiles the wrapped module in place (nn.Module.compile): the
        # engine's own forward, its hooks (ZeRO-3 gathering) and backward stay outside the graph
        engine.compile(backend=cfg.engine.compile_backend, compile_kwargs=compile_kwargs(cfg.engine))
    forward = engine
    from .unet import CUDA_GRAPH_MODES
    cuda_graphs = cfg.engine.compile and device.type == "cuda" and \
        cfg.engine.compile_backend == "inductor" and cfg.engine.compile_mode in CUDA_GRAPH_MODES
    ema = EMA(engine.module, zero3=cfg.engine.zero_stage == 3)
    sched = D.Schedule.from_config(cfg.diffusion)

    # ---- 5. data ---------------------------------------------------------------------------------
    noise = NoiseStream(cfg.seed, rank, world, device)
    loader = None
    if data is None:
        from .data import build_loader
        loader = build_loader(cfg.data, cfg.engine.micro_batch, rank, world, cfg.seed)
        if cfg.data.use_embeddings:
            null = loader.null_condition()
    if null is not None:
        null = null.to(device)

    # ---- 6. resume -----------------------------------------------------------------------------
    step, images = 0, 0
    if resume_dir:
        try:   # [ckpt-errors] an unreadable file (complete.json and sizes fine, bytes not) -> one line
            path, _client = engine.load_checkpoint(os.path.dirname(load_dir), tag=os.path.basename(load_dir))
        except (OSError, RuntimeError, EOFError, KeyError, ValueError, AssertionError) as e:
            raise ckpt.CheckpointError(
                f"cannot load checkpoint {load_dir} ({type(e).__name__}: {str(e).strip()[:200] or 'in the loader'});"
                f" resume "
                f"from an older one with checkpoint.resume=TAG (complete: "
                f"{', '.join(ckpt.complete_tags(directory))})") from e
        if path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load {load_dir}")
        step, images = int(resume_meta["step"]), int(resume_meta["images_seen"])
        shard_files = [ckpt.ema_file(resume_dir, r) for r in range(resume_meta["world_size"])]
        shards = [torch.load(f, map_location="cpu", weights_only=True)
                  for f in shard_files if os.path.isfile(f)]
        ema.load_full(EMA.full_state(shards, resume_meta["shapes"], resume_meta["ema_partitioned"]),
                      rank, world)
        rank_state = torch.load(ckpt.rank_file(resume_dir, rank if not reshard else 0),
                                map_location="cpu", weights_only=True)
        noise.load_state_dict(rank_state["noise"])   # global stream: identical on every rank
        if not reshard and loader is not None and rank_state.get("data") is not None:
            loader.load_state_dict(rank_state["data"])
        elif loader is not None and rank_state.get("data") is not None:
            # a new world size changes which shards each rank reads: continue at the next epoch
            loader.load_state_dict({"epoch": int(rank_state["data"].get("epoch", 0)) + 1})
        print0(f"resumed from {resume_dir} at step {step} ({images} images)")
    data_iter = iter(loader if loader is not None else data)

    # ---- 7. train ------------------------------------------------------------------------------
    logger = _Logger(cfg.run_dir, cfg, rank, cfg.engine.steps, step)
    result = TrainResult(step=step, images_seen=images, losses=[], stopped_by_signal=False,
                         checkpoint=None, nonfinite_skipped=0)
    nonfinite_run, last_ckpt_step = 0, step
    memory_logged = False
    t_last, img_last = time.perf_counter(), images
    ckpt_metrics: dict = {}     # [ckpt-errors] the last checkpoint's numbers, for the next metrics line

    def rank_state() -> dict:
        return {"noise": noise.state_dict(),
                "data": loader.state_dict() if loader is not None else None}

    engine.train()
    try:
        while step < cfg.engine.steps:
            loss_sum, nonfinite = 0.0, 0.0
            for _ in range(cfg.engine.grad_accum):
                # -- batch -> condition (frozen encoder or precomputed) -> null-text dropout
                batch = next(data_iter)
                x0 = batch["image"].to(device, non_blocking=True).float()
                t, eps, u = noise.draw(tuple(x0.shape), sched.T)
                cond_kwargs = {}
                if cfg.task == "diffusion":
                    cond_kwargs = _condition(cfg, batch, encoder, null, u, device, dtype)
                # -- forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; eps_theta(x_t, t, y)
                x_t = D.q_sample(sched, x0, t, eps)
                if cfg.engine.channels_last:
                    x_t = x_t.contiguous(memory_format=torch.channels_last)
                if cuda_graphs:     # a new replay: the previous step's graph outputs are dead
                    torch.compiler.cudagraph_mark_step_begin()
                out = forward(x_t.to(dtype), t, **cond_kwargs).float()
                if cfg.task == "classifier":
                    # -- noisy classifier p(y | x_t, t): cross-entropy on the noised image
                    # (labels: json `label`, or classifier.class_names matched in the captions)
                    from .classifier import batch_labels
                    per_sample = torch.nn.functional.cross_entropy(
                        out, batch_labels(batch, cfg.classifier).to(device), reduction="none")
                else:
                    # -- L_simple per sample (or the configured prediction / weighting), mean
                    per_sample = D.training_loss(sched, out, x0, t, eps, prediction=cfg.diffusion.prediction,
                                                 min_snr_gamma=cfg.diffusion.min_snr_gamma)
                loss = per_sample.mean()
                # -- agree across ranks: loss for the log, non-finite, stop signal
                flags = torch.tensor([loss.detach().float().item(), float(not torch.isfinite(loss)),
                                      float(stop.signum != 0)], dtype=torch.float64)
                if world > 1:
                    flags = flags.to(device)
                    dist.all_reduce(flags)
                    flags = flags.cpu()
                if flags[1] > 0:   # skip: no backward, no step on any rank
                    nonfinite += 1
                    continue
                engine.backward(loss)
                engine.step()
                loss_sum += float(flags[0]) / world
            if nonfinite:
                result["nonfinite_skipped"] += 1
                nonfinite_run += 1
                if nonfinite_run >= cfg.engine.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{nonfinite_run} non-finite losses in a row, the last at step {step + 1}: "
                        f"lower optim.lr, check the data, or raise engine.max_nonfinite")
                warnings.warn(f"non-finite loss at step {step + 1}: step skipped")
                continue
            nonfinite_run = 0
            step += 1
            images += global_batch

            # -- EMA of the weights
            ema.update(ema_decay_for(cfg, step, global_batch))

            # -- log
            loss_val = loss_sum / cfg.engine.grad_accum
            result["losses"].append(loss_val)
            logger.advance()
            if step % cfg.engine.log_every == 0 or step == cfg.engine.steps:
                now = time.perf_counter()
                metrics = {"loss": loss_val, "lr": lr_sched.get_last_lr()[0], "images_seen": images,
                           "images_per_s": (images - img_last) / max(1e-9, now - t_last)}
                if not memory_logged:   # once, after the first step created the optimizer state
                    metrics.update(memory_stats(engine, cfg.engine.zero_stage == 3))
                    if cfg.engine.compile:
                        metrics.update(compile_stats())
                    memory_logged = True
                if loader is not None and hasattr(loader, "stats"):
                    metrics.update({f"data/{k}": v for k, v in loader.stats().items()
                                    if isinstance(v, (int, float))})
                metrics.update(ckpt_metrics)     # [ckpt-errors]
                ckpt_metrics.clear()
                logger.log(step, metrics)
                t_last, img_last = now, images

            # -- sample grid: every rank takes part (ZeRO-3 forward is collective), rank 0 writes
            if cfg.engine.sample_every and step % cfg.engine.sample_every == 0 and encoder is not None:
                _sample_grid(cfg, engine.module, ema, encoder, null, sched, device, dtype, step, rank)

            # -- checkpoint (every rank), preemption
            stopping = flags[2] > 0
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or \
                    (stopping and cfg.checkpoint.save_on_exit):
                result["checkpoint"] = checkpoint_or_report(   # [ckpt-errors] timed, on_write_error
                    lambda: save_checkpoint(engine, cfg, denv, step, images, ema, rank_state()),
                    cfg, step, ckpt_metrics) or result["checkpoint"]
                last_ckpt_step = step
            if stopping:
                print0(f"signal {stop.signum}: checkpointed at step {step}, exiting")
                result["stopped_by_signal"] = True
                break
        else:
            if cfg.checkpoint.save_on_exit and last_ckpt_step != step and cfg.checkpoint.every:
                result["checkpoint"] = checkpoint_or_report(   # [ckpt-errors] timed, on_write_error
                    lambda: save_checkpoint(engine, cfg, denv, step, images, ema, rank_state()),
                    cfg, step, ckpt_metrics) or result["checkpoint"]
    finally:
        stop.restore()
        logger.close()
    result.update(step=step, images_seen=images)
    result["engine"], result["ema"] = engine, ema
    return result


def build_model_factory(cfg: Config) -> Callable[[], torch.nn.Module]:
    """The trained network for cfg.task (called inside zero.Init under ZeRO-3)."""
    if cfg.task == "classifier":
        from .classifier import NoisyClassifier
        return lambda: NoisyClassifier(cfg.unet, cfg.classifier)
    from .unet import UNet
    return lambda: UNet(cfg.unet)


def _check_widths(cfg: Config, dim: int, pooled_dim: int, source: str) -> None:
    if cfg.unet.context_dim != dim:
        raise ConfigError(f"unet.context_dim={cfg.unet.context_dim} but the {source} gives {dim}-dim "
                          f"tokens: set unet.context_dim={dim}")
    if cfg.text.pooled and cfg.unet.pooled_dim != pooled_dim:
        raise ConfigError(f"text.pooled is on: set unet.pooled_dim={pooled_dim} (the {source}'s width), "
                          f"not {cfg.unet.pooled_dim}")


def _condition(cfg: Config, batch: dict, encoder, null, u: torch.Tensor, device, dtype) -> dict:
    """Caption -> (ctx, ctx_mask[, pooled]) with null-text dropout: where u < p_uncond the sample
    gets exactly the null condition that classifier-free sampling uses."""
    from .text import Condition
    if "ctx" in batch:
        cond = Condition(ctx=batch["ctx"].to(device).float(), mask=batch["ctx_mask"].to(device),
                         pooled=batch.get("pooled").to(device) if batch.get("pooled") is not None else None)
    else:
        cond = encoder.encode(list(batch["caption"]))
    drop = u < cfg.text.p_uncond
    cond = cond.where(drop, null)
    kw = cond.as_kwargs()
    return {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in kw.items()}


@torch.no_grad()
def _sample_grid(cfg: Config, module, ema: EMA, encoder, null, sched, device, dtype, step: int, rank: int):
    from .images import save_grid
    from .sampling import cfg_model, ddim_sample

    s = cfg.sample
    prompts = s.prompts or ["a photo"]
    cond = encoder.encode(prompts)
    uncond = encoder.encode([s.negative_prompt] * len(prompts)) if s.negative_prompt else \
        null.expand(len(prompts))
    g = torch.Generator(device=device).manual_seed(s.seed)
    c = cfg.unet.in_channels
    x_T = torch.randn((len(prompts), c, cfg.data.image_size, cfg.data.image_size), generator=g, device=device)

    def model(x, t, kw):
        return module(x.to(dtype), t, **{k: (v.to(dtype) if v is not None and v.is_floating_point() else v)
                                         for k, v in kw.items()}).float()
    was_training = module.training
    module.eval()
    with ema.swapped_in():
        fn = cfg_model(model, cond.as_kwargs(), uncond.as_kwargs(), s.guidance_scale, rescale=s.rescale)
        x0 = ddim_sample(fn, x_T, sched, steps=s.steps, eta=s.eta, generator=g,
                         prediction=cfg.diffusion.prediction)
    module.train(was_training)
    if rank == 0:
        save_grid(x0, os.path.join(cfg.run_dir, "samples", f"step{step:08d}.png"),
                  nrow=min(len(prompts), 10), scale=2)
