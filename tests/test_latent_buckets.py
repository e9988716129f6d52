"""Aspect-ratio buckets on precomputed latents, with a real (tiny) diffusers AutoencoderKL and real
shards of non-square images: tools.precompute_latents encodes each image at the bucket the pixel
loader would put it in (the same crop, the same size condition); the latent loader batches one
bucket per batch from the stored placement (no image in the shards), resumes exactly with samples
waiting in the bucket queues, and refuses a bucket set other than the one the shards were encoded
with. Caption embeddings written in the same pass (--text-encoder) equal tools.precompute_text's,
and the trainer runs on latents + embeddings + buckets without an image, a VAE or a text encoder."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from framework.config import BucketConfig, ConfigError, DataConfig
from framework.data.buckets import assign, buckets_from_config
from framework.data.loader import build_loader, iter_shard_samples
from framework.data.shardformat import LATENT_BUCKET, read_latent_bucket
from framework.data.shards import ShardWriter
from framework.models.vae import LATENT_MEAN, LATENT_STD, FrozenVAE, make_tiny_vae
from tests._fixtures import tiny_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (h, w) of the stored images: aspects 0.36 .. 2.1, so all three buckets of the rule below get images
SHAPES = [(20, 10), (10, 20), (16, 16), (18, 12), (12, 18), (30, 14), (9, 25), (17, 16)]
BUCKETS = BucketConfig(enabled=True, step=8)     # area 16^2, step 8 (UNet x VAE factor): 16x8, 16x16, 8x16
CAPTIONS = ["a bag", "a boot on the left", "a wide coat", "a tall dress", "a shirt"]


def write_images(path: str, counts=(12, 12, 12, 12)) -> dict[str, tuple[int, int]]:
    """Grayscale PNGs of the SHAPES (cycled); -> {key: (h, w)}."""
    rng = np.random.default_rng(0)
    w = ShardWriter(path, prefix="d", max_count=10_000)
    sizes, n = {}, 0
    for s, c in enumerate(counts):
        for i in range(c):
            key = f"d{s:02d}x{i:03d}"
            h, wd = SHAPES[n % len(SHAPES)]
            sizes[key] = (h, wd)
            w.write(key, Image.fromarray(rng.integers(0, 256, (h, wd), dtype=np.uint8)),
                    CAPTIONS[n % len(CAPTIONS)], {"label": n % 10})
            n += 1
        w.next_shard()
    w.close()
    return sizes


def data_cfg(urls, **kw) -> DataConfig:
    base = dict(urls=[urls] if urls else [], image_size=16, channels=1, buckets=BUCKETS, num_workers=0,
                shuffle_buffer=0, shardshuffle=False)
    base.update(kw)
    return DataConfig(**base)


def members(folder: str) -> dict[str, dict]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".tar"):
            out.update({s["__key__"]: s for s in iter_shard_samples(os.path.join(folder, f))})
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from framework.data.latents import precompute_latents

    d = tmp_path_factory.mktemp("latbuckets")
    sizes = write_images(str(d / "src"))
    vae_dir = make_tiny_vae(str(d / "vae"), in_channels=1, scaling_factor=0.5)   # factor 2, 4 channels
    vae = FrozenVAE(vae_dir)
    m = precompute_latents(str(d / "src"), str(d / "lat"), vae, data_cfg(""), batch_size=4, wait_s=30)
    return {"dir": d, "src": str(d / "src"), "lat": str(d / "lat"), "vae": vae_dir, "sizes": sizes, "manifest": m}


def test_precompute_encodes_each_image_at_its_bucket(assets):
    """Every sample: its stored bucket and size condition are the pixel loader's for that image
    (nearest aspect, resize, center crop), its latent has that bucket's shape / 2 and is the VAE's
    posterior of exactly the crop the pixel loader makes."""
    m, sizes = assets["manifest"], assets["sizes"]
    buckets = buckets_from_config(BUCKETS, 16, 2)
    lat = m["latents"]
    assert sorted(map(tuple, lat["buckets"])) == sorted(buckets) == [(8, 16), (16, 8), (16, 16)]
    assert lat["shape"] == [4, 8, 8] and lat["bucket_member"] == LATENT_BUCKET      # the square default
    assert m["total"] == len(sizes) == sum(lat["bucket_counts"].values())
    assert len([n for n in lat["bucket_counts"].values() if n]) == 3
    got = members(assets["lat"])
    assert set(got) == set(sizes) and not any("png" in s for s in got.values())
    # the pixel loader's crops and size conditions of the same images (buckets on, center crop)
    pix = build_loader(data_cfg(assets["src"]), 1, 0, 1, 0)
    crops = {}
    for _ in range(pix.steps_per_epoch):
        b = next(pix)
        crops[b["key"][0]] = (b["image"][0], b["size_cond"][0].tolist())
    assert set(crops) == set(sizes)
    vae = FrozenVAE(assets["vae"])
    for key, s in got.items():
        bucket, sc, shape = read_latent_bucket(s[LATENT_BUCKET])
        pl = assign(*sizes[key], buckets)
        assert bucket == pl.bucket and sc == pl.size_cond() == crops[key][1], key
        assert shape == (4, bucket[0] // 2, bucket[1] // 2)
        zm = np.load(io.BytesIO(s[LATENT_MEAN]))
        zs = np.load(io.BytesIO(s[LATENT_STD]))
        assert zm.dtype == np.float16 and zm.shape == zs.shape == shape
        mean, std = vae.encode(crops[key][0][None])
        # stored fp16 of an encode in a batch of 4 vs this one-image encode: fp16 rounding (relative
        # 2^-11) dominates; kernel differences between batch sizes are ~1e-6 (atol for values near 0)
        np.testing.assert_allclose(zm.astype(np.float32), mean[0].numpy(), rtol=2 ** -10, atol=1e-5)
        np.testing.assert_allclose(zs.astype(np.float32), std[0].numpy(), rtol=2 ** -10, atol=1e-5)
    pix.close()


def test_latent_loader_batches_one_bucket_from_the_stored_placement(assets):
    """Batches of one bucket: (B, 4, h/2, w/2) latents with the stored size conditions; the shards
    hold no image, so nothing was decoded. Every image of an epoch's batches has its own bucket."""
    L = build_loader(data_cfg(assets["lat"], latents=True, shuffle_buffer=8, shardshuffle=True), 3, 0, 1, 5)
    lat = members(assets["lat"])
    seen = set()
    for _ in range(2 * L.steps_per_epoch):
        b = next(L)
        sc = b["size_cond"]
        assert sc.shape == (3, 6) and b["image"].shape == (3, 4, int(sc[0, 4]) // 2, int(sc[0, 5]) // 2)
        for i, key in enumerate(b["key"]):
            assert sc[i].tolist() == read_latent_bucket(lat[key][LATENT_BUCKET])[1]
        seen.add(tuple(sc[0, 4:].tolist()))
    assert seen == {(8, 16), (16, 8), (16, 16)}
    st = L.stats()
    assert st["bad"] == 0 and sum(v for k, v in st.items() if k.startswith("bucket/")) == 2 * L.steps_per_epoch * 3
    L.close()


def _digest(batches) -> list:
    return [(b["key"], b["image"].numpy().tobytes(), b["size_cond"].tolist()) for b in batches]


def _take(urls, steps, W, R=1, rank=0, sd=None, seed=3):
    L = build_loader(data_cfg(urls, latents=True, num_workers=W, shuffle_buffer=6, shardshuffle=True), 3, rank, R, seed)
    if sd is not None:
        L.load_state_dict(json.loads(json.dumps(sd)))        # what a checkpoint round trip does
    out = _digest(next(L) for _ in range(steps))
    st, stats = L.state_dict(), L.stats()
    L.close()
    return out, st, stats


@pytest.mark.parametrize("W,R", [(2, 1), (2, 2)])
def test_latent_buckets_resume_exactly_with_workers(assets, W, R):
    """1 rank x 2 workers (and 2 x 2): cut at several steps (mid-epoch with samples waiting in the
    bucket queues, and across the epoch end), restart from the state dict: keys, latent draws and
    size conditions of the rest equal the uninterrupted run's, and so do the final state and counters."""
    L = build_loader(data_cfg(assets["lat"], latents=True, num_workers=W), 3, 0, R, 3)
    S = L.steps_per_epoch
    L.close()
    total = S + 3
    waiting = 0
    for rank in range(R):
        ref, ref_sd, ref_stats = _take(assets["lat"], total, W, R, rank)
        for k in (3, S - 1, S + 1):
            head, sd, _ = _take(assets["lat"], k, W, R, rank)
            assert head == ref[:k]
            waiting += sum(len(v) for p in sd["workers"] for v in (p.get("buckets") or {}).get("pending", {}).values())
            tail, sd2, stats2 = _take(assets["lat"], total - k, W, R, rank, sd=sd)
            assert head + tail == ref, (rank, k)
            assert sd2 == ref_sd and stats2 == ref_stats
    assert waiting > 0                                  # the cuts left samples queued


def test_bucket_set_must_match_the_shards(assets):
    """data.buckets other than the shards' recorded set, or off for bucketed shards, or on for
    square ones: a ConfigError naming data.buckets; a sample without its placement is skipped."""
    other = BucketConfig(enabled=True, step=8, max_area=24 * 24)
    with pytest.raises(ConfigError, match=r"data\.buckets.*differs.*latents\.buckets"):
        build_loader(data_cfg(assets["lat"], latents=True, buckets=other), 3, 0, 1, 0)
    with pytest.raises(ConfigError, match=r"data\.buckets.*precomputed with aspect-ratio buckets"):
        build_loader(data_cfg(assets["lat"], latents=True, buckets=BucketConfig()), 3, 0, 1, 0)
    # square latent shards (no buckets at precompute) read with buckets on
    from framework.data.latents import precompute_latents
    sq = str(assets["dir"] / "square")
    precompute_latents(assets["src"], sq, FrozenVAE(assets["vae"]), data_cfg("", buckets=BucketConfig()), wait_s=30)
    with pytest.raises(ConfigError, match=r"data\.buckets\.enabled=true.*without buckets"):
        build_loader(data_cfg(sq, latents=True), 3, 0, 1, 0)
    b = next(build_loader(data_cfg(sq, latents=True, buckets=BucketConfig()), 3, 0, 1, 0))
    assert b["image"].shape == (3, 4, 8, 8) and "size_cond" not in b
    # a bucketed sample whose zbucket.json is gone: skipped and counted (no_latent)
    import webdataset as wds
    bad = assets["dir"] / "bad"
    os.makedirs(bad)
    m = json.load(open(os.path.join(assets["lat"], "shards.json")))
    name = m["shards"][0]["url"]
    with wds.TarWriter(str(bad / name)) as w:
        for i, s in enumerate(iter_shard_samples(os.path.join(assets["lat"], name))):
            s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            if i == 0:
                del s[LATENT_BUCKET]
            w.write(s)
    m.update(shards=m["shards"][:1], total=m["shards"][0]["count"])
    json.dump(m, open(bad / "shards.json", "w"))
    L = build_loader(data_cfg(str(bad), latents=True, max_bad_fraction=0.5), 2, 0, 1, 0)
    keys = [k for _ in range(L.steps_per_epoch) for k in next(L)["key"]]
    st = L.stats()        # the feed reads on into the next epoch (it needs s x B good ones): read once per pass
    assert st["bad_no_latent"] >= 1 and st["bad"] == st["bad_no_latent"] and "d00x000" not in keys
    L.close()


@pytest.fixture(scope="module")
def with_text(assets, tmp_path_factory):
    """The same source through both tools' command lines: latents + embeddings in one pass, and
    tools.precompute_text alone (one process each: RANK / WORLD_SIZE unset)."""
    from tools import precompute_latents, precompute_text

    d = tmp_path_factory.mktemp("lattext")
    enc = tiny_encoder(str(d / "enc"))
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        lat = precompute_latents.run(["--src", assets["src"], "--out", str(d / "lat"), "--wait", "30",
                                      "--batch-size", "4", "--text-encoder", enc, "--max-length", "8",
                                      f"vae.path={assets['vae']}", "data.image_size=16", "data.channels=1",
                                      "data.buckets.enabled=true", "data.buckets.step=8"])
        emb = precompute_text.run(["--src", assets["src"], "--out", str(d / "emb"), "--wait", "30",
                                   "--text-encoder", enc, "--max-length", "8"])
    finally:
        os.environ.update(env)
    return {"dir": d, "enc": enc, "lat": str(d / "lat"), "emb": str(d / "emb"), "m_lat": lat, "m_emb": emb}


def test_embeddings_in_the_latent_pass_equal_precompute_text(assets, with_text):
    """Byte for byte: every sample's emb.npy / mask.npy, the null condition files and the
    manifest's embeddings entry (same encoder, same fp16 packing, same encoder batches)."""
    e_lat, e_emb = with_text["m_lat"]["embeddings"], with_text["m_emb"]["embeddings"]
    assert e_lat == e_emb and e_lat["encoder"] == with_text["enc"] and e_lat["L"] == 8 and e_lat["D"] == 32
    assert with_text["m_lat"]["latents"]["buckets"]                          # the buckets are there too
    lat, emb = members(with_text["lat"]), members(with_text["emb"])
    assert set(lat) == set(emb) == set(assets["sizes"])
    for key in lat:
        for member in ("emb.npy", "mask.npy"):
            assert lat[key][member] == emb[key][member], (key, member)
        assert LATENT_BUCKET in lat[key] and "png" not in lat[key]
    for f in ("null_emb.npy", "null_mask.npy"):
        assert open(os.path.join(with_text["lat"], f), "rb").read() == open(os.path.join(with_text["emb"], f), "rb").read()
    # the loader reads latents + embeddings + the null condition from the one shard set
    L = build_loader(data_cfg(with_text["lat"], latents=True, use_embeddings=True), 4, 0, 1, 0)
    b = next(L)
    assert b["ctx"].shape == (4, 8, 32) and b["ctx_mask"].shape == (4, 8) and b["size_cond"].shape == (4, 6)
    assert L.null_condition().ctx.shape == (1, 8, 32)
    L.close()


@pytest.mark.slow
def test_training_on_bucketed_latents_and_embeddings(with_text, tmp_path):
    """python -m framework.train, 1 rank, on the latent + embedding shards with buckets on and
    micro-conditioning: it trains (finite losses, more than one bucket), and it never loads an image,
    the VAE or the text encoder (the shards hold no image; vae.path is unset; text.encoder names a
    folder that does not exist)."""
    from tests._trained import env
    run_dir = str(tmp_path / "run")
    base = [sys.executable, "-m", "framework.train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
            f"text.encoder={tmp_path / 'no-such-encoder'}", "unet.context_dim=32",
            f"data.urls=['{with_text['lat']}']", "data.latents=true", "data.use_embeddings=true",
            "data.image_size=16", "data.buckets.enabled=true", "data.buckets.step=8", "data.shuffle_buffer=8",
            "unet.in_channels=4", "unet.micro_conditioning=true", "engine.micro_batch=2", "engine.zero_stage=2",
            "log.tensorboard=false"]
    p = subprocess.run(base + [f"run_dir={run_dir}", "engine.steps=4"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if x.strip()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in losses)
    hist = {k: v for k, v in losses[-1].items() if k.startswith("data/bucket/")}
    assert sum(hist.values()) == 4 * 2 and len([v for v in hist.values() if v]) >= 2
    # another bucket set (a larger area) is refused at startup, naming the key
    p = subprocess.run(base + [f"run_dir={run_dir}-other", "engine.steps=1", "data.buckets.max_area=576"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "data.buckets" in p.stderr and "latents.buckets" in p.stderr, p.stderr[-2000:]
