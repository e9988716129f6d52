"""Encode the captions of a shard set once with the frozen text encoder; write new shards with
emb.npy (fp16, valid tokens only) + mask.npy, and record the encoder, L, D and the null condition
in the new shards.json. Training with data.use_embeddings=true then skips the encoder.

    python -m tools.precompute_text --src data/fmnist-train --out data/fmnist-train-emb \\
        --config configs/tiny.yaml text.max_length=16        # or --text-encoder PATH --max-length 16
    torchrun --nproc_per_node 4 -m tools.precompute_text --src ... --out ...   # shards split by RANK

The text.* settings come from --config and dotted overrides (only the text section is used).
"""
from __future__ import annotations

import sys
from typing import Optional

from tools._cli import entry_point
from tools._precompute import add_text_args, check_overrides, device_of, precompute_parser, text_encoder_from, text_overrides


def run(argv: Optional[list[str]] = None):
    p = precompute_parser("python -m tools.precompute_text", __doc__, 256, "captions per encoder batch", "text")
    add_text_args(p)
    p.add_argument("overrides", nargs="*", help="text.* overrides, e.g. text.encoder=minilm-l6")
    args = p.parse_args(argv)

    from framework.config import load_config
    from framework.dist import dist_env
    from framework.data.precompute import precompute_text

    check_overrides(p, args.overrides, ("text.",))
    tcfg = load_config(args.config, args.overrides + text_overrides(args)).text
    env = dist_env()
    encoder, info = text_encoder_from(tcfg, device_of(args, env.local_rank))
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
