"""The noisy classifier p(y | x_t, t): its held-out accuracy on noised images, by t (a JSON curve).

    python -m tools.classifier accuracy --classifier runs/classifier --data data/fmnist-test \
        --n 1000 --t 1,50,100,200,300,400,500,600,700,800,900,1000 --out runs/classifier/accuracy_by_t.json

--classifier: a run directory (its latest checkpoint's EMA weights) or an exported directory.
--data: shards (anything data.urls accepts); labels from the json `label`, or the classifier's
class_names matched in the captions. The images are read at the classifier's data.image_size /
channels. The logic is framework/classifier.py (``held_out``, ``accuracy_by_t``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional


def _ts(text: str, T: int) -> list[int]:
    if not text:
        return sorted({1, *range(T // 10, T + 1, T // 10)})
    return [int(v) for v in text.split(",") if v.strip()]


def accuracy_main(args) -> dict:
    import torch

    from framework.classifier import accuracy_by_t, held_out, load_classifier
    from framework.diffusion import Schedule

    torch.set_num_threads(max(1, args.threads)) if args.threads else None
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_classifier(args.classifier, device=device)
    sched = Schedule.from_config(cfg.diffusion)
    data_cfg = dataclasses.replace(cfg.data, urls=[args.data])
    images, labels = held_out(data_cfg, args.n, cfg.classifier, seed=args.seed)
    ts = _ts(args.t, sched.T)
    acc = accuracy_by_t(model, images, labels, sched, ts, batch_size=args.batch_size, seed=args.seed)
    out = {"classifier": os.path.abspath(args.classifier), "data": args.data, "n": int(len(images)),
           "T": sched.T, "chance": 1.0 / cfg.classifier.num_classes,
           "t": list(acc), "accuracy": [acc[t] for t in acc]}
    text = json.dumps(out, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.classifier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy", help="held-out accuracy on noised images by t (JSON)")
    a.add_argument("--classifier", required=True, help="run directory or exported directory")
    a.add_argument("--data", required=True, help="held-out shards (a folder with shards.json, a brace pattern, ...)")
    a.add_argument("--n", type=int, default=1000, help="held-out images (default 1000)")
    a.add_argument("--t", default="", help="comma-separated timesteps (default 1 and every T/10)")
    a.add_argument("--batch-size", type=int, default=250)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="auto")
    a.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a.add_argument("--out", default="", help="write the JSON here too")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "accuracy":
        accuracy_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
