"""Evaluating a text-to-image model on a class-template dataset (Fashion-MNIST) with an
independent classifier.

    clf, info = get_classifier()                         # a small CNN trained once on the 60k real
                                                         # training images, cached by a key of the data
    res = guidance_sweep(pipe, clf, gammas=[0, 1, 3, 5], per_class=20, real=reference_features(clf))
    plot_sweep([res["curve"]], "sweep.png")              # a list of named method curves

For each guidance scale gamma the sweep samples ``per_class`` images of every class from prompts made
of the dataset's caption templates, then reports
  - accuracy: the classifier's agreement with the prompted class (guided accuracy);
  - fd: the Frechet distance between Gaussians fitted to the classifier's penultimate features of the
    samples and of the held-out real images (the FID recipe in this classifier's feature space);
    ``fd_floor`` is the same statistic for as many REAL training images: what a perfect model scores
    at this sample size;
  - diversity: the mean pairwise feature distance within a class, averaged over classes, next to the
    same for real held-out images (``diversity_real``); their ratio shows mode collapse under guidance.

The classifier, the features and the statistics are plain torch (no scipy, no matplotlib: the plot
is drawn with PIL). No deepspeed.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from framework.files import atomic_file

__all__ = ["CLASSIFIER_VERSION", "load_fashion", "to_input", "Classifier", "train_classifier",
           "accuracy", "features", "data_key", "get_classifier", "frechet_distance",
           "mean_pairwise_distance", "class_diversity", "class_prompts", "reference_features",
           "guidance_sweep", "plot_sweep", "default_cache_dir"]

CLASSIFIER_VERSION = 1     # bump when the network or its training changes (invalidates caches)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_fashion(split: str = "train", root: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's dataset-fashion-mnist -> (images (N, 28, 28) uint8, labels (N,) int64)."""
    from framework.data.sources import FASHION_ROOT
    root = root or FASHION_ROOT
    stem = {"train": "train", "test": "t10k"}[split]
    img, lab = (os.path.join(root, f"{stem}-{k}-idx{d}-ubyte.gz") for k, d in (("images", 3), ("labels", 1)))
    for p in (img, lab):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: apt-get install dataset-fashion-mnist")
    with gzip.open(img) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lab) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1] (the diffusion model's range)."""
    return torch.from_numpy(np.array(images, copy=True)).float().div_(127.5).sub_(1.0)[:, None]


# ---------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """A small CNN on (B, 1, 28, 28) images in [-1, 1]: 3 conv stages (16, 32, 64 channels, BN,
    ReLU, max-pool between) -> 128-d penultimate features -> 10 logits. Other sizes are resized to
    28x28, RGB is averaged to gray. ~2.3M multiply-adds per image: trains at ~1k images/s on 2 cores."""

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64), feat_dim: int = 128,
                 size: int = 28):
        super().__init__()
        self.size = size
        a, b, c = widths

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.body = nn.Sequential(block(1, a), nn.MaxPool2d(2),            # 28 -> 14
                                  block(a, b), nn.MaxPool2d(2),            # 14 -> 7
                                  block(b, c))                             # 7
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c * (size // 4) ** 2, feat_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feat_dim, num_classes))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feat_dim) penultimate activations."""
        return self.fc(self.body(self.prepare(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 2, batch_size: int = 128,
                     lr: float = 3e-3, seed: int = 0, progress: bool = False) -> Classifier:
    """AdamW with a one-cycle schedule, ``epochs`` passes over (x (N,1,28,28) in [-1,1], y (N,)).
    Deterministic in ``seed`` (on CPU)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="classifier", unit="step", leave=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)                     # dropout
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return model.eval()


@torch.no_grad()
def _batched(fn: Callable, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((_batched(model, x).argmax(1) == y).float().mean())


@torch.no_grad()
def features(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return _batched(model.features, x).double()


def data_key(x: np.ndarray, y: np.ndarray, hparams: dict) -> str:
    """sha256 of the training images, labels, hyperparameters and CLASSIFIER_VERSION."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    h.update(json.dumps({**hparams, "version": CLASSIFIER_VERSION}, sort_keys=True).encode())
    return h.hexdigest()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "framework", "eval")


def get_classifier(cache_dir: Optional[str] = None, root: Optional[str] = None, n_train: int = 0,
                   n_test: int = 0, epochs: int = 2, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                   progress: bool = False) -> tuple[Classifier, dict]:
    """The evaluation classifier, trained on the real training images (the first ``n_train``; 0: all
    60k) and kept in ``cache_dir`` as safetensors under a key of the data and the hyperparameters.
    Its accuracy on the held-out test split (the first ``n_test``; 0: all 10k) is measured on
    training and stored with it. -> (classifier, info {accuracy, n_train, n_test, epochs, seconds,
    key, cached, path})."""
    from safetensors.torch import load_file, save_file

    xtr, ytr = load_fashion("train", root)
    if n_train:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    hp = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "n_test": n_test}
    key = data_key(xtr, ytr, hp)
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"fmnist-cnn-{key[:16]}.safetensors")
    model = Classifier()
    if os.path.isfile(path):
        try:
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                info = json.loads(f.metadata()["info"])
            model.load_state_dict(load_file(path))
            return model.eval(), dict(info, cached=True, path=path)
        except Exception:      # a damaged cache file: retrain
            pass
    t0 = time.perf_counter()
    model = train_classifier(to_input(xtr), torch.from_numpy(ytr), epochs, batch_size, lr, seed, progress)
    seconds = time.perf_counter() - t0
    xte, yte = load_fashion("test", root)
    if n_test:
        xte, yte = xte[:n_test], yte[:n_test]
    acc = accuracy(model, to_input(xte), torch.from_numpy(yte))
    info = {"accuracy": round(acc, 4), "n_train": int(len(xtr)), "n_test": int(len(xte)), "epochs": epochs,
            "seconds": round(seconds, 1), "key": key, "held_out": "Fashion-MNIST test split"}
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata={"info": json.dumps(info)})
    return model, dict(info, cached=False, path=path)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def _stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = f.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / max(1, len(f) - 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) between Gaussians fitted to two
    feature sets (N_i, D); float64, symmetric PSD square roots by eigendecomposition."""
    mu1, s1 = _stats(f1)
    mu2, s2 = _stats(f2)
    r1 = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh((r1 @ s2 @ r1 + (r1 @ s2 @ r1).T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


def mean_pairwise_distance(f: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs i < j of rows of f (N, D)."""
    n = len(f)
    if n < 2:
        return float("nan")
    d = torch.cdist(f.double(), f.double())
    return float(d.sum() / (n * (n - 1)))


