"""Summarise shards: per-shard counts (vs the manifest), keys, members, image sizes, a caption
histogram, labels, problems; optionally a PNG contact sheet.

    python -m tools.inspect_shards data/fmnist-train --sheet fmnist.png
    python -m tools.inspect_shards "data/x/data-{000000..000009}.tar" --json --max-samples 5000
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from framework.data.inspection import format_report, inspect_shards
from tools._cli import entry_point


def run(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.inspect_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="+", help="shards.json, its folder, paths or brace patterns")
    p.add_argument("--sheet", default=None, help="write a PNG contact sheet here")
    p.add_argument("--n", type=int, default=64, help="images on the contact sheet")
    p.add_argument("--top", type=int, default=15, help="rows of the caption histogram")
    p.add_argument("--max-samples", type=int, default=0, help="stop after N samples (0: all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = inspect_shards(args.spec, contact_sheet=args.sheet, n_images=args.n, top=args.top,
                            max_samples=args.max_samples)
    print(json.dumps(report, ensure_ascii=False) if args.json else format_report(report))
    return report


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
