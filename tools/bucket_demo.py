"""The aspect-ratio bucket demo: Fashion-MNIST items on wide / tall canvases captioned where they
are, trained with buckets and with center crop, evaluated by where the classifier finds the item.

    python -m tools.bucket_demo [--steps 1500] [--n 8000] [--grid docs/buckets_demo.png]

Phases: shards (framework.bucket_demo.write_canvas_shards), two training runs of
configs/bucket_demo.yaml (``python -m framework.train``, 1 process; the second with
data.buckets.enabled=false), export, then framework.bucket_demo.position_accuracy on each and one
grid PNG. Prints and returns the numbers (also RUN_DIR/bucket_demo.json). docs/buckets_demo.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional

from tools._cli import entry_point

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bucket_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/bucket-demo", help="where the canvas shards go (reused)")
    p.add_argument("--run-dir", default="runs/bucket-demo")
    p.add_argument("--n", type=int, default=8000, help="training canvases")
    p.add_argument("--steps", type=int, default=1500, help="training steps of each run (batch 32)")
    p.add_argument("--per-prompt", type=int, default=8, help="samples per (class, place) prompt")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--grid", default="docs/buckets_demo.png")
    p.add_argument("--reuse", action="store_true", help="skip a run whose export already exists")
    return p


def _train(run_dir: str, data: str, steps: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "framework.train", "--config", os.path.join(ROOT, "configs", "bucket_demo.yaml"),
           f"run_dir={run_dir}", f"data.urls=['{os.path.abspath(data)}']", f"engine.steps={steps}",
           f"checkpoint.every={steps}", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def run(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch

    from framework import bucket_demo as D
    from framework.evaluate import get_classifier
    from framework.export import export
    from framework.pipeline import Pipeline

    torch.manual_seed(0)
    m = D.write_canvas_shards(args.data, args.n)
    print(f"data: {m['total']} canvases in {len(m['shards'])} shards ({args.data})")
    runs = {"buckets": [], "center": ["data.buckets.enabled=false"]}
    out: dict = {"steps": args.steps, "n": args.n, "guidance": args.guidance, "per_prompt": args.per_prompt,
                 "classes": [D.NAMES[c] for c in D.CLASSES], "train_seconds": {}}
    pipes = {}
    for name, extra in runs.items():
        rd = os.path.join(args.run_dir, name)
        ex = os.path.join(rd, "export")
        if not (args.reuse and os.path.isfile(os.path.join(ex, "config.yaml"))):
            out["train_seconds"][name] = round(_train(rd, args.data, args.steps, extra), 1)
            export(rd, ex, weights="ema", dtype="fp32", overwrite=True)
        pipes[name] = Pipeline.from_pretrained(ex, device="cpu")
    clf, info = get_classifier()
    clf.eval()
    out["classifier_accuracy"] = info["accuracy"]
    out["ceiling"] = round(D.real_accuracy(clf), 4)
    kw = dict(per_prompt=args.per_prompt, guidance=args.guidance, steps=args.sample_steps)
    res = {"buckets": D.position_accuracy(pipes["buckets"], clf, **kw),
           "center": D.position_accuracy(pipes["center"], clf, **kw),
           "center_square": D.position_accuracy(pipes["center"], clf, shape=(D.ITEM, D.ITEM), **kw)}
    for k, r in res.items():
        out[k] = {"accuracy": round(r["accuracy"], 4), "by_place": {p: round(v, 4) for p, v in r["by_place"].items()},
                  "other_half_mean": None if r["other_half_mean"] is None else round(r["other_half_mean"], 4)}
        print(f"{k:>14}: accuracy {r['accuracy']:.3f}  by place {out[k]['by_place']}  "
              f"other half mean {out[k]['other_half_mean']}")
    print(f"ceiling (real test items through the same crop/upscale): {out['ceiling']:.3f}")
    # the grid: real canvases, then per model one sample per class for each place
    import numpy as np
    from framework.evaluate import load_fashion
    x, y = load_fashion("test")
    rows = []
    for place in D.PLACES:
        ims = [torch.from_numpy(D.canvas(x[int(np.flatnonzero(y == c)[0])], place)).float().div(127.5).sub(1)[None]
               for c in D.CLASSES]
        rows.append((f"data: {place}", ims))
    for k in res:
        for place in D.PLACES:
            rows.append((f"{k}: {place}", [res[k]["samples"][(c, place)][0] for c in D.CLASSES]))
    os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
    D.save_grid(rows, args.grid)
    out["grid"] = args.grid
    with open(os.path.join(args.run_dir, "bucket_demo.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return out


main = entry_point(run)

if __name__ == "__main__":
    main()