def class_diversity(f: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the within-class mean pairwise feature distance."""
    vals = [mean_pairwise_distance(f[labels == c]) for c in labels.unique().tolist()]
    vals = [v for v in vals if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
def class_prompts(per_class: int, num_classes: int = 10) -> tuple[list[str], torch.Tensor]:
    """``per_class`` prompts per class from the training captions' templates (sample j of class c uses
    template j mod #templates), class-major order. -> (prompts, labels (N,))."""
    from framework.data.sources import FASHION_NOUNS, FASHION_TEMPLATES, a_an
    prompts, labels = [], []
    for c in range(num_classes):
        for j in range(per_class):
            prompts.append(a_an(FASHION_TEMPLATES[j % len(FASHION_TEMPLATES)].format(FASHION_NOUNS[c])))
            labels.append(c)
    return prompts, torch.tensor(labels)


def reference_features(model: Classifier, root: Optional[str] = None, n_floor: int = 0,
                       seed: int = 0, per_class_diversity: int = 200) -> dict:
    """Held-out real features (the test split) for the Frechet distance and the real diversity,
    plus the training images' features for the sample-size floor (``n_floor`` of them, drawn by
    ``floor_features(n)``)."""
    xte, yte = load_fashion("test", root)
    fte = features(model, to_input(xte))
    yte_t = torch.from_numpy(yte)
    sel = torch.cat([torch.nonzero(yte_t == c).flatten()[:per_class_diversity] for c in range(10)])
    xtr, _ = load_fashion("train", root)
    return {"features": fte, "labels": yte_t,
            "diversity_real": class_diversity(fte[sel], yte_t[sel]),
            "train_images": xtr, "model": model, "seed": seed, "_floor": {}}


def _fd_floor(real: dict, n: int) -> float:
    """FD between n random real TRAINING images and the held-out set: a perfect model's score at
    sample size n (the statistic is biased upward for small n)."""
    if n not in real["_floor"]:
        g = np.random.default_rng(real["seed"])
        idx = g.choice(len(real["train_images"]), size=n, replace=False)
        f = features(real["model"], to_input(real["train_images"][np.sort(idx)]))
        real["_floor"][n] = frechet_distance(f, real["features"])
    return real["_floor"][n]


@torch.no_grad()
def guidance_sweep(pipe, model: Classifier, gammas: Sequence[float], real: dict, per_class: int = 20,
                   steps: int = 20, sampler: str = "ddim", seed: int = 0, batch_size: int = 100,
                   name: str = "CFG", model_wrapper: Optional[Callable] = None, progress: bool = False,
                   grid_per_class: int = 10, **sample_kwargs) -> dict:
    """For each gamma: ``per_class`` samples of each of the 10 classes (the same initial noise for every
    gamma), the classifier's guided accuracy, the Frechet distance to the held-out real features, the
    within-class diversity. ``model_wrapper(fn, prompts) -> fn`` adds another guidance on top (e.g.
    classifier guidance) for a further named curve. -> {"name", "points": [{gamma, accuracy,
    per_class_accuracy, fd, fd_floor, diversity, diversity_real, n, seconds}], "curve": {"name",
    "points"}, "grids": {gamma: (images (10*k, C, H, W), k)}}."""
    prompts, labels = class_prompts(per_class)
    n = len(prompts)
    x_T = pipe.noise(n, seed)
    points, grids = [], {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(gammas) * math.ceil(n / batch_size), desc=f"sweep {name}", unit="batch")
    for gamma in gammas:
        t0 = time.perf_counter()
        outs = []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            outs.append(pipe(prompts[lo:hi], guidance_scale=float(gamma), steps=steps, sampler=sampler,
                             seed=seed + 1 + lo // batch_size, x_T=x_T[lo:hi], output_type="pt",
                             model_wrapper=model_wrapper, **sample_kwargs))
            if bar is not None:
                bar.update(1)
        x = torch.cat(outs)                                                   # (N, C, H, W) in [-1, 1]
        # the classifier sees what a PNG would hold: 8-bit quantised pixels
        x = ((x + 1) * 127.5).round().div(127.5).sub(1)
        f = features(model, x)
        logits = model.head(f.float())
        pred = logits.argmax(1)
        correct = (pred == labels).float()
        k = min(grid_per_class, per_class)
        grids[gamma] = (torch.cat([x[labels == c][:k] for c in range(10)]), k)
        points.append({
            "gamma": float(gamma), "accuracy": round(float(correct.mean()), 4),
            "per_class_accuracy": [round(float(correct[labels == c].mean()), 3) for c in range(10)],
            "fd": round(frechet_distance(f, real["features"]), 3), "fd_floor": round(_fd_floor(real, n), 3),
            "diversity": round(class_diversity(f, labels), 3), "diversity_real": round(real["diversity_real"], 3),
            "n": n, "seconds": round(time.perf_counter() - t0, 1)})
    if bar is not None:
        bar.close()
    curve = {"name": name, "points": points}
    return {"name": name, "points": points, "curve": curve, "grids": grids,
            "settings": {"per_class": per_class, "steps": steps, "sampler": sampler, "seed": seed,
                         "gammas": [float(g) for g in gammas]}}


# ---------------------------------------------------------------------------------------------
# The plot (PIL: no matplotlib dependency)
# ---------------------------------------------------------------------------------------------
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    ticks = [math.floor(lo / step) * step]
    while ticks[-1] < hi - step * 1e-9:            # the last tick is >= hi
        ticks.append(ticks[-1] + step)
    return [round(t, 10) for t in ticks]


def plot_sweep(curves: Sequence[dict], path: str,
               metrics: Sequence[tuple[str, str]] = (("accuracy", "guided accuracy"),
                                                     ("fd", "Frechet distance (classifier features)"),
                                                     ("diversity", "within-class diversity")),
               x_key: str = "gamma", x_label: str = "guidance scale gamma",
               references: Optional[dict[str, tuple[str, float]]] = None,
               title: str = "") -> str:
    """One panel per metric, metric vs ``x_key``; one line per curve ({"name", "points": [{x_key,
    metric...}]}): CFG now, classifier guidance or other methods later. ``references``:
    {metric: (label, value)} dashed horizontal lines (e.g. real-data diversity)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pw, ph, ml, mr, mt, mb = 330, 250, 58, 14, 30, 44
    legend_h = 18 * len(curves) + 8
    title_h = 22 if title else 0
    W, H = len(metrics) * (pw + ml + mr) + 10, title_h + ph + mt + mb + legend_h
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((10, 5), title, fill="black", font=font)
    refs = references or {}
    xs_all = [p[x_key] for c in curves for p in c["points"]]
    xlo, xhi = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    xt = _nice_ticks(xlo, xhi)
    xlo, xhi = min(xlo, xt[0]), max(xhi, xt[-1])
    for m_i, (key, label) in enumerate(metrics):
        ox, oy = m_i * (pw + ml + mr) + ml, title_h + mt
        vals = [p[key] for c in curves for p in c["points"] if p.get(key) is not None
                and not math.isnan(p[key])]
        if key in refs:
            vals.append(refs[key][1])
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        if key == "accuracy":
            yt = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        else:
            pad = (hi - lo) * 0.05 or 0.5
            yt = _nice_ticks(lo - pad, hi + pad)
        ylo, yhi = yt[0], yt[-1]

        def X(v):
            return ox + (v - xlo) / ((xhi - xlo) or 1) * pw

        def Y(v):
            return oy + ph - (v - ylo) / ((yhi - ylo) or 1) * ph
        d.rectangle([ox, oy, ox + pw, oy + ph], outline="black")
        for t in yt:
            d.line([ox, Y(t), ox + pw, Y(t)], fill=(230, 230, 230))
            d.line([ox - 4, Y(t), ox, Y(t)], fill="black")
            d.text((ox - 6, Y(t)), f"{t:g}", fill="black", font=font, anchor="rm")
        for t in xt:
            d.line([X(t), oy + ph, X(t), oy + ph + 4], fill="black")
            d.text((X(t), oy + ph + 6), f"{t:g}", fill="black", font=font, anchor="mt")
        d.text((ox + pw / 2, oy - 6), label, fill="black", font=font, anchor="md")
        d.text((ox + pw / 2, oy + ph + 22), x_label, fill="black", font=font, anchor="mt")
        if key in refs:
            rl, rv = refs[key]
            x0 = ox
            while x0 < ox + pw:
                d.line([x0, Y(rv), min(x0 + 6, ox + pw), Y(rv)], fill=(90, 90, 90))
                x0 += 10
            d.text((ox + pw - 4, Y(rv) - 3), rl, fill=(90, 90, 90), font=font, anchor="rd")
        for c_i, c in enumerate(curves):
            color = _COLORS[c_i % len(_COLORS)]
            pts = [(X(p[x_key]), Y(p[key])) for p in sorted(c["points"], key=lambda p: p[x_key])
                   if p.get(key) is not None and not math.isnan(p[key])]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for (px, py) in pts:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    ly = title_h + mt + ph + mb
    for c_i, c in enumerate(curves):
        color = _COLORS[c_i % len(_COLORS)]
        d.line([ml, ly + 18 * c_i + 7, ml + 24, ly + 18 * c_i + 7], fill=color, width=3)
        d.text((ml + 30, ly + 18 * c_i), c["name"], fill="black", font=font)
    with atomic_file(path, suffix=".png") as tmp:
        img.save(tmp)
    return path
