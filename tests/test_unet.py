import copy
import glob
import importlib.util
import os
from typing import Optional

import pytest
import torch

from framework.config import UNetConfig, load_config
from framework.models.unet import (UNet, apply_activation_checkpointing, count_params, diffusers_config,
                            from_diffusers_state_dict, to_diffusers_state_dict)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = os.path.join(ROOT, "configs", "unet")
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None




def preset(name: str) -> UNetConfig:
    return load_config(os.path.join(PRESETS, f"{name}.yaml")).unet


def small_cfg(**kw) -> UNetConfig:
    """Tiny, but with 2 res blocks, depth-2 transformers, pooled text and a width change per level."""
    base = dict(in_channels=3, channels=16, channel_mult=[1, 2, 2], num_res_blocks=2, attention_levels=[0, 2],
                head_dim=8, context_dim=12, pooled_dim=6, groups=4, transformer_depth=2)
    base.update(kw)
    return UNetConfig(**base)


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Re-initialise every all-zero parameter (zero-init output layers, norm biases) randomly, so the
    output is not identically 0 and every parameter gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(cfg: UNetConfig, b=2, h=16, w=16, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, h, w, generator=g)
    t = torch.randint(1, 1000, (b,), generator=g)
    ctx = torch.randn(b, L, cfg.context_dim, generator=g)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, 4:] = False                               # sample 0 has 4 real tokens
    pooled = torch.randn(b, cfg.pooled_dim, generator=g) if cfg.pooled_dim else None
    return x, t, dict(ctx=ctx, ctx_mask=mask, pooled=pooled)


def eval_unet(cfg: Optional[UNetConfig] = None):
    """A perturbed UNet(cfg) (default: small_cfg()) in eval mode, built after torch.manual_seed(0),
    its inputs and its output on them: m, x, t, kw, ref."""
    cfg = cfg or small_cfg()
    torch.manual_seed(0)
    m = perturb(UNet(cfg)).eval()
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        ref = m(x, t, **kw)
    return m, x, t, kw, ref


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
def test_preset_files_hold_only_unet():
    import yaml
    files = sorted(glob.glob(os.path.join(PRESETS, "*.yaml")))
    assert {os.path.basename(f) for f in files} >= {"tiny.yaml", "base64.yaml", "sd2.yaml"}
    for f in files:
        with open(f) as fh:
            assert list(yaml.safe_load(fh)) == ["unet"], f


def test_tiny_preset_forward_and_size():
    cfg = preset("tiny")
    n = count_params(cfg)
    print(f"\ntiny: {n:,} parameters")
    assert n < 1_000_000
    m = UNet(cfg)
    x, t, kw = inputs(cfg, h=16, w=24)                # any H, W divisible by 2^(levels-1)
    out = m(x, t, **kw)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))    # zero-initialised output conv


@pytest.mark.parametrize("name,hw", [("base64", 64), ("sd2", 32)])
def test_large_presets_on_meta(name, hw):
    cfg = preset(name)
    with torch.device("meta"):
        m = UNet(cfg)
        x = torch.randn(2, cfg.in_channels, hw, hw)
        ctx = torch.randn(2, 77, cfg.context_dim)
        out = m(x, torch.tensor([1, 500]), ctx=ctx, ctx_mask=torch.ones(2, 77, dtype=torch.bool))
    assert out.shape == x.shape and out.device.type == "meta"
    n = sum(p.numel() for p in m.parameters())
    assert n == count_params(cfg)
    print(f"\n{name}: {n:,} parameters")
    if name == "sd2":
        assert abs(n - 865e6) / 865e6 < 0.05
        assert n == 865_910_724                       # exactly diffusers' SD2 UNet
    else:
        assert 100e6 < n < 300e6


