"""Training under DeepSpeed ZeRO. The only module that imports deepspeed.

``Trainer(cfg).fit()`` (or ``train(cfg)``) is the run: setup, ``train_step`` (one optimizer step of
the task's objective, ``framework/objectives.py``) and the policy after each step, top to bottom in
comment-headed phases. Around it: ``build_ds_config`` (our config -> DeepSpeed JSON), the EMA
(``framework/ema.py``, sharded like the parameters under ZeRO-3), the noise stream
(``framework/noise.py``, indexed by global sample position so that N ranks draw what 1 rank draws),
and checkpoint save/load with client state (``framework/checkpoint.py``: layout, atomic protocol).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Optional

import torch

from framework.train import checkpoint as ckpt
from framework.config import Config, ConfigError, save_config, to_dict
from framework.dist import StopFlag, dist_env, print0, rank_seed, setup_env
from framework.train.ema import EMA, ema_decay_for
from framework.diffusion.noise import NoiseStream
from framework.train.objectives import build_objective
from framework.train.runlock import job_lock

__all__ = ["build_ds_config", "build_optimizer", "init_distributed", "shutdown_distributed", "Trainer", "train",
           "TrainResult", "NonFiniteLossError", "EMA", "NoiseStream"]

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


def shutdown_distributed() -> None:
    """Destroy the process groups at the end of a run that went well, while the interpreter is
    whole. Left to the interpreter's teardown, gloo's worker threads can abort the process
    ("terminate called without an active exception", SIGABRT) after all its work is done, and the
    launcher then reports the job failed (seen in CI: a 2-rank ZeRO-2 run, after its "done" line).
    Not after an error: ranks may then be out of step, and a collective teardown could wait."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def build_optimizer(cfg: Config, params, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW from cfg.optim (fused on CUDA): passed to DeepSpeed, which compiles nothing for it."""
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if device.type == "cuda" and o.fused:
        kw["fused"] = True
    return torch.optim.AdamW(params, **kw)


class Logger:
    """Rank 0's record of the run: metrics.jsonl, TensorBoard when installed, and on a terminal a
    progress bar; where stderr is not a terminal (SLURM, nohup, CI) a plain line per logged step
    instead, so a job's log shows progress."""

    def __init__(self, run_dir: str, cfg: Config, rank: int, total: int, start: int):
        self.rank, self.total, self.start = rank, total, start
        self.t0 = time.perf_counter()
        self.f = open(os.path.join(run_dir, "metrics.jsonl"), "a") if rank == 0 and cfg.log.jsonl else None
        if self.f and self.f.tell() > 0:   # a line cut short by a kill: end it, start anew
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
        if rank == 0 and cfg.engine.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.lines = rank == 0 and self.bar is None and cfg.log.lines

    def log(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        if self.f:
            try:
                self.f.write(json.dumps({"step": step, **metrics}) + "\n")
                self.f.flush()
            except OSError as e:     # a full disk must not kill rank 0 mid-step
                warnings.warn(f"metrics.jsonl: {e}; metrics of step {step} are not logged")
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar:
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                 img_s=f"{metrics.get('images_per_s', 0):.1f}")
        if self.lines:
            print(self.line(step, metrics, time.perf_counter() - self.t0), flush=True)

    def line(self, step: int, metrics: dict, elapsed: float) -> str:
        """'step 120/1000 (12.0%)  loss 0.0712  lr 2.00e-04  31.5 img/s  data wait 1%  bad 0.00%
        0:01:02 elapsed, eta 0:07:35'"""
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")

        def hms(s: float) -> str:
            if s != s:
                return "?"
            s = int(s)
            return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
        return (f"step {step}/{self.total} ({100 * step / max(1, self.total):.1f}%)  "
                f"loss {metrics.get('loss', float('nan')):.4f}  lr {metrics.get('lr', 0):.2e}  "
                f"{metrics.get('images_per_s', 0):.1f} img/s  "
                f"data wait {100 * metrics.get('data/wait_frac', 0):.0f}%  "
                f"bad {100 * metrics.get('data/bad_fraction', 0):.2f}%  {hms(elapsed)} elapsed, eta {hms(eta)}")

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
# The trainer
# ---------------------------------------------------------------------------------------------
class TrainResult(dict):
    """step, images_seen, losses (one per step), stopped_by_signal, checkpoint, nonfinite_skipped."""


