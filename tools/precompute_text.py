"""Encode the captions of a shard set once with the frozen text encoder; write new shards with
emb.npy (fp16, valid tokens only) + mask.npy, and record the encoder, L, D and the null condition
in the new shards.json. Training with data.use_embeddings=true then skips the encoder.

    python -m tools.precompute_text --src data/fmnist-train --out data/fmnist-train-emb \\
        --config configs/tiny.yaml text.max_length=16
    torchrun --nproc_per_node 4 -m tools.precompute_text --src ... --out ...   # shards split by RANK

The text.* settings come from --config and dotted overrides (only the text section is used).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional
from tools._cli import entry_point


def run(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(prog="python -m tools.precompute_text", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="input shards.json or its folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", "-c", default=None, help="YAML preset (its text section is used)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--wait", type=float, default=3600.0, help="rank 0 waits this long for the others")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="text.* overrides, e.g. text.encoder=minilm-l6")
    args = p.parse_args(argv)

    import torch

    from framework.config import load_config
    from framework.dist import dist_env
    from framework.data.precompute import precompute_text
    from framework.models.text import TextEncoder, resolve_encoder

    bad = [o for o in args.overrides if not o.startswith("text.")]
    if bad:
        p.error(f"only text.* overrides apply here: {bad}")
    tcfg = load_config(args.config, args.overrides).text
    env = dist_env()
    device = args.device
    if device is None:
        device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    encoder = TextEncoder(tcfg, device=device)
    info = {"encoder": tcfg.encoder, "resolved": os.path.basename(os.path.normpath(resolve_encoder(tcfg.encoder))),
            "kind": tcfg.kind, "max_length": tcfg.max_length, "layer": tcfg.layer, "null": tcfg.null,
            "pooled": tcfg.pooled}
    m = precompute_text(args.src, args.out, encoder, info, rank=env.rank, world_size=env.world_size,
                        batch_size=args.batch_size, wait_s=args.wait,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
    if m is not None:
        e = m["embeddings"]
        print(f"{args.out}: {m['total']} samples in {len(m['shards'])} shards; "
              f"encoder {e['encoder']} L={e['L']} D={e['D']}")
    return m


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
