"""The noisy classifier p(y | x_t, t) and classifier guidance.

Fast: construction (zero-init head, meta build, UNet key names), caption -> class labels, gradients
flow only into x (eps and mean-shift forms, combined with classifier-free guidance).
Slow: accuracy by t of a briefly trained classifier (plain torch loop) through the JSON tool;
the real trainer with task=classifier (1 rank, labels from captions) against ZeRO-3 at 2 ranks
(labels from json), both loaded back as guidance classifiers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from framework.models.classifier import (ClassifierGuide, NoisyClassifier, accuracy_by_t, batch_labels,
                                  class_index, export_classifier, labels_from_captions,
                                  load_classifier)
from framework.config import ClassifierConfig, load_config
from framework.diffusion.process import Schedule, q_sample
from framework.diffusion.sampling import cfg_model, ddim_sample, ddpm_sample
from framework.data.sources import FASHION_CLASSES
from framework.models.unet import UNet
from tests._fixtures import CLASSES, class_image, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(*overrides):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), list(overrides))


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_logits_shape_zero_init_head_and_meta_build(pool):
    cfg = _cfg(f"classifier.pool={pool}")
    torch.manual_seed(0)
    m = NoisyClassifier(cfg.unet, cfg.classifier)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 50, 100])
    logits = m(x, t)
    assert logits.shape == (3, 10)
    assert torch.all(logits == 0)                         # zero-initialised output layer: uniform p(y|x_t)
    assert torch.all(m.head.weight == 0) and torch.all(m.head.bias == 0)
    # the zero init lives in the layer's own reset_parameters (what ZeRO-3 zero.Init relies on)
    m.head.weight.data.normal_()
    m.head.reset_parameters()
    assert torch.all(m.head.weight == 0)
    assert m.features(x, t).shape == (3, 32)
    with torch.device("meta"):
        meta = NoisyClassifier(cfg.unet, cfg.classifier)
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in m.parameters())
    # the UNet's encoder half, same key names and shapes (an encoder can be copied from a UNet)
    unet_sd = UNet(cfg.unet).state_dict()
    shared = [k for k in m.state_dict() if k.startswith(("time_embed", "conv_in", "down.", "mid.res"))]
    assert shared and all(unet_sd[k].shape == m.state_dict()[k].shape for k in shared
                          if "attn2" not in k and "norm2" not in k)


def test_rejects_bad_config():
    cfg = _cfg()
    with pytest.raises(ValueError, match="num_classes"):
        NoisyClassifier(cfg.unet, ClassifierConfig(num_classes=1))
    with pytest.raises(ValueError, match="class_names has 2"):
        NoisyClassifier(cfg.unet, ClassifierConfig(num_classes=10, class_names=["a", "b"]))


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------
def test_labels_from_captions_fashion_names():
    caps = ["a photo of a t-shirt", "a pair of trousers", "a grayscale photo of a shirt",
            "an ankle boot on a black background", "Sneakers!", "a TOP", "a small image of a bag"]
    assert labels_from_captions(caps, FASHION_CLASSES) == [0, 1, 6, 9, 7, 0, 8]
    with pytest.raises(ValueError, match="names no class"):
        labels_from_captions(["a photo of a cat"], FASHION_CLASSES)
    with pytest.raises(ValueError, match="several classes"):
        labels_from_captions(["a coat and a dress"], FASHION_CLASSES)
    assert class_index("ankle boot", FASHION_CLASSES, 10) == 9
    assert class_index("3", FASHION_CLASSES, 10) == 3
    with pytest.raises(ValueError):
        class_index(10, FASHION_CLASSES, 10)


def test_batch_labels_json_then_captions_then_error():
    cls = ClassifierConfig(num_classes=10, class_names=list(CLASSES))
    batch = {"label": torch.tensor([3, -1, -1]), "caption": ["x", "a photo of a t-shirt", "a boot"],
             "key": ["a", "b", "c"]}
    assert batch_labels(batch, cls).tolist() == [3, 0, 9]
    with pytest.raises(ValueError, match="'b' has no label"):
        batch_labels(batch, ClassifierConfig(num_classes=10))
    with pytest.raises(ValueError, match="outside 0..9"):
        batch_labels({"label": torch.tensor([12]), "caption": ["x"]}, cls)


# ---------------------------------------------------------------------------------------------
# Gradients flow only into x
# ---------------------------------------------------------------------------------------------
def _random_guide(cfg, seed=0):
    torch.manual_seed(seed)
    m = NoisyClassifier(cfg.unet, cfg.classifier)
    with torch.no_grad():
        m.head.weight.normal_(0, 0.5)                     # a non-trivial classifier
    return ClassifierGuide(m, CLASSES)


def test_gradients_flow_only_into_x_both_forms():
    cfg = _cfg()
    guide = _random_guide(cfg)
    params = list(guide.model.parameters())
    assert not guide.model.training and not any(p.requires_grad for p in params)
    sched = Schedule(20, "cosine")
    x = torch.randn(4, 1, 16, 16)
    t = torch.tensor([1, 5, 10, 20])
    y = torch.tensor([0, 3, 7, 9])

    # grad_fn = d/dx log_softmax(logits)[y], the classifier's own autograd on a free copy of x
    g = guide.grad_fn(y)(x, t)
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        lp = torch.log_softmax(guide.model.float()(xr, t), -1)[torch.arange(4), y].sum()
    (ref,) = torch.autograd.grad(lp, xr)
    assert torch.allclose(g, ref, atol=1e-6) and g.abs().sum() > 0
    assert not x.requires_grad and x.grad is None

    # eps-correction form equals the lecture's formula
    base = lambda x, t: 0.1 * x                           # noqa: E731
    fn = guide.eps_model(base, y, 2.5, sched)
    want = base(x, t) - 2.5 * sched.sqrt_one_minus_abar[t].float().view(-1, 1, 1, 1) * ref
    assert torch.allclose(fn(x, t), want, atol=1e-6)

    # full samplers in both forms, inside no_grad: no classifier parameter ever gets a .grad
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(4, 1, 16, 16, generator=gen)
    out_eps = guide.sample(base, x_T, sched, y, 3.0, form="eps", sampler="ddim", steps=5)
    out_mean = guide.sample(base, x_T, sched, y, 3.0, form="mean", sampler="ddpm",
                            generator=torch.Generator().manual_seed(1))
    plain = ddpm_sample(base, x_T, sched, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out_eps).all() and torch.isfinite(out_mean).all()
    assert not torch.allclose(out_mean, plain)            # the guidance did something
    assert all(p.grad is None for p in params)
    assert all(not p.requires_grad for p in params)
    with pytest.raises(ValueError, match="ddpm"):
        guide.sample(base, x_T, sched, y, 1.0, form="mean", sampler="ddim")


def test_mean_shift_as_model_wrapper_equals_ddpm_classifier_grad():
    """The ancestral mean shift as an eps correction (for Pipeline model_wrapper) is exactly
    ddpm_sample(classifier_grad=...); the prompt wrapper reads each prompt's class."""
    cfg = _cfg()
    guide = _random_guide(cfg)
    sched = Schedule(12, "cosine")
    base = lambda x, t: 0.2 * x + 0.05                   # noqa: E731
    x_T = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 5, 8])
    ref = ddpm_sample(base, x_T, sched, generator=torch.Generator().manual_seed(2), classifier_grad=guide.grad_fn(y),
                      classifier_scale=4.0)
    got = ddpm_sample(guide.mean_shift_model(base, y, 4.0, sched), x_T, sched, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    wrap = guide.prompt_wrapper(4.0, sched, form="mean")
    via_prompts = ddpm_sample(wrap(base, ["a photo of a trouser", "a sandal", "a bag"]), x_T, sched,
                              generator=torch.Generator().manual_seed(2))
    assert torch.allclose(via_prompts, ref, atol=1e-5)
    eps_wrap = guide.prompt_wrapper(4.0, sched, form="eps", y="sandal")
    assert torch.allclose(eps_wrap(base, ["x"] * 3)(x_T, torch.tensor([6, 6, 6])),
                          guide.eps_model(base, 5, 4.0, sched)(x_T, torch.tensor([6, 6, 6])))
    assert all(p.grad is None for p in guide.model.parameters())


def test_guidance_on_text_model_with_and_without_cfg():
    """A text-conditional UNet: unconditional = the null condition (cfg scale 0); CFG + classifier
    guidance = the classifier correction wrapped around the CFG model function."""
    cfg = _cfg("unet.context_dim=8")
    guide = _random_guide(cfg)
    torch.manual_seed(1)
    unet = UNet(cfg.unet).eval()
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.1)
    sched = Schedule(20, "cosine")
    B, L = 2, 4
    cond = {"ctx": torch.randn(B, L, 8), "ctx_mask": torch.ones(B, L, dtype=torch.bool)}
    null = {"ctx": torch.zeros(1, L, 8), "ctx_mask": torch.tensor([[True, False, False, False]])}
    model = lambda x, t, c: unet(x, t, **c)               # noqa: E731
    x, t, y = torch.randn(B, 1, 16, 16), torch.tensor([7, 7]), 4
    grad = guide.grad_fn(y)(x, t)
    s = sched.sqrt_one_minus_abar[7].item()
    with torch.no_grad():
        e_c, e_u = model(x, t, cond), model(x, t, {k: v.expand(B, *v.shape[1:]) for k, v in null.items()})
        uncond_fn = cfg_model(model, cond, null, 0.0)           # "unconditional text model"
        assert torch.allclose(guide.eps_model(uncond_fn, y, 2.0, sched)(x, t), e_u - 2.0 * s * grad, atol=1e-5)
        both = guide.eps_model(cfg_model(model, cond, null, 3.0), y, 2.0, sched)
        assert torch.allclose(both(x, t), 3 * e_c - 2 * e_u - 2.0 * s * grad, atol=1e-5)
        x0 = ddim_sample(both, torch.randn(B, 1, 16, 16), sched, steps=4)
    assert torch.isfinite(x0).all()
    assert all(p.grad is None for p in guide.model.parameters())
    assert all(p.grad is None for p in unet.parameters())


