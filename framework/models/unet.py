"""The network eps_theta(x_t, t, ctx): a text-conditioned UNet.

Block structure equivalent to diffusers' ``UNet2DConditionModel`` (SD1/SD2 family), written small:

    conv_in -> down levels [ResBlock (+ SpatialTransformer)] x num_res_blocks, Downsample (stride-2 conv)
            -> mid: ResBlock, SpatialTransformer, ResBlock (mid_attention=False: one ResBlock)
            -> up levels [cat(skip) -> ResBlock (+ SpatialTransformer)] x (num_res_blocks + 1), Upsample
            -> GroupNorm, SiLU, conv_out (zero-initialised)

- time: sinusoidal embedding of t (cos first, as diffusers ``flip_sin_to_cos=True``) -> Linear, SiLU,
  Linear (width 4 x channels); an optional pooled text vector goes through its own MLP and is added.
- ResBlock (diffusers ``ResnetBlock2D``): GroupNorm, SiLU, conv3x3, + Linear(SiLU(temb)) (additive, or
  scale-shift ``h * (1 + s) + b`` after the second norm), GroupNorm, SiLU, dropout, conv3x3 (zero-init),
  1x1 skip conv when the width changes.
- SpatialTransformer (diffusers ``Transformer2DModel``): GroupNorm, proj_in (linear or 1x1 conv), depth x
  [x + SelfAttn(LN x); x + CrossAttn(LN x, ctx, mask); x + GEGLU-FF(LN x)], proj_out (zero-init), residual.

Memory and speed switches are applied from OUTSIDE (``apply_activation_checkpointing``,
``unet.to(memory_format=torch.channels_last)``, ``torch.compile``). ``to_diffusers_state_dict`` and
``from_diffusers_state_dict`` map weights to and from diffusers' key layout.

No diffusion math, no deepspeed, no text encoder here.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from framework.config import UNetConfig

__all__ = ["UNet", "size_multiple", "check_size", "build_encoder_half", "run_encoder_half", "ResBlock", "SpatialTransformer", "timestep_embedding", "apply_activation_checkpointing",
           "count_params", "level_channels", "level_heads", "to_diffusers_state_dict",
           "from_diffusers_state_dict", "diffusers_config"]


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t (B,) int or float -> (B, dim) float32 [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]                      # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)     # (B, 2*half)
    return F.pad(emb, (0, dim - 2 * half))                          # odd dim: one zero column


class _ZeroInit:
    """Parameters start at zero, set in the layer's OWN ``reset_parameters``: so the zero init also
    holds under ZeRO-3 ``zero.Init`` (which partitions a layer as soon as its own __init__ returns; a
    parent's later ``zeros_`` would touch an empty placeholder) and after a meta-device build
    + ``to_empty()`` + ``reset_parameters()``."""

    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ZeroConv2d(_ZeroInit, nn.Conv2d):
    pass


class ZeroLinear(_ZeroInit, nn.Linear):
    pass


class _Block(nn.Module):
    """A unit that ``apply_activation_checkpointing`` may wrap (ResBlock, SpatialTransformer)."""
    checkpointing: bool = False


def _run(block: _Block, *args):
    """Call a block, through non-reentrant activation checkpointing when switched on.

    The whole ``block.__call__`` (module hooks included) is recomputed, so ZeRO-3's parameter
    gather hooks fire again in the backward recompute; no weight is cached outside the module."""
    if block.checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class ResBlock(_Block):
    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, dropout: float = 0.0,
                 scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_proj = nn.Linear(temb_dim, cout * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = ZeroConv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x (B, Cin, H, W); temb (B, temb_dim), already through SiLU
        h = self.conv1(F.silu(self.norm1(x)))                        # (B, Cout, H, W)
        e = self.time_proj(temb)[:, :, None, None]                   # (B, Cout or 2 Cout, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return (x if self.skip is None else self.skip(x)) + h


class Attention(nn.Module):
    """Multi-head attention over tokens; keys from ``ctx`` (cross) or from ``x`` (self)."""

    def __init__(self, dim: int, heads: int, kv_dim: int = 0):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(kv_dim or dim, dim, bias=False)
        self.v = nn.Linear(kv_dim or dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x (B, N, C); ctx (B, L, Dc) or None (self-attention); mask (B, L) bool, True = attend
        src = x if ctx is None else ctx.to(x.dtype)
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.k(src), "b l (h d) -> b h l d", h=self.heads)
        v = rearrange(self.v(src), "b l (h d) -> b h l d", h=self.heads)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v)                          # (B, h, N, d)
        else:
            # masked keys get -inf. A row with no valid key would be NaN: it attends to all its keys
            # instead and its result is then zeroed, i.e. an all-masked context contributes nothing.
            mask = mask.bool()                                                   # 0/1 ints work too
            valid = mask.any(dim=-1)                                             # (B,)
            keep = (mask | ~valid[:, None])[:, None, None, :]                    # (B, 1, 1, L)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            o = o * valid[:, None, None, None].to(o.dtype)
        return self.out(rearrange(o, "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    """GEGLU: Linear(C, 2*4C) -> a * gelu(g) -> Linear(4C, C)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(g))


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (pre-LayerNorm): self-attn, cross-attn, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim) if context_dim > 0 else None
        self.attn2 = Attention(dim, heads, context_dim) if context_dim > 0 else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, ctx=None, mask=None):
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None and ctx is not None:      # ctx None: unconditional, cross-attn skipped
            x = x + self.attn2(self.norm2(x), ctx, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(_Block):
    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 linear: bool = True):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels do not split into {heads} heads")
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = ZeroLinear(channels, channels) if linear else ZeroConv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, ctx: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x (B, C, H, W) -> tokens (B, H*W, C) -> back
        h, w = x.shape[-2:]
        y = self.norm(x)
        if self.linear:
            y = self.proj_in(rearrange(y, "b c h w -> b (h w) c"))
        else:
            y = rearrange(self.proj_in(y), "b c h w -> b (h w) c")
        for blk in self.blocks:
            y = blk(y, ctx, mask)
        if self.linear:
            y = rearrange(self.proj_out(y), "b (h w) c -> b c h w", h=h, w=w)
        else:
            y = self.proj_out(rearrange(y, "b (h w) c -> b c h w", h=h, w=w))
        return x + y


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: resblocks, their transformers (empty where no attention), a resampler."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.sample: Optional[nn.Module] = None


