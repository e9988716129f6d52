"""The inference Pipeline and tools/sample.py on a tiny trained, exported model.

Deterministic under a seed; classifier-free guidance uses the exported null condition and ONE batched
forward per step; the grid of tools/sample.py has rows x cols cells.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from framework.export import Pipeline
from tests._trained import exported

PROMPTS = ["a photo of a coat", "a photo of a sneaker", "a photo of a bag"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(exported(tmp_path_factory, 1, 0), device="cpu")


def test_deterministic_under_a_seed(pipe):
    for sampler, steps in (("ddim", 5), ("ddpm", None)):          # ddpm: all T=100 steps, noise each step
        kw = dict(guidance_scale=3.0, sampler=sampler, steps=steps, output_type="pt")
        a = pipe(PROMPTS, seed=11, **kw)
        b = pipe(PROMPTS, seed=11, **kw)
        assert a.shape == (3, 1, 16, 16) and a.dtype == torch.float32
        assert torch.equal(a, b), sampler
        assert a.min() >= -1 and a.max() <= 1
    c = pipe(PROMPTS, seed=12, guidance_scale=3.0, steps=5, output_type="pt")
    assert not torch.allclose(c, pipe(PROMPTS, seed=11, guidance_scale=3.0, steps=5, output_type="pt"))


def test_output_types(pipe):
    pil = pipe(PROMPTS[:2], steps=2, seed=0)
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in pil)
    arr = pipe(PROMPTS[:2], steps=2, seed=0, output_type="np")
    assert arr.shape == (2, 16, 16, 1) and arr.dtype.name == "uint8"
    import numpy as np
    assert (arr[0, ..., 0] == np.asarray(pil[0])).all()
    with pytest.raises(ValueError):
        pipe(PROMPTS, output_type="latent")
    with pytest.raises(ValueError):
        pipe(PROMPTS, sampler="euler")


def test_guidance_is_one_batched_forward_with_the_exported_null(pipe):
    calls = []
    h = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        pipe(PROMPTS, guidance_scale=3.0, steps=4, seed=0, output_type="pt")
        assert calls == [6] * 4                          # [cond; uncond] in one call per step
        calls.clear()
        pipe(PROMPTS, guidance_scale=1.0, steps=4, seed=0, output_type="pt")
        assert calls == [3] * 4                          # gamma = 1: the conditional model alone
    finally:
        h.remove()
    # gamma = 0 is the model under THE null condition, for any prompt
    a = pipe(PROMPTS, guidance_scale=0.0, steps=3, seed=5, output_type="pt")
    b = pipe(["something else entirely"] * 3, guidance_scale=0.0, steps=3, seed=5, output_type="pt")
    assert torch.equal(a, b)
    # ... and that condition is the exported tensor
    seen = {}

    def spy(m, args, kwargs, out):
        seen["ctx"], seen["mask"] = kwargs["ctx"], kwargs["ctx_mask"]
    h = pipe.unet.register_forward_hook(spy, with_kwargs=True)
    try:
        pipe(PROMPTS[:1], guidance_scale=0.0, steps=1, output_type="pt")
    finally:
        h.remove()
    assert torch.equal(seen["ctx"], pipe.null.ctx) and torch.equal(seen["mask"], pipe.null.mask)
    # a negative prompt replaces the null condition
    n = pipe(PROMPTS, guidance_scale=3.0, steps=3, seed=5, output_type="pt", negative_prompt="a photo of a shirt")
    g = pipe(PROMPTS, guidance_scale=3.0, steps=3, seed=5, output_type="pt")
    assert not torch.equal(n, g)


@pytest.mark.equivalence
def test_batching_does_not_change_ddim_samples(pipe):
    # the noise of image i is fixed by the seed, whatever the batch it is sampled in
    x_T = pipe.noise(3, seed=4)
    full = pipe(PROMPTS, steps=3, x_T=x_T, output_type="pt")
    part = pipe(PROMPTS[1:], steps=3, x_T=x_T[1:], output_type="pt")
    assert torch.allclose(full[1:], part, atol=1e-4)    # batch-size-dependent kernels
    grid = pipe.sample_grid(PROMPTS, [0.0, 3.0], num_per_prompt=2, seed=4, batch_size=4, steps=3)
    grid2 = pipe.sample_grid(PROMPTS, [0.0, 3.0], num_per_prompt=2, seed=4, batch_size=6, steps=3)
    assert grid["images"].shape == (2 * 2 * 3, 1, 16, 16) and grid["nrow"] == 3
    assert torch.allclose(grid["images"], grid2["images"], atol=1e-4)


def test_sample_tool_writes_images_and_a_grid_of_rows_x_cols(tmp_path_factory, tmp_path):
    from tools import sample as tool
    export = exported(tmp_path_factory, 1, 0)
    pf = tmp_path / "prompts.txt"
    pf.write_text("# classes\na photo of a dress\n\na photo of a pair of trousers\n")
    out = tmp_path / "s"
    s = tool.run([export, "--prompt", "a photo of a bag", "--prompts-file", str(pf), "--guidance", "0", "1", "4",
                   "--num-per-prompt", "2", "--steps", "3", "--seed", "1", "--batch-size", "4", "--out", str(out),
                   "--cell-scale", "2"])
    rows, cols = 3 * 2, 3
    assert len(s["images"]) == rows * cols
    assert {(r["row"], r["col"]) for r in s["images"]} == {(r, c) for r in range(rows) for c in range(cols)}
    assert len(os.listdir(out / "images")) == rows * cols
    grid = Image.open(out / "grid.png")
    cell, pad = 16 * 2, 2
    label_w = max(len(f"g={g} #1") for g in ("0", "1", "4")) * 6 + 6      # framework.images row labels
    assert grid.size == (label_w + cols * (cell + pad) + pad, 14 + rows * (cell + pad) + pad)
    with open(out / "samples.json") as f:
        meta = json.load(f)
    assert meta["prompts"][0] == "a photo of a bag" and meta["guidance_scales"] == [0.0, 1.0, 4.0]
    # deterministic: the same command gives the same images
    s2 = tool.run([export, "--prompt", "a photo of a bag", "--prompts-file", str(pf), "--guidance", "0", "1", "4",
                    "--num-per-prompt", "2", "--steps", "3", "--seed", "1", "--batch-size", "4", "--out",
                    str(tmp_path / "s2"), "--no-images", "--cell-scale", "2"])
    assert not os.path.exists(tmp_path / "s2" / "images")
    assert Image.open(s2["grid"]).tobytes() == grid.tobytes()