class Trainer:
    """One run: ``Trainer(cfg).fit()``. Setup in ``__init__`` (processes, resume decision, the task's
    objective, the engine, EMA, data, resume), one optimizer step in ``train_step``, the policy after
    each step (non-finite, EMA, log, samples, checkpoint, preemption) in ``fit``.

    ``data``: an iterable of batches instead of ``cfg.data``'s shards; ``model_factory``: the trained
    network instead of the objective's; ``objective``: instead of ``build_objective(cfg)``.
    """

    def __init__(self, cfg: Config, data: Optional[Iterable] = None, model_factory=None,
                 stop: Optional[StopFlag] = None, objective=None):
        self.cfg = cfg
        e = cfg.engine
        # ---- 1. processes, devices, run directory ------------------------------------------------
        self.stop = stop or StopFlag()      # SIGTERM/SIGUSR1: finish the step, checkpoint, exit 0
        device_kind = e.device if e.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.denv = init_distributed(device_kind)
        self.rank, self.world = self.denv.rank, self.denv.world_size
        self.device_kind = device_kind
        self.device = _device(device_kind, self.denv.local_rank)
        # one trainer per run directory: rank 0 holds RUN/trainer.lock until fit() ends (or close())
        self._exit = contextlib.ExitStack()
        self._exit.enter_context(job_lock(cfg.run_dir, self.rank, share=_broadcast_from_rank0))
        try:
            self._setup(cfg, data, model_factory, objective)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory (the lock); ``fit`` does it when it ends."""
        self._exit.close()

    def _setup(self, cfg: Config, data, model_factory, objective) -> None:
        import deepspeed
        import torch.distributed as dist

        e, rank, world, device = cfg.engine, self.rank, self.world, self.device
        torch.manual_seed(rank_seed(cfg.seed, 0))           # identical initial weights on all ranks
        os.makedirs(cfg.run_dir, exist_ok=True)
        if rank == 0:
            save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        # the preemption flag is agreed on the host every step: over the default group when it is
        # gloo (CPU), else over a gloo group of its own (no device synchronisation for it)
        self._host_group = None
        if world > 1 and dist.get_backend() != "gloo":
            self._host_group = dist.new_group(backend="gloo")

        # ---- 2. what to resume from (decided before the engine: a new world size needs universal) -
        self.resume_dir = resume_dir = ckpt.find_resume(ckpt.ckpt_dir(cfg.run_dir), cfg.checkpoint.resume)
        if world > 1:   # every rank must see the same checkpoint: run_dir on a shared file system
            seen: list = [None] * world
            dist.all_gather_object(seen, os.path.basename(resume_dir) if resume_dir else None)
            if len(set(seen)) > 1:
                raise RuntimeError(f"ranks found different checkpoints to resume from ({seen}): put run_dir "
                                   f"({cfg.run_dir}) on a file system that every node shares")
        self.resume_meta = ckpt.read_meta(resume_dir) if resume_dir else None
        self.reshard = bool(self.resume_meta and self.resume_meta["world_size"] != world)
        ds_config = build_ds_config(cfg, world, self.device_kind, load_universal=self.reshard)
        self.global_batch = ds_config["train_batch_size"]
        self.dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32

        # ---- 3. the task: its objective (frozen parts stay outside the engine and zero.Init) -------
        self.objective = objective if objective is not None else build_objective(cfg)

        # ---- 4. the trained network: inside zero.Init under ZeRO-3 (no rank holds all of it) -------
        factory = model_factory or self.objective.build_model
        # dtype comes from ds_config (passing it hits a precedence bug that picks bf16 on CPU);
        # mem_efficient_linear=False: don't monkey-patch F.linear globally (the encoder uses it too)
        # ZeRO 0-2: built on its device (initialising SD2 on a GPU takes seconds, on a CPU a minute)
        init_ctx = deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False) \
            if e.zero_stage == 3 else torch.device(device)
        with init_ctx:
            model = factory()
        if e.activation_checkpointing:
            from framework.models.unet import apply_activation_checkpointing
            apply_activation_checkpointing(model, e.activation_checkpointing)
        # engine.channels_last: only the input x_t goes channels_last (in the objective); convolutions
        # then run channels_last (as fast as with converted weights). Converting the weights here
        # breaks deepspeed.initialize: its broadcast does p.data.view(torch.uint8) (needs stride 1).
        optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], device)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    lr_scheduler=self.lr_sched, config=ds_config)
        if e.compile:
            # DeepSpeed's engine.compile compiles the wrapped module in place (nn.Module.compile): the
            # engine's own forward, its hooks (ZeRO-3 gathering) and backward stay outside the graph
            self.engine.compile(backend=e.compile_backend, compile_kwargs=compile_kwargs(e))
        from framework.models.unet import CUDA_GRAPH_MODES
        self.cuda_graphs = e.compile and device.type == "cuda" and e.compile_backend == "inductor" and \
            e.compile_mode in CUDA_GRAPH_MODES
        self.ema = EMA(self.engine.module, zero3=e.zero_stage == 3)
        # the planner's memory per rank, before step 0: a warning when the micro batch will not fit
        self.plan_memory = None
        if cfg.log.plan != "off" and rank == 0:
            from framework.train.plan import check_fits, predict_rank_memory
            self.plan_memory = predict_rank_memory(cfg, world, device,
                                                   probe="auto" if cfg.log.plan == "probe" else "off")
            msg = check_fits(cfg, world, device, memory=self.plan_memory,
                             local_world=self.denv.local_world_size)
            if msg:
                warnings.warn(msg)

        # ---- 5. data, noise --------------------------------------------------------------------------
        # with aspect-ratio buckets ranks may hold different shapes in one step: eps per (draw, rank)
        self.noise = NoiseStream(cfg.seed, rank, world, device,
                                 mode="buckets" if cfg.data.buckets.enabled else "global")
        self._nonfinite_pending = torch.zeros((), dtype=torch.float64, device=device)
        self.data_wait_s = 0.0
        self.loader = None
        if data is None:
            from framework.data.loader import build_loader
            self.loader = build_loader(cfg.data, e.micro_batch, rank, world, cfg.seed)
            print0(self.loader.summary())     # shards, samples, steps, what is left out per epoch
            if cfg.data.latents:      # the shards' latents (c, h, w) must fit the UNet
                from framework.models.vae import check_latent_unet
                check_latent_unet(self.loader.latents, cfg.unet.in_channels)
        self.objective.setup(device, self.dtype, self.loader if self.loader is not None else data)

        # ---- 6. resume ---------------------------------------------------------------------------------
        self.step, self.images = 0, 0
        if resume_dir:
            self._resume()
        self.batches = iter(self.loader if self.loader is not None else data)

    def _resume(self) -> None:
        resume_dir, meta, rank, world = self.resume_dir, self.resume_meta, self.rank, self.world
        load_dir = resume_dir
        if self.reshard:
            import torch.distributed as dist
            if rank == 0:
                print0(f"resuming {resume_dir} (world size {meta['world_size']}) on {world} ranks "
                       f"through a universal checkpoint")
                ckpt.convert_to_universal(resume_dir, meta["zero_stage"])
            dist.barrier()
            load_dir = resume_dir.rstrip("/") + "_universal"
        try:   # an unreadable file (complete.json and sizes fine, bytes not) -> one line
            path, _client = self.engine.load_checkpoint(os.path.dirname(load_dir), tag=os.path.basename(load_dir))
        except (OSError, RuntimeError, EOFError, KeyError, ValueError, AssertionError) as e:
            raise ckpt.CheckpointError(
                f"cannot load checkpoint {load_dir} ({type(e).__name__}: {str(e).strip()[:200] or 'in the loader'});"
                f" resume from an older one with checkpoint.resume=TAG (complete: "
                f"{', '.join(ckpt.complete_tags(os.path.dirname(resume_dir)))})") from e
        if path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load {load_dir}")
        self.step, self.images = int(meta["step"]), int(meta["images_seen"])
        shard_files = [ckpt.ema_file(resume_dir, r) for r in range(meta["world_size"])]
        shards = [torch.load(f, map_location="cpu", weights_only=True) for f in shard_files if os.path.isfile(f)]
        self.ema.load_full(EMA.full_state(shards, meta["shapes"], meta["ema_partitioned"]), rank, world)
        rank_state = torch.load(ckpt.rank_file(resume_dir, rank if not self.reshard else 0),
                                map_location="cpu", weights_only=True)
        self.noise.load_state_dict(rank_state["noise"])   # global stream: identical on every rank
        if self.loader is not None and rank_state.get("data") is not None:
            if not self.reshard:
                self.loader.load_state_dict(rank_state["data"])
            else:   # a new world size changes which shards each rank reads: continue at the next epoch
                self.loader.load_state_dict({"epoch": int(rank_state["data"].get("epoch", 0)) + 1})
        print0(f"resumed from {resume_dir} at step {self.step} ({self.images} images)")

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> Optional[torch.Tensor]:
        """grad_accum micro steps and the optimizer step. Returns the loss (mean over ranks and micro
        steps) as a float64 device tensor, or None when a non-finite loss on any rank skipped the step
        (engine.skip_nonfinite). Reads nothing back from the device unless skip_nonfinite is on
        (then one read per micro step: whether to run backward)."""
        import torch.distributed as dist
        e = self.cfg.engine
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        skipped = False
        for _ in range(e.grad_accum):
            t0 = time.perf_counter()
            batch = next(self.batches)
            self.data_wait_s += time.perf_counter() - t0      # host time waiting for the loader
            if self.cuda_graphs:       # a new replay: the previous step's graph outputs are dead
                torch.compiler.cudagraph_mark_step_begin()
            loss = self.objective.loss(self.engine, batch, self.noise).mean()
            # agree across ranks: the loss for the log, non-finite (on the device)
            flags = torch.stack([loss.detach().double(), (~torch.isfinite(loss.detach())).double()])
            if self.world > 1:
                dist.all_reduce(flags)
            if e.skip_nonfinite:
                if flags[1].item() > 0:     # skip: no backward, no step on any rank
                    skipped = True
                    continue
            else:
                self._nonfinite_pending += flags[1]
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += flags[0] / self.world
        return None if skipped else loss_sum / e.grad_accum

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, e = self.cfg, self.cfg.engine
        logger = Logger(cfg.run_dir, cfg, self.rank, e.steps, self.step)
        result = TrainResult(step=self.step, images_seen=self.images, losses=[], stopped_by_signal=False,
                             checkpoint=None, nonfinite_skipped=0)
        pending: list[torch.Tensor] = []        # losses not yet read back from the device
        nonfinite_run, last_ckpt_step, first_log = 0, self.step, True
        t_last, img_last, log_start = time.perf_counter(), self.images, self.step
        self.data_wait_s = 0.0
        ckpt_metrics: dict = {}     # the last checkpoint's numbers, for the next metrics line

        self.engine.train()
        try:
            while self.step < e.steps:
                loss = self.train_step()

                # -- a non-finite loss skipped the step on every rank
                if loss is None:
                    result["nonfinite_skipped"] += 1
                    nonfinite_run += 1
                    if nonfinite_run >= e.max_nonfinite:
                        raise NonFiniteLossError(
                            f"{nonfinite_run} non-finite losses in a row, the last at step {self.step + 1}: "
                            f"lower optim.lr, check the data, or raise engine.max_nonfinite")
                    warnings.warn(f"non-finite loss at step {self.step + 1}: step skipped")
                    continue
                nonfinite_run = 0
                self.step += 1
                self.images += self.global_batch
                pending.append(loss)

                # -- EMA of the weights
                self.ema.update(ema_decay_for(e, self.step, self.global_batch))

                # -- log: the one read of the losses since the last log
                logger.advance()
                if self.step % e.log_every == 0 or self.step == e.steps:
                    result["losses"] += torch.stack(pending).tolist()
                    pending.clear()
                    if not e.skip_nonfinite and float(self._nonfinite_pending) > 0:
                        raise NonFiniteLossError(
                            f"non-finite loss between steps {log_start + 1} and {self.step} "
                            f"(engine.skip_nonfinite=false: the weights may be damaged): resume from the "
                            f"last checkpoint, lower optim.lr or set engine.skip_nonfinite=true")
                    now = time.perf_counter()
                    # data wait: the share of the interval the step spent waiting for the next batch
                    metrics = {"loss": result["losses"][-1], "lr": self.lr_sched.get_last_lr()[0],
                               "images_seen": self.images,
                               "images_per_s": (self.images - img_last) / max(1e-9, now - t_last),
                               "data/wait_frac": min(1.0, self.data_wait_s / max(1e-9, now - t_last))}
                    self.data_wait_s = 0.0
                    if first_log:   # once, after the first step created the optimizer state
                        metrics.update(memory_stats(self.engine, e.zero_stage == 3))
                        if self.plan_memory is not None:    # the plan next to the measured peak
                            from framework.train.plan import log_fields, measured_peak_bytes
                            metrics.update(log_fields(self.plan_memory, measured_peak_bytes(self.device),
                                                      self.device))
                        if e.compile:
                            metrics.update(compile_stats())
                        first_log = False
                    if self.loader is not None and hasattr(self.loader, "stats"):
                        metrics.update({f"data/{k}": v for k, v in self.loader.stats().items()
                                        if isinstance(v, (int, float))})
                    metrics.update(self.objective.metrics())
                    metrics.update(ckpt_metrics)
                    ckpt_metrics.clear()
                    logger.log(self.step, metrics)
                    t_last, img_last, log_start = now, self.images, self.step

                # -- sample grid: every rank takes part (ZeRO-3 forward is collective), rank 0 writes
                if e.sample_every and self.step % e.sample_every == 0 and hasattr(self.objective, "sample_grid"):
                    self.objective.sample_grid(self.engine.module, self.ema, self.step, self.rank)

                # -- checkpoint (every rank), preemption
                stopping = self._agreed_stop()
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or \
                        (stopping and cfg.checkpoint.save_on_exit):
                    # timed (checkpoint/write_s); a failed write aborts or is reported (on_write_error)
                    result["checkpoint"] = checkpoint_or_report(self.save_checkpoint, cfg, self.step,
                                                                ckpt_metrics) or result["checkpoint"]
                    last_ckpt_step = self.step
                if stopping:
                    print0(f"signal {self.stop.signum}: checkpointed at step {self.step}, exiting")
                    result["stopped_by_signal"] = True
                    break
            else:
                if cfg.checkpoint.save_on_exit and last_ckpt_step != self.step and cfg.checkpoint.every:
                    result["checkpoint"] = checkpoint_or_report(self.save_checkpoint, cfg, self.step,
                                                                ckpt_metrics) or result["checkpoint"]
        finally:
            if pending:
                result["losses"] += torch.stack(pending).tolist()
            self.stop.restore()
            logger.close()
            self.close()
        result.update(step=self.step, images_seen=self.images, engine=self.engine, ema=self.ema)
        return result

    def _agreed_stop(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1: a host-side all-reduce (gloo), no device read."""
        import torch.distributed as dist
        flag = torch.tensor([float(self.stop.signum != 0)])
        if self.world > 1:
            dist.all_reduce(flag, group=self._host_group)
        return bool(flag.numpy()[0] > 0)

    def rank_state(self) -> dict:
        return {"noise": self.noise.state_dict(),
                "data": self.loader.state_dict() if self.loader is not None else None}

    def save_checkpoint(self) -> str:
        return save_checkpoint(self.engine, self.cfg, self.denv, self.step, self.images, self.ema,
                               self.rank_state())


def train(cfg: Config, data: Optional[Iterable] = None, model_factory=None,
          stop: Optional[StopFlag] = None) -> TrainResult:
    """``Trainer(cfg, ...).fit()``: the whole run."""
    return Trainer(cfg, data=data, model_factory=model_factory, stop=stop).fit()