# ---------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------
def level_channels(cfg: UNetConfig) -> list[int]:
    return [cfg.channels * m for m in cfg.channel_mult]


def level_heads(cfg: UNetConfig) -> list[int]:
    chs = level_channels(cfg)
    if cfg.num_heads:
        if len(cfg.num_heads) != len(chs):
            raise ValueError(f"unet.num_heads has {len(cfg.num_heads)} entries, channel_mult {len(chs)}")
        return list(cfg.num_heads)
    return [max(1, c // cfg.head_dim) for c in chs]


def build_encoder_half(module: nn.Module, cfg: UNetConfig, context_dim: int,
                       pooled_dim: int = 0) -> tuple[int, list[int]]:
    """Give ``module`` the UNet's first half: ``time_embed`` (+ ``pooled_embed`` when pooled_dim > 0,
    else None), ``conv_in``, the ``down`` levels and the ``mid`` block (the same key names wherever it
    is used: the UNet, the noisy classifier). ``context_dim`` 0 builds self-attention only. Returns (width at the bottom, the width of every
    tensor the down path pushes for skip connections)."""
    chs, heads = level_channels(cfg), level_heads(cfg)
    n_levels, nrb = len(chs), cfg.num_res_blocks
    bad = [lv for lv in cfg.attention_levels if not 0 <= lv < n_levels]
    if bad:
        raise ValueError(f"unet.attention_levels {bad} outside 0..{n_levels - 1}")
    c0 = chs[0]
    temb = 4 * c0
    module.time_embed = nn.Sequential(nn.Linear(c0, temb), nn.SiLU(), nn.Linear(temb, temb))
    module.pooled_embed = (nn.Sequential(nn.Linear(pooled_dim, temb), nn.SiLU(), nn.Linear(temb, temb))
                           if pooled_dim > 0 else None)
    module.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)

    # down path; `skips` records the width of every tensor pushed for the up path
    module.down = nn.ModuleList()
    skips, c = [c0], c0
    for lv, cout in enumerate(chs):
        level = Level()
        for _ in range(nrb):
            level.res.append(_res(cfg, c, cout))
            c = cout
            if lv in cfg.attention_levels:
                level.attn.append(_attn(cfg, c, heads[lv], context_dim))
            skips.append(c)
        if lv < n_levels - 1:
            level.sample = Downsample(c)
            skips.append(c)
        module.down.append(level)

    # mid: ResBlock, SpatialTransformer, ResBlock (without attention a single ResBlock, as diffusers)
    module.mid = Level()
    module.mid.res.append(_res(cfg, c, c))
    if cfg.mid_attention:
        module.mid.attn.append(_attn(cfg, c, heads[-1], context_dim))
        module.mid.res.append(_res(cfg, c, c))
    return c, skips


def run_encoder_half(module: nn.Module, x: torch.Tensor, temb: torch.Tensor, ctx=None, ctx_mask=None,
                     hs: Optional[list] = None) -> torch.Tensor:
    """conv_in -> down levels -> mid of a module built by ``build_encoder_half``; appends every skip
    tensor to ``hs`` when given. temb is SiLU(time embedding) (B, 4C)."""
    h = module.conv_in(x)
    if hs is not None:
        hs.append(h)
    for level in module.down:
        for i, block in enumerate(level.res):
            h = _run(block, h, temb)
            if len(level.attn):
                h = _run(level.attn[i], h, ctx, ctx_mask)
            if hs is not None:
                hs.append(h)
        if level.sample is not None:
            h = level.sample(h)
            if hs is not None:
                hs.append(h)
    for i, block in enumerate(module.mid.res):
        h = _run(block, h, temb)
        if i < len(module.mid.attn):
            h = _run(module.mid.attn[i], h, ctx, ctx_mask)
    return h


def size_multiple(cfg: UNetConfig) -> int:
    """The UNet's downsampling factor 2 ** (len(channel_mult) - 1): heights and widths must divide by it."""
    return 2 ** (len(cfg.channel_mult) - 1)


def check_size(height: int, width: int, multiple: int, what: str = "the UNet's downsampling factor") -> None:
    """ValueError unless height and width are positive multiples of ``multiple``."""
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height x width = {height}x{width}: both must be positive multiples of {multiple} "
                         f"({what}); e.g. {max(multiple, height // multiple * multiple)}x"
                         f"{max(multiple, width // multiple * multiple)}")