def test_zero_init_lives_in_reset_parameters():
    """Zero-init layers init themselves: kept under ZeRO-3 zero.Init (which partitions each layer when
    its own __init__ returns) and after meta build + to_empty() + reset_parameters()."""
    cfg = small_cfg()
    with torch.device("meta"):
        m = UNet(cfg)
    m.to_empty(device="cpu")
    for mod in m.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    zero = [n for n, p in m.named_parameters() if not p.any()]
    assert "conv_out.weight" in zero and "down.0.res.0.conv2.weight" in zero
    assert "down.0.attn.0.proj_out.weight" in zero and "mid.attn.0.proj_out.bias" in zero
    assert "conv_in.weight" not in zero
    x, t, kw = inputs(cfg)
    assert torch.equal(m(x, t, **kw), torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------
# Masking and conditioning
# ---------------------------------------------------------------------------------------------
@pytest.mark.equivalence
def test_padding_invariance_and_mask_semantics():
    m, x, t, kw, ref = eval_unet()
    with torch.no_grad():
        # append 5 padded (masked) tokens holding garbage
        pad = torch.randn(2, 5, m.cfg.context_dim) * 100
        kw2 = dict(kw, ctx=torch.cat([kw["ctx"], pad], 1),
                   ctx_mask=torch.cat([kw["ctx_mask"], torch.zeros(2, 5, dtype=torch.bool)], 1))
        torch.testing.assert_close(m(x, t, **kw2), ref, atol=1e-5, rtol=0)
        # the masked keys of sample 0 do not matter either
        ctx3 = kw["ctx"].clone()
        ctx3[0, 4:] = 7.0
        torch.testing.assert_close(m(x, t, **dict(kw, ctx=ctx3)), ref, atol=1e-5, rtol=0)
        # mask None == all True; a 0/1 integer mask == the bool one
        ones = torch.ones(2, 7, dtype=torch.bool)
        torch.testing.assert_close(m(x, t, **dict(kw, ctx_mask=None)), m(x, t, **dict(kw, ctx_mask=ones)))
        torch.testing.assert_close(m(x, t, **dict(kw, ctx_mask=kw["ctx_mask"].long())), ref)
        # an all-masked row is finite and independent of its (masked) tokens
        none = kw["ctx_mask"].clone()
        none[1] = False
        a = m(x, t, **dict(kw, ctx_mask=none))
        b = m(x, t, **dict(kw, ctx_mask=none, ctx=kw["ctx"] + 3.0))
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)


def test_output_depends_on_ctx_pooled_and_t():
    m, x, t, kw, ref = eval_unet()
    with torch.no_grad():
        assert (m(x, t, **dict(kw, ctx=kw["ctx"] + 1)) - ref).abs().max() > 1e-3
        assert (m(x, t, **dict(kw, pooled=kw["pooled"] + 1)) - ref).abs().max() > 1e-3
        assert (m(x, t + 1, **kw) - ref).abs().max() > 1e-4
        torch.testing.assert_close(m(x, t.float(), **kw), ref)        # int or float t
        assert m(x, t).shape == x.shape                                # unconditional call


def test_unconditional_config_builds_no_cross_attention():
    cfg = small_cfg(context_dim=0, pooled_dim=0)
    m = perturb(UNet(cfg))
    assert not any(".attn2." in k for k in m.state_dict())
    x, t, _ = inputs(cfg)
    m(x, t).square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_gradient_reaches_every_parameter():
    cfg = small_cfg()
    m = perturb(UNet(cfg))
    x, t, kw = inputs(cfg)
    m(x, t, **kw).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# ---------------------------------------------------------------------------------------------
