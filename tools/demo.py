"""`make demo`: Fashion-MNIST end to end on a CPU machine, in about 10 minutes on 2 cores.

    python -m tools.demo                       # fresh run in runs/demo
    python -m tools.demo --resume              # continue an interrupted run (checkpoint.resume=auto)
    python -m tools.demo --nproc 4 engine.steps=1200      # extra key=value go to the training config

Phases (each timed; the times and results land in RUN/demo.json):
  1. shards    Fashion-MNIST (Debian's dataset-fashion-mnist) -> data/fmnist-train webdataset shards,
               captions from class templates ("a photo of a sneaker", ...); reused when complete
  2. train     configs/demo.yaml with DeepSpeed ZeRO-2 on --nproc CPU processes (launch/local.sh ->
               torchrun), frozen pretrained MiniLM-L6 text encoder, null-text dropout
  3. export    newest checkpoint -> RUN/export (EMA weights, safetensors, config.yaml, null.safetensors)
  4. sample    a grid of all 10 classes with classifier-free guidance -> RUN/samples/grid.png
  5. evaluate  an independent CNN classifier (trained once, cached): guided accuracy, Frechet distance
               and diversity for gamma in 0, 1, 3, 5 -> RUN/eval/{eval.json, sweep.png, grid_g*.png}
See docs/demo.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Optional
from tools._cli import entry_point

# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads made 2-thread
# sampling 2x SLOWER than 1 thread (measured: 63-69 s vs 33-47 s for 100 guided samples); passive,
# 2 threads match 1 thread under load and beat it when the machine is idle. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--data", default="data/fmnist-train", help="shard folder (built if missing)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--nproc", type=int, default=2, help="training processes (DeepSpeed ranks)")
    p.add_argument("--resume", action="store_true", help="continue RUN's newest checkpoint instead of starting fresh")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0])
    p.add_argument("--per-class", type=int, default=20, help="evaluation samples per class and gamma")
    p.add_argument("--eval-steps", type=int, default=20, help="DDIM steps for the evaluation and the grid")
    p.add_argument("--grid-scales", type=float, nargs="+", default=[1.0, 3.0], help="guidance rows of the grid")
    p.add_argument("--cache-dir", default=None, help="evaluation classifier cache")
    p.add_argument("overrides", nargs="*", help="training config overrides key=value")
    return p


def _phase(name: str) -> None:
    print(f"\n==== {name} " + "=" * max(0, 70 - len(name)), flush=True)


def build_shards(out: str) -> dict:
    """Fashion-MNIST train split -> shards (60 x 1000 PNG samples); reused when complete."""
    from framework.data.shardformat import read_manifest
    from framework.data.shards import write_shards
    from framework.data.sources import fashion_mnist_source
    manifest = os.path.join(out, "shards.json")
    if os.path.isfile(manifest):
        m = read_manifest(manifest)
        if m.get("total") == 60000 and all(os.path.isfile(os.path.join(out, s["url"])) for s in m["shards"]):
            print(f"reusing {out} ({m['total']} samples in {len(m['shards'])} shards)")
            return m
    src = fashion_mnist_source("train")
    m = write_shards(src, out, prefix="fmnist", max_count=1000, image_format="png")
    print(f"wrote {m['total']} samples in {len(m['shards'])} shards to {out}")
    return m


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the training ranks included)."""
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _threads() -> int:
    """Intra-op threads of the in-process phases (sampling, evaluation): all cores."""
    import torch
    n = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(f"{os.cpu_count()} cores (load average {load:.1f} at start), {n} intra-op threads for sampling "
          f"and evaluation, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    return n


def train_command(args) -> list[str]:
    overrides = [f"run_dir={args.run_dir}", f"data.urls=['{os.path.abspath(args.data)}']"]
    if args.resume:
        overrides.append("checkpoint.resume=auto")
    overrides += list(args.overrides)
    local = os.path.join(ROOT, "launch", "local.sh")
    if os.path.isfile(local):
        return ["bash", local, str(args.nproc), args.config, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
            "-m", "framework.train", "--config", args.config, *overrides]


def run(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if shutil.which("nvidia-smi") is None else "cuda")
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t_all, c_all = time.perf_counter(), _cpu_seconds()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = _threads()

    def timed(name):
        class T:
            def __enter__(self):
                _phase(name)
                self.t, self.c = time.perf_counter(), _cpu_seconds()

            def __exit__(self, *exc):
                times[name] = round(time.perf_counter() - self.t, 1)
                cpu[name] = round(_cpu_seconds() - self.c, 1)
                if exc[0] is None:
                    print(f"[{name}: {times[name]:.0f} s wall, {cpu[name]:.0f} s CPU]", flush=True)
        return T()

    # ---- 1. data ----------------------------------------------------------------------------------
    with timed("shards"):
        build_shards(args.data)

    # ---- 2. train ---------------------------------------------------------------------------------
    with timed("train"):
        if not args.resume and os.path.isdir(args.run_dir):
            shutil.rmtree(args.run_dir)
        cmd = train_command(args)
        print("+ " + " ".join(cmd), flush=True)
        env = dict(os.environ)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        r = subprocess.run(cmd, cwd=os.getcwd(), env=env)
        if r.returncode != 0:
            raise SystemExit(f"training failed with exit code {r.returncode}")
    steps_log = os.path.join(args.run_dir, "metrics.jsonl")
    last = {}
    if os.path.isfile(steps_log):
        with open(steps_log) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        last = rows[-1] if rows else {}

    # ---- 3. export --------------------------------------------------------------------------------
    from framework.export import export
    export_dir = os.path.join(args.run_dir, "export")
    with timed("export"):
        ex = export(args.run_dir, export_dir, weights="ema", dtype="fp32", overwrite=True)
        print(f"exported {ex['tag']} (EMA, {ex['params']:,} parameters) -> {export_dir}")

    # ---- 4. sample: a grid of all 10 classes ------------------------------------------------------
    from framework.data.sources import FASHION_CLASSES, FASHION_NOUNS, a_an
    from tools import evaluate as tool_evaluate
    from tools import sample as tool_sample
    sample_dir = os.path.join(args.run_dir, "samples")
    with timed("sample"):
        argv_s = [export_dir, "--out", sample_dir, "--steps", str(args.eval_steps), "--num-per-prompt", "4",
                  "--guidance", *[f"{g:g}" for g in args.grid_scales], "--labels", *FASHION_CLASSES]
        for noun in FASHION_NOUNS:
            argv_s += ["--prompt", a_an(f"a photo of a {noun}")]
        samples = tool_sample.run(argv_s)

    # ---- 5. evaluate ------------------------------------------------------------------------------
    eval_dir = os.path.join(args.run_dir, "eval")
    with timed("evaluate"):
        argv_e = [export_dir, "--out", eval_dir, "--per-class", str(args.per_class), "--steps",
                  str(args.eval_steps), "--gammas", *[f"{g:g}" for g in args.gammas]]
        if args.cache_dir:
            argv_e += ["--cache-dir", args.cache_dir]
        ev = tool_evaluate.run(argv_e)

    # ---- summary ----------------------------------------------------------------------------------
    times["total"] = round(time.perf_counter() - t_all, 1)
    cpu["total"] = round(_cpu_seconds() - c_all, 1)
    points = {f"{p['gamma']:g}": p for p in ev["methods"][0]["points"]}
    summary = {
        "times_s": times, "cpu_s": cpu, "machine": {"cores": os.cpu_count(), "threads": threads,
                                                     "load_at_start": round(load0, 2)},
        "train": {"step": last.get("step"), "images_seen": last.get("images_seen"), "final_loss": last.get("loss"),
                  "nproc": args.nproc, "config": os.path.abspath(args.config), "overrides": args.overrides},
        "classifier": {k: ev["classifier"][k] for k in ("accuracy", "n_train", "n_test", "epochs", "cached")},
        "sweep": {g: {k: p[k] for k in ("accuracy", "fd", "fd_floor", "diversity", "diversity_real")}
                  for g, p in points.items()},
        "files": {"grid": samples["grid"], "sweep_plot": ev["plot"],
                  "eval_json": os.path.abspath(os.path.join(eval_dir, "eval.json")),
                  "eval_grids": ev["methods"][0]["grids"], "export": os.path.abspath(export_dir)},
    }
    with open(os.path.join(args.run_dir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=1)

    _phase("demo done")
    print("phase times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print("CPU seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    print(f"evaluation classifier: held-out accuracy {ev['classifier']['accuracy']:.3f}")
    for g, p in points.items():
        print(f"  gamma={g:>3}: guided accuracy {p['accuracy']:.3f}   FD {p['fd']:7.2f} (floor {p['fd_floor']:.2f})"
              f"   diversity {p['diversity']:.2f} (real {p['diversity_real']:.2f})")
    print(f"class grid (rows: guidance {', '.join(f'{g:g}' for g in args.grid_scales)}): {samples['grid']}")
    print(f"sweep plot: {ev['plot']}")
    print(f"evaluation: {summary['files']['eval_json']} (grids per gamma next to it)")
    print(f"summary:    {os.path.abspath(os.path.join(args.run_dir, 'demo.json'))}")
    print(f"try:        .venv/bin/python -m tools.sample {export_dir} --prompt 'a photo of a dress' --guidance 0 3 -n 4")
    return summary


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
