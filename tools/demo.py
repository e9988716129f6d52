"""`make demo`: Fashion-MNIST end to end on a CPU machine, in about 12 minutes on 2 cores.

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

    python -m tools.demo --latent              # latent diffusion end to end in runs/latent-demo (make demo-latent)
    python -m tools.demo --latent --dataset openmoji      # the same in colour on OpenMoji (a decoded grid)

The latent demo (docs/latent.md, ~16 minutes on 2 cores): shards as above (+ the test split, held out) -> a small KL
autoencoder trained with task=autoencoder (diffusers AutoencoderKL, configs/vae/demo.yaml) -> its export
(held-out PSNR, scaling factor = 1/latent std) -> tools.precompute_latents (posterior mean/std fp16
per image) and the caption embeddings (frozen MiniLM) -> the latent UNet (configs/latent_demo.yaml)
trained on latents and embeddings only (no image decode, no VAE, no text encoder on the trainers) ->
export (vae/ inside) -> grid and evaluation on the decoded images, as the pixel demo.
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


# Per dataset: shard folders, configs (relative to configs/), run folder; OpenMoji has no test split
# and no evaluation classifier: its autoencoder PSNR is measured on training glyphs and its result is
# a decoded grid of these prompts.
DATASETS = {
    "fashion": dict(data="data/fmnist-train", test_data="data/fmnist-test", vae_config="vae/demo.yaml",
                    config="latent_demo.yaml", run_dir="runs/latent-demo"),
    "openmoji": dict(data="data/openmoji-32", test_data=None, vae_config="vae/openmoji.yaml",
                     config="latent_openmoji.yaml", run_dir="runs/latent-openmoji"),
}
OPENMOJI_PROMPTS = ["red apple", "green apple", "grinning face", "smiling face with heart-eyes", "dog face",
                    "cat face", "sun", "fire", "red heart", "blue heart", "rocket", "automobile", "tangerine",
                    "evergreen tree", "snowman", "flag: Japan"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", action="store_true", help="the latent-diffusion demo (docs/latent.md)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="fashion",
                   help="--latent: Fashion-MNIST (evaluated) or OpenMoji (RGB, a decoded grid)")
    p.add_argument("--run-dir", default=None, help="default runs/demo (runs/latent-demo with --latent)")
    p.add_argument("--data", default=None, help="shard folder (built if missing; default per dataset)")
    p.add_argument("--config", default=None, help="default configs/demo.yaml (configs/latent_demo.yaml)")
    p.add_argument("--vae-config", default=None, help="--latent: the autoencoder's training config")
    p.add_argument("--test-data", default=None, help="--latent: held-out shards (built if missing)")
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


SPLITS = {"train": 60000, "test": 10000}


def build_shards(out: str, split: str = "train") -> dict:
    """A Fashion-MNIST split -> shards of 1000 PNG samples (train 60, test 10); reused when complete."""
    from framework.data.shardformat import read_manifest
    from framework.data.shards import write_shards
    from framework.data.sources import fashion_mnist_source
    manifest = os.path.join(out, "shards.json")
    if os.path.isfile(manifest):
        m = read_manifest(manifest)
        if m.get("total") == SPLITS[split] and all(os.path.isfile(os.path.join(out, s["url"])) for s in m["shards"]):
            print(f"reusing {out} ({m['total']} samples in {len(m['shards'])} shards)")
            return m
    src = fashion_mnist_source(split)
    m = write_shards(src, out, prefix=f"fmnist-{split}" if split != "train" else "fmnist", max_count=1000,
                     image_format="png")
    print(f"wrote {m['total']} samples in {len(m['shards'])} shards to {out}")
    return m


def build_openmoji(out: str, size: int = 32) -> dict:
    """OpenMoji glyphs at ``size`` px (RGB on white, CLDR names as captions); reused when complete."""
    from framework.data.shardformat import read_manifest
    from framework.data.shards import write_shards
    from framework.data.sources import openmoji_source
    manifest = os.path.join(out, "shards.json")
    if os.path.isfile(manifest):
        m = read_manifest(manifest)
        if m.get("total") and all(os.path.isfile(os.path.join(out, s["url"])) for s in m["shards"]):
            print(f"reusing {out} ({m['total']} samples in {len(m['shards'])} shards)")
            return m
    m = write_shards(openmoji_source(size), out, prefix="openmoji", max_count=500, image_format="png")
    print(f"wrote {m['total']} OpenMoji glyphs in {len(m['shards'])} shards to {out}")
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


class Phases:
    """Times each phase (wall and CPU seconds, the training ranks included) into ``times`` / ``cpu``."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.t0, self.c0 = time.perf_counter(), _cpu_seconds()

    def __call__(self, name: str):
        phases = self

        class T:
            def __enter__(self):
                _phase(name)
                self.t, self.c = time.perf_counter(), _cpu_seconds()

            def __exit__(self, *exc):
                phases.times[name] = round(time.perf_counter() - self.t, 1)
                phases.cpu[name] = round(_cpu_seconds() - self.c, 1)
                if exc[0] is None:
                    print(f"[{name}: {phases.times[name]:.0f} s wall, {phases.cpu[name]:.0f} s CPU]", flush=True)
        return T()

    def total(self) -> None:
        self.times["total"] = round(time.perf_counter() - self.t0, 1)
        self.cpu["total"] = round(_cpu_seconds() - self.c0, 1)