# Switches applied from outside
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [True, "attention", "res"])
@pytest.mark.equivalence
def test_activation_checkpointing_identical(kind):
    from framework.models.unet import ResBlock, SpatialTransformer
    cfg = small_cfg(dropout=0.1)
    torch.manual_seed(0)
    m1 = perturb(UNet(cfg))
    m2 = apply_activation_checkpointing(copy.deepcopy(m1), kind)
    want = {True: (ResBlock, SpatialTransformer), "attention": SpatialTransformer, "res": ResBlock}[kind]
    blocks = [m for m in m2.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    assert {type(m) for m in blocks} == {ResBlock, SpatialTransformer}
    assert all(m.checkpointing == isinstance(m, want) for m in blocks)
    assert list(m1.state_dict()) == list(m2.state_dict())       # keys unchanged
    x, t, kw = inputs(cfg)
    torch.manual_seed(5)
    o1 = m1(x, t, **kw)
    o1.square().mean().backward()
    torch.manual_seed(5)
    o2 = m2(x, t, **kw)
    o2.square().mean().backward()
    assert torch.equal(o1, o2)                                   # dropout replayed exactly
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():                                        # no recompute without grad
        m2.eval()(x, t, **kw)
    apply_activation_checkpointing(m2, False)
    assert not any(m.checkpointing for m in blocks)
    with pytest.raises(ValueError, match="attention"):
        apply_activation_checkpointing(m2, "some")


@pytest.mark.equivalence
def test_channels_last_same_output():
    m, x, t, kw, ref = eval_unet()
    with torch.no_grad():
        m.to(memory_format=torch.channels_last)
        out = m(x.to(memory_format=torch.channels_last), t, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.equivalence
def test_compiles_without_graph_breaks():
    """torch.compile-friendly: one graph (fullgraph) through dynamo; the eager backend keeps it fast."""
    torch._dynamo.reset()
    cfg = small_cfg(num_res_blocks=1, transformer_depth=1, channel_mult=[1, 2], attention_levels=[1])
    m = perturb(UNet(cfg)).eval()
    x, t, kw = inputs(cfg)
    compiled = torch.compile(m, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, **kw), m(x, t, **kw))


@pytest.mark.gpu
def test_cuda_graph_sampling_net_matches_eager():
    """compile_for_inference(mode="reduce-overhead") on CUDA (inductor + CUDA graphs) behind
    export.network_fn(cuda_graphs=True): each call replays the graph and hands out a copy, so outputs
    of earlier steps stay valid after later replays, and match eager bf16."""
    from framework.export import network_fn
    from framework.models.unet import compile_for_inference
    torch._dynamo.reset()
    cfg = small_cfg(num_res_blocks=1, transformer_depth=1, channel_mult=[1, 2], attention_levels=[1])
    m = perturb(UNet(cfg)).eval().requires_grad_(False).to("cuda", torch.bfloat16)
    x, t, kw = inputs(cfg)
    kw = {k: v.cuda() for k, v in kw.items()}
    eager = network_fn(m, torch.bfloat16)
    graphed = network_fn(compile_for_inference(m, "reduce-overhead"), torch.bfloat16, cuda_graphs=True)
    with torch.no_grad():
        xs = [x.cuda() * s for s in (1.0, 0.5, 2.0, 1.5, 0.25)]
        outs = [graphed(xi, t.cuda(), kw) for xi in xs]          # warmup, record, replays
        refs = [eager(xi, t.cuda(), kw) for xi in xs]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, atol=3e-2, rtol=3e-2)
    assert len({o.data_ptr() for o in outs}) == len(outs)


# ---------------------------------------------------------------------------------------------
# diffusers layout
# ---------------------------------------------------------------------------------------------
def test_state_dict_mapping_round_trip():
    m = UNet(small_cfg())
    sd = m.state_dict()
    d = to_diffusers_state_dict(sd)
    assert all(k.startswith(("conv_in", "time_embedding", "class_embedding", "down_blocks", "mid_block",
                             "up_blocks", "conv_norm_out", "conv_out")) for k in d)
    assert "down_blocks.0.attentions.1.transformer_blocks.1.ff.net.0.proj.weight" in d
    back = from_diffusers_state_dict(d)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="optional: pip install diffusers")
@pytest.mark.parametrize("kw", [dict(), dict(scale_shift=True, linear_projection=False, mid_attention=False,
                                             pooled_dim=0, attention_levels=[1])])
@pytest.mark.equivalence
def test_matches_diffusers_unet(kw):
    from diffusers import UNet2DConditionModel
    cfg = small_cfg(**kw)
    ours, x, t, c, a = eval_unet(cfg)
    theirs = UNet2DConditionModel(**diffusers_config(cfg)).eval()
    missing, unexpected = theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        b = theirs(x, t, encoder_hidden_states=c["ctx"], encoder_attention_mask=c["ctx_mask"],
                   class_labels=c["pooled"]).sample
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert a.abs().max() > 1e-2
    # and back: diffusers weights load into ours
    again = UNet(cfg)
    again.load_state_dict(from_diffusers_state_dict(theirs.state_dict()), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x, t, **c), a)


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="optional: pip install diffusers")
def test_sd2_flops_match_diffusers():
    """SD2 preset, one 32x32x4 latent, 77x1024 context, counted on the meta device."""
    from diffusers import UNet2DConditionModel
    cfg = preset("sd2")
    with torch.device("meta"):
        ours = UNet(cfg)
        theirs = UNet2DConditionModel(**diffusers_config(cfg))
        x, t, ctx = torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.randn(1, 77, 1024)
    assert set(to_diffusers_state_dict(ours.state_dict())) == set(theirs.state_dict())
    a = _flops(lambda: ours(x, t, ctx=ctx))
    b = _flops(lambda: theirs(x, t, encoder_hidden_states=ctx))
    print(f"\nSD2 forward FLOPs per 32x32x4 latent: ours {a / 1e9:.2f} G, diffusers {b / 1e9:.2f} G")
    assert abs(a - b) / b < 0.02
