"""Data pipeline throughput: decode+augment+batch from local shards vs the bare PIL decode rate of
the same images; and the data path at scale: startup over many shards, resume, drop. Prints JSON lines.

    python -m tools.bench_data                       # both datasets, workers 0 and 2
    python -m tools.bench_data --which jpeg --workers 0 1 2 --seconds 10
    python -m tools.bench_data --which startup       # build the loader over 10,000 tars without manifest
    python -m tools.bench_data --which resume        # first batch after resuming at 10/50/90% of an epoch
    python -m tools.bench_data --which dropped       # 7 shards of 1,000 on 2 ranks: samples left out

Datasets (written to a temp dir): Fashion-MNIST 28x28 PNG read at 32x32 (grayscale), and 512
synthetic 256x256 photo-like JPEGs (q90) read at 256 (RGB, random crop+flip) and at 64 (where
libjpeg's draft mode decodes at reduced scale). ``samples_per_s_per_worker`` divides by the number
of worker processes (1 for num_workers=0, which decodes in the main process);
``samples_per_cpu_s`` divides by the CPU time used (main process + workers), which stays
meaningful on a shared, busy machine where wall-clock rates mostly measure the contention.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from typing import Optional

import numpy as np
from PIL import Image


def _fmnist_images(n: int) -> list[Image.Image]:
    from framework.data.sources import fashion_mnist_source
    try:
        src = fashion_mnist_source("train")
        return [src.load(i)["image"] for i in range(min(n, len(src)))]
    except FileNotFoundError:            # no Debian package: random 28x28 blobs stand in
        rng = np.random.default_rng(0)
        return [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L") for _ in range(n)]


def _photo_like(rng: np.random.Generator, base: Optional[Image.Image], size: int = 256) -> Image.Image:
    """Smooth colour gradients + an upsampled object + mild noise: JPEG-compresses like a photo."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    img = (c0[None, None] * (1 - yy[..., None]) + c1[None, None] * yy[..., None]) * (1 - xx[..., None]) \
        + c2[None, None] * xx[..., None]
    if base is not None:
        obj = np.asarray(base.convert("L").resize((size, size), Image.BICUBIC), np.float32)[..., None] / 255
        tint = rng.uniform(0, 255, 3)
        img = img * (1 - obj) + tint * obj
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_datasets(tmp: str, n_fmnist: int, n_jpeg: int) -> dict[str, str]:
    from framework.data.shards import ShardWriter

    out = {}
    fm = _fmnist_images(max(n_fmnist, n_jpeg))
    w = ShardWriter(os.path.join(tmp, "fmnist"), prefix="fm", max_count=max(1, n_fmnist // 8))
    for i in range(n_fmnist):
        w.write(f"fm{i:06d}", fm[i], "a photo of a thing", {"label": i % 10})
    w.close()
    out["fmnist"] = os.path.join(tmp, "fmnist")
    rng = np.random.default_rng(0)
    w = ShardWriter(os.path.join(tmp, "jpeg"), prefix="jp", max_count=max(1, n_jpeg // 8), image_format="jpg")
    for i in range(n_jpeg):
        w.write(f"jp{i:06d}", _photo_like(rng, fm[i]), "a photo of a thing")
    w.close()
    out["jpeg"] = os.path.join(tmp, "jpeg")
    return out


def _proc_cpu_s(pid: int) -> float:
    """user+system CPU seconds of a process (Linux /proc); 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def bare_decode_rate(path: str, seconds: float) -> dict:
    """PIL decode only (Image.open + load), bytes already in memory, one process."""
    from framework.data.loader import expand_spec, iter_shard_samples

    shards, _ = expand_spec(path)
    t0 = time.perf_counter()
    blobs = [s.get("png") or s.get("jpg") for sh in shards for s in iter_shard_samples(sh.url)]
    read_s = time.perf_counter() - t0
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or n < len(blobs):
        im = Image.open(io.BytesIO(blobs[n % len(blobs)]))
        im.load()
        n += 1
        if n >= 4 * len(blobs):
            break
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"samples_per_s": round(n / dt, 1), "samples_per_cpu_s": round(n / max(cpu, 1e-9), 1),
            "tar_read_samples_per_s": round(len(blobs) / read_s, 1),
            "samples": n, "image": f"{im.width}x{im.height} {im.mode}",
            "mean_bytes": int(np.mean([len(b) for b in blobs]))}


def pipeline_rate(path: str, image_size: int, channels: int, workers: int, batch: int, seconds: float,
                  crop: str = "center", flip: bool = False) -> dict:
    from framework.config import DataConfig
    from framework.data.loader import build_loader

    cfg = DataConfig(urls=[path], image_size=image_size, channels=channels, num_workers=workers,
                     crop=crop, random_flip=flip, shuffle_buffer=256)
    L = build_loader(cfg, batch, 0, 1, 0)
    next(L)                                   # start-up (worker processes, first shard) not timed
    pids = [w.pid for w in getattr(L._it, "_workers", [])]     # DataLoader worker processes

    def cpu() -> float:                       # this process + the workers: robust to a busy machine
        return time.process_time() + sum(_proc_cpu_s(p) for p in pids)
    n, t0, c0 = 0, time.perf_counter(), cpu()
    while time.perf_counter() - t0 < seconds:
        n += next(L)["image"].shape[0]
    dt, used = time.perf_counter() - t0, cpu() - c0
    L.close()
    procs = max(1, workers)
    return {"samples_per_s": round(n / dt, 1), "samples_per_s_per_worker": round(n / dt / procs, 1),
            "samples_per_cpu_s": round(n / max(used, 1e-9), 1), "samples": n}


# ---------------------------------------------------------------------------------------------
# Startup, resume and drop (the data path at scale)
# ---------------------------------------------------------------------------------------------
def _tiny_png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), i % 256, np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def write_img2dataset_tree(out: str, n_shards: int, per_shard: int, stats: bool) -> str:
    """``n_shards`` tars named as img2dataset names them (``00000.tar``; members ``KEY.png``,
    ``KEY.txt``, ``KEY.json``), tiny samples, no ``shards.json``; with ``stats`` a
    ``{shard}_stats.json`` beside each. Returns the brace pattern."""
    import tarfile

    os.makedirs(out, exist_ok=True)
    png = _tiny_png(7)
    for s in range(n_shards):
        with tarfile.open(os.path.join(out, f"{s:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                for ext, data in (("png", png), ("txt", b"a grey square"),
                                  ("json", json.dumps({"key": key, "status": "success"}).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        if stats:
            with open(os.path.join(out, f"{s:05d}_stats.json"), "w") as f:
                json.dump({"count": per_shard, "successes": per_shard, "failed_to_download": 0}, f)
    return os.path.join(out, "{%05d..%05d}.tar" % (0, n_shards - 1))


def startup_times(tmp: str, n_shards: int, per_shard: int = 2, workers: int = 2) -> list[dict]:
    """Seconds to build the loader (shard list and counts, no sample read) over ``n_shards`` local
    tars without a manifest: the first start, a second start, and with ``_stats.json`` files."""
    from framework.config import DataConfig
    from framework.data.loader import build_loader

    out = []
    for stats in (False, True):
        pattern = write_img2dataset_tree(os.path.join(tmp, f"i2d-{int(stats)}"), n_shards, per_shard, stats)
        for attempt in ("first", "second"):
            cfg = DataConfig(urls=[pattern], image_size=4, channels=1, num_workers=workers)
            t0 = time.perf_counter()
            L = build_loader(cfg, 2, 0, 1, 0)
            dt = time.perf_counter() - t0
            out.append({"what": "startup", "shards": n_shards, "stats_json": stats, "start": attempt,
                        "seconds": round(dt, 3), "steps_per_epoch": L.steps_per_epoch})
            L.close()
    return out


def resume_times(path: str, batch: int = 64, fractions=(0.1, 0.5, 0.9), workers: int = 0,
                 shuffle_buffer: int = 2000, image_size: int = 28) -> list[dict]:
    """Seconds to the first batch of a fresh loader and of loaders resumed at ``fractions`` of an
    epoch (1 rank; the demo's data settings)."""
    from framework.config import DataConfig
    from framework.data.loader import build_loader

    cfg = DataConfig(urls=[path], image_size=image_size, channels=1, num_workers=workers,
                     shuffle_buffer=shuffle_buffer)

    def first_batch(sd=None, repeat: int = 3) -> float:
        times = []
        for _ in range(repeat):             # the median of 3: the machine may be shared
            L = build_loader(cfg, batch, 0, 1, 0)
            t0 = time.perf_counter()
            if sd is not None:
                L.load_state_dict(sd)
            next(L)
            times.append(time.perf_counter() - t0)
            L.close()
        return sorted(times)[len(times) // 2]

    L = build_loader(cfg, batch, 0, 1, 0)
    S = L.steps_per_epoch
    at = sorted({max(1, int(f * S)) for f in fractions})
    states = {}
    for k in range(1, at[-1] + 1):
        next(L)
        if k in at:
            states[k] = json.loads(json.dumps(L.state_dict()))
    L.close()
    out = [{"what": "resume_first_batch", "step": 0, "steps_per_epoch": S, "seconds": round(first_batch(), 3),
            "state_bytes": 0}]
    for k in at:
        out.append({"what": "resume_first_batch", "step": k, "steps_per_epoch": S,
                    "seconds": round(first_batch(states[k]), 3), "state_bytes": len(json.dumps(states[k]))})
    return out


def dropped(tmp: str, n_shards: int = 7, per_shard: int = 1000, ranks: int = 2, batch: int = 32,
            workers: int = 0) -> dict:
    """Samples the equal-steps rule leaves out per epoch: ``n_shards`` of ``per_shard`` on ``ranks``."""
    from framework.config import DataConfig
    from framework.data.loader import build_loader

    pattern = write_img2dataset_tree(os.path.join(tmp, f"drop-{n_shards}x{per_shard}"), n_shards, per_shard, True)
    cfg = DataConfig(urls=[pattern], image_size=4, channels=1, num_workers=workers)
    L = build_loader(cfg, batch, 0, ranks, 0)
    n = n_shards * per_shard
    rec = {"what": "dropped_per_epoch", "shards": n_shards, "per_shard": per_shard, "ranks": ranks,
           "workers": workers, "batch": batch, "dropped": L.dropped_per_epoch,
           "dropped_pct": round(100 * L.dropped_per_epoch / n, 2), "steps_per_epoch": L.steps_per_epoch}
    L.close()
    return rec


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m tools.bench_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=["all", "fmnist", "jpeg", "startup", "resume", "dropped"], default="all",
                   help="all = the decode throughput sections (fmnist, jpeg); startup, resume, dropped: "
                        "the data path at scale")
    p.add_argument("--startup-shards", type=int, default=10_000)
    p.add_argument("--resume-shards", type=int, nargs="+", default=[60, 1000],
                   help="resume section: Fashion-MNIST train (60,000) written as this many shards")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--n-fmnist", type=int, default=10_000)
    p.add_argument("--n-jpeg", type=int, default=512)
    p.add_argument("--tmp", default=None, help="where to write the shards (default: a temp dir)")
    args = p.parse_args(argv)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    results = []

    def emit(rec: dict) -> None:
        rec = {**rec, "machine": machine}
        results.append(rec)
        print(json.dumps(rec), flush=True)

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        if args.which == "startup":
            for rec in startup_times(tmp, args.startup_shards):
                emit(rec)
            return results
        if args.which == "dropped":
            emit(dropped(tmp))
            return results
        if args.which == "resume":
            from framework.data.shards import write_shards
            from framework.data.sources import fashion_mnist_source

            src = fashion_mnist_source("train")
            for n in args.resume_shards:
                out = os.path.join(tmp, f"fmnist-{n}")
                write_shards(src, out, prefix="fmnist", max_count=-(-len(src) // n), image_format="png")
                for rec in resume_times(out, batch=args.batch):
                    emit({**rec, "shards": n})
            return results
        t0 = time.perf_counter()
        paths = write_datasets(tmp, args.n_fmnist if args.which != "jpeg" else 8,
                               args.n_jpeg if args.which != "fmnist" else 8)
        emit({"what": "write_shards", "seconds": round(time.perf_counter() - t0, 2)})
        runs = []
        if args.which in ("all", "fmnist"):
            runs.append(("fmnist-28px-png", paths["fmnist"], [(32, 1, "center", False)]))
        if args.which in ("all", "jpeg"):
            runs.append(("synthetic-256px-jpeg", paths["jpeg"], [(256, 3, "random", True), (64, 3, "center", False)]))
        for name, path, variants in runs:
            emit({"dataset": name, "what": "bare_pil_decode", **bare_decode_rate(path, args.seconds)})
            for size, ch, crop, flip in variants:
                for w in args.workers:
                    emit({"dataset": name, "what": "pipeline_decode_augment_batch", "image_size": size,
                          "channels": ch, "crop": crop, "flip": flip, "num_workers": w, "batch": args.batch,
                          **pipeline_rate(path, size, ch, w, args.batch, args.seconds, crop, flip)})
    return results


if __name__ == "__main__":
    main()
