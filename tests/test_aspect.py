"""Any shape, not only squares: the UNet on non-square inputs (attention's token reshape included),
the size check, SDXL micro-conditioning (zero-initialised, never part of the null condition), a
non-square training step under ZeRO-3 through the real Trainer, and non-square sampling through the
Pipeline and tools/sample.py on a tiny trained export."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os

import pytest
import torch
from PIL import Image

from framework.config import ConfigError, UNetConfig, load_config
from framework.models.text import Condition
from framework.models.unet import UNet, diffusers_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = UNetConfig(in_channels=2, channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, attention_levels=[0, 1, 2],
                 head_dim=8, context_dim=12, groups=8)


def randomized(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A UNet with every parameter random (zero-initialised output layers included), in float64."""
    torch.manual_seed(seed)
    net = UNet(cfg).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


def test_non_square_forward_is_the_transpose_of_the_transposed_problem():
    """Transposing the input and every conv kernel transposes the output exactly: convolutions,
    stride-2 downsampling, nearest upsampling and norms commute with the transpose and attention is
    permutation-equivariant over tokens. A token reshape that mixed up h and w (or a hard-coded
    square) would scramble the tokens of one of the two and break the equality."""
    net = randomized(CFG)
    net_t = copy.deepcopy(net)
    with torch.no_grad():
        for m in net_t.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(m.weight.transpose(-1, -2).clone())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 8, 24, generator=g, dtype=torch.float64)          # 3 levels: /4 -> 2x6 tokens
    ctx = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 500])
    y = net(x, t, ctx)
    assert y.shape == (2, 2, 8, 24)
    y_t = net_t(x.transpose(-1, -2).contiguous(), t, ctx)
    assert y_t.shape == (2, 2, 24, 8)
    torch.testing.assert_close(y_t, y.transpose(-1, -2), rtol=1e-10, atol=1e-10)   # float64: reordering only
    # the control: the same model on the transposed input without transposed kernels differs
    assert not torch.allclose(net(x.transpose(-1, -2).contiguous(), t, ctx), y_t, atol=1e-3)


@pytest.mark.parametrize("h,w", [(12, 16), (16, 14), (3, 4)])
def test_sizes_must_divide_by_the_downsampling_factor(h, w):
    net = UNet(CFG)
    assert net.size_multiple == 4
    bad = h % 4 or w % 4
    with pytest.raises(ValueError, match=r"multiples of 4 \(the UNet's downsampling factor\)") if bad \
            else contextlib.nullcontext():
        assert net(torch.randn(1, 2, h, w), torch.tensor([1])).shape == (1, 2, h, w)


# ---------------------------------------------------------------------------------------------
# Micro-conditioning
# ---------------------------------------------------------------------------------------------
MC = dataclasses.replace(CFG, micro_conditioning=True)


def test_micro_conditioning_starts_as_the_model_without_it():
    torch.manual_seed(0)
    plain = UNet(CFG)
    torch.manual_seed(0)
    mc = UNet(MC)
    # the same initial weights for every shared layer (size_embed is built last) ...
    sd = mc.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in plain.state_dict().items())
    assert sorted(set(sd) - set(plain.state_dict())) == [
        "size_embed.0.bias", "size_embed.0.weight", "size_embed.2.bias", "size_embed.2.weight"]
    # ... and the same output, whatever the size condition: its last layer starts at zero
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(3, 2, 8, 16, generator=g), torch.tensor([1, 50, 999]), torch.randn(3, 4, 12, generator=g)
    for sc in ([8, 16, 0, 0, 8, 16], [1024, 512, 37, 0, 8, 16]):
        assert torch.equal(mc(x, t, ctx, size_cond=torch.tensor([sc] * 3)), plain(x, t, ctx))
    # it trains: in a model whose other layers moved away from their (partly zero) init, the zero layer
    # gets a gradient at once, the one before it only once that layer has moved
    with torch.no_grad():
        for name, p in mc.named_parameters():
            if not name.startswith("size_embed."):
                p.normal_(0, 0.1)
    out = mc(x, t, ctx, size_cond=torch.tensor([[8, 16, 0, 0, 8, 16], [16, 8, 4, 0, 8, 16], [8, 8, 0, 0, 8, 16]]))
    out.square().mean().backward()
    assert mc.size_embed[2].weight.grad.abs().sum() > 0
    assert mc.size_embed[0].weight.grad.abs().sum() == 0
    # once trained, the condition matters; one row broadcasts to the batch
    with torch.no_grad():
        mc.size_embed[2].weight.normal_(0, 0.1)
    a = mc(x, t, ctx, size_cond=torch.tensor([[8, 16, 0, 0, 8, 16]]))
    assert torch.equal(a, mc(x, t, ctx, size_cond=torch.tensor([[8, 16, 0, 0, 8, 16]] * 3)))
    assert not torch.allclose(a, mc(x, t, ctx, size_cond=torch.tensor([[64, 128, 0, 0, 8, 16]])))
    with pytest.raises(ValueError, match="micro_conditioning is on: pass size_cond"):
        mc(x, t, ctx)
    with pytest.raises(ValueError, match="micro_conditioning has no diffusers"):
        diffusers_config(MC)


