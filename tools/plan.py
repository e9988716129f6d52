"""Plan a run before launching it: memory per rank, largest micro batch, step time, images/s, time
and GPU-hours to a target, checkpoint size, shard bandwidth (logic: framework/train/plan.py).

    python -m tools.plan --preset sd2 --latent 4x32x32 --cluster a100-80x8 --nodes 8 \\
        --zero 2 --micro-batch 32 --target-images 1e9
    python -m tools.plan --config configs/fashion.yaml --cluster h200x8      # a run config
    python -m tools.plan --preset tiny --cluster cpu --memory-gib 1 --precision fp32 --json
    python -m tools.plan --cluster cpu --calibrate bench.jsonl    # this machine's MFU per preset

Prints a readable table (stderr when --json, which puts one JSON object on stdout).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:                 # `python tools/plan.py` as well as `python -m tools.plan`
    sys.path.insert(0, ROOT)

from tools._cli import entry_point  # noqa: E402


def _shape(s: str) -> tuple:
    """'4x32x32' (C x H x W) or '32x32x4' (H x W x C, C <= 16 last)."""
    parts = tuple(int(x) for x in s.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--latent {s!r}: give C x H x W, e.g. 4x32x32")
    if parts[0] > 16 and parts[2] <= 16:
        parts = (parts[2], parts[0], parts[1])
    return parts


def _ckpt(s: str):
    return {"true": True, "false": False, "none": False, "all": "all"}.get(s.lower(), s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what is trained")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--preset", default="sd2", help="UNet size preset (configs/unet: tiny, base64, sd2)")
    src.add_argument("--config", default=None, help="a run config YAML (its unet, data, engine sections)")
    g.add_argument("--override", nargs="*", default=[], help="dotted overrides for --config (key=value)")
    g.add_argument("--latent", type=_shape, default=None, help="UNet input C x H x W (e.g. 4x32x32)")
    g.add_argument("--resolution", type=int, default=None, help="image side in pixels (latents: / --vae-factor)")
    g.add_argument("--context", type=int, default=None, help="text tokens L (preset default 77)")
    g.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="default: bf16 on GPU clusters, fp32 on cpu")
    g.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3], help="ZeRO stage (default 2)")
    g.add_argument("--no-ema", action="store_true")
    g.add_argument("--ckpt", type=_ckpt, default=None, help="activation checkpointing: false, true/all, attention, res")
    g.add_argument("--micro-batch", type=int, default=None)
    g.add_argument("--grad-accum", type=int, default=None)
    g.add_argument("--mfu", type=float, default=None,
                   help="fraction of peak reached on the executed FLOPs (default: the table's, else 0.40)")
    g.add_argument("--overlap", type=float, default=0.0, help="fraction of communication hidden by compute")
    g.add_argument("--target-images", type=float, default=1e9)
    g.add_argument("--data", choices=["pixels", "latents"], default=None,
                   help="what the shards hold (default: latents for 4-channel UNets)")
    g.add_argument("--text-tokens", type=int, default=0, help="valid tokens stored per caption (0: all)")
    g.add_argument("--pixel-size", type=int, default=0, help="image side in the shards (0: latent side x 8)")
    g.add_argument("--jpeg-bytes-per-pixel", type=float, default=0.25, help="JPEG size per pixel (256 px q90: 0.24)")
    g.add_argument("--storage-gbs", type=float, default=2.0, help="checkpoint write bandwidth, GB/s (aggregate)")
    g.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (adds write time)")
    c = p.add_argument_group("cluster (a preset, fields overridable)")
    c.add_argument("--cluster", default="a100-80x8", help="h200x8, h100x8, a100-80x8, a100-40x8, cpu")
    c.add_argument("--nodes", type=int, default=None)
    c.add_argument("--gpus-per-node", type=int, default=None)
    c.add_argument("--memory-gib", type=float, default=None, help="memory per GPU (cpu: limit on each rank's anonymous memory)")
    c.add_argument("--peak-tflops", type=float, default=None)
    c.add_argument("--intra-gbs", type=float, default=None, help="per GPU, GB/s, one direction")
    c.add_argument("--inter-gbs", type=float, default=None, help="per node, GB/s, one direction")
    c.add_argument("--comm-efficiency", type=float, default=None)
    c.add_argument("--runtime-gib", type=float, default=None, help="memory outside the allocator per GPU")
    o = p.add_argument_group("output")
    o.add_argument("--probe", choices=["auto", "fake", "cpu", "device", "off"], default="auto",
                   help="activations: table, else a probe (auto: real CPU tensors for small models, else fake "
                        "tensors; device: on the current CUDA device)")
    o.add_argument("--json", action="store_true", help="one JSON object on stdout (the table to stderr)")
    k = p.add_argument_group("calibration (instead of a plan)")
    k.add_argument("--calibrate", nargs="+", default=None, metavar="BENCH_JSONL",
                   help="record each preset's MFU on --cluster from tools/bench.py --sections train output "
                        "(one or more runs: the median), so plans of those presets use this machine's speed")
    k.add_argument("--table", default=None,
                   help="with --calibrate: the table to write (default: $FRAMEWORK_PLAN_CACHE or "
                        "~/.cache/framework/plan_table.json)")
    return p


def calibrate(args, cl) -> dict:
    from framework.train import plan as P
    records = []
    for path in args.calibrate:
        try:
            with open(path) as f:
                records += [json.loads(ln) for ln in f if ln.strip()]
        except (OSError, ValueError) as e:
            raise SystemExit(f"--calibrate {path}: {e}")
    try:
        entries = P.mfu_from_bench(records, cl)
    except ValueError as e:
        raise SystemExit(f"--calibrate: {e}")
    where = P.record_mfu(entries, args.table)
    for k, v in entries.items():
        print(f"{k}: mfu {v['mfu']:.4f} ({v['tflops']:.4g} of {v['peak_tflops']:g} TFLOP/s, "
              f"batch {','.join(map(str, v['batch']))}, {v['runs']} run(s))", file=sys.stderr)
    print(f"written to {where}", file=sys.stderr)
    return entries


def run(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from framework.train import plan as P
    from framework.config import load_config

    cl = P.cluster(args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   memory_gib=args.memory_gib, peak_tflops=args.peak_tflops, intra_gbs=args.intra_gbs,
                   inter_gbs=args.inter_gbs, comm_efficiency=args.comm_efficiency,
                   runtime_gib=args.runtime_gib)
    if args.calibrate:
        return calibrate(args, cl)
    kw = {"precision": args.precision or ("bf16" if cl.device == "cuda" else "fp32")}
    for name, val in (("zero_stage", args.zero), ("activation_checkpointing", args.ckpt),
                      ("micro_batch", args.micro_batch), ("grad_accum", args.grad_accum), ("data", args.data)):
        if val is not None:
            kw[name] = val
    kw.update(mfu=args.mfu, overlap=args.overlap, target_images=args.target_images,
              text_tokens=args.text_tokens, pixel_size=args.pixel_size,
              jpeg_bytes_per_pixel=args.jpeg_bytes_per_pixel, storage_gbs=args.storage_gbs, ckpt_every=args.ckpt_every,
              ema=not args.no_ema)
    shape = dict(latent=args.latent, resolution=args.resolution, context_len=args.context)
    shape = {k: v for k, v in shape.items() if v is not None}
    if args.config:
        cfg = load_config(args.config, args.override)
        if args.precision is None and cfg.engine.precision != "auto":
            kw["precision"] = cfg.engine.precision
        w = P.Workload.from_config(cfg, name=os.path.splitext(os.path.basename(args.config))[0], **shape, **kw)
    else:
        w = P.Workload.from_preset(args.preset, **shape, **kw)
    plan = P.make_plan(w, cl, probe=args.probe)
    table = P.format_plan(plan)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(plan))
    else:
        print(table)
    return plan


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
