import ast
import math
import multiprocessing as mp
import os

import pytest
import torch
import torch.nn.functional as F

from framework.config import TextConfig, UNetConfig
from framework.models.text import (Condition, TextEncoder, clip_tokenizer_from_open_clip, make_tiny_encoder,
                            null_dropout, resolve_encoder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPS = ["a photo of a cat", "a red truck", "", "a photo of a cat", "an extremely long caption " * 10]




@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return make_tiny_encoder(str(tmp_path_factory.mktemp("enc") / "tiny-bert"), hidden=32)


@pytest.fixture(scope="session")
def tiny(tiny_path):
    return TextEncoder(TextConfig(encoder=tiny_path, max_length=16, pooled=True, cache_size=0), device="cpu")


@pytest.fixture(scope="session")
def minilm():
    return TextEncoder(TextConfig(encoder="minilm-l6", max_length=16, pooled=True, cache_size=0))


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------
def test_tiny_encoder_by_path_is_frozen_and_padded(tiny, tiny_path):
    assert resolve_encoder(tiny_path) == os.path.abspath(tiny_path)
    assert tiny.dim == 32 and tiny.pooled_dim == 32 and tiny.device.type == "cpu"
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    c = tiny.encode(CAPS)
    assert c.ctx.shape == (5, 16, 32) and c.ctx.dtype == torch.float32
    assert c.mask.shape == (5, 16) and c.mask.dtype == torch.bool and c.pooled.shape == (5, 32)
    assert c.mask[4].all()                             # truncated to exactly max_length
    assert c.mask[2].sum() == 2                        # "" -> [CLS] [SEP]
    assert torch.equal(c.ctx[~c.mask], torch.zeros_like(c.ctx[~c.mask]))   # padding is zero
    assert not c.ctx.requires_grad and not c.ctx.is_inference()
    assert torch.equal(c.ctx[0], c.ctx[3])
    assert tiny.encode(CAPS[:1], dtype=torch.bfloat16).ctx.dtype == torch.bfloat16


def test_make_tiny_encoder_deterministic_and_reused(tiny_path, tmp_path):
    other = make_tiny_encoder(str(tmp_path / "again"), hidden=32)
    a = TextEncoder(TextConfig(encoder=other, max_length=8, cache_size=0)).encode(["a cat"])
    b = TextEncoder(TextConfig(encoder=tiny_path, max_length=8, cache_size=0)).encode(["a cat"])
    assert torch.equal(a.ctx, b.ctx)
    assert make_tiny_encoder(other) == other           # an existing folder is reused


def test_minilm_offline_semantics(minilm):
    assert minilm.dim == 384
    p = minilm.encode(["a photo of a cat", "a picture of a kitten", "a truck"]).pooled
    cos = F.cosine_similarity
    near, far = cos(p[0], p[1], dim=0).item(), cos(p[0], p[2], dim=0).item()
    print(f"\nMiniLM cosine: cat~kitten {near:.3f}, cat~truck {far:.3f}")
    assert near > far


def test_cache_returns_identical_tensors(tiny_path):
    cached = TextEncoder(TextConfig(encoder=tiny_path, max_length=16, pooled=True, cache_size=3))
    plain = TextEncoder(TextConfig(encoder=tiny_path, max_length=16, pooled=True, cache_size=0))
    calls = [CAPS, ["a red truck", "a dog", "a photo of a cat"], ["x", "y", "z", "a dog"], CAPS]
    for texts in calls:
        a, b = cached.encode(texts), plain.encode(texts)
        assert torch.equal(a.ctx, b.ctx) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)
        assert len(cached._cache) <= max(3, len(set(texts)))
    assert len(cached._cache) == 3