class Feed:
    """Batches of precomputed caption embeddings, cycling through a list (no text encoder)."""

    def __init__(self, batches: list):
        self.batches, self.i = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def null_condition(self):
        return Condition(torch.zeros(1, 8, 32), torch.ones(1, 8, dtype=torch.bool))


def tiny_cfg(tmp_path, *overrides):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                       [f"run_dir={tmp_path}", "unet.context_dim=32", "engine.micro_batch=4",
                        "data.use_embeddings=true", "engine.log_every=1", "checkpoint.every=0",
                        "log.tensorboard=false", *overrides])


def batch(h: int, w: int, seed: int, size_cond=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"image": torch.randn(4, 1, h, w, generator=g), "ctx": torch.randn(4, 8, 32, generator=g),
           "ctx_mask": torch.ones(4, 8, dtype=torch.bool)}
    if size_cond is not None:
        out["size_cond"] = torch.tensor(size_cond)
    return out


@pytest.mark.parametrize("p_uncond", [0.0, 1.0])
def test_null_text_dropout_keeps_the_size_condition(tmp_path, p_uncond):
    """The rule: null-text dropout replaces the text only; the size condition goes through as the
    loader gave it (SDXL), and without one the batch's own uncropped shape is used."""
    from framework.diffusion.noise import NoiseStream
    from framework.train.objectives import DiffusionObjective
    cfg = tiny_cfg(tmp_path, "unet.micro_conditioning=true", f"text.p_uncond={p_uncond}")
    obj = DiffusionObjective(cfg)
    feed = Feed([])
    obj.setup("cpu", torch.float32, feed)
    seen = []
    net = UNet(cfg.unet)

    def forward(x, t, **kw):
        seen.append(kw)
        return net(x, t, **kw)
    sc = [[40, 90, 3, 0, 16, 32], [16, 32, 0, 0, 16, 32], [64, 64, 0, 16, 16, 32], [17, 33, 1, 1, 16, 32]]
    obj.loss(forward, batch(16, 32, 0, sc), NoiseStream(0, 0, 1, torch.device("cpu")))
    assert torch.equal(seen[-1]["size_cond"], torch.tensor(sc)) and seen[-1]["size_cond"].dtype == torch.long
    null = feed.null_condition()
    dropped = torch.equal(seen[-1]["ctx"], null.ctx.expand(4, -1, -1))
    assert dropped == (p_uncond == 1.0)
    obj.loss(forward, batch(16, 32, 1), NoiseStream(0, 0, 1, torch.device("cpu")))
    assert torch.equal(seen[-1]["size_cond"], torch.tensor([[16, 32, 0, 0, 16, 32]] * 4))


def test_bucket_config_is_checked_against_the_unet(tmp_path):
    from framework.train.objectives import DiffusionObjective
    obj = DiffusionObjective(tiny_cfg(tmp_path, "data.buckets.enabled=true", "data.buckets.step=6"))
    with pytest.raises(ConfigError, match=r"data.buckets.step=6 must be a multiple of 4"):
        obj.setup("cpu", torch.float32, Feed([]))
    obj = DiffusionObjective(tiny_cfg(tmp_path, "data.buckets.enabled=true", "data.buckets.step=8"))
    obj.setup("cpu", torch.float32, Feed([]))
    assert obj.buckets == [(16, 8), (16, 16), (8, 16)]          # max_area 0: image_size^2 = 16x16


