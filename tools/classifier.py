"""The noisy classifier p(y | x_t, t): its held-out accuracy on noised images, by t (a JSON curve).

    python -m tools.classifier accuracy --classifier runs/classifier --data data/fmnist-test \
        --n 1000 --t 1,50,100,200,300,400,500,600,700,800,900,1000 --out runs/classifier/accuracy_by_t.json

The measurement of docs/classifier_guidance.md (trains what is missing, ~10 CPU-minutes):

    python -m tools.classifier guided-accuracy --out runs/cg-fmnist --scales 0,1,3,10 --forms eps,mean

an unconditional diffusion model (configs/classifier.yaml with task=diffusion text.p_uncond=1.0) and
the noisy classifier (configs/classifier.yaml) on Fashion-MNIST shards, then the class accuracy of
guided samples (framework.evaluate's independent CNN) by classifier scale, for each form; writes
OUT/guided_accuracy.json, OUT/guided_accuracy.png (one curve per form), OUT/grid_{form}.png and
OUT/accuracy_by_t.json.

--classifier: a run directory (its latest checkpoint's EMA weights) or an exported directory.
--data: shards (anything data.urls accepts); labels from the json `label`, or the classifier's
class_names matched in the captions. The images are read at the classifier's data.image_size /
channels. The logic is framework/models/classifier.py (``held_out``, ``accuracy_by_t``).
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

    from framework.models.classifier import accuracy_by_t, held_out, load_classifier
    from framework.diffusion.process import Schedule

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(run_dir: str, overrides: list[str], log: str) -> None:
    import subprocess
    if os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
        print(f"[guided-accuracy] {run_dir}: trained already", file=sys.stderr)
        return
    cmd = [sys.executable, "-m", "framework.train", "--config", os.path.join(ROOT, "configs", "classifier.yaml"),
           f"run_dir={run_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    print(f"[guided-accuracy] {' '.join(cmd)}", file=sys.stderr)
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def guided_main(args) -> dict:
    import time

    import torch

    from framework import evaluate as E
    from framework.models.classifier import ClassifierGuide, classifier_guidance_sweep
    from framework.export import Pipeline, export
    from framework.images import save_grid
    from framework.data.shards import write_shards
    from framework.data.sources import fashion_mnist_source

    t_start = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(max(1, args.threads))
    timing: dict = {}

    # -- 1. shards (a subset of the training split; the test split held out) -----------------------
    t0 = time.perf_counter()
    train_dir, test_dir = os.path.join(out, "fmnist-train"), os.path.join(out, "fmnist-test")
    if not os.path.isfile(os.path.join(train_dir, "shards.json")):
        write_shards(fashion_mnist_source("train"), train_dir, limit=args.n_train, max_count=2500)
    if not os.path.isfile(os.path.join(test_dir, "shards.json")):
        write_shards(fashion_mnist_source("test"), test_dir, limit=1000, max_count=500)
    timing["shards_s"] = round(time.perf_counter() - t0, 1)

    # -- 2. an unconditional diffusion model and the noisy classifier, same schedule ---------------
    common = [f"data.urls=['{train_dir}']", "data.num_workers=0", "engine.progress=false",
              f"engine.micro_batch={args.batch}", "engine.log_every=25", "optim.lr=2e-3"]
    t0 = time.perf_counter()
    _train(os.path.join(out, "diffusion"), ["task=diffusion", "text.p_uncond=1.0", *common,
           f"engine.steps={args.diffusion_steps}", f"checkpoint.every={args.diffusion_steps}"],
           os.path.join(out, "diffusion.log"))
    timing["diffusion_train_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    _train(os.path.join(out, "classifier"), [*common, f"engine.steps={args.classifier_steps}",
           f"checkpoint.every={args.classifier_steps}"], os.path.join(out, "classifier.log"))
    timing["classifier_train_s"] = round(time.perf_counter() - t0, 1)

    # -- 3. the noisy classifier's held-out accuracy by t ------------------------------------------
    t0 = time.perf_counter()
    acc_t = accuracy_main(argparse.Namespace(
        classifier=os.path.join(out, "classifier"), data=test_dir, n=1000, t="", batch_size=250, seed=0,
        device="cpu", threads=args.threads, out=os.path.join(out, "accuracy_by_t.json")))
    timing["accuracy_by_t_s"] = round(time.perf_counter() - t0, 1)

    # -- 4. sampling: export -> Pipeline (THE null condition at CFG scale 0 = unconditional) -------
    export_dir = os.path.join(out, "diffusion-export")
    if not os.path.isfile(os.path.join(export_dir, "config.yaml")):
        export(os.path.join(out, "diffusion"), export_dir)
    pipe = Pipeline.from_pretrained(export_dir, device="cpu")
    guide = ClassifierGuide.load(os.path.join(out, "classifier"), device=pipe.device)

    # -- 5. the independent evaluation classifier (framework.evaluate; cached) ---------------------
    t0 = time.perf_counter()
    eval_model, eval_info = E.get_classifier(n_train=args.eval_n_train, progress=False)
    real = E.reference_features(eval_model)
    timing["eval_classifier_s"] = round(time.perf_counter() - t0, 1)

    # -- 6. the sweep: guided accuracy by classifier scale, one curve per form ---------------------
    t0 = time.perf_counter()
    scales = [float(v) for v in args.scales.split(",")]
    curves, cache, results = [], {}, {}
    for form in args.forms.split(","):
        res = classifier_guidance_sweep(pipe, eval_model, guide, scales, real, form=form, cache=cache,
                                        per_class=args.per_class, sampler="ddpm", clip_x0=None, seed=args.seed,
                                        batch_size=args.per_class * 10, grid_per_class=min(4, args.per_class))
        curves.append(res["curve"])
        results[form] = res["points"]
        rows = [res["grids"][s][0] for s in scales]
        k = res["grids"][scales[0]][1]
        save_grid(torch.cat(rows), os.path.join(out, f"grid_{form}.png"), nrow=10 * k, scale=2,
                  row_labels=[f"s={s:g}" for s in scales])
        for p in res["points"]:
            print(f"[guided-accuracy] {form:4s} s={p['classifier_scale']:<5g} accuracy {p['accuracy']:.3f} "
                  f"fd {p['fd']:.1f} diversity {p['diversity']:.2f}", file=sys.stderr)
    timing["sweep_s"] = round(time.perf_counter() - t0, 1)
    E.plot_sweep(curves, os.path.join(out, "guided_accuracy.png"), x_label="classifier scale s",
                 title="classifier guidance of an unconditional model (Fashion-MNIST)")
    timing["total_s"] = round(time.perf_counter() - t_start, 1)
    summary = {"scales": scales, "forms": args.forms.split(","), "per_class": args.per_class,
               "sampler": "ddpm", "clip_x0": None, "T": pipe.sched.T, "seed": args.seed,
               "accuracy": {f: [p["accuracy"] for p in pts] for f, pts in results.items()},
               "points": results, "accuracy_by_t": {"t": acc_t["t"], "accuracy": acc_t["accuracy"]},
               "eval_classifier": {k: eval_info[k] for k in ("accuracy", "n_train", "n_test", "epochs")
                                   if k in eval_info},
               "runs": {"diffusion": os.path.join(out, "diffusion"), "classifier": os.path.join(out, "classifier")},
               "diffusion_steps": args.diffusion_steps, "classifier_steps": args.classifier_steps,
               "batch": args.batch, "n_train": args.n_train, "timing": timing}
    with open(os.path.join(out, "guided_accuracy.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: summary[k] for k in ("scales", "accuracy", "accuracy_by_t", "eval_classifier",
                                              "timing")}, indent=1))
    return summary


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
    g = sub.add_parser("guided-accuracy", help="train an unconditional model + noisy classifier on "
                       "Fashion-MNIST, then guided accuracy by classifier scale (JSON, PNG)")
    g.add_argument("--out", default="runs/cg-fmnist", help="work folder (shards, runs, results)")
    g.add_argument("--scales", default="0,1,3,10", help="classifier scales (comma-separated)")
    g.add_argument("--forms", default="eps,mean", help="eps and/or mean (comma-separated)")
    g.add_argument("--per-class", type=int, default=10, help="samples per class and scale")
    g.add_argument("--diffusion-steps", type=int, default=1200)
    g.add_argument("--classifier-steps", type=int, default=1800)
    g.add_argument("--batch", type=int, default=32, help="training micro batch")
    g.add_argument("--n-train", type=int, default=20000, help="training images written to shards")
    g.add_argument("--eval-n-train", type=int, default=0,
                   help="evaluation CNN's training images (0: all 60k; cached by framework.evaluate)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=1)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "accuracy":
        accuracy_main(args)
    elif args.cmd == "guided-accuracy":
        guided_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