def train_command(nproc: int, config: str, overrides: list[str]) -> list[str]:
    local = os.path.join(ROOT, "launch", "local.sh")
    if os.path.isfile(local):
        return ["bash", local, str(nproc), config, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "framework.train", "--config", config, *overrides]


def train(nproc: int, config: str, run_dir: str, overrides: list[str], resume: bool, clean: bool = True) -> dict:
    """``framework.train`` on ``nproc`` CPU processes (``run_dir`` removed first unless ``resume`` or not
    ``clean``); -> the last metrics row."""
    if clean and not resume and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    cmd = train_command(nproc, config, [f"run_dir={run_dir}"] + (["checkpoint.resume=auto"] if resume else [])
                        + list(overrides))
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(cmd, cwd=os.getcwd(), env=env)
    if r.returncode != 0:
        raise SystemExit(f"training ({config}) failed with exit code {r.returncode}")
    rows = []
    steps_log = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(steps_log):
        with open(steps_log) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
    return next((r for r in reversed(rows) if "loss" in r), rows[-1] if rows else {})


def export_sample_evaluate(args, phase: Phases, prompts: Optional[list[str]] = None) -> dict:
    """Phases 3-5 of the demos: export the newest checkpoint (EMA), a class grid, the evaluation
    (Fashion-MNIST); with ``prompts`` a grid of them and no evaluation."""
    from framework.export import export
    export_dir = os.path.join(args.run_dir, "export")
    with phase("export"):
        ex = export(args.run_dir, export_dir, weights="ema", dtype="fp32", overwrite=True)
        print(f"exported {ex['tag']} (EMA, {ex['params']:,} parameters) -> {export_dir}")

    from framework.data.sources import FASHION_CLASSES, FASHION_NOUNS, a_an
    from tools import evaluate as tool_evaluate
    from tools import sample as tool_sample
    sample_dir = os.path.join(args.run_dir, "samples")
    with phase("sample"):
        argv_s = [export_dir, "--out", sample_dir, "--steps", str(args.eval_steps), "--num-per-prompt", "4",
                  "--guidance", *[f"{g:g}" for g in args.grid_scales]]
        if prompts is None:
            argv_s += ["--labels", *FASHION_CLASSES]
            prompts = [a_an(f"a photo of a {noun}") for noun in FASHION_NOUNS]
        for prompt in prompts:
            argv_s += ["--prompt", prompt]
        samples = tool_sample.run(argv_s)
    if args.latent and args.dataset != "fashion":
        return {"export": export_dir, "samples": samples}

    eval_dir = os.path.join(args.run_dir, "eval")
    with phase("evaluate"):
        argv_e = [export_dir, "--out", eval_dir, "--per-class", str(args.per_class), "--steps",
                  str(args.eval_steps), "--gammas", *[f"{g:g}" for g in args.gammas]]
        if args.cache_dir:
            argv_e += ["--cache-dir", args.cache_dir]
        ev = tool_evaluate.run(argv_e)
    points = {f"{p['gamma']:g}": p for p in ev["methods"][0]["points"]}
    return {"export": export_dir, "samples": samples, "eval": ev, "eval_dir": eval_dir, "points": points}