# ---------------------------------------------------------------------------------------------
# Training: a different shape every step, ZeRO-3, micro-conditioning on
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_non_square_training_under_zero3(tmp_path):
    import deepspeed
    from framework.train import engine as E
    cfg = tiny_cfg(tmp_path, "engine.zero_stage=3", "engine.steps=3", "unet.micro_conditioning=true",
                   "data.buckets.enabled=true", "data.buckets.step=8", "optim.lr=1e-2")
    feed = Feed([batch(8, 24, 0, [[8, 24, 0, 0, 8, 24]] * 4), batch(24, 8, 1, [[30, 9, 3, 0, 24, 8]] * 4),
                 batch(16, 16, 2)])
    tr = E.Trainer(cfg, data=feed)
    assert tr.noise.mode == "buckets"
    shapes = []
    h = tr.engine.module.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape[-2:])))
    result = tr.fit()
    h.remove()
    assert shapes == [(8, 24), (24, 8), (16, 16)]
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    # the size embedding's zero layer moved under ZeRO-3 (its gradient reached the partitioned weights)
    last = tr.engine.module.size_embed[2].weight
    with deepspeed.zero.GatheredParameters([last]):
        assert last.shape == (64, 64) and last.abs().sum() > 0


def test_buckets_noise_mode_keeps_the_shared_stream_in_step():
    """Two ranks holding different shapes draw from the shared generator in step (t, dropout), and
    their eps differ; a resume continues the same draws."""
    from framework.diffusion.noise import NoiseStream
    cpu = torch.device("cpu")
    r0, r1 = NoiseStream(5, 0, 2, cpu, mode="buckets"), NoiseStream(5, 1, 2, cpu, mode="buckets")
    one = NoiseStream(5, 0, 1, cpu, mode="global")
    t0, e0, u0 = r0.draw((4, 1, 8, 24), 100)
    t1, e1, u1 = r1.draw((4, 1, 24, 8), 100)
    tg, _, ug = NoiseStream(5, 0, 1, cpu, mode="buckets").draw((8, 1, 16, 16), 100)
    assert torch.equal(torch.cat([t0, t1]), tg) and torch.equal(torch.cat([u0, u1]), ug)   # one global stream
    assert e0.shape == (4, 1, 8, 24) and e1.shape == (4, 1, 24, 8)
    assert not torch.allclose(e0.flatten()[:32], e1.flatten()[:32])
    assert torch.equal(r0.gen.get_state(), r1.gen.get_state())         # in step whatever the shapes
    sd = r0.state_dict()
    a = r0.draw((4, 1, 8, 24), 100)
    fresh = NoiseStream(5, 0, 2, cpu, mode="buckets")
    fresh.load_state_dict(sd)
    b = fresh.draw((4, 1, 8, 24), 100)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    del one


# ---------------------------------------------------------------------------------------------
# Sampling through the Pipeline of a tiny trained export
# ---------------------------------------------------------------------------------------------
PROMPTS = ["a photo of a coat", "a photo of a sneaker"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from framework.pipeline import Pipeline
    from tests._trained import exported
    return Pipeline.from_pretrained(exported(tmp_path_factory, 1, 0), device="cpu")


def test_pipeline_samples_any_multiple_of_the_factor(pipe):
    assert pipe.size_multiple == 4
    wide = pipe(PROMPTS, steps=3, seed=3, height=16, width=32, output_type="pt")
    assert wide.shape == (2, 1, 16, 32) and torch.isfinite(wide).all()
    assert torch.equal(wide, pipe(PROMPTS, steps=3, seed=3, height=16, width=32, output_type="pt"))
    pil = pipe(PROMPTS, steps=2, seed=0, height=24, width=8)
    assert [im.size for im in pil] == [(8, 24), (8, 24)]
    assert pipe(PROMPTS[:1], steps=2, output_type="pt").shape == (1, 1, 16, 16)        # default: training size
    with pytest.raises(ValueError, match=r"16x30: both must be positive multiples of 4 \(the UNet's "
                                         r"downsampling factor 4\)"):
        pipe(PROMPTS, steps=2, height=16, width=30)
    grid = pipe.sample_grid(PROMPTS, [0.0, 3.0], seed=1, steps=2, height=8, width=24)
    assert grid["images"].shape == (4, 1, 8, 24)


def test_pipeline_passes_the_size_condition_to_both_branches(pipe):
    """A micro-conditioned UNet (the export's weights, size_embed new): zero-initialised it samples
    what the plain model samples; the condition is [h, w, 0, 0, h, w] in both halves of guidance."""
    from framework.pipeline import Pipeline
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(pipe.unet.cfg, micro_conditioning=True))
    missing, unexpected = unet.load_state_dict(pipe.unet.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("size_embed.") for k in missing)
    if pipe.channels_last:                      # as from_pretrained lays out the plain one
        unet = unet.to(memory_format=torch.channels_last)
    mc = Pipeline(unet.eval(), pipe.encoder, pipe.null, pipe.sched, pipe.config, pipe.device, pipe.dtype,
                  pipe.channels_last)
    kw = dict(steps=2, seed=4, height=16, width=32, guidance_scale=3.0, output_type="pt")
    assert torch.equal(mc(PROMPTS, **kw), pipe(PROMPTS, **kw))
    seen = []
    h = unet.register_forward_hook(lambda m, a, k, o: seen.append(k["size_cond"]), with_kwargs=True)
    try:
        mc(PROMPTS, **kw)
    finally:
        h.remove()
    assert len(seen) == 2 and all(torch.equal(s, torch.tensor([[16, 32, 0, 0, 16, 32]] * 4)) for s in seen)


