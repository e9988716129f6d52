"""Evaluate an exported Fashion-MNIST model with an independent classifier across guidance scales.

    python -m tools.evaluate runs/demo/export --out runs/demo/eval
    python -m tools.evaluate EXPORT --out DIR --gammas 0 1 2 3 5 7 --per-class 50 --steps 25 --seed 0

The classifier (a small CNN, plain torch) is trained once on the 60k real training images and cached
under --cache-dir keyed by the data and its settings; its held-out accuracy (the 10k test split) is
reported. For each guidance scale gamma: guided accuracy (the classifier agrees with the prompted
class), Frechet distance in the classifier's feature space against the held-out real images (with the
floor a perfect model gets at this sample size), within-class diversity vs real. Writes
OUT/eval.json, OUT/sweep.png (one line per method; CFG now) and OUT/grid_g{gamma}.png (rows = classes).
The logic is framework/evaluate.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle OpenMP threads sleep (see tools/demo.py)
from typing import Callable, Optional
from tools._cli import classifier_guidance_group, entry_point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="export directory (tools/checkpoint.py export)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0],
                   help="classifier-free guidance scales to sweep")
    p.add_argument("--per-class", type=int, default=20, help="samples per class and scale")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--no-clip", action="store_true", help="do not clamp the sampler's x_0 estimates to [-1, 1]")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None, help="classifier cache (default ~/.cache/framework/eval)")
    p.add_argument("--classifier-epochs", type=int, default=2)
    p.add_argument("--classifier-train", type=int, default=0, help="train the classifier on the first N images (0: all)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: Debian's)")
    p.add_argument("--quiet", action="store_true")
    add_method_args(p)
    return p


# ---- further guidance methods (e.g. --classifier DIR --classifier-scale G) -------------------------
def add_method_args(p: argparse.ArgumentParser) -> None:
    """Flags of further methods go here."""
    g = classifier_guidance_group(p, "classifier guidance curve: --classifier adds one")
    g.add_argument("--classifier-scales", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0],
                   help="classifier scales of that curve")
    g.add_argument("--classifier-cfg", type=float, default=0.0,
                   help="classifier-free scale under the classifier curve (0: the null condition)")


def methods(args, pipe) -> list[tuple[str, list[float], Optional[Callable]]]:
    """The curves of the sweep: (name, scales, model_wrapper). CFG sweeps its guidance scale; a method
    added here (e.g. classifier guidance on top of CFG at a fixed scale) gets its own named curve.
    A third element with a ``sweep`` method sweeps its own scale (classifier guidance: the classifier
    scale at a fixed CFG scale, ``framework.models.classifier.ClassifierGuidanceMethod``)."""
    out = [("classifier-free guidance", list(args.gammas), None)]
    if getattr(args, "classifier", None):
        from framework.models.classifier import ClassifierGuidanceMethod, ClassifierGuide
        guide = ClassifierGuide.load(args.classifier, device=pipe.device)
        name = f"classifier guidance ({args.classifier_form}" + \
            (f", CFG {args.classifier_cfg:g})" if args.classifier_cfg else ", unconditional)")
        out.append((name, list(args.classifier_scales),
                    ClassifierGuidanceMethod(guide, args.classifier_form, args.classifier_cfg)))
    return out


# ---------------------------------------------------------------------------------------------------
def run(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    from framework import evaluate as V
    from framework.export import Pipeline
    from framework.images import save_grid
    from framework.data.sources import FASHION_CLASSES

    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    clf, clf_info = V.get_classifier(args.cache_dir, args.data_root, n_train=args.classifier_train,
                                     epochs=args.classifier_epochs, progress=not args.quiet)
    t_clf = time.perf_counter() - t0
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    how = "cached" if clf_info["cached"] else f"trained in {clf_info['seconds']} s"
    log(f"classifier: held-out accuracy {clf_info['accuracy']:.4f} on {clf_info['n_test']} test images "
        f"({how}: {clf_info['path']})")
    real = V.reference_features(clf, args.data_root, seed=args.seed)
    pipe = Pipeline.from_pretrained(args.export, device=args.device)
    curves, runs = [], []
    for name, scales, wrapper in methods(args, pipe):
        own = getattr(wrapper, "sweep", None)          # a method that sweeps its own scale
        sweep, wrapper = (own, None) if own is not None else (V.guidance_sweep, wrapper)
        res = sweep(pipe, clf, scales, real, per_class=args.per_class, steps=args.steps,
                    sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, name=name,
                    model_wrapper=wrapper, progress=not args.quiet,
                    **({"clip_x0": None} if args.no_clip else {}))
        curves.append(res["curve"])
        grids = {}
        slug = "" if len(runs) == 0 else "_" + "".join(ch if ch.isalnum() else "-" for ch in name)
        for g, (imgs, k) in res["grids"].items():
            path = os.path.join(args.out, f"grid{slug}_g{g:g}.png")
            save_grid(imgs, path, nrow=k, scale=2, row_labels=FASHION_CLASSES)
            grids[f"{g:g}"] = os.path.abspath(path)
        runs.append({"name": name, "points": res["points"], "settings": res["settings"], "grids": grids})
        for p in res["points"]:
            log(f"  {name} gamma={p['gamma']:g}: accuracy {p['accuracy']:.3f}  FD {p['fd']:.2f} "
                f"(floor {p['fd_floor']:.2f})  diversity {p['diversity']:.2f} (real {p['diversity_real']:.2f})  "
                f"[{p['seconds']} s]")
    plot = V.plot_sweep(curves, os.path.join(args.out, "sweep.png"),
                        references={"diversity": ("real", real["diversity_real"])},
                        title=f"{os.path.basename(os.path.abspath(args.export))}: {args.per_class} samples/class, "
                              f"{args.sampler} {args.steps} steps; classifier held-out acc {clf_info['accuracy']:.3f}")
    result = {"export": os.path.abspath(args.export), "classifier": clf_info, "methods": runs,
              "plot": os.path.abspath(plot), "seconds": {"classifier": round(t_clf, 1),
                                                         "total": round(time.perf_counter() - t0, 1)},
              "device": str(pipe.device)}
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {os.path.join(os.path.abspath(args.out), 'eval.json')} and {plot}")
    return result


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
