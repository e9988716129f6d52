"""Training entry point: ``python -m framework.train --config configs/X.yaml key=value ...``.

Works under torchrun, the deepspeed launcher, srun, or alone (a world of one).

Expected failures (a bad config, missing or bad data, a run directory held by another trainer, a
checkpoint that cannot be written or read, diverging losses) end the run with one line on stderr
and an exit status of their own (``EXIT_CODES``), not a traceback per rank. Rank 0 prints the line.
Data and checkpoint-read errors may concern one rank alone (its shards, its optimizer shard): a
rank > 0 prints those only if it is still alive ``PEER_GRACE_S`` later, i.e. if the launcher did not
stop it because rank 0 failed too. The others reach every rank alike (config, the lock, the vote on
a checkpoint write, the agreed loss check).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

# exit status and label per kind of expected error, most specific first (1 stays "a bug": a traceback)
EXIT_CODES = {"ConfigError": (2, "config error"), "DataError": (3, "data error"),
              "RunDirError": (4, "run directory unusable"), "RunLockError": (4, "run directory in use"),
              "CheckpointWriteError": (5, "checkpoint not written"),
              "CheckpointError": (6, "checkpoint unreadable"), "NonFiniteLossError": (7, "training diverged")}
RANK_LOCAL = (3, 6)      # may concern one rank's shards / files; the others are the same on every rank
PEER_GRACE_S = 3.0


def _expected_errors() -> tuple:
    from framework.train.checkpoint import CheckpointError, CheckpointWriteError
    from framework.config import ConfigError
    from framework.data.loader import DataError
    from framework.train.engine import NonFiniteLossError
    from framework.train.runlock import RunLockError
    return (ConfigError, DataError, RunLockError, CheckpointWriteError, CheckpointError, NonFiniteLossError)


def report(e: BaseException, rank: int, stop=None) -> int:
    """One line for an expected error; returns the exit status."""
    code, label = next((EXIT_CODES[k.__name__] for k in type(e).__mro__ if k.__name__ in EXIT_CODES),
                       (1, type(e).__name__))
    line = " ".join(str(e).split())            # one line, whatever the message held
    if rank == 0:
        print(f"error: {label}: {line}", file=sys.stderr, flush=True)
    elif code in RANK_LOCAL:
        # maybe this rank's data (or checkpoint file) alone: speak up unless the launcher stops
        # us meanwhile (because rank 0 failed too)
        if stop is not None:
            stop.restore()                     # SIGTERM from the launcher ends us again
        time.sleep(PEER_GRACE_S)
        print(f"error: [rank {rank}] {label}: {line}", file=sys.stderr, flush=True)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    from framework.dist import StopFlag, die_with_launcher
    die_with_launcher()          # a worker whose launcher dies exits within seconds (no orphans)
    stop = StopFlag()            # before the slow imports: a preemption signal during setup still counts
    from framework.config import ConfigError, parse_cli

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    try:
        cfg = parse_cli(argv)
    except ConfigError as e:
        stop.restore()
        return report(e, rank)
    from framework.train.engine import shutdown_distributed, train
    try:
        result = train(cfg, stop=stop)
    except _expected_errors() as e:
        stop.restore()
        return report(e, rank)
    from framework.dist import print0
    print0(f"done: step {result['step']}, {result['images_seen']} images"
           + (" (stopped by signal, checkpointed)" if result["stopped_by_signal"] else ""))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
