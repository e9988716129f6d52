"""torchrun entry of tests/test_aspect.py's 2-rank run: each rank trains on batches of ITS OWN shapes
(rank 0 wide, rank 1 tall, then both square, then swapped), through the real Trainer under the
config given on the command line, and writes RUN_DIR/aspect-rankN.json: the shapes its forward saw,
the losses, the step, and a SHA-256 of the full (gathered) weights."""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

SHAPES = {0: [(8, 24), (16, 16), (24, 8), (8, 16)], 1: [(24, 8), (16, 16), (8, 24), (16, 8)]}


class Feed:
    """Batch k of this rank: fixed by (rank, k), so a resumed run continues with the same batches."""

    def __init__(self, rank: int, micro_batch: int):
        self.rank, self.b, self.i = rank, micro_batch, 0

    def __iter__(self):
        return self

    def __next__(self):
        h, w = SHAPES[self.rank][self.i % 4]
        g = torch.Generator().manual_seed(1000 * self.rank + self.i)
        self.i += 1
        return {"image": torch.randn(self.b, 1, h, w, generator=g), "ctx": torch.randn(self.b, 8, 32, generator=g),
                "ctx_mask": torch.ones(self.b, 8, dtype=torch.bool),
                "size_cond": torch.tensor([[h + 3, w, 3, 0, h, w]] * self.b)}

    def null_condition(self):
        from framework.models.text import Condition
        return Condition(torch.zeros(1, 8, 32), torch.ones(1, 8, dtype=torch.bool))


def main(argv=None) -> int:
    import deepspeed
    from framework.config import parse_cli
    from framework.train.engine import Trainer

    cfg = parse_cli(argv)
    rank = int(os.environ["RANK"])
    feed = Feed(rank, cfg.engine.micro_batch)
    tr = Trainer(cfg, data=feed)
    feed.i = tr.step * cfg.engine.grad_accum             # a resumed run continues with the next batch
    shapes = []
    tr.engine.module.register_forward_hook(lambda m, a, o: shapes.append(list(o.shape[-2:])))
    result = tr.fit()
    params = list(tr.engine.module.parameters())
    h = hashlib.sha256()
    with deepspeed.zero.GatheredParameters(params):      # collective: every rank gathers
        for name, p in sorted(tr.engine.module.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    record = {"rank": rank, "step": result["step"], "losses": result["losses"], "shapes": shapes,
              "noise_mode": tr.noise.mode, "sha256": h.hexdigest()}
    with open(os.path.join(cfg.run_dir, f"aspect-rank{rank}.json"), "w") as f:
        json.dump(record, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
