"""The frozen first stage (framework/models/vae.py) with real diffusers AutoencoderKL models (tiny, random
weights, saved to disk with save_pretrained): loading, freezing, and the latent scaling applied
exactly once on the way in and undone exactly once on the way out."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from framework.config import ConfigError, VAEConfig
from framework.models.vae import (LATENT_MEAN, LATENT_STD, FrozenVAE, LatentError, LatentSpec, check_latent_unet,
                           make_tiny_vae, save_vae_dir, scale_latent, unscale_latent)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """The same weights (seed 0) under three scalings: SD's 0.18215, none, and 0.5 with a shift."""
    d = tmp_path_factory.mktemp("vae")
    return {"sd": make_tiny_vae(str(d / "sd"), scaling_factor=0.18215),
            "one": make_tiny_vae(str(d / "one"), scaling_factor=1.0),
            "shift": make_tiny_vae(str(d / "shift"), scaling_factor=0.5, shift_factor=0.3)}


def _images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, size, size), generator=g) * 2 - 1


def test_loads_frozen_with_config_scaling(vaes):
    v = FrozenVAE(vaes["sd"])
    assert v.scale == pytest.approx(0.18215) and v.shift == 0.0
    assert v.dtype == torch.float32                         # CPU default
    assert not v.model.training
    assert all(not p.requires_grad for p in v.model.parameters())
    assert (v.latent_channels, v.factor, v.in_channels) == (4, 2, 1)
    assert v.latent_shape(1, 16, 16) == (4, 8, 8)
    # overrides from the config section win over config.json
    w = FrozenVAE.from_config(VAEConfig(path=vaes["sd"], scaling_factor=0.5, shift_factor=0.1, dtype="bf16"))
    assert (w.scale, w.shift) == (0.5, 0.1)
    assert next(w.model.parameters()).dtype == torch.bfloat16
    s = FrozenVAE(vaes["shift"])
    assert (s.scale, s.shift) == (0.5, pytest.approx(0.3))
    # no gradient reaches the VAE, and its outputs carry no graph
    x = _images(2).requires_grad_(True)
    mean, std = v.encode(x)
    assert not mean.requires_grad and not std.requires_grad


def test_scaling_applied_once_each_way(vaes):
    """The classic bug: scaling applied twice (or never) on one side. With the same weights under
    scaling 0.18215, 1 and (0.5, shift 0.3): the scaled latents relate exactly as (z - shift) * scale
    and decode(sample(encode(x))) is the same image for all three."""
    x = _images()
    a, b, c = FrozenVAE(vaes["sd"]), FrozenVAE(vaes["one"]), FrozenVAE(vaes["shift"])
    mean, std = a.encode(x)
    mean_b, std_b = b.encode(x)
    assert torch.equal(mean, mean_b) and torch.equal(std, std_b)      # the raw posterior is unscaled
    za = a.sample(mean, std, torch.Generator().manual_seed(1))
    zb = b.sample(mean, std, torch.Generator().manual_seed(1))
    zc = c.sample(mean, std, torch.Generator().manual_seed(1))
    torch.testing.assert_close(za, zb * 0.18215, rtol=0, atol=1e-6)
    torch.testing.assert_close(zc, (zb - 0.3) * 0.5, rtol=0, atol=1e-6)
    # decode undoes the scaling exactly once: the three give the same image. The only difference is
    # the float rounding of z0/scale (relative 2^-24 of |z| <~ 5), through a decoder of small gain:
    # well under 1e-5.
    xa, xb, xc = a.decode(za), b.decode(zb), c.decode(zc)
    torch.testing.assert_close(xa, xb, rtol=0, atol=1e-5)
    torch.testing.assert_close(xc, xb, rtol=0, atol=1e-5)
    # and decode(z) is diffusers' own decode of the unscaled latent
    ref = b.model.decode(mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))).sample
    torch.testing.assert_close(xb, ref, rtol=0, atol=1e-6)
    # mode="mean": the scaled posterior mean
    torch.testing.assert_close(a.encode_scaled(x, mode="mean"), mean * 0.18215, rtol=0, atol=1e-7)


def test_scaling_factor_from_latent_std_gives_unit_variance(vaes, tmp_path):
    """scale = 1/std of the raw latents (LDM 4.3.2): a VAE saved with it gives z0 of std 1."""
    x = _images(16, seed=3)
    b = FrozenVAE(vaes["one"])
    mean, std = b.encode(x)
    z = b.sample(mean, std, torch.Generator().manual_seed(0))
    s = float(z.std())
    d = str(tmp_path / "scaled")
    save_vae_dir(vaes["one"], d, scaling_factor=1.0 / s)
    v = FrozenVAE(d)
    z0 = v.sample(mean, std, torch.Generator().manual_seed(0))
    assert abs(float(z0.std()) - 1.0) < 1e-5          # once: 1; twice would give 1/s (here far from 1)
    assert abs(1.0 / s - 1.0) > 0.05
    # the copied weights are byte-identical, diffusers loads the folder and reads the new factor
    from diffusers import AutoencoderKL
    m = AutoencoderKL.from_pretrained(d, low_cpu_mem_usage=False)
    assert m.config.scaling_factor == pytest.approx(1.0 / s)
    assert v.digest == b.digest


def test_bad_vae_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae.path"):
        FrozenVAE(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        FrozenVAE(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        FrozenVAE(str(tmp_path / "noweights"))
    with pytest.raises(ConfigError, match="vae.path"):
        FrozenVAE.from_config(VAEConfig())


def _npy(a) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_latent_spec_draw_is_deterministic_and_scaled_once():
    info = {"latents": {"shape": [4, 2, 2], "scaling_factor": 0.5, "shift_factor": 0.25, "vae": {"sha256": "x"}}}
    spec = LatentSpec.from_manifests([info])
    r = np.random.default_rng(0)
    mean = r.standard_normal((4, 2, 2)).astype(np.float16)
    std = (r.random((4, 2, 2)) * 0.1).astype(np.float16)
    sample = {LATENT_MEAN: _npy(mean), LATENT_STD: _npy(std)}
    z1 = spec.draw(sample, random.Random(7))
    z2 = spec.draw(sample, random.Random(7))
    assert np.array_equal(z1, z2) and z1.dtype == np.float32
    eps = np.random.default_rng(random.Random(7).getrandbits(64)).standard_normal((4, 2, 2), dtype=np.float32)
    expect = (mean.astype(np.float32) + std.astype(np.float32) * eps - 0.25) * 0.5
    np.testing.assert_allclose(z1, expect, rtol=0, atol=1e-6)
    np.testing.assert_allclose(unscale_latent(scale_latent(expect, 0.5, 0.25), 0.5, 0.25), expect, atol=1e-6)
    assert LatentSpec.from_manifests([info], scaling_factor=2.0).scale == 2.0
    with pytest.raises(LatentError) as e:
        spec.draw({LATENT_MEAN: _npy(mean[:2]), LATENT_STD: _npy(std[:2])}, random.Random(0))
    assert e.value.reason == "shape"
    with pytest.raises(LatentError) as e:
        spec.draw({LATENT_MEAN: _npy(mean)}, random.Random(0))
    assert e.value.reason == "no_latent"
    with pytest.raises(ConfigError, match="precompute_latents"):
        LatentSpec.from_manifests([{"shards": []}])
    with pytest.raises(ConfigError, match="unet.in_channels=3"):
        check_latent_unet(spec, 3)
