"""Training entry point: ``python -m framework.train --config configs/X.yaml key=value ...``.

Works under torchrun, the deepspeed launcher, srun, or alone (a world of one).
"""
from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from .dist import StopFlag
    stop = StopFlag()            # before the slow imports: a preemption signal during setup still counts
    from .config import ConfigError, parse_cli

    try:
        cfg = parse_cli(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from .engine import train
    result = train(cfg, stop=stop)
    from .dist import print0
    print0(f"done: step {result['step']}, {result['images_seen']} images"
           + (" (stopped by signal, checkpointed)" if result["stopped_by_signal"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
