"""Prompts -> PNG images and a labelled grid, from an export directory (tools/checkpoint.py export).

    python -m tools.sample runs/demo/export --prompt "a photo of a dress" --prompt "a photo of a bag"
    python -m tools.sample runs/demo/export --prompts-file prompts.txt --guidance 0 1 3 5 \\
        --num-per-prompt 2 --steps 25 --sampler ddim --seed 0 --out samples/
    python -m tools.sample EXPORT --prompt "a photo of a coat" --negative-prompt "a photo of a shirt" --rescale 0.7
    python -m tools.sample EXPORT --prompt "a bag on the left" --size 16x32 --size 32x16   # aspect ratios

Grid: one row per guidance scale (x --num-per-prompt), one column per prompt; every scale starts
from the same noise, so a column shows what guidance changes. Several --size: a block of rows per
size, each image centred in a cell as large as the largest (framework/images.make_grid). Writes OUT/grid.png,
OUT/images/g{scale}_p{prompt}_n{sample}.png and OUT/samples.json. The logic is
framework/export.py (Pipeline, Pipeline.sample_grid).
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
    p = argparse.ArgumentParser(prog="python -m tools.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="export directory (config.yaml + model*.safetensors + null.safetensors)")
    p.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line (# comments)")
    p.add_argument("--labels", nargs="*", default=None, help="column labels (default: the prompts' ends)")
    p.add_argument("--guidance", "-g", type=float, nargs="+", default=None,
                   help="classifier-free guidance scale(s); one grid row each (default: config.yaml's)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=None)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (ddpm uses all T)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    p.add_argument("--rescale", type=float, default=None, help="CFG rescale phi in [0, 1]")
    p.add_argument("--negative-prompt", default=None, help="replaces the null condition in guidance")
    p.add_argument("--clip-x0", type=float, default=None,
                   help="clamp each step's x_0 estimate to [-C, C] (default: config.yaml's, 1.0)")
    p.add_argument("--no-clip", action="store_true", help="do not clamp the x_0 estimates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="output height in pixels (default: the training size)")
    p.add_argument("--width", type=int, default=None, help="output width in pixels (default: the training size)")
    p.add_argument("--size", action="append", default=[], metavar="HxW",
                   help="an output size, e.g. 256x384 (repeatable: a block of grid rows per size)")
    p.add_argument("--num-per-prompt", "-n", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile the UNet (the first batch compiles; pays for many batches); "
                        "reduce-overhead = CUDA graphs")
    p.add_argument("--text-encoder", default=None,
                   help="the text encoder's directory, overriding config.yaml's (e.g. on another machine)")
    p.add_argument("--out", "-o", default="samples", help="output folder")
    p.add_argument("--cell-scale", type=int, default=0, help="grid pixel scale (0: auto, cells >= 64 px)")
    p.add_argument("--no-images", action="store_true", help="write only the grid")
    add_guidance_args(p)
    return p


# ---- extra guidance (e.g. classifier guidance: --classifier DIR --classifier-scale G) -------------
def add_guidance_args(p: argparse.ArgumentParser) -> None:
    """Flags of further guidance methods go here."""
    g = classifier_guidance_group(p, "classifier guidance")
    g.add_argument("--classifier-scale", type=float, default=1.0, help="classifier guidance scale (default 1)")
    g.add_argument("--classifier-class", default=None,
                   help="target class (index or name) for every prompt; default: the class each prompt names")


def guidance_wrapper(args, pipe) -> Optional[Callable]:
    """-> None, or ``wrap(model_fn, prompts) -> model_fn`` applied on top of classifier-free guidance
    (``Pipeline.__call__(model_wrapper=...)``): the place for classifier guidance."""
    if not getattr(args, "classifier", None):
        return None
    from framework.models.classifier import ClassifierGuide
    sampler = args.sampler or pipe.defaults.sampler
    if args.classifier_form == "mean" and (sampler != "ddpm" or not args.no_clip):
        raise SystemExit("--classifier-form mean is the lecture's mean shift of the plain ancestral sampler: "
                         "add --sampler ddpm --no-clip")
    guide = ClassifierGuide.load(args.classifier, device=pipe.device)
    if guide.model.cfg.in_channels != pipe.channels:
        raise SystemExit(f"--classifier takes {guide.model.cfg.in_channels}-channel images, the model makes "
                         f"{pipe.channels}")
    try:
        guide.check_schedule(pipe.sched)
    except ValueError as e:
        raise SystemExit(f"--classifier: {e}")
    return guide.prompt_wrapper(args.classifier_scale, pipe.sched, form=args.classifier_form,
                                y=args.classifier_class)


# ---------------------------------------------------------------------------------------------------
def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise SystemExit("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def short_label(text: str, width_px: int) -> str:
    """The end of a prompt that fits ``width_px`` (the default font is ~6 px per character)."""
    n = max(3, width_px // 6)
    return text if len(text) <= n else ".." + text[-(n - 2):]


def parse_sizes(args) -> list[tuple[Optional[int], Optional[int]]]:
    """--size HxW (repeatable) or --height/--width -> [(h, w)] (None: the model's training size)."""
    if args.size and (args.height or args.width):
        raise SystemExit("use --size HxW or --height/--width, not both")
    out = []
    for text in args.size:
        try:
            h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 256x384") from None
        out.append((h, w))
    return out or [(args.height, args.width)]


def run(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    from framework.export import Pipeline
    from framework.images import save_grid, to_pil

    prompts = read_prompts(args)
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.export, device=args.device, text_encoder=args.text_encoder,
                                    compile=args.compile or False)
    scales = args.guidance if args.guidance is not None else [pipe.defaults.guidance_scale]
    kw = {k: getattr(args, k) for k in ("steps", "sampler", "eta", "rescale") if getattr(args, k) is not None}
    if args.negative_prompt is not None:
        kw["negative_prompt"] = args.negative_prompt
    if args.no_clip or args.clip_x0 is not None:
        kw["clip_x0"] = None if args.no_clip else args.clip_x0
    sizes = []
    for h, w in parse_sizes(args):
        try:
            sizes.append(pipe.check_size(h, w))
        except ValueError as e:
            raise SystemExit(f"--size/--height/--width: {e}") from None
    wrapper = guidance_wrapper(args, pipe)
    images, row_labels, records = [], [], []
    for h, w in sizes:
        r = pipe.sample_grid(prompts, scales, num_per_prompt=args.num_per_prompt, seed=args.seed,
                             batch_size=args.batch_size, progress=True, model_wrapper=wrapper,
                             height=h, width=w, **kw)
        images.append(r["images"])
        row_labels += [f"{lab} {h}x{w}" if len(sizes) > 1 else lab for lab in r["row_labels"]]
        for rec in r["records"]:
            records.append(dict(rec, row=rec["row"] + len(row_labels) - len(r["row_labels"]), height=h, width=w))
    res = {"images": images[0] if len(images) == 1 else images, "nrow": len(prompts),
           "row_labels": row_labels, "records": records}
    os.makedirs(args.out, exist_ok=True)
    side = min(min(s) for s in sizes)
    scale = args.cell_scale or max(1, -(-64 // side))
    cell = max(w for _, w in sizes) * scale
    labels = args.labels if args.labels else [short_label(p, cell) for p in prompts]
    if len(labels) != len(prompts):
        raise SystemExit(f"{len(labels)} --labels for {len(prompts)} prompts")
    grid = save_grid(res["images"], os.path.join(args.out, "grid.png"), nrow=res["nrow"], scale=scale,
                     row_labels=res["row_labels"], col_labels=labels)
    files = []
    if not args.no_images:
        os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
        pils = [im for x in images for im in to_pil(x)]
        for rec, im in zip(res["records"], pils):
            size = f"_{rec['height']}x{rec['width']}" if len(sizes) > 1 else ""
            name = f"images/g{rec['scale']:g}_p{rec['col']:03d}_n{rec['sample']}{size}.png"
            im.save(os.path.join(args.out, name))
            rec["file"] = name
            files.append(name)
    summary = {"export": os.path.abspath(args.export), "grid": os.path.abspath(grid), "prompts": prompts,
               "guidance_scales": scales, "sizes": [list(s) for s in sizes], "seed": args.seed, "num_per_prompt": args.num_per_prompt,
               "sampler": kw.get("sampler", pipe.defaults.sampler), "steps": kw.get("steps", pipe.defaults.steps),
               "device": str(pipe.device), "seconds": round(time.perf_counter() - t0, 2),
               "images": res["records"]}
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{len(res['records'])} images ({len(res['row_labels'])} rows x {res['nrow']} prompts) -> "
          f"{summary['grid']} ({summary['seconds']} s)", file=sys.stderr)
    return summary


main = entry_point(run)


if __name__ == "__main__":
    sys.exit(main())