def summarize(args, phase: Phases, threads: int, load0: float, last: dict, res: dict, extra: dict) -> dict:
    phase.total()
    ev, points = res.get("eval"), res.get("points", {})
    summary = {
        "times_s": phase.times, "cpu_s": phase.cpu,
        "machine": {"cores": os.cpu_count(), "threads": threads, "load_at_start": round(load0, 2)},
        "train": {"step": last.get("step"), "images_seen": last.get("images_seen"), "final_loss": last.get("loss"),
                  "nproc": args.nproc, "config": os.path.abspath(args.config), "overrides": args.overrides},
        **extra,
        "files": {"grid": res["samples"]["grid"], "export": os.path.abspath(res["export"])},
    }
    if ev is not None:
        summary["classifier"] = {k: ev["classifier"][k] for k in ("accuracy", "n_train", "n_test", "epochs", "cached")}
        summary["sweep"] = {g: {k: p[k] for k in ("accuracy", "fd", "fd_floor", "diversity", "diversity_real")}
                            for g, p in points.items()}
        summary["files"].update(sweep_plot=ev["plot"], eval_grids=ev["methods"][0]["grids"],
                                eval_json=os.path.abspath(os.path.join(res["eval_dir"], "eval.json")))
    with open(os.path.join(args.run_dir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=1)

    _phase("demo done")
    print("phase times: " + ", ".join(f"{k} {v:.0f} s" for k, v in phase.times.items()))
    print("CPU seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in phase.cpu.items()))
    if "vae" in extra:
        v = extra["vae"]
        print(f"autoencoder: PSNR {v['psnr']:.2f} dB ({v['held_out']}), latents {v['latent_shape']}, "
              f"scaling factor {v['scaling_factor']:.4f}")
    if ev is not None:
        print(f"evaluation classifier: held-out accuracy {ev['classifier']['accuracy']:.3f}")
        for g, p in points.items():
            print(f"  gamma={g:>3}: guided accuracy {p['accuracy']:.3f}   FD {p['fd']:7.2f} (floor {p['fd_floor']:.2f})"
                  f"   diversity {p['diversity']:.2f} (real {p['diversity_real']:.2f})")
    print(f"grid (rows: guidance {', '.join(f'{g:g}' for g in args.grid_scales)}): {res['samples']['grid']}")
    if ev is not None:
        print(f"sweep plot: {ev['plot']}")
        print(f"evaluation: {summary['files']['eval_json']} (grids per gamma next to it)")
    print(f"summary:    {os.path.abspath(os.path.join(args.run_dir, 'demo.json'))}")
    example = "a photo of a dress" if ev is not None else OPENMOJI_PROMPTS[0]
    print(f"try:        .venv/bin/python -m tools.sample {res['export']} --prompt '{example}' --guidance 0 3 -n 4")
    return summary


def run_pixel(args, phase: Phases, threads: int, load0: float) -> dict:
    with phase("shards"):
        build_shards(args.data)
    with phase("train"):
        last = train(args.nproc, args.config, args.run_dir,
                     [f"data.urls=['{os.path.abspath(args.data)}']"] + list(args.overrides), args.resume)
    res = export_sample_evaluate(args, phase)
    return summarize(args, phase, threads, load0, last, res, {})


def run_latent(args, phase: Phases, threads: int, load0: float) -> dict:
    """The latent demo: autoencoder -> latents + embeddings -> latent UNet -> decoded samples."""
    from framework.config import load_config
    from framework.data.latents import precompute_latents
    from framework.data.precompute import text_encoder_info
    from framework.models.autoencoder import export_autoencoder
    from framework.models.text import TextEncoder
    from framework.models.vae import FrozenVAE

    vae_run, vae_dir = os.path.join(args.run_dir, "vae-run"), os.path.join(args.run_dir, "vae")
    lat_dir = os.path.join(args.run_dir, "latents")
    fashion = args.dataset == "fashion"
    with phase("shards"):
        if fashion:
            build_shards(args.data, "train")
            build_shards(args.test_data, "test")
        else:
            build_openmoji(args.data)
    held_out = args.test_data if fashion else args.data
    held_out_label = "1000 held-out test images" if fashion else "1000 training glyphs (no test split)"
    if args.resume and os.path.isfile(os.path.join(lat_dir, "shards.json")):
        print(f"--resume: reusing {vae_dir} and {lat_dir}")
        vae_info = json.load(open(os.path.join(args.run_dir, "vae.json")))
    else:
        if os.path.isdir(args.run_dir):
            shutil.rmtree(args.run_dir)
        with phase("autoencoder"):
            vlast = train(args.nproc, args.vae_config, vae_run, [f"data.urls=['{os.path.abspath(args.data)}']"],
                          False)
        with phase("vae export"):
            s = export_autoencoder(vae_run, vae_dir, data_urls=[os.path.abspath(held_out)],
                                   max_samples=1000, overwrite=True)
            ev = s["evaluation"]
            vae_info = {"psnr": ev["psnr"], "psnr_mean": ev.get("psnr_mean"), "latent_std": ev["latent_std"],
                        "scaling_factor": s["scaling_factor"], "train_steps": vlast.get("step"),
                        "train_images": vlast.get("images_seen"), "params": s.get("params"),
                        "config": os.path.abspath(args.vae_config), "held_out": held_out_label}
            print(f"PSNR {ev['psnr']:.2f} dB ({held_out_label}), latent std "
                  f"{[round(x, 3) for x in ev['latent_std']]} -> scaling factor {s['scaling_factor']:.4f}")
        cfg = load_config(args.config, list(args.overrides))
        with phase("latents"):      # posterior mean/std and the caption embeddings, one pass
            vae = FrozenVAE(vae_dir, device="cpu")
            enc = TextEncoder(cfg.text, device="cpu")
            m = precompute_latents(os.path.abspath(args.data), lat_dir, vae, cfg.data, batch_size=250, wait_s=60,
                                   text_encoder=enc, text_info=text_encoder_info(cfg.text),
                                   log=lambda line: print(line, flush=True))     # a line per shard
            lat = m["latents"]
            vae_info["latent_shape"] = lat["shape"]
            print(f"{m['total']} latents {lat['shape']} + caption embeddings in {len(m['shards'])} shards")
        with open(os.path.join(args.run_dir, "vae.json"), "w") as f:
            json.dump(vae_info, f, indent=1)
    with phase("train"):
        last = train(args.nproc, args.config, args.run_dir,
                     [f"data.urls=['{os.path.abspath(lat_dir)}']", f"vae.path={os.path.abspath(vae_dir)}"]
                     + list(args.overrides), args.resume and os.path.isdir(os.path.join(args.run_dir, "checkpoints")),
                     clean=False)    # RUN holds the autoencoder and the latents too
    res = export_sample_evaluate(args, phase, None if fashion else OPENMOJI_PROMPTS)
    return summarize(args, phase, threads, load0, last, res, {"vae": vae_info})


def run(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    d = DATASETS[args.dataset] if args.latent else dict(data="data/fmnist-train", run_dir="runs/demo",
                                                        config="demo.yaml")
    for key in ("data", "test_data", "run_dir"):
        if getattr(args, key, None) is None:
            setattr(args, key, d.get(key))
    for key in ("config", "vae_config"):
        if getattr(args, key, None) is None and d.get(key):
            setattr(args, key, os.path.join(ROOT, "configs", d[key]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if shutil.which("nvidia-smi") is None else "cuda")
    phase = Phases()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = _threads()
    return (run_latent if args.latent else run_pixel)(args, phase, threads, load0)


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