# ---------------------------------------------------------------------------------------------
# Accuracy by t of a briefly trained classifier
# ---------------------------------------------------------------------------------------------
def _synthetic(n, rng):
    y = np.arange(n) % 10
    x = np.stack([class_image(int(v), 16, rng) for v in y]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(x)[:, None], torch.from_numpy(y).long()


@pytest.mark.slow
def test_accuracy_by_t_beats_chance_at_small_t_and_degrades_to_chance(tmp_path):
    cfg = _cfg("unet.attention_levels=[]", "unet.mid_attention=false")
    rng = np.random.default_rng(0)
    xtr, ytr = _synthetic(500, rng)
    xte, yte = _synthetic(300, rng)                        # held out: fresh noise backgrounds
    sched = Schedule(100, "cosine")                        # abar_T ~ 0: x_T carries no class
    torch.manual_seed(0)
    m = NoisyClassifier(cfg.unet, cfg.classifier)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):                                  # x_t at random t, cross-entropy
        idx = torch.randint(0, len(xtr), (32,), generator=g)
        t = torch.randint(1, sched.T + 1, (32,), generator=g)
        x_t = q_sample(sched, xtr[idx], t, torch.randn(32, 1, 16, 16, generator=g))
        loss = torch.nn.functional.cross_entropy(m(x_t, t), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    ts = [1, 10, 25, 50, 75, 90, 100]
    acc = accuracy_by_t(m, xte, yte, sched, ts)
    (tmp_path / "curve.json").write_text(json.dumps({"t": ts, "accuracy": [acc[t] for t in ts]}))
    print("accuracy by t:", acc)
    assert acc[1] >= 0.9 and acc[25] >= 0.9               # chance is 0.1
    assert acc[100] <= 0.25                                # pure noise: back to chance
    assert acc[100] < acc[75] <= acc[1]


# ---------------------------------------------------------------------------------------------
# The real trainer: task=classifier at 1 rank (caption labels) and ZeRO-3 at 2 ranks (json labels)
# ---------------------------------------------------------------------------------------------
def _strip_json(src_dir, dst_dir):
    """The same shards without the json metadata: labels must come from the captions."""
    os.makedirs(dst_dir, exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(src_dir, name)) as src, \
                tarfile.open(os.path.join(dst_dir, name), "w") as dst:
            for member in src.getmembers():
                if not member.name.endswith(".json"):
                    dst.addfile(member, src.extractfile(member))
    manifest = json.load(open(os.path.join(src_dir, "shards.json")))
    json.dump(manifest, open(os.path.join(dst_dir, "shards.json"), "w"))


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train(run_dir, urls, nproc, overrides):
    cmd = [sys.executable, "-m", "framework.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "framework.train"]
    args = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run_dir={run_dir}", "task=classifier",
            f"data.urls=['{urls}']", "data.shardshuffle=false", "data.shuffle_buffer=0",
            "data.num_workers=0", "engine.steps=3", "checkpoint.every=3", "engine.ema_decay=0.5",
            "optim.lr=3e-3", *overrides]
    p = subprocess.run(cmd + args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f) if "loss" in m}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.equivalence
