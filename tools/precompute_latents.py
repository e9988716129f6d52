"""Encode the images of a shard set once with a frozen VAE; write new shards with the posterior
(zmean.npy, zstd.npy: fp16, unscaled) in place of the images, captions and json kept, and record the
VAE (path, sha256), the scaling and the latent shape in shards.json. Training with data.latents=true
then reads latents only (no image decode, no VAE on the trainers).

    python -m tools.precompute_latents --src data/fmnist-train --out data/fmnist-train-lat \\
        vae.path=out/vae data.image_size=32 data.channels=1
    torchrun --nproc_per_node 8 -m tools.precompute_latents --src ... --out ...   # shard i on rank i % world

Aspect-ratio buckets: the trainer's data.buckets setting (data.buckets.enabled=true and its rule or
sizes, from --config or overrides): each image is encoded at its bucket's shape, as the pixel loader
would crop it, and its bucket and SDXL size condition are stored (train with the same data.buckets).

    python -m tools.precompute_latents --src photos --out photos-lat vae.path=sd-vae data.image_size=512 \\
        data.channels=3 data.buckets.enabled=true data.buckets.step=64

Text embeddings in the same pass: --text-encoder NAME_OR_PATH [--max-length N] (or text.* overrides):
the same members tools.precompute_text writes; train with data.latents=true data.use_embeddings=true
(no image, no VAE, no text encoder on the trainers). Without it, tools.precompute_text can run on the
output (it keeps every member), or before.

Resumable: a shard already written (by an earlier, killed run with the same VAE, image size, buckets
and encoder) is skipped. The vae.*, data.* and text.* settings come from --config and dotted
overrides. The logic is framework/data/latents.py.
"""
from __future__ import annotations

import sys
from typing import Optional

from tools._cli import entry_point
from tools._precompute import add_text_args, check_overrides, device_of, precompute_parser, text_encoder_from, text_overrides


def run(argv: Optional[list[str]] = None):
    p = precompute_parser("python -m tools.precompute_latents", __doc__, 64, "images per VAE batch",
                          "vae, data (and text)")
    p.add_argument("--keep-images", action="store_true", help="keep the image members too")
    add_text_args(p)
    p.add_argument("--text-batch-size", type=int, default=256,
                   help="captions per encoder batch (as tools.precompute_text's --batch-size)")
    p.add_argument("overrides", nargs="*",
                   help="vae.* / data.* (data.buckets.*) / text.* overrides, e.g. vae.path=out/vae")
    args = p.parse_args(argv)

    import time

    from framework.config import load_config
    from framework.dist import dist_env
    from framework.data.latents import precompute_latents
    from framework.models.vae import FrozenVAE

    check_overrides(p, args.overrides, ("vae.", "data.", "text."))
    text_over = text_overrides(args)
    with_text = any(o.startswith("text.encoder=") for o in args.overrides + text_over)
    if not with_text and any(o.startswith("text.") for o in args.overrides + text_over):
        p.error("text.* settings apply with a text encoder: give --text-encoder NAME_OR_PATH")
    cfg = load_config(args.config, args.overrides + text_over)
    env = dist_env()
    device = device_of(args, env.local_rank)
    vae = FrozenVAE.from_config(cfg.vae, device=device)
    encoder, info = text_encoder_from(cfg.text, device) if with_text else (None, None)
    t0 = time.perf_counter()
    m = precompute_latents(args.src, args.out, vae, cfg.data, rank=env.rank, world_size=env.world_size,
                           batch_size=args.batch_size, keep_images=args.keep_images, wait_s=args.wait,
                           log=lambda s: print(s, file=sys.stderr, flush=True),
                           text_encoder=encoder, text_info=info, text_batch_size=args.text_batch_size)
    if m is not None:
        lat = m["latents"]
        extra = f"; buckets {lat['bucket_counts']}" if lat.get("buckets") else ""
        if with_text:
            extra += f"; embeddings {m['embeddings']['encoder']} L={m['embeddings']['L']} D={m['embeddings']['D']}"
        print(f"{args.out}: {m['total']} samples in {len(m['shards'])} shards; latents {lat['shape']} "
              f"scale {lat['scaling_factor']:g}; skipped {m['skipped_latents'] or 'none'}{extra}; "
              f"{time.perf_counter() - t0:.1f} s")
    return m


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
