"""Aspect-ratio buckets in the loader (framework/data/loader.py + framework/data/buckets.py) on real shards of
images of several shapes: one bucket per batch, nearest-aspect assignment seen in the batches, the
size condition, exact resume at 2 ranks x 2 workers, equal images per step on every rank, and a
short real training run with a bit-exact checkpoint/resume."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from framework.data.buckets import assign, make_buckets, nearest_bucket
from framework.config import BucketConfig, DataConfig
from framework.data.loader import build_loader, decode_sample
from framework.data.shards import ShardWriter
from tests._fixtures import loader_run, take

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(20, 40), (40, 20), (30, 30), (24, 36), (36, 24), (27, 31), (50, 26), (19, 45)]   # (h, w), aspects 0.4..2.4
COUNTS = [13, 9, 15, 11, 12, 8, 14, 10, 13, 12]
BUCKETS = make_buckets(576, 8)                  # 24x24's area, step 8: 32x16, 24x16, 24x24, 16x24, 16x32


def make_dataset(path, counts=COUNTS, prefix="d", seed=0, bad=None, channels=3, caption=None):
    """Shards of images of the SHAPES (cycled, PNG and JPEG alternating); json holds the stored size."""
    rng = np.random.default_rng(seed)
    bad = bad or {}
    w = ShardWriter(str(path), prefix=prefix, max_count=10_000)
    n = 0
    for s, c in enumerate(counts):
        for i in range(c):
            key = f"{prefix}{s:02d}x{i:03d}"
            h, wd = SHAPES[n % len(SHAPES)]
            shape = (h, wd) if channels == 1 else (h, wd, 3)
            im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            buf = io.BytesIO()
            fmt = "PNG" if n % 2 == 0 else "JPEG"
            im.save(buf, format=fmt)
            data = b"\x89PNG\r\n\x1a\n broken" if bad.get(key) == "undecodable" else buf.getvalue()
            cap = caption(n) if caption else f"caption of {key}"
            w.write(key, (data, "png" if fmt == "PNG" else "jpg"), cap, {"label": n % 10, "h": h, "w": wd})
            n += 1
        w.next_shard()
    return w.close()


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("bds")
    make_dataset(d, bad={"d01x003": "undecodable", "d06x002": "undecodable"})
    return str(d)


def sizes_of(path) -> dict[str, tuple[int, int]]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".tar"):
            import tarfile
            with tarfile.open(os.path.join(path, f)) as t:
                for m in t.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.load(t.extractfile(m))
                        out[m.name[:-5]] = (meta["h"], meta["w"])
    return out


def cfg_for(urls, buckets=True, **kw) -> DataConfig:
    base = dict(urls=[urls], image_size=24, channels=3, shuffle_buffer=16, num_workers=0, max_bad_fraction=0.5,
                buckets=BucketConfig(enabled=buckets, step=8))
    base.update(kw)
    return DataConfig(**base)


def digest(batches) -> list[str]:
    """Per batch: keys, shape, pixels and size condition, hashed (a resume must give the same bytes)."""
    out = []
    for b in batches:
        h = hashlib.sha1(json.dumps(b["key"]).encode())
        h.update(b["image"].numpy().tobytes())
        h.update(b["size_cond"].numpy().tobytes())
        out.append(f"{'/'.join(b['key'])}:{tuple(b['image'].shape)}:{h.hexdigest()[:12]}")
    return out


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("W", [0, 2])
def test_batches_are_one_bucket_and_images_go_to_their_nearest_bucket(ds, W):
    B = 3
    L = build_loader(cfg_for(ds, num_workers=W), B, 0, 1, 5)
    assert "5 aspect-ratio buckets" in L.summary()
    S = L.steps_per_epoch
    sizes = sizes_of(ds)
    seen_buckets = set()
    batches = take(L, 2 * S + 1)
    for b in batches:
        n, c, h, w = b["image"].shape
        assert n == B and c == 3 and (h, w) in BUCKETS                  # one bucket, full batch
        assert b["size_cond"].shape == (B, 6) and str(b["size_cond"].dtype) == "torch.int64"
        for k, sc in zip(b["key"], b["size_cond"].tolist()):
            oh, ow = sizes[k]
            assert nearest_bucket(oh, ow, BUCKETS) == (h, w), (k, (oh, ow), (h, w))
            pl = assign(oh, ow, BUCKETS)
            assert sc == [oh, ow, pl.top, pl.left, h, w]                # center crop, no flip
        seen_buckets.add((h, w))
    assert seen_buckets == set(BUCKETS)                                  # every bucket is used by this data
    st = L.stats()
    hist = {k: v for k, v in st.items() if k.startswith("bucket/")}
    assert sum(hist.values()) == len(batches) * B                       # counts of the consumed batches
    want: dict[str, int] = {}
    for b in batches:
        k = f"bucket/{b['image'].shape[2]}x{b['image'].shape[3]}"
        want[k] = want.get(k, 0) + B
    assert {k: v for k, v in hist.items() if v} == want
    L.close()


def test_random_crop_and_flip_are_the_placement_seen_in_the_pixels():
    """The decoded pixels are PIL's resize of the image to the placement's size, cropped at the
    size condition's offsets; when the sample is flipped the crop_left counts from the mirrored
    image's left edge (SDXL's convention), so the same formula holds on the flipped pixels."""
    rng0 = np.random.default_rng(3)
    arr = rng0.integers(0, 256, (20, 34, 3), dtype=np.uint8)     # -> bucket 16x24, resized 16x27: 3 px to crop
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    sample = {"__key__": "k", "png": buf.getvalue(), "txt": b"x"}
    cfg = cfg_for("unused", crop="random", random_flip=True)
    flips, lefts = set(), set()
    for seed in range(40):
        out = decode_sample(sample, cfg, random.Random(seed), buckets=BUCKETS)
        oh, ow, top, left, h, w = out["size_cond"]
        assert (oh, ow) == (20, 34) and out["bucket"] == (h, w) == nearest_bucket(20, 34, BUCKETS) == (16, 24)
        pl = assign(20, 34, BUCKETS, crop="center")
        lefts.add(left)
        rh, rw = pl.resize
        resized = np.asarray(Image.fromarray(arr).resize((rw, rh), Image.BICUBIC)).transpose(2, 0, 1)
        assert 0 <= top <= rh - h and 0 <= left <= rw - w
        got = out["image"]
        plain = resized[:, top:top + h, left:left + w]
        mirrored = resized[:, :, ::-1][:, top:top + h, left:left + w]
        if np.array_equal(got, plain):
            flips.add(False)
        else:
            assert np.array_equal(got, mirrored), seed
            flips.add(True)
    assert flips == {False, True} and len(lefts) > 2


def _run(urls, steps, B, rank, R, W, seed=5, sd=None, **kw):
    batches, st, stats = loader_run(cfg_for(urls, num_workers=W, **kw), steps, B, rank, R, seed, sd)
    return digest(batches), st, stats


@pytest.mark.parametrize("W,R", [(0, 1), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_kill_and_resume_is_exact_with_buckets(ds, W, R):
    """Stop after k steps, restart from the state dict: the rest of the batches (keys, pixels, size
    conditions) equal the uninterrupted run's on every rank, across epoch ends, with samples
    waiting in the bucket queues at the cut (re-read and re-decoded from their references; random
    crop and flip on, so a re-decode with another generator would show in the pixels)."""
    B = 3
    kw = dict(crop="random", random_flip=True)
    L = build_loader(cfg_for(ds, num_workers=W, **kw), B, 0, R, 5)
    S = L.steps_per_epoch
    L.close()
    total = 2 * S + 2
    for rank in range(R):
        ref, ref_sd, ref_stats = _run(ds, total, B, rank, R, W, **kw)
        waiting = 0
        for k in (1, S - 1, S, S + 2, 2 * S):
            head, sd, _ = _run(ds, k, B, rank, R, W, **kw)
            assert head == ref[:k]
            waiting += sum(len(v) for p in sd["workers"] for v in (p.get("buckets") or {}).get("pending", {}).values())
            tail, sd2, stats2 = _run(ds, total - k, B, rank, R, W, sd=sd, **kw)
            assert head + tail == ref, (rank, k)
            assert sd2 == ref_sd and stats2 == ref_stats
        assert waiting > 0                                  # the cuts did leave samples in the queues
        assert ref_stats["bad"] > 0 or R > 1


def test_every_rank_steps_with_the_same_number_of_images(ds):
    """2 ranks x 2 workers: each step of each rank is one full batch (whichever bucket), the ranks
    have the same steps per epoch, and the feed keeps every worker at s batches per epoch."""
    B, R, W = 3, 2, 2
    loaders = [build_loader(cfg_for(ds, num_workers=W), B, r, R, 5) for r in range(R)]
    S = loaders[0].steps_per_epoch
    assert S == loaders[1].steps_per_epoch and S > 0
    for L in loaders:
        for k in range(2 * S + 1):
            b = next(L)
            assert b["image"].shape[0] == B and len(b["key"]) == B
        assert L.state_dict()["epoch"] == 2 and sum(v for k, v in L.stats().items() if k.startswith("bucket/")) == (2 * S + 1) * B
        L.close()


def test_buckets_off_keeps_the_square_batch(ds, caplog):
    """Without buckets the batch is the square one (no size_cond); a state saved without buckets
    does not continue a run with buckets (another batch stream): it restarts the next epoch."""
    L = build_loader(cfg_for(ds, buckets=False), 3, 0, 1, 5)
    b = next(L)
    assert b["image"].shape == (3, 3, 24, 24) and "size_cond" not in b
    assert not any(k.startswith("bucket/") for k in L.stats())
    sd = L.state_dict()
    L.close()
    L = build_loader(cfg_for(ds), 3, 0, 1, 5)
    with caplog.at_level(logging.WARNING):
        L.load_state_dict(sd)
    assert "cannot resume exactly" in caplog.text and L.epoch == 1
    L.close()


def test_bucket_histogram_is_logged_at_each_epoch_end(ds, caplog):
    L = build_loader(cfg_for(ds), 3, 0, 1, 5)
    with caplog.at_level(logging.INFO, logger="framework.data.loader"):
        take(L, L.steps_per_epoch)
    assert "images per aspect-ratio bucket" in caplog.text and "24x24" in caplog.text
    L.close()


# Precomputed latents with buckets (the stored bucket used instead of assign(), exact resume, a
# training run): tests/test_latent_buckets.py


# ---------------------------------------------------------------------------------------------
# A short real training run (python -m framework.train, 1 rank) with buckets on; checkpoint/resume
# ---------------------------------------------------------------------------------------------
def _train(run_dir, shards, enc, *overrides):
    from tests._trained import env
    cmd = [sys.executable, "-m", "framework.train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
           f"run_dir={run_dir}", f"text.encoder={enc}", "unet.context_dim=32", f"data.urls=['{shards}']",
           "data.image_size=16", "data.buckets.enabled=true", "data.buckets.step=8", "data.num_workers=2",
           "data.shuffle_buffer=8", "engine.zero_stage=2", "engine.micro_batch=2", "engine.log_every=1",
           "unet.micro_conditioning=true", "log.tensorboard=false", *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()], p


@pytest.mark.slow
def test_training_with_buckets_resumes_bit_exactly(tmp_path):
    """6 steps through the real Trainer on 1-channel images of several shapes, batches of buckets
    16x8 / 16x16 / 8x16 (area 16^2, step 8); a run checkpointed at step 3 and resumed gives the
    uninterrupted run's losses bit for bit (the loader's queues, the noise stream in 'buckets' mode
    and the weights all resume), and the per-bucket counts reach the metric log."""
    from tests._fixtures import tiny_encoder
    enc = tiny_encoder(str(tmp_path / "enc"))
    make_dataset(tmp_path / "shards", counts=[10] * 4, channels=1,
                 caption=lambda n: f"a pattern {n % 10}")
    shards = str(tmp_path / "shards")
    whole, _ = _train(tmp_path / "whole", shards, enc, "engine.steps=6", "checkpoint.every=0")
    ref = {m["step"]: m["loss"] for m in whole if "loss" in m}
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    last = [m for m in whole if "loss" in m][-1]
    hist = {k: v for k, v in last.items() if k.startswith("data/bucket/")}
    assert sum(hist.values()) == 6 * 2 and set(hist) <= {"data/bucket/16x8", "data/bucket/16x16", "data/bucket/8x16"}
    assert len([v for v in hist.values() if v]) >= 2                   # more than one shape was trained on
    _train(tmp_path / "cut", shards, enc, "engine.steps=3", "checkpoint.every=3")
    rest, p = _train(tmp_path / "cut", shards, enc, "engine.steps=6", "checkpoint.every=3",
                     "checkpoint.resume=auto")
    assert "resumed from" in p.stdout + p.stderr
    got = {m["step"]: m["loss"] for m in rest if "loss" in m}
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]   # bit-exact