def test_trainer_task_classifier_1_rank_captions_equals_zero3_2_ranks_json(tmp_path):
    # 16 shards x 4 samples, no shuffling: the 2-rank global batch of step k is the 1-rank batch
    write_shards(str(tmp_path / "json"), 16, 4, size=16)
    _strip_json(str(tmp_path / "json"), str(tmp_path / "nojson"))
    pattern = "data-{000000..000015}.tar"
    # The two runs reduce gradients in a different order (one batch of 8 vs two halves all-reduced),
    # so their gradients differ by fp32 rounding. AdamW's step lr*m/(sqrt(v)+eps) has a sensitivity
    # to its gradient of at most lr/eps (reached where |g| ~ eps): with the default eps=1e-8 and
    # lr=3e-3, 3e5. Below the zero-initialised head the backbone gradients are ~0 after one step,
    # so there the rounding noise became weight differences of 2.1e-5 (AVX-512), 2.6e-5 (AVX2) and
    # 4.1e-5 (SSE4.1 kernels). eps=1e-4 makes the factor 1e4 times smaller (measured: 6e-8, 1.7e-8,
    # 3.3e-8), so atol=1e-5 holds with a margin > 100 on any CPU; steps where |g| >> 1e-4 (the
    # head's) are Adam's unchanged.
    adam = ["optim.eps=1e-4"]
    one = _train(tmp_path / "one", str(tmp_path / "nojson" / pattern), 1,
                 ["engine.zero_stage=0", "engine.micro_batch=8", f"classifier.class_names={list(CLASSES)}", *adam])
    z3 = _train(tmp_path / "z3", str(tmp_path / "json" / pattern), 2,
                ["engine.zero_stage=3", "engine.micro_batch=4", *adam])
    assert sorted(one) == sorted(z3) == [1, 2, 3]
    assert abs(one[1] - np.log(10)) < 1e-4                # zero-init head: uniform p(y|x_t) at step 1
    # same labels, same noise: the same losses up to the forward's fp32 rounding (a mean of 8
    # cross-entropies, ~1e-7 relative); 1e-5 leaves room for the weights' differences above
    for s in one:
        assert abs(one[s] - z3[s]) <= 1e-5 * max(1.0, abs(one[s])), (one, z3)
    # loaded back (consolidated EMA; ZeRO-3's is re-assembled from 2 partitions): same weights
    m1, c1 = load_classifier(str(tmp_path / "one"))
    m3, c3 = load_classifier(str(tmp_path / "z3"))
    assert c1.classifier.class_names == list(CLASSES) and c3.task == "classifier"
    sd1, sd3 = m1.state_dict(), m3.state_dict()
    assert sd1.keys() == sd3.keys()
    assert any(v.abs().sum() > 0 for k, v in sd1.items() if k.startswith("head."))   # it trained
    for k in sd1:                                         # atol: see `adam` above
        assert torch.allclose(sd1[k], sd3[k], atol=1e-5, rtol=0), (k, (sd1[k] - sd3[k]).abs().max())
    assert not m1.training and not any(p.requires_grad for p in m1.parameters())
    # an exported classifier (safetensors + config.yaml) loads to the same weights
    export_classifier(str(tmp_path / "z3"), str(tmp_path / "z3-export"))
    me, ce = load_classifier(str(tmp_path / "z3-export"))
    assert ce.classifier.num_classes == 10 and ce.diffusion.timesteps == c3.diffusion.timesteps
    assert all(torch.equal(me.state_dict()[k], sd3[k]) for k in sd3)
    # tools/sample.py's classifier flags: the wrapper on top of the (CFG) model function
    from types import SimpleNamespace

    from framework.config import SampleConfig
    from tools import sample as S
    pipe = SimpleNamespace(device=torch.device("cpu"), channels=1, sched=Schedule.from_config(c1.diffusion),
                           defaults=SampleConfig())
    argv = ["EXPORT", "--guidance", "0", "--classifier", str(tmp_path / "one"), "--classifier-scale", "2"]
    mean = ["--sampler", "ddpm", "--no-clip", "--classifier-form", "mean"]
    wrap = S.guidance_wrapper(S.build_parser().parse_args(argv + mean), pipe)
    base = lambda x, t: 0.1 * x                           # noqa: E731
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    assert wrap(base, ["a photo of a bag", "a dress"])(x, t).shape == x.shape
    eps_wrap = S.guidance_wrapper(S.build_parser().parse_args(argv + ["--classifier-class", "bag"]), pipe)
    guide = ClassifierGuide(m1, c1.classifier.class_names)
    assert torch.allclose(eps_wrap(base, ["x", "y"])(x, t), guide.eps_model(base, 8, 2.0, pipe.sched)(x, t))
    assert S.guidance_wrapper(S.build_parser().parse_args(["EXPORT"]), pipe) is None
    for missing in (["--sampler", "ddpm"], ["--no-clip"]):        # the plain ancestral sampler only
        with pytest.raises(SystemExit, match="--sampler ddpm --no-clip"):
            S.guidance_wrapper(S.build_parser().parse_args(argv + missing + ["--classifier-form", "mean"]), pipe)
    with pytest.raises(SystemExit, match="schedule"):
        S.guidance_wrapper(S.build_parser().parse_args(argv), SimpleNamespace(**{**vars(pipe), "sched": Schedule(50)}))
    # the JSON accuracy tool runs on it (labels from captions through the run's class_names)
    out = tmp_path / "acc.json"
    from tools.classifier import main
    main(["accuracy", "--classifier", str(tmp_path / "one"), "--data", str(tmp_path / "nojson"),
          "--n", "20", "--t", "1,50,100", "--out", str(out), "--threads", "1"])
    curve = json.loads(out.read_text())
    assert curve["t"] == [1, 50, 100] and curve["n"] == 20 and len(curve["accuracy"]) == 3


