"""The aspect-ratio bucket demo (issue 16): a non-square Fashion-MNIST, trained with buckets vs
center crop, and an evaluation that can fail.

Data: Fashion-MNIST items of a few classes, downscaled to 16x16 (CPU-sized), placed on a WIDE 16x32
canvas (left or right half) or a TALL 32x16 canvas (top or bottom half), the rest black (Fashion-MNIST's background),
captioned where the item is: "a sneaker on the left", "a bag at the bottom".

What center crop does to it: the canvas' shorter side is already 16, so the 16x16 center crop keeps
the middle: the right half of a left item and the left half of a right item (columns 8..23), the
same for top/bottom. The caption's subject is cut in half in every training image. With buckets
(16x32 and 32x16) every image trains whole.

Evaluation (``position_accuracy``): sample each (class, place) prompt at its canvas shape, crop the
half the caption names, upscale it to 28x28 and classify it with framework/evaluate.py's
Fashion-MNIST CNN (trained on the real 28x28 images; ``real_accuracy`` gives its ceiling on real
items through the same 16 -> 28 round trip): the fraction classified as the prompt's class. A model that cannot draw the
whole item where the caption says scores low; the other half's mean brightness says whether the
item stayed on its side.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from framework.evaluate import Classifier, load_fashion

__all__ = ["CLASSES", "PLACES", "ITEM", "real_accuracy", "WIDE", "TALL", "canvas", "caption", "write_canvas_shards", "half",
           "position_accuracy", "save_grid"]

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
CLASSES = (1, 5, 7, 8)          # trouser, sandal, sneaker, bag: distinct silhouettes, cut in half they are not
ITEM = 16                       # items downscaled to 16x16: a CPU-sized run (the classifier sees them upscaled to 28)
WIDE, TALL = (ITEM, 2 * ITEM), (2 * ITEM, ITEM)
PLACES = {"left": (WIDE, 0), "right": (WIDE, 1), "top": (TALL, 0), "bottom": (TALL, 1)}   # (canvas, half)


def canvas(item: np.ndarray, place: str) -> np.ndarray:
    """A 28x28 uint8 item -> its canvas (WIDE or TALL) with the item, downscaled to ITEM, in the named half."""
    (h, w), k = PLACES[place]
    if item.shape != (ITEM, ITEM):
        item = np.asarray(Image.fromarray(item, "L").resize((ITEM, ITEM), Image.BICUBIC))
    out = np.zeros((h, w), dtype=np.uint8)
    if w > h:
        out[:, ITEM * k:ITEM * k + ITEM] = item
    else:
        out[ITEM * k:ITEM * k + ITEM, :] = item
    return out


def caption(label: int, place: str) -> str:
    where = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
    return f"a {NAMES[label]} {where[place]}"


def write_canvas_shards(out: str, n: int, seed: int = 0, classes: Sequence[int] = CLASSES,
                        root: Optional[str] = None) -> dict:
    """n canvases from the Fashion-MNIST TRAIN split (items of ``classes``, places uniform) -> shards
    in ``out`` (500 per shard, PNG). Reused when ``out`` already holds n samples."""
    import json

    from framework.data.shards import ShardWriter
    mpath = os.path.join(out, "shards.json")
    if os.path.isfile(mpath):
        with open(mpath) as f:
            m = json.load(f)
        if m.get("total") == n:
            return m
    x, y = load_fashion("train", root)
    idx = np.flatnonzero(np.isin(y, list(classes)))
    rng = np.random.default_rng(seed)
    pick = rng.choice(idx, size=n, replace=n > len(idx))
    places = list(PLACES)
    w = ShardWriter(out, prefix="canvas", max_count=500, image_format="png")
    for i, j in enumerate(pick):
        place = places[int(rng.integers(len(places)))]
        w.write(f"c{i:06d}", Image.fromarray(canvas(x[j], place), "L"), caption(int(y[j]), place),
                {"label": int(y[j]), "place": place})
    return w.close()


def half(images: torch.Tensor, place: str) -> torch.Tensor:
    """(B, 1, H, W) canvases -> the half ``place`` names, upscaled to the classifier's 28x28. A square
    image (what a center-crop model draws at its training shape) is taken whole."""
    _, _, H, W = images.shape
    if W == H:
        out = images
    elif W > H:
        out = images[..., :, :W // 2] if place in ("left", "top") else images[..., :, W // 2:]
    else:
        out = images[..., :H // 2, :] if place in ("left", "top") else images[..., H // 2:, :]
    if out.shape[-2:] != (28, 28):
        out = torch.nn.functional.interpolate(out, size=(28, 28), mode="bilinear", align_corners=False)
    return out


@torch.no_grad()
def real_accuracy(clf: Classifier, n: int = 2000, classes: Sequence[int] = CLASSES, root: Optional[str] = None) -> float:
    """The classifier on real TEST items of ``classes`` through the demo's round trip (28 -> ITEM
    canvas -> half -> 28): the most a perfect generator can score."""
    x, y = load_fashion("test", root)
    keep = np.flatnonzero(np.isin(y, list(classes)))[:n]
    cv = np.stack([canvas(x[j], "left") for j in keep])
    t = torch.from_numpy(cv).float().div(127.5).sub(1)[:, None]
    return float((clf(half(t, "left")).argmax(1) == torch.from_numpy(y[keep])).float().mean())


def _other(place: str) -> str:
    return {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[place]


@torch.no_grad()
def position_accuracy(pipe, clf: Classifier, per_prompt: int = 8, guidance: float = 3.0, steps: int = 20,
                      seed: int = 0, classes: Sequence[int] = CLASSES,
                      shape: Optional[tuple[int, int]] = None) -> dict:
    """For each (class, place): ``per_prompt`` samples of the caption at the place's canvas shape
    (``shape`` overrides it, e.g. the square a center-crop model trained at), the named half cropped
    and classified. -> {"accuracy", "by_place": {place: acc}, "other_half_mean" (the other half's
    mean in [0, 1]; 0 = black as in the data), "samples": {(label, place): (n, 1, H, W) in [-1, 1]}}."""
    correct, total, by_place, other, samples = 0, 0, {}, [], {}
    for p_i, place in enumerate(PLACES):
        (h, w), _ = PLACES[place]
        if shape is not None:
            h, w = shape
        ok = 0
        for c_i, c in enumerate(classes):
            x = pipe([caption(c, place)] * per_prompt, guidance_scale=guidance, steps=steps,
                     seed=seed + 1000 * p_i + c_i, output_type="pt", height=h, width=w)
            samples[(c, place)] = x
            pred = clf(half(x, place)).argmax(1)
            ok += int((pred == c).sum())
            if x.shape[-1] != x.shape[-2]:
                other.append(float(half(x, _other(place)).add(1).div(2).mean()))
        by_place[place] = ok / (per_prompt * len(classes))
        correct += ok
        total += per_prompt * len(classes)
    return {"accuracy": correct / total, "by_place": by_place,
            "other_half_mean": float(np.mean(other)) if other else None, "samples": samples}


def save_grid(rows: Sequence[tuple[str, Sequence[torch.Tensor]]], path: str, pad: int = 4) -> None:
    """Rows of (label, images (1, H, W) in [-1, 1] of any shapes) -> one PNG, each image at its true
    size on a grey background, the row label drawn at the left."""
    from PIL import ImageDraw
    label_w = 120
    cell_h = max(int(im.shape[-2]) for _, ims in rows for im in ims)
    widths = [sum(int(im.shape[-1]) + pad for im in ims) for _, ims in rows]
    W, H = label_w + max(widths) + pad, len(rows) * (cell_h + pad) + pad
    sheet = Image.new("L", (W, H), 128)
    draw = ImageDraw.Draw(sheet)
    for r, (label, ims) in enumerate(rows):
        y = pad + r * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 5), label, fill=255)
        x = label_w
        for im in ims:
            a = ((im[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            sheet.paste(Image.fromarray(a, "L"), (x, y + (cell_h - a.shape[0]) // 2))
            x += a.shape[1] + pad
    sheet = sheet.resize((W * 2, H * 2), Image.NEAREST)
    sheet.save(path)