def test_sample_tool_mixes_shapes_in_one_grid(tmp_path_factory, tmp_path):
    from tests._trained import exported
    from tools import sample as tool
    out = tmp_path / "s"
    s = tool.run([exported(tmp_path_factory, 1, 0), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                  "--guidance", "3", "--steps", "2", "--size", "16x32", "--size", "32x16", "--out", str(out),
                  "--cell-scale", "1"])
    assert s["sizes"] == [[16, 32], [32, 16]]
    assert {(r["height"], r["width"]) for r in s["images"]} == {(16, 32), (32, 16)}
    assert sorted(r["row"] for r in s["images"]) == [0, 0, 1, 1]
    sizes = sorted(Image.open(out / r["file"]).size for r in s["images"])
    assert sizes == [(16, 32), (16, 32), (32, 16), (32, 16)]
    grid = Image.open(out / "grid.png")
    cell, pad, label_w = 32, 2, len("g=3 32x16") * 6 + 6          # cells as large as the largest image
    assert grid.size == (label_w + 2 * (cell + pad) + pad, 14 + 2 * (cell + pad) + pad)
    with pytest.raises(SystemExit, match="multiples of 4"):
        tool.run([exported(tmp_path_factory, 1, 0), "--prompt", "x", "--size", "16x18", "--out", str(out)])


# ---------------------------------------------------------------------------------------------
# 2 ranks, different shapes at the same step, ZeRO-3; resume
# ---------------------------------------------------------------------------------------------
def _run_2_ranks(run_dir, *overrides) -> list[dict]:
    import json
    import subprocess
    import sys
    from tests._trained import env
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "aspect_entry.py"), "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
           f"run_dir={run_dir}", "unet.context_dim=32", "engine.micro_batch=2", "data.use_embeddings=true",
           "engine.zero_stage=3", "unet.micro_conditioning=true", "data.buckets.enabled=true",
           "data.buckets.step=8", "optim.lr=1e-2", "log.tensorboard=false", *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"2-rank run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    out = []
    for r in range(2):
        with open(os.path.join(run_dir, f"aspect-rank{r}.json")) as f:
            out.append(json.load(f))
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_with_different_shapes_under_zero3_resume_exactly(tmp_path):
    """Rank 0 and rank 1 hold batches of different shapes at the same step (the bucket each drew);
    every rank steps with micro_batch images, the ranks agree on the weights, and a run stopped at
    step 2 and resumed reaches the uninterrupted run's weights and losses bit for bit (the noise
    stream's 'buckets' mode resumes with the shared generator and the draw count)."""
    whole = _run_2_ranks(tmp_path / "whole", "engine.steps=4", "checkpoint.every=0")
    assert whole[0]["shapes"] == [[8, 24], [16, 16], [24, 8], [8, 16]]
    assert whole[1]["shapes"] == [[24, 8], [16, 16], [8, 24], [16, 8]]
    assert whole[0]["noise_mode"] == "buckets" and whole[0]["step"] == 4
    assert whole[0]["sha256"] == whole[1]["sha256"] and whole[0]["losses"] == whole[1]["losses"]
    first = _run_2_ranks(tmp_path / "cut", "engine.steps=2", "checkpoint.every=2")
    assert first[0]["losses"] == whole[0]["losses"][:2]
    rest = _run_2_ranks(tmp_path / "cut", "engine.steps=4", "checkpoint.every=2", "checkpoint.resume=auto")
    assert rest[0]["shapes"] == whole[0]["shapes"][2:] and rest[1]["shapes"] == whole[1]["shapes"][2:]
    assert rest[0]["losses"] == whole[0]["losses"][2:]
    assert rest[0]["sha256"] == rest[1]["sha256"] == whole[0]["sha256"]
