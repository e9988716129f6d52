"""Export a training run to an inference directory (alias of `python -m tools.checkpoint export`).

    python -m tools.export runs/demo runs/demo/export                 # EMA weights, fp32, one file
    python -m tools.export runs/demo out --dtype bf16 --max-shard-size 2GB --diffusers --overwrite

See tools/checkpoint.py and framework/export.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from tools.checkpoint import add_export_args, run_export
from tools._cli import entry_point


def run(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return run_export(add_export_args(p).parse_args(argv))


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