# ---------------------------------------------------------------------------------------------
# The evaluation sweep over classifier scales (random pipeline: bookkeeping, not quality)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
                    reason="needs Debian's dataset-fashion-mnist")
def test_classifier_guidance_sweep_bookkeeping(tmp_path):
    from framework import evaluate as V
    from framework.models.classifier import ClassifierGuidanceMethod
    from framework.config import DiffusionConfig, SampleConfig, TextConfig, UNetConfig
    from framework.export import Pipeline
    from framework.models.text import TextEncoder
    from tests._fixtures import tiny_encoder

    enc = TextEncoder(TextConfig(encoder=tiny_encoder(str(tmp_path / "enc")), max_length=8), device="cpu")
    torch.manual_seed(0)
    ucfg = UNetConfig(in_channels=1, channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[],
                      mid_attention=False, context_dim=enc.dim, groups=8)
    unet = UNet(ucfg).eval()
    for p in unet.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    dcfg = DiffusionConfig(timesteps=8, beta_end=0.5)
    pipe = Pipeline(unet, enc, enc.null(1), Schedule.from_config(dcfg),
                    {"image": {"size": 16, "channels": 1}, "sample": vars(SampleConfig())},
                    torch.device("cpu"), torch.float32)
    m = NoisyClassifier(ucfg, ClassifierConfig(num_classes=10, class_names=list(FASHION_CLASSES)))
    with torch.no_grad():
        m.head.weight.normal_(0, 0.5)
    guide = ClassifierGuide(m, FASHION_CLASSES, dcfg)
    clf = V.Classifier().eval()
    xte, _ = V.load_fashion("test")
    real = {"features": V.features(clf, V.to_input(xte[:300])), "diversity_real": 1.0,
            "train_images": xte[300:600], "model": clf, "seed": 0, "_floor": {}}
    kw = dict(per_class=1, sampler="ddpm", batch_size=10, grid_per_class=1, clip_x0=None)
    res = {}
    for form in ("eps", "mean"):
        method = ClassifierGuidanceMethod(guide, form=form)
        res[form] = method.sweep(pipe, clf, [0.0, 5.0], real, **kw)
        pts = res[form]["points"]
        assert [p["gamma"] for p in pts] == [0.0, 5.0] == [p["classifier_scale"] for p in pts]
        assert all(p["cfg_scale"] == 0.0 and p["n"] == 10 and p["form"] == form for p in pts)
        assert res[form]["settings"]["form"] == form and res[form]["grids"][5.0][0].shape == (10, 1, 16, 16)
    # s = 0 is the unguided model for both forms; s > 0 changes the samples
    assert torch.equal(res["eps"]["grids"][0.0][0], res["mean"]["grids"][0.0][0])
    assert not torch.equal(res["eps"]["grids"][0.0][0], res["eps"]["grids"][5.0][0])
    with pytest.raises(ValueError, match="ddpm"):
        ClassifierGuidanceMethod(guide, form="mean").sweep(pipe, clf, [1.0], real, per_class=1, sampler="ddim")
    with pytest.raises(ValueError, match="unclipped"):
        ClassifierGuidanceMethod(guide, form="mean").sweep(pipe, clf, [1.0], real, **{**kw, "clip_x0": 1.0})
    bad = ClassifierGuide(m, FASHION_CLASSES, DiffusionConfig(timesteps=9))
    with pytest.raises(ValueError, match="schedule"):
        ClassifierGuidanceMethod(bad).sweep(pipe, clf, [1.0], real, **kw)
    assert all(p.grad is None for p in m.parameters())
