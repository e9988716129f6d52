"""Entry point the launch tests start instead of ``framework.train`` (via ``FW_ENTRY``).

It trains exactly like ``python -m framework.train`` and then writes, per global rank,
``RUN_DIR/launch-rankNNNNN.json``: what ``framework.dist`` derived from the launcher's
environment (before the trainer touched it), which network namespace the process ran in, the
final step, the losses, and a SHA-256 of the trained weights, so a test can check that the ranks
of a multi-node job agree on the weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys


def weights_sha256(module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    from framework.config import parse_cli
    from framework.dist import dist_env

    cfg = parse_cli(argv)
    d = dist_env()   # as the launcher left it (for srun: from SLURM_* alone)
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = ""
    record = {"launcher": d.launcher, "rank": d.rank, "world_size": d.world_size,
              "local_rank": d.local_rank, "node_rank": d.node_rank, "master_addr": d.master_addr,
              "master_port": d.master_port, "netns": netns,
              "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME", "")}

    from framework.train.engine import train
    result = train(cfg)
    record.update(step=result["step"], images_seen=result["images_seen"], losses=result["losses"],
                  stopped_by_signal=bool(result["stopped_by_signal"]),
                  weights_sha256=weights_sha256(result["engine"].module))
    path = os.path.join(cfg.run_dir, f"launch-rank{d.rank:05d}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