def _res(cfg: UNetConfig, cin: int, cout: int) -> "ResBlock":
    return ResBlock(cin, cout, 4 * cfg.channels * cfg.channel_mult[0], cfg.groups, cfg.dropout, cfg.scale_shift)


def _attn(cfg: UNetConfig, c: int, heads: int, context_dim: int) -> "SpatialTransformer":
    return SpatialTransformer(c, heads, cfg.transformer_depth, context_dim, cfg.groups, cfg.linear_projection)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        chs, heads = level_channels(cfg), level_heads(cfg)
        n_levels, nrb, g = len(chs), cfg.num_res_blocks, cfg.groups
        c0 = chs[0]
        c, skips = build_encoder_half(self, cfg, cfg.context_dim, cfg.pooled_dim)

        def res(cin, cout):
            return _res(cfg, cin, cout)

        def attn(c, lv):
            return _attn(cfg, c, heads[lv], cfg.context_dim)

        # up path, lowest resolution first (diffusers' up_blocks order)
        self.up = nn.ModuleList()
        for lv in reversed(range(n_levels)):
            level = Level()
            for _ in range(nrb + 1):
                level.res.append(res(c + skips.pop(), chs[lv]))
                c = chs[lv]
                if lv in cfg.attention_levels:
                    level.attn.append(attn(c, lv))
            if lv > 0:
                level.sample = Upsample(c)
            self.up.append(level)

        self.norm_out = nn.GroupNorm(g, c0, eps=1e-5)
        self.conv_out = ZeroConv2d(c0, cfg.out_channels or cfg.in_channels, 3, padding=1)

        # SDXL micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w], each
        # number through the timestep embedding (c0 wide), concatenated (B, 6*c0), an MLP whose last
        # layer starts at zero (an untrained model is the model without it), added to the time
        # embedding. Built last, so the other layers draw the same initial weights with it or without.
        self.size_embed = (nn.Sequential(nn.Linear(6 * c0, 4 * c0), nn.SiLU(), ZeroLinear(4 * c0, 4 * c0))
                           if cfg.micro_conditioning else None)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: 2 ** (levels - 1) (one halving per level)."""
        return size_multiple(self.cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: Optional[torch.Tensor] = None,
                ctx_mask: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None,
                size_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, H, W), H and W multiples of ``size_multiple`` = 2^(levels-1), any aspect;
        t (B,) int or float (or a scalar); ctx (B, L, D) text tokens or None; ctx_mask (B, L) bool,
        True = real token; pooled (B, P); size_cond (B, 6) [orig_h, orig_w, crop_top, crop_left,
        target_h, target_w] in pixels (required with unet.micro_conditioning, else ignored)
        -> (B, C_out, H, W)."""
        check_size(x.shape[-2], x.shape[-1], self.size_multiple)
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        c0 = self.conv_in.out_channels
        temb = self.time_embed(timestep_embedding(t, c0).to(x.dtype))  # (B, 4C)
        if self.pooled_embed is not None and pooled is not None:
            temb = temb + self.pooled_embed(pooled.to(temb.dtype))
        if self.size_embed is not None:
            if size_cond is None:
                raise ValueError("unet.micro_conditioning is on: pass size_cond (B, 6) = [orig_h, orig_w, "
                                 "crop_top, crop_left, target_h, target_w]")
            B = x.shape[0]
            sc = torch.as_tensor(size_cond, device=x.device).reshape(-1, 6).expand(B, 6)
            e = timestep_embedding(sc.reshape(-1), c0).reshape(B, 6 * c0)             # (B, 6*C)
            temb = temb + self.size_embed(e.to(temb.dtype))
        temb = F.silu(temb)            # every ResBlock takes SiLU(temb), as diffusers' ResnetBlock2D

        hs: list = []
        h = run_encoder_half(self, x, temb, ctx, ctx_mask, hs)

        for level in self.up:
            for i, block in enumerate(level.res):
                h = _run(block, torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = _run(level.attn[i], h, ctx, ctx_mask)
            if level.sample is not None:
                h = level.sample(h)

        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# Applied from outside
# ---------------------------------------------------------------------------------------------
CHECKPOINT_KINDS = ("all", "attention", "res")


def apply_activation_checkpointing(unet: nn.Module, enabled: Union[bool, str] = True) -> nn.Module:
    """Recompute blocks in backward (torch.utils.checkpoint, use_reentrant=False) instead of keeping
    their activations. ``enabled``: True / "all" (every ResBlock and SpatialTransformer), "attention"
    (the SpatialTransformers only: their token-sized activations - norms, QKV, the GEGLU's 8x-wide
    hidden - are most of the memory per image, while the convolutions, most of the FLOPs, are not
    recomputed), "res" (the ResBlocks only), False / "none" (off). State-dict keys are unchanged;
    works under ZeRO-3 (the module call, hooks included, is what is recomputed). Returns the module."""
    kind = {True: "all", False: "none"}.get(enabled, enabled)
    if kind not in CHECKPOINT_KINDS + ("none",):
        raise ValueError(f"activation checkpointing {enabled!r}: use true/false or one of {', '.join(CHECKPOINT_KINDS)}")
    want = {"all": _Block, "attention": SpatialTransformer, "res": ResBlock, "none": ()}[kind]
    for m in unet.modules():
        if isinstance(m, _Block):
            m.checkpointing = bool(want) and isinstance(m, want)
    return unet


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")     # inductor records CUDA graphs in these


def compile_for_inference(unet: nn.Module, mode: Union[bool, str] = True, backend: str = "inductor"):
    """``torch.compile`` of an eval UNet for sampling: one graph (``fullgraph``: the UNet has no graph
    break, tested), static shapes (the sampler calls it with one batch shape at every step, so one
    compilation serves a whole run). ``mode``: True / "default", or "reduce-overhead" (inductor's CUDA
    graphs: one graph replay per step instead of ~1,000 kernel launches; CPU ignores it), or
    "max-autotune[-no-cudagraphs]". Returns a callable with the module's signature; the module itself
    is unchanged (its parameters are shared)."""
    mode = "default" if mode is True else mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
    kw = {"mode": mode} if backend == "inductor" else {}
    return torch.compile(unet, backend=backend, fullgraph=True, dynamic=False, **kw)


def count_params(cfg: UNetConfig) -> int:
    """Parameter count of UNet(cfg), built on the meta device (allocates nothing)."""
    with torch.device("meta"):
        model = UNet(cfg)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# diffusers key layout
# ---------------------------------------------------------------------------------------------
# One table, read both ways: (our key part, diffusers' key part). "^" anchors a pair at the start of
# a key, "#" stands for an index. Either direction applies the pairs in this order and rewrites each
# part once, so a level's sampler ("down.1.sample.") comes before the level itself ("down.1.").
_DIFFUSERS_KEYS = [
    ("^time_embed.0.", "time_embedding.linear_1."),
    ("^time_embed.2.", "time_embedding.linear_2."),
    ("^pooled_embed.0.", "class_embedding.linear_1."),
    ("^pooled_embed.2.", "class_embedding.linear_2."),
    ("^down.#.sample.", "down_blocks.#.downsamplers.0."),
    ("^up.#.sample.", "up_blocks.#.upsamplers.0."),
    ("^down.#.", "down_blocks.#."),
    ("^up.#.", "up_blocks.#."),
    ("^mid.", "mid_block."),
    ("^norm_out.", "conv_norm_out."),
    (".res.#.", ".resnets.#."),
    (".attn.#.", ".attentions.#."),
    (".time_proj.", ".time_emb_proj."),
    (".skip.", ".conv_shortcut."),
    (".blocks.#.", ".transformer_blocks.#."),
    (".attn#.q.", ".attn#.to_q."),
    (".attn#.k.", ".attn#.to_k."),
    (".attn#.v.", ".attn#.to_v."),
    (".attn#.out.", ".attn#.to_out.0."),
    (".ff.proj.", ".ff.net.0.proj."),
    (".ff.out.", ".ff.net.2."),
]


def _key_rules(src: int) -> list:
    """_DIFFUSERS_KEYS as (regex, replacement) pairs that rewrite side ``src`` (0: ours, 1: diffusers')
    into the other side."""
    rules = []
    for pair in _DIFFUSERS_KEYS:
        anchor = "^" if pair[0].startswith("^") else ""
        old, new = pair[src].lstrip("^"), pair[1 - src].lstrip("^")
        pattern = anchor + re.escape(old).replace(re.escape("#"), r"(\d+)")
        rules.append((re.compile(pattern), new.replace("#", r"\g<1>")))
    return rules


_TO_DIFFUSERS, _FROM_DIFFUSERS = _key_rules(0), _key_rules(1)


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = pattern.sub(replacement, key)
    return key


def to_diffusers_state_dict(sd: dict) -> dict:
    """Our state dict -> diffusers ``UNet2DConditionModel`` keys (same tensors, renamed).
    Load it into ``UNet2DConditionModel(**diffusers_config(cfg))``."""
    return {_rename(k, _TO_DIFFUSERS): v for k, v in sd.items()}


def from_diffusers_state_dict(sd: dict) -> dict:
    """diffusers ``UNet2DConditionModel`` state dict -> ours (e.g. to fine-tune SD2 weights)."""
    return {_rename(k, _FROM_DIFFUSERS): v for k, v in sd.items()}


def diffusers_config(cfg: UNetConfig) -> dict:
    """The ``UNet2DConditionModel(**kwargs)`` equivalent to ``cfg`` (context_dim > 0; pooled text
    maps to ``class_embed_type="projection"``, pass it as ``class_labels``). Note: with ctx=None
    our cross-attention is skipped, diffusers' would self-attend instead. Micro-conditioning has no
    equivalent here (SDXL's ``add_embedding`` takes the pooled text and the size ids through ONE MLP;
    ours embeds the size ids alone): ValueError."""
    if cfg.micro_conditioning:
        raise ValueError("unet.micro_conditioning has no diffusers UNet2DConditionModel equivalent in this "
                         "mapping (SDXL's add_embedding mixes pooled text and size ids): export without diffusers")
    n = len(cfg.channel_mult)
    att = set(cfg.attention_levels)
    kw = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels or cfg.in_channels,
        block_out_channels=tuple(level_channels(cfg)), layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if lv in att else "DownBlock2D" for lv in range(n)),
        up_block_types=tuple("CrossAttnUpBlock2D" if lv in att else "UpBlock2D" for lv in reversed(range(n))),
        mid_block_type="UNetMidBlock2DCrossAttn" if cfg.mid_attention else "UNetMidBlock2D",
        attention_head_dim=tuple(level_heads(cfg)),   # diffusers' legacy name: it is the head COUNT
        cross_attention_dim=cfg.context_dim, transformer_layers_per_block=cfg.transformer_depth,
        norm_num_groups=cfg.groups, norm_eps=1e-5, use_linear_projection=cfg.linear_projection,
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, dropout=cfg.dropout,
        resnet_time_scale_shift="scale_shift" if cfg.scale_shift else "default",
    )
    if cfg.pooled_dim > 0:
        kw.update(class_embed_type="projection", projection_class_embeddings_input_dim=cfg.pooled_dim)
    return kw
