"""The evaluation: classifier accuracy on real held-out data, the statistics against closed forms,
the sweep's bookkeeping, the PIL plot."""
from __future__ import annotations

import math
import os

import pytest
import torch
from PIL import Image

from framework import evaluate as V

HAS_FMNIST = os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not HAS_FMNIST, reason="needs Debian's dataset-fashion-mnist")

# A small subset keeps this test fast: 4,000 training images, 2 epochs (~8 CPU-seconds) reach ~84%
# on the held-out test split; the full recipe (60k, 2 epochs) reaches ~91%. Stated threshold: 0.78.
SUBSET_THRESHOLD = 0.78


@needs_data
def test_classifier_reaches_stated_accuracy_on_held_out_data_and_is_cached(tmp_path):
    clf, info = V.get_classifier(str(tmp_path), n_train=4000, n_test=2000, epochs=2)
    assert not info["cached"] and info["n_train"] == 4000 and info["n_test"] == 2000
    assert info["accuracy"] >= SUBSET_THRESHOLD, info
    # re-measured independently on the held-out split
    xte, yte = V.load_fashion("test")
    assert abs(V.accuracy(clf, V.to_input(xte[:2000]), torch.from_numpy(yte[:2000])) - info["accuracy"]) < 1e-3
    # cached by a key of the data: the second call loads the same weights, a different subset retrains
    clf2, info2 = V.get_classifier(str(tmp_path), n_train=4000, n_test=2000, epochs=2)
    assert info2["cached"] and info2["key"] == info["key"] and info2["accuracy"] == info["accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), clf2.state_dict().values()))
    assert V.data_key(xte[:10], yte[:10], {}) != V.data_key(xte[:11], yte[:11], {})
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(info["path"])]      # safetensors, no pickle
    # features: (N, 128); other image sizes are resized
    f = V.features(clf, torch.zeros(3, 1, 16, 16))
    assert f.shape == (3, 128)


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    n, d = 500, 4

    def white(n):      # samples with empirical mean exactly 0 and covariance exactly I
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        z = z - z.mean(0)
        return z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T
    s1 = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    s2 = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    m = torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    a, b = white(n) * s1.sqrt(), white(2 * n) * s2.sqrt() + m
    # diagonal covariances: |m|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    expected = float(m.square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    assert abs(V.frechet_distance(a, b) - expected) < 1e-8
    assert abs(V.frechet_distance(a, a)) < 1e-8
    # a full (rotated) covariance: invariant under a common rotation
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    assert abs(V.frechet_distance(a @ q, b @ q) - V.frechet_distance(a, b)) < 1e-6


def test_diversity_statistics():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    assert V.mean_pairwise_distance(f[:2]) == pytest.approx(5.0)
    assert V.mean_pairwise_distance(f[1:]) == pytest.approx((5 + 5 + 10) / 3)
    labels = torch.tensor([0, 0, 1, 1])
    assert V.class_diversity(f, labels) == pytest.approx((5.0 + 10.0) / 2)
    assert math.isnan(V.mean_pairwise_distance(f[:1]))


def test_class_prompts_use_the_training_templates():
    from framework.data.sources import FASHION_TEMPLATES
    prompts, labels = V.class_prompts(8)
    assert len(prompts) == 80 and labels.tolist() == [c for c in range(10) for _ in range(8)]
    assert prompts[0] == "a photo of a t-shirt" and prompts[8] == "a photo of a pair of trousers"
    assert prompts[9] == "a black and white image of a pair of trousers"
    assert prompts[7 * 8 + 6] == "a centered product photo of a sneaker"
    assert len({p.split(" of a")[0] for p in prompts[:len(FASHION_TEMPLATES)]}) >= 5


def test_plot_sweep_draws_several_named_curves(tmp_path):
    pts = lambda acc: [{"gamma": g, "accuracy": a, "fd": 10 / (1 + g), "diversity": 5 - g / 2}
                       for g, a in zip([0, 1, 3, 5], acc)]
    path = V.plot_sweep([{"name": "classifier-free guidance", "points": pts([0.3, 0.6, 0.9, 0.95])},
                         {"name": "classifier guidance", "points": pts([0.3, 0.5, 0.7, 0.8])}],
                        str(tmp_path / "sweep.png"), references={"diversity": ("real", 4.2)}, title="t")
    im = Image.open(path).convert("RGB")
    assert im.size[0] > 900 and im.size[1] > 250
    colors = {c for _, c in im.getcolors(1 << 20)}
    assert (31, 119, 180) in colors and (214, 39, 40) in colors         # one color per curve
    assert V._nice_ticks(0.0, 5.0) == [0, 1, 2, 3, 4, 5]
    assert V._nice_ticks(3.1, 6.7)[-1] >= 6.7


@needs_data
def test_guidance_sweep_bookkeeping(tmp_path):
    """The sweep on a random (untrained) pipeline: shapes, keys, the same noise for every gamma."""
    from framework.config import DiffusionConfig, SampleConfig, TextConfig, UNetConfig
    from framework.diffusion.process import Schedule
    from framework.export import Pipeline
    from framework.models.text import TextEncoder
    from framework.models.unet import UNet
    from tests._fixtures import tiny_encoder

    enc = TextEncoder(TextConfig(encoder=tiny_encoder(str(tmp_path / "enc")), max_length=8), device="cpu")
    torch.manual_seed(0)
    ucfg = UNetConfig(in_channels=1, channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                      head_dim=16, context_dim=enc.dim, groups=8)
    unet = UNet(ucfg).eval()
    for p in unet.parameters():              # make the zero-initialised output layers non-trivial
        p.data.add_(0.01 * torch.randn_like(p))
    config = {"image": {"size": 16, "channels": 1}, "sample": vars(SampleConfig())}
    pipe = Pipeline(unet, enc, enc.null(1), Schedule.from_config(DiffusionConfig(timesteps=50)), config,
                    torch.device("cpu"), torch.float32)
    clf = V.Classifier().eval()
    xte, yte = V.load_fashion("test")
    real = {"features": V.features(clf, V.to_input(xte[:500])), "diversity_real": 1.0,
            "train_images": xte[500:1000], "model": clf, "seed": 0, "_floor": {}}
    res = V.guidance_sweep(pipe, clf, [0.0, 2.0], real, per_class=2, steps=2, batch_size=7, grid_per_class=2)
    assert [p["gamma"] for p in res["points"]] == [0.0, 2.0]
    for p in res["points"]:
        assert p["n"] == 20 and 0 <= p["accuracy"] <= 1 and len(p["per_class_accuracy"]) == 10
        assert p["fd"] > 0 and p["fd_floor"] > 0 and p["diversity"] >= 0
    imgs, k = res["grids"][2.0]
    assert k == 2 and imgs.shape == (20, 1, 16, 16)
    assert res["curve"]["name"] == "CFG" and res["settings"]["per_class"] == 2
