"""Checkpoint tools: inspect, consolidate, reshard, export. The logic is framework/export.py.

    python -m tools.checkpoint inspect runs/demo                      # newest valid tag
    python -m tools.checkpoint inspect runs/demo --tag step00001000 --json
    python -m tools.checkpoint consolidate runs/demo --out w.safetensors          # raw fp32 weights
    python -m tools.checkpoint consolidate runs/demo --out ema.safetensors --weights ema
    python -m tools.checkpoint reshard runs/demo                      # -> CK/TAG_universal (any world size)
    python -m tools.checkpoint export runs/demo runs/demo/export      # EMA, fp32, one file
    python -m tools.checkpoint export runs/demo out --dtype bf16 --max-shard-size 2GB --diffusers
    python -m tools.checkpoint export runs/demo out --weights raw --tag step00000500 --overwrite

RUN is a run directory, its checkpoints/ folder or a tag directory. Every command takes the newest
VALID tag unless --tag names one (a checkpoint whose save did not finish is skipped with a warning).
Checkpoints of any ZeRO stage (0-3) and any world size. The trainer converts to a universal checkpoint
by itself when a run resumes on another world size; `reshard` does it ahead of time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional
from tools._cli import entry_point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def run_args(sp):
        sp.add_argument("run", help="run directory, its checkpoints/ folder, or a tag directory")
        sp.add_argument("--tag", default=None, help="a tag such as step00001000 (default: newest valid)")

    i = sub.add_parser("inspect", help="tag, step, world size, ZeRO stage, sizes")
    run_args(i)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    c = sub.add_parser("consolidate", help="ZeRO shards -> one fp32 safetensors state dict")
    run_args(c)
    c.add_argument("--out", required=True, help="output .safetensors file")
    c.add_argument("--weights", choices=["raw", "ema"], default="raw", help="trained (raw, default) or EMA weights")

    r = sub.add_parser("reshard", help="-> DeepSpeed universal checkpoint (loads on any world size)")
    run_args(r)

    add_export_args(sub.add_parser("export", help="-> inference directory (safetensors + config.yaml)"))
    return p


def add_export_args(e: argparse.ArgumentParser) -> argparse.ArgumentParser:
    e.add_argument("run", help="run directory, its checkpoints/ folder, or a tag directory")
    e.add_argument("out", help="output directory (written atomically)")
    e.add_argument("--tag", default=None, help="a tag such as step00001000 (default: newest valid)")
    e.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA (default) or raw weights")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    e.add_argument("--max-shard-size", default="0",
                   help="split the weights into HF-style shards of at most this size, e.g. 2GB (0: one file)")
    e.add_argument("--diffusers", action="store_true",
                   help="also write OUT/unet/ in diffusers' UNet2DConditionModel layout")
    e.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return e


def run_export(args) -> dict:
    from framework.export import export
    s = export(args.run, args.out, tag=args.tag, weights=args.weights, dtype=args.dtype,
               max_shard_size=args.max_shard_size, diffusers=args.diffusers, overwrite=args.overwrite)
    print(f"exported {s['weights']} weights of {s['tag']} (step {s['step']}, ZeRO-{s['zero_stage']} on "
          f"{s['world_size']} ranks) as {s['dtype']} to {s['out']} ({len(s['files'])} files, {s['seconds']} s)")
    return s


def run(argv: Optional[list[str]] = None):
    args = build_parser().parse_args(argv)
    from framework import export as E

    if args.command == "inspect":
        info = E.inspect_checkpoint(args.run, args.tag)
        print(json.dumps(info, indent=1) if args.json else E.format_inspect(info))
        return info
    if args.command == "consolidate":
        sd, info = E.consolidate(args.run, args.tag, weights=args.weights)
        out = os.path.abspath(args.out)
        E.save_state_dict(sd, os.path.dirname(out) or ".", name=os.path.basename(out).removesuffix(".safetensors"),
                          metadata={"weights": args.weights, "tag": info["tag"]})
        n = sum(v.numel() for v in sd.values())
        print(f"consolidated {args.weights} weights of {info['tag']} (ZeRO-{info['zero_stage']}, "
              f"{info['world_size']} ranks): {len(sd)} tensors, {n:,} parameters -> {out}")
        return out
    if args.command == "reshard":
        out = E.reshard(args.run, args.tag)
        print(f"universal checkpoint: {out}\n(the trainer loads it when resuming on another world size; "
              f"DeepSpeed config checkpoint.load_universal=true)")
        return out
    if args.command == "export":
        return run_export(args)
    raise AssertionError(args.command)


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
