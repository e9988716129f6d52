"""Export a task=autoencoder run as a diffusers AutoencoderKL folder (the first stage of latent diffusion).

    python -m tools.export_vae runs/vae out/vae                       # EMA weights; scaling from the run's data
    python -m tools.export_vae runs/vae out/vae --data data/fmnist-test --samples 2000
    python -m tools.export_vae runs/vae out/vae --scaling-factor 0.9 --weights raw --overwrite

The folder loads with ``diffusers.AutoencoderKL.from_pretrained(out)`` and as ``vae.path=out``. Its
config.json's scaling_factor is 1/std of the latents measured on --data (default: the run's
data.urls) unless --scaling-factor gives one; framework_export.json records the reconstruction PSNR
and the per-channel latent statistics. The logic is framework/models/autoencoder.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from tools._cli import entry_point


def run(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.export_vae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a task=autoencoder run directory (or its checkpoints/ folder, or a tag directory)")
    p.add_argument("out", help="output folder (diffusers AutoencoderKL layout)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest valid one)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--data", nargs="*", default=None, help="held-out shards for PSNR and the latent std")
    p.add_argument("--samples", type=int, default=1000, help="images to measure on (default 1000)")
    p.add_argument("--scaling-factor", type=float, default=0.0, help="use this instead of 1/measured std")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from framework.models.autoencoder import export_autoencoder

    summary = export_autoencoder(args.run, args.out, data_urls=args.data or None, checkpoint=args.tag,
                                 weights=args.weights, max_samples=args.samples,
                                 scaling_factor=args.scaling_factor, overwrite=args.overwrite)
    ev = summary["evaluation"]
    print(json.dumps({"out": summary["out"], "step": summary["step"], "psnr": round(ev["psnr"], 3),
                      "latent_std": [round(s, 4) for s in ev["latent_std"]],
                      "scaling_factor": summary["scaling_factor"]}))
    return summary


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