def test_no_deepspeed_import():
    with open(os.path.join(ROOT, "framework", "models", "text.py")) as f:
        tree = ast.parse(f.read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(n.split(".")[0] == "deepspeed" for n in names)


def _encode_in_child(path):
    import torch as th
    from framework.config import TextConfig as TC
    from framework.models.text import TextEncoder as TE
    th.set_num_threads(1)
    return TE(TC(encoder=path, max_length=16, pooled=True), device="cpu").encode(CAPS).ctx


@pytest.mark.slow
def test_usable_from_several_processes(tiny, tiny_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        outs = pool.map(_encode_in_child, [tiny_path, tiny_path])
    ref = tiny.encode(CAPS).ctx
    for o in outs:
        torch.testing.assert_close(o, ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# The null condition and dropout
# ---------------------------------------------------------------------------------------------
def test_null_dropout_rate_and_exact_null(tiny):
    null = tiny.null(1)
    cond = tiny.encode(["a photo of a cat", "a red truck"] * 2000)          # B = 4000 (cached rows)
    g = torch.Generator().manual_seed(0)
    n, p, total = cond.batch, 0.1, 0
    for _ in range(5):
        out, dropped = null_dropout(cond, null, p, g)
        total += int(dropped.sum())
    trials = 5 * n
    sigma = math.sqrt(trials * p * (1 - p))
    assert abs(total - trials * p) < 5 * sigma, (total, trials * p)
    # a dropped sample gets exactly what classifier-free sampling uses as "unconditional"
    uncond = tiny.null(n)
    d = dropped
    assert d.any() and (~d).any()
    assert torch.equal(out.ctx[d], uncond.ctx[d]) and torch.equal(out.mask[d], uncond.mask[d])
    assert torch.equal(out.pooled[d], uncond.pooled[d])
    assert torch.equal(out.ctx[~d], cond.ctx[~d]) and torch.equal(out.mask[~d], cond.mask[~d])
    # "empty" null == encoding of ""
    assert torch.equal(null.ctx, tiny.encode([""]).ctx) and torch.equal(null.mask, tiny.encode([""]).mask)
    # p = 0 and p = 1
    assert not null_dropout(cond, null, 0.0, g)[1].any()
    assert torch.equal(null_dropout(cond, null, 1.0, g)[0].ctx, uncond.ctx)


def test_null_zeros_and_precomputed(tiny_path):
    enc = TextEncoder(TextConfig(encoder=tiny_path, max_length=8, null="zeros", pooled=True))
    null = enc.null(3)
    assert torch.equal(null.ctx, torch.zeros(3, 8, 32))
    assert null.mask[:, 0].all() and not null.mask[:, 1:].any()      # never an all-masked row
    assert torch.equal(null.pooled, torch.zeros(3, 32))
    # precomputed embeddings: the null is passed in as a Condition
    rows = [torch.randn(3, 32), torch.randn(8, 32), torch.randn(1, 32)]
    cond = Condition.from_arrays(rows, length=8)
    null2 = Condition.zeros(1, 8, 32)
    out, dropped = null_dropout(cond, null2, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out.ctx[dropped], null2.expand(3).ctx[dropped])


def test_null_is_finite_through_unet(tiny_path):
    from framework.models.unet import UNet
    enc = TextEncoder(TextConfig(encoder=tiny_path, max_length=8, null="zeros"))
    unet = UNet(UNetConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                           head_dim=16, context_dim=32, groups=8))
    out = unet(torch.randn(2, 3, 8, 8), torch.tensor([3, 4]), **enc.null(2).as_kwargs())
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Condition helpers
# ---------------------------------------------------------------------------------------------
def test_condition_helpers():
    import numpy as np
    c = Condition.from_arrays(np.random.randn(3, 5, 4).astype(np.float16), mask=np.array([[1] * 5, [1, 1, 0, 0, 0],
                              [1, 0, 0, 0, 0]]), pooled=np.ones((3, 2)))
    assert c.ctx.dtype == torch.float32 and c.mask.dtype == torch.bool
    assert torch.equal(c.ctx[1, 2:], torch.zeros(3, 4))                  # masked positions zeroed
    # trimmed rows (stored without padding) == the padded array
    rows = [c.ctx[i, : int(c.mask[i].sum())].numpy() for i in range(3)]
    t = Condition.from_arrays(rows, pooled=np.ones((3, 2)), length=5)
    assert torch.equal(t.ctx, c.ctx) and torch.equal(t.mask, c.mask)
    longer = Condition.from_arrays(c.ctx, c.mask, length=7)
    assert longer.ctx.shape == (3, 7, 4) and not longer.mask[:, 5:].any()
    assert Condition.from_arrays(c.ctx, c.mask, length=2).ctx.shape == (3, 2, 4)

    both = c.cat(c.index(0))
    assert both.batch == 4 and torch.equal(both.ctx[3], c.ctx[0]) and both.pooled.shape == (4, 2)
    sel = c.index(torch.tensor([2, 0]))
    assert torch.equal(sel.mask, c.mask[[2, 0]])
    assert torch.equal(c.index(slice(1, 3)).ctx, c.ctx[1:3])
    kw = c.to("cpu", torch.float64).as_kwargs()
    assert set(kw) == {"ctx", "ctx_mask", "pooled"} and kw["ctx"].dtype == torch.float64
    assert kw["ctx_mask"].dtype == torch.bool
    assert c.index(1).expand(4).batch == 4
    w = c.where(torch.tensor([True, False, True]), c.index(1))
    assert torch.equal(w.ctx[0], c.ctx[1]) and torch.equal(w.ctx[1], c.ctx[1]) and torch.equal(w.ctx[2], c.ctx[1])
    with pytest.raises(ValueError):
        c.where(torch.tensor([True, False, True]), Condition.zeros(1, 6, 4, 2))
    assert Condition(c.ctx, c.mask.long()).mask.dtype == torch.bool        # int masks from data


# ---------------------------------------------------------------------------------------------
# CLIP path
# ---------------------------------------------------------------------------------------------
def test_clip_tokenizer_and_tiny_clip_model(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    path = str(tmp_path / "clip")
    tok = clip_tokenizer_from_open_clip(path)
    ids = tok("a photo of a cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]              # as openai/clip-vit-*
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert len(tok) == 49408
    torch.manual_seed(0)
    conf = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    CLIPTextModel(conf).save_pretrained(path)
    for kind in ("clip", "auto"):
        enc = TextEncoder(TextConfig(encoder=path, kind=kind, max_length=12, pooled=True, cache_size=0))
        assert enc.is_clip and enc.dim == 32
        c = enc.encode(["a photo of a cat", "a red truck"])
        assert c.ctx.shape == (2, 12, 32) and c.pooled.shape == (2, 32)
        assert c.mask[0].sum() == 7 and c.mask[1].sum() == 5
        dec = enc.tokenizer.decode(enc.tokenizer("a photo of a cat")["input_ids"], skip_special_tokens=True)
        assert dec == "a photo of a cat"
    pen = TextEncoder(TextConfig(encoder=path, kind="clip", max_length=12, layer=-2, cache_size=0))
    assert not torch.equal(pen.encode(["a cat"]).ctx, enc.encode(["a cat"]).ctx)


# ---------------------------------------------------------------------------------------------
# Encoder -> UNet -> loss -> backward
# ---------------------------------------------------------------------------------------------
def test_text_conditions_unet_and_grads_stop_at_encoder(tiny):
    from framework.models.unet import UNet
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[0, 1],
                           head_dim=8, context_dim=tiny.dim, pooled_dim=tiny.pooled_dim, groups=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():        # the zero-initialised layers would make the output identically 0
        for p in unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 700])
    cond, _ = null_dropout(tiny.encode(["a photo of a cat", "a red truck"]), tiny.null(), 0.0, g)
    out = unet(x, t, **cond.as_kwargs())
    other = unet(x, t, **tiny.encode(["a blue bird", "a green field"]).as_kwargs())
    assert (out - other).abs().max() > 1e-3                   # the text conditions the output
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert all(p.grad is None for p in tiny.model.parameters())


def test_t5_model_type_selects_encoder_only(tmp_path):
    """No T5 weights or sentencepiece files ship offline: a tiny random T5 with the BERT tokenizer
    checks that kind=auto picks T5EncoderModel (AutoModel would build the decoder too)."""
    import shutil
    from transformers import T5Config, T5EncoderModel
    path = str(tmp_path / "t5")
    src = resolve_encoder("minilm-l6")
    os.makedirs(path)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), path)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=30522, d_model=32, d_ff=64, d_kv=16, num_layers=2,
                            num_heads=2)).save_pretrained(path)
    enc = TextEncoder(TextConfig(encoder=path, max_length=10, pooled=True, cache_size=0))
    assert type(enc.model).__name__ == "T5EncoderModel" and enc.dim == 32
    c = enc.encode(["a photo of a cat"])
    assert c.ctx.shape == (1, 10, 32) and c.pooled.shape == (1, 32)


@pytest.mark.gpu
def test_cuda_bf16_encoder_and_unet(tiny_path):
    from framework.models.unet import UNet
    enc = TextEncoder(TextConfig(encoder=tiny_path, max_length=16), device="cuda")
    assert enc.model.dtype == torch.bfloat16
    c = enc.encode(["a photo of a cat", "a red truck"])
    assert c.ctx.dtype == torch.float32 and c.ctx.device.type == "cuda"
    unet = UNet(UNetConfig(channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[0, 1],
                           head_dim=16, context_dim=enc.dim)).cuda().to(torch.bfloat16)
    unet.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    out = unet(x, torch.tensor([1, 2], device="cuda"), **c.as_kwargs())
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
