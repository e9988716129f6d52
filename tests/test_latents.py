"""Precomputed latents end to end with a real (tiny) diffusers AutoencoderKL and real shards:
tools.precompute_latents against a direct encode, idempotence, resume after a kill, rank split, bad
samples; the loader's latent draws (exact, resumable); a latent training run under the real engine,
its export (vae/ inside) and the Pipeline decoding with the VAE."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from framework.config import DataConfig
from framework.data.latents import RECORDS_DIR, iter_images, precompute_latents
from framework.models.vae import LATENT_MEAN, LATENT_STD, FrozenVAE, make_tiny_vae
from tests._fixtures import tiny_encoder, write_shards
from tests._trained import env as _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _add_bad_shard(directory: str) -> None:
    """One more shard: 2 good samples and one whose PNG is garbage (it must be skipped and counted)."""
    import webdataset as wds
    from PIL import Image

    path = os.path.join(directory, "data-000004.tar")
    rng = np.random.default_rng(9)
    with wds.TarWriter(path) as w:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), mode="L").save(buf, format="PNG")
            png = buf.getvalue() if i != 1 else b"\x89PNG not an image"
            w.write({"__key__": f"bad{i}", "png": png, "txt": "a photo of a bag", "json": b'{"label": 8}'})
    m = json.load(open(os.path.join(directory, "shards.json")))
    m["shards"].append({"url": "data-000004.tar", "count": 3})
    m["total"] += 3
    json.dump(m, open(os.path.join(directory, "shards.json"), "w"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("latents")
    write_shards(str(d / "src"), 4, 6, size=16)
    _add_bad_shard(str(d / "src"))
    vae_dir = make_tiny_vae(str(d / "vae"), in_channels=1, scaling_factor=0.5)
    return {"dir": d, "src": str(d / "src"), "vae": vae_dir,
            "data": DataConfig(image_size=16, channels=1)}


def _members(path: str) -> dict[str, dict]:
    from framework.data.loader import iter_shard_samples
    return {s["__key__"]: s for s in iter_shard_samples(path)}


def _run(assets, out, rank=0, world=1, batch_size=64):
    vae = FrozenVAE(assets["vae"])
    return precompute_latents(assets["src"], out, vae, assets["data"], rank=rank, world_size=world,
                              batch_size=batch_size, wait_s=30)


def test_precompute_matches_direct_encode_and_counts_bad(assets):
    out = str(assets["dir"] / "lat")
    m = _run(assets, out)
    assert m["total"] == 4 * 6 + 2 and m["skipped_latents"] == {"decode": 1}
    lat = m["latents"]
    vae = FrozenVAE(assets["vae"])
    assert lat["shape"] == [4, 8, 8] and lat["scaling_factor"] == 0.5 and lat["shift_factor"] == 0.0
    assert lat["vae"]["sha256"] == vae.digest and lat["vae"]["path"] == vae.path
    assert [s["count"] for s in m["shards"]] == [6, 6, 6, 6, 2] and m["image_key"] is None
    # every output sample: the fp16 posterior of its image, encoded directly (one batch per shard as
    # the tool did: the same kernels, so the same bits), caption and json kept, the image dropped
    for i, sh in enumerate(m["shards"]):
        src = os.path.join(assets["src"], sh["url"])
        imgs = list(iter_images([src], assets["data"]))
        mean, std = vae.encode(torch.from_numpy(np.stack([it["image"] for it in imgs])))
        got = _members(os.path.join(out, sh["url"]))
        assert list(got) == [it["key"] for it in imgs]
        for j, it in enumerate(imgs):
            s = got[it["key"]]
            assert "png" not in s and s["txt"] == it["raw"]["txt"] and s["json"] == it["raw"]["json"]
            zm = np.load(io.BytesIO(s[LATENT_MEAN]))
            zs = np.load(io.BytesIO(s[LATENT_STD]))
            assert zm.dtype == np.float16 and zm.shape == (4, 8, 8)
            assert np.array_equal(zm, mean[j].numpy().astype(np.float16))
            assert np.array_equal(zs, std[j].numpy().astype(np.float16))


def test_idempotent_resumes_after_kill_and_splits_ranks(assets):
    out = str(assets["dir"] / "lat2")
    m1 = _run(assets, out, batch_size=4)          # batch size changes the kernels, not the decisions
    names = [s["url"] for s in m1["shards"]]
    before = {n: open(os.path.join(out, n), "rb").read() for n in names}
    mtimes = {n: os.path.getmtime(os.path.join(out, n)) for n in names}
    # run again: every shard is complete, nothing is rewritten, the same manifest
    m2 = _run(assets, out, batch_size=4)
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in names} == mtimes
    assert {k: v for k, v in m2.items() if k != "created"} == {k: v for k, v in m1.items() if k != "created"}
    # a job killed mid-way leaves a tmp file of the shard it was writing, and maybe a renamed shard
    # whose record was not written yet: both shards are redone, the others skipped
    os.remove(os.path.join(out, RECORDS_DIR, names[1] + ".json"))
    os.remove(os.path.join(out, RECORDS_DIR, names[2] + ".json"))
    os.remove(os.path.join(out, names[2]))
    open(os.path.join(out, names[2] + ".tmp.12345"), "wb").write(b"partial")
    os.remove(os.path.join(out, "shards.json"))
    m3 = _run(assets, out, batch_size=4)
    assert m3["shards"] == m1["shards"]
    for n in names:
        assert open(os.path.join(out, n), "rb").read() == before[n], n
        if n not in (names[1], names[2]):
            assert os.path.getmtime(os.path.join(out, n)) == mtimes[n], n
    # two ranks (rank 1 first: rank 0 waits for every shard's record): shard i on rank i % 2, the same bytes
    out2 = str(assets["dir"] / "lat_2ranks")
    assert _run(assets, out2, rank=1, world=2, batch_size=4) is None
    assert not os.path.exists(os.path.join(out2, "shards.json"))
    assert sorted(os.listdir(out2)) == sorted([RECORDS_DIR, names[1], names[3]])
    m4 = _run(assets, out2, rank=0, world=2, batch_size=4)
    assert m4["shards"] == m1["shards"]
    for n in names:
        assert open(os.path.join(out2, n), "rb").read() == before[n], n


def test_loader_draws_latents_exactly_and_resumes(assets):
    from framework.data.loader import build_loader

    out = str(assets["dir"] / "lat")
    if not os.path.exists(os.path.join(out, "shards.json")):
        _run(assets, out)
    cfg = DataConfig(urls=[out], latents=True, num_workers=0, shuffle_buffer=0, shardshuffle=False,
                     image_size=16, channels=1)
    loader = build_loader(cfg, 3, 0, 1, seed=5)
    b = next(loader)
    assert b["image"].shape == (3, 4, 8, 8) and b["image"].dtype == torch.float32
    # the draw z0 = 0.5 * (mean + std * eps): the implied eps = (z0 / 0.5 - mean) / std is standard
    # normal (768 values: the sample mean's standard error is 0.036, the std's 0.026; bounds 5x that)
    members = {}
    for n in sorted(os.listdir(out)):
        if n.endswith(".tar"):
            members.update(_members(os.path.join(out, n)))
    eps = []
    for i, key in enumerate(b["key"]):
        mean = np.load(io.BytesIO(members[key][LATENT_MEAN])).astype(np.float32)
        std = np.load(io.BytesIO(members[key][LATENT_STD])).astype(np.float32)
        eps.append((b["image"][i].numpy() / 0.5 - mean) / std)
    eps = np.stack(eps)
    assert abs(float(eps.mean())) < 0.18 and abs(float(eps.std()) - 1) < 0.13, (eps.mean(), eps.std())
    # the same (seed, epoch, key): the same draw; another seed: another draw of the same samples
    again = next(build_loader(cfg, 3, 0, 1, seed=5))
    assert again["key"] == b["key"] and torch.equal(again["image"], b["image"])
    other = next(build_loader(cfg, 3, 0, 1, seed=6))
    assert other["key"] == b["key"] and not torch.equal(other["image"], b["image"])
    # an overridden scaling factor is used instead of the recorded one
    b2 = next(build_loader(DataConfig(**{**cfg.__dict__, "latent_scaling_factor": 1.0}), 3, 0, 1, seed=5))
    np.testing.assert_allclose(b2["image"].numpy(), b["image"].numpy() / 0.5, rtol=1e-6, atol=1e-6)
    # a sample's draw depends on (seed, epoch, shard, key) only: 2 ranks draw what 1 rank draws
    def epoch0(rank, world, batch):
        ld = build_loader(DataConfig(**{**cfg.__dict__, "shardshuffle": True}), batch, rank, world, seed=2)
        got = {}
        for _ in range(ld.steps_per_epoch):
            bb = next(ld)
            got.update({k: bb["image"][i] for i, k in enumerate(bb["key"])})
        return got
    one = epoch0(0, 1, 2)
    two = {**epoch0(0, 2, 1), **epoch0(1, 2, 1)}
    assert len(two) >= 8 and set(two) <= set(one)
    for k in two:
        assert torch.equal(two[k], one[k]), k
    # exact resume with 2 workers: the batches after a saved position equal an uninterrupted run's
    wcfg = DataConfig(**{**cfg.__dict__, "num_workers": 2, "shuffle_buffer": 4, "shardshuffle": True})
    a = build_loader(wcfg, 2, 0, 1, seed=1)
    ref = [next(a) for _ in range(6)]
    c = build_loader(wcfg, 2, 0, 1, seed=1)
    for _ in range(3):
        next(c)
    sd = c.state_dict()
    c.close()
    d = build_loader(wcfg, 2, 0, 1, seed=1)
    d.load_state_dict(sd)
    for k in range(3, 6):
        got = next(d)
        assert got["key"] == ref[k]["key"] and torch.equal(got["image"], ref[k]["image"]), k
    a.close()
    d.close()


def test_bad_latent_samples_are_skipped_and_counted(assets, tmp_path):
    import webdataset as wds

    from framework.data.loader import build_loader
    out = str(assets["dir"] / "lat")
    if not os.path.exists(os.path.join(out, "shards.json")):
        _run(assets, out)
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    m = json.load(open(os.path.join(out, "shards.json")))
    # a copy with one sample lacking zstd.npy and one with a wrong latent shape
    src = os.path.join(out, m["shards"][0]["url"])
    with wds.TarWriter(os.path.join(bad, m["shards"][0]["url"])) as w:
        for i, (k, s) in enumerate(_members(src).items()):
            s = {kk: v for kk, v in s.items() if not kk.startswith("__")}
            if i == 0:
                del s[LATENT_STD]
            if i == 1:
                buf = io.BytesIO()
                np.save(buf, np.zeros((4, 4, 4), np.float16))
                s[LATENT_MEAN] = buf.getvalue()
            w.write({"__key__": k, **s})
    m["shards"] = m["shards"][:1]
    m["total"] = m["shards"][0]["count"]
    json.dump(m, open(os.path.join(bad, "shards.json"), "w"))
    cfg = DataConfig(urls=[bad], latents=True, num_workers=0, shuffle_buffer=0, shardshuffle=False,
                     max_bad_fraction=0.5)
    loader = build_loader(cfg, 4, 0, 1, seed=0)
    batch = next(loader)
    st = loader.stats()
    assert st["bad_no_latent"] == 1 and st["bad_shape"] == 1 and len(batch["key"]) == 4


@pytest.mark.slow
@pytest.mark.distributed
def test_latent_training_export_and_pipeline_decode(assets, tmp_path):
    out = str(assets["dir"] / "lat")
    if not os.path.exists(os.path.join(out, "shards.json")):
        _run(assets, out)
    enc = tiny_encoder(str(tmp_path / "enc"))
    run_dir = str(tmp_path / "run")
    base = [sys.executable, "-m", "framework.train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
            f"text.encoder={enc}", "unet.context_dim=32", f"data.urls=['{out}']", "data.latents=true",
            "data.shardshuffle=false", "engine.steps=3", "engine.zero_stage=2", "checkpoint.every=3",
            f"vae.path={assets['vae']}"]
    # the UNet must take the latents' 4 channels: a clear error otherwise
    p = subprocess.run(base + [f"run_dir={run_dir}-bad", "unet.in_channels=1"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "unet.in_channels=4" in p.stderr, p.stderr[-2000:]
    p = subprocess.run(base + [f"run_dir={run_dir}", "unet.in_channels=4"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)

    # export: vae/ inside with the training scaling; the Pipeline samples latents and decodes them
    from diffusers import AutoencoderKL

    from framework.export import Pipeline, export
    exp = str(tmp_path / "export")
    summary = export(run_dir, exp)
    assert "vae/config.json" in summary["files"]
    vae_conf = json.load(open(os.path.join(exp, "vae", "config.json")))
    assert vae_conf["scaling_factor"] == 0.5
    pipe = Pipeline.from_pretrained(exp)
    assert pipe.vae is not None and pipe.vae.scale == 0.5 and (pipe.channels, pipe.image_size) == (4, 8)
    imgs = pipe(["a photo of a bag"], steps=2, output_type="pt", seed=0)
    assert imgs.shape == (1, 1, 16, 16)
    # the decode step undoes the scaling once: diffusers' own decode of z0 / 0.5
    z0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    from framework.models.vae import decode_latents
    ref = AutoencoderKL.from_pretrained(os.path.join(exp, "vae"), low_cpu_mem_usage=False)
    with torch.no_grad():
        expect = ref.decode(z0 / ref.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_latents(pipe.vae, z0), expect, rtol=0, atol=1e-6)
    # a wrong VAE is refused at export (not the weights that encoded the shards)
    other = make_tiny_vae(str(tmp_path / "other"), in_channels=1, seed=1)
    from framework.config import load_config
    from framework.data.latents import latent_export_info
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      [f"data.urls=['{out}']", "data.latents=true", f"vae.path={other}"])
    with pytest.raises(Exception, match="not those that encoded"):
        latent_export_info(cfg)


def test_text_embeddings_compose_with_latents(assets, tmp_path):
    """tools.precompute_text on a latent shard set keeps the latents (and their manifest entry):
    the loader then returns z0 and the precomputed caption embeddings, no image, no encoder."""
    from framework.config import TextConfig
    from framework.data.loader import build_loader
    from framework.data.precompute import precompute_text
    from framework.models.text import TextEncoder

    out = str(assets["dir"] / "lat")
    if not os.path.exists(os.path.join(out, "shards.json")):
        _run(assets, out)
    enc = TextEncoder(TextConfig(encoder=tiny_encoder(str(tmp_path / "enc")), max_length=8), device="cpu")
    emb = str(tmp_path / "lat_emb")
    m = precompute_text(out, emb, enc, {"encoder": "tiny"})
    assert m["latents"]["shape"] == [4, 8, 8] and m["embeddings"]["L"] == 8
    cfg = DataConfig(urls=[emb], latents=True, use_embeddings=True, num_workers=0, shuffle_buffer=0,
                     shardshuffle=False)
    loader = build_loader(cfg, 4, 0, 1, seed=0)
    b = next(loader)
    plain = next(build_loader(DataConfig(**{**cfg.__dict__, "urls": [out], "use_embeddings": False}), 4, 0, 1, 0))
    assert b["key"] == plain["key"] and torch.equal(b["image"], plain["image"])
    assert b["ctx"].shape == (4, 8, enc.dim) and b["ctx_mask"].shape == (4, 8)
    torch.testing.assert_close(b["ctx"], enc.encode(b["caption"]).ctx.half().float(), rtol=0, atol=0)


def test_encoding_on_the_fly_draws_from_the_posterior_with_the_stream(assets, tmp_path):
    """vae.path without data.latents: the objective encodes each image batch and diffuses
    scale * (mean + std * eps_post), eps_post from the trainer's global noise stream (so 2 ranks
    draw the slices of 1 rank's draw); a 2-step run trains and its export decodes with vae/."""
    from framework.config import load_config
    from framework.diffusion.noise import NoiseStream
    from framework.train.objectives import DiffusionObjective
    enc = tiny_encoder(str(tmp_path / "enc"))
    over = [f"text.encoder={enc}", "unet.context_dim=32", "unet.in_channels=4", f"vae.path={assets['vae']}",
            f"data.urls=['{assets['src']}']"]
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), over)
    obj = DiffusionObjective(cfg)
    obj.setup("cpu", torch.float32, None)
    assert obj.vae is not None and obj.pixel_factor == 2
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    one = NoiseStream(0, 0, 1, torch.device("cpu"))
    x0, *_ = obj.noised({"image": x}, one)
    ref_stream = NoiseStream(0, 0, 1, torch.device("cpu"))
    mean, std = FrozenVAE(assets["vae"]).encode(x)
    expect = (mean + std * ref_stream.randn(tuple(mean.shape))) * 0.5     # scaling_factor 0.5, once
    torch.testing.assert_close(x0, expect, rtol=0, atol=0)
    r1 = NoiseStream(0, 1, 2, torch.device("cpu"))                         # rank 1 of 2: the second half
    x0_r1, *_ = obj.noised({"image": x[2:]}, r1)
    torch.testing.assert_close(x0_r1, expect[2:], rtol=0, atol=0)
    bad = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), over[:3] + ["unet.in_channels=1", over[3]])
    with pytest.raises(Exception, match="unet.in_channels=4"):
        DiffusionObjective(bad).setup("cpu", torch.float32, None)

    run_dir = str(tmp_path / "run")
    p = subprocess.run([sys.executable, "-m", "framework.train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
                        f"run_dir={run_dir}", *over, "data.shardshuffle=false", "engine.steps=2", "checkpoint.every=2"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    from framework.export import Pipeline, export
    summary = export(run_dir, str(tmp_path / "export"))
    assert "vae/config.json" in summary["files"]
    pipe = Pipeline.from_pretrained(summary["out"])
    assert (pipe.channels, pipe.image_size, pipe.latent_factor) == (4, 8, 2)
    assert pipe(["a photo of a bag"], steps=2, output_type="pt").shape == (1, 1, 16, 16)


@pytest.mark.distributed
@pytest.mark.equivalence
def test_latent_training_one_rank_equals_zero3_on_two_ranks(assets, tmp_path):
    """Latent shards (16 x 4 samples, read in a fixed order): 1 process at micro batch 8 and ZeRO-3 on
    2 ranks at micro batch 4 see the same latent draws (keyed by sample, not rank) and the same noise
    (the global stream), so their losses agree up to reduction order (the tolerance of
    tests/test_engine.py's ZeRO-equivalence test, derived there)."""
    from tests._trained import job_cmd, losses, run_job
    src, lat = str(tmp_path / "src"), str(tmp_path / "lat")
    write_shards(src, 16, 4, size=16)
    precompute_latents(src, lat, FrozenVAE(assets["vae"]), DataConfig(image_size=16, channels=1),
                       batch_size=64, wait_s=30)
    enc = tiny_encoder(str(tmp_path / "enc"))

    def argv(run_dir, *over):
        return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run_dir={run_dir}", f"text.encoder={enc}",
                "unet.context_dim=32", "unet.in_channels=4", f"data.urls=['{lat}']", "data.latents=true",
                f"vae.path={assets['vae']}", "data.shardshuffle=false", "data.shuffle_buffer=0",
                "data.num_workers=0", "text.p_uncond=0.25", "engine.steps=3", *over]
    run_job(job_cmd(1) + argv(tmp_path / "one", "engine.zero_stage=0", "engine.micro_batch=8"))
    run_job(job_cmd(2) + argv(tmp_path / "z3", "engine.zero_stage=3", "engine.micro_batch=4"))
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "z3")
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    for s in ref:
        assert abs(got[s] - ref[s]) <= 1e-5 * max(1.0, abs(ref[s])), (s, got, ref)
