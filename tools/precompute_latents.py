"""Encode the images of a shard set once with a frozen VAE; write new shards with the posterior
(zmean.npy, zstd.npy: fp16, unscaled) in place of the images, captions and json kept, and record the
VAE (path, sha256), the scaling and the latent shape in shards.json. Training with data.latents=true
then reads latents only (no image decode, no VAE on the trainers).

    python -m tools.precompute_latents --src data/fmnist-train --out data/fmnist-train-lat \\
        vae.path=out/vae data.image_size=32 data.channels=1
    torchrun --nproc_per_node 8 -m tools.precompute_latents --src ... --out ...   # shard i on rank i % world

Resumable: a shard already written (by an earlier, killed run with the same VAE and image size) is
skipped. Text embeddings: run tools.precompute_text on the output (it keeps every member), or before.
The vae.* and data.* settings come from --config and dotted overrides. The logic is framework/data/latents.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from tools._cli import entry_point


def run(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(prog="python -m tools.precompute_latents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="input shards.json or its folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", "-c", default=None, help="YAML preset (its vae and data sections are used)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--keep-images", action="store_true", help="keep the image members too")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--wait", type=float, default=3600.0, help="rank 0 waits this long for the others")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="vae.* / data.* overrides, e.g. vae.path=out/vae")
    args = p.parse_args(argv)

    import time

    import torch

    from framework.config import load_config
    from framework.dist import dist_env
    from framework.data.latents import precompute_latents
    from framework.models.vae import FrozenVAE

    bad = [o for o in args.overrides if not o.startswith(("vae.", "data."))]
    if bad:
        p.error(f"only vae.* and data.* overrides apply here: {bad}")
    cfg = load_config(args.config, args.overrides)
    env = dist_env()
    device = args.device
    if device is None:
        device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    vae = FrozenVAE.from_config(cfg.vae, device=device)
    t0 = time.perf_counter()
    m = precompute_latents(args.src, args.out, vae, cfg.data, rank=env.rank, world_size=env.world_size,
                           batch_size=args.batch_size, keep_images=args.keep_images, wait_s=args.wait,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    if m is not None:
        lat = m["latents"]
        print(f"{args.out}: {m['total']} samples in {len(m['shards'])} shards; latents {lat['shape']} "
              f"scale {lat['scaling_factor']:g}; skipped {m['skipped_latents'] or 'none'}; "
              f"{time.perf_counter() - t0:.1f} s")
    return m


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
