"""Write webdataset shards + shards.json from a folder, a CSV/JSONL table, Fashion-MNIST or OpenMoji.

    python -m tools.make_shards fashion-mnist --out data/fmnist-train --split train
    python -m tools.make_shards fashion-mnist --out data/fmnist-test --split test --limit 1000
    python -m tools.make_shards openmoji --out data/openmoji --size 64
    python -m tools.make_shards folder --root photos/ --out data/photos --format jpg --resize 256
    python -m tools.make_shards table --table captions.csv --out data/web --image-col url
    python -m tools.make_shards count data/laion/        # count existing tars once -> shards.json


Common options: --prefix, --max-count (samples per shard), --max-bytes (e.g. 256M), --format
(auto|png|jpg), --limit, --no-shuffle, --seed, --resize. The logic is framework/data/shards.py (the
writer) and framework/data/sources.py. ``count`` writes a counts-only shards.json beside tars written by
another tool (e.g. img2dataset without its _stats.json), so that remote copies of them, or
read-only mounts, start without reading every tar.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Optional

from framework.data import sources as S
from framework.data.shards import write_shards
from framework.data.shardlist import count_local_tars, expand_spec
from tools._cli import entry_point


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G, 100000)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.make_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)

    def common(sp, prefix, fmt="auto"):
        sp.add_argument("--out", required=True, help="output folder (shards + shards.json)")
        sp.add_argument("--prefix", default=prefix, help=f"shard name prefix (default {prefix})")
        sp.add_argument("--max-count", type=int, default=1000,
                        help="samples per shard (default 1000; a dataset needs at least ranks x workers shards)")
        sp.add_argument("--max-bytes", type=parse_bytes, default=parse_bytes("256M"),
                        help="bytes per shard, whichever comes first (default 256M)")
        sp.add_argument("--format", choices=["auto", "png", "jpg"], default=fmt,
                        help="image encoding; auto keeps a source file's bytes (default %(default)s)")
        sp.add_argument("--jpeg-quality", type=int, default=90)
        sp.add_argument("--limit", type=int, default=0, help="write at most N samples (0: all)")
        sp.add_argument("--no-shuffle", action="store_true", help="keep the source order")
        sp.add_argument("--seed", type=int, default=0, help="order shuffle seed")
        sp.add_argument("--resize", type=int, default=0, help="store images resized+center-cropped to NxN")
        sp.add_argument("--quiet", action="store_true")

    f = sub.add_parser("folder", help="images with sidecar .txt captions (and optional .json)")
    f.add_argument("--root", required=True)
    f.add_argument("--allow-missing-caption", action="store_true", help="write images without a .txt too")
    common(f, "data")
    t = sub.add_parser("table", help="a CSV/TSV/JSONL table: image path or URL, caption, metadata")
    t.add_argument("--table", required=True)
    t.add_argument("--image-col", default=None)
    t.add_argument("--caption-col", default=None)
    t.add_argument("--key-col", default=None, help="a column with unique sample keys (default: row index)")
    t.add_argument("--base-dir", default=None, help="relative paths are relative to this (default: the table's folder)")
    common(t, "data")
    m = sub.add_parser("fashion-mnist", help="Fashion-MNIST from Debian's dataset-fashion-mnist")
    m.add_argument("--split", choices=["train", "test"], default="train")
    m.add_argument("--root", default=S.FASHION_ROOT)
    common(m, "fmnist", "png")
    o = sub.add_parser("openmoji", help="OpenMoji glyphs rendered with Pillow, CLDR names as captions")
    o.add_argument("--size", type=int, default=64, help="image size (default 64)")
    o.add_argument("--font-size", type=int, default=48)
    common(o, "openmoji", "png")
    c = sub.add_parser("count", help="count the samples of existing local tars once and write shards.json")
    c.add_argument("spec", nargs="+", help="a folder of tars, paths or brace patterns")
    c.add_argument("--cache-dir", default=None, help="where to write the counts when the folder is read-only")
    return p


def count(spec: list[str], cache_dir: Optional[str] = None) -> dict:
    """Count local tars (headers only, in parallel) into the counts cache (``shards.json`` beside
    them when writable). Returns {"shards", "total", "unreadable"}."""
    shards, _ = expand_spec(spec, count_local=False)
    local = [sh.url for sh in shards]
    counts = count_local_tars(local, cache_dir)
    return {"shards": len(local), "total": sum(c or 0 for c in counts),
            "unreadable": [u for u, c in zip(local, counts) if c is None]}


def run(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.source == "count":
        res = count(args.spec, args.cache_dir)
        print(json.dumps(res))
        return res
    if args.source == "folder":
        src = S.folder_source(args.root, require_caption=not args.allow_missing_caption)
    elif args.source == "table":
        src = S.table_source(args.table, args.image_col, args.caption_col, args.key_col, args.base_dir)
    elif args.source == "fashion-mnist":
        src = S.fashion_mnist_source(args.split, args.root, seed=args.seed)
    else:
        src = S.openmoji_source(args.size, args.font_size)

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"  {done}/{total}", file=sys.stderr, flush=True)

    m = write_shards(src, args.out, prefix=args.prefix, max_count=args.max_count,
                     max_bytes=args.max_bytes, image_format=args.format, limit=args.limit,
                     shuffle=not args.no_shuffle, seed=args.seed, resize=args.resize,
                     jpeg_quality=args.jpeg_quality, progress=progress)
    if not args.quiet:
        print(json.dumps({"out": args.out, "url": m["url"], "shards": len(m["shards"]), "total": m["total"],
                          "image_size": m["image_size"], "channels": m["channels"],
                          "skipped": m.get("skipped", {})}))
    return m


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
