"""Model FLOPs of a network: one forward and one forward+backward, per image.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions and attention. On the
**meta** device nothing is allocated or computed, so even the SD2 UNet is counted in seconds; on a
real CPU device torch has no formula for the CPU flash-attention kernel (attention would count 0),
so ``flop_counter`` registers one. Model FLOPs: no recomputation is counted (neither activation
checkpointing nor flash attention's backward recompute), so a rate derived from them is MFU.

One definition for every consumer: ``tools/bench.py`` (MFU of a measured step) and
``framework/plan.py`` (the step time a plan predicts) count through ``count_flops``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils import flop_counter as fcm

__all__ = ["flop_counter", "count_flops"]


def flop_counter() -> fcm.FlopCounterMode:
    """FlopCounterMode that also counts CPU's fused attention (torch registers formulas only for
    the CUDA kernels, so on a CPU device attention would count 0; on meta it decomposes to bmm).
    Model FLOPs: no recomputation (activation checkpointing, flash attention's backward) counted."""
    def fwd(query, key, value, *args, out_val=None, **kwargs):
        return fcm.sdpa_flop_count(query.shape, key.shape, value.shape)

    def bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
        # model FLOPs: 2 x forward (dQ, dK, dV, dP), as the meta count; torch's formula for the
        # CUDA flash kernels adds the recomputed QK^T (2.5 x forward)
        return 2 * fcm.sdpa_flop_count(query.shape, key.shape, value.shape)

    fwd._get_raw = bwd._get_raw = True          # take the tensors as they are (no shape wrapper)
    custom = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            custom[op] = fn
    return fcm.FlopCounterMode(display=False, custom_mapping=custom)


def count_flops(build: Callable[[], torch.nn.Module], input_shape: tuple[int, int, int],
                context_shape: tuple[int, int], batch: int = 1, device: str = "meta",
                backward: bool = True) -> dict:
    """FLOPs per image of one forward and (``backward``) one forward+backward of the MSE loss of
    ``build()`` (a network called ``model(x, t, ctx=ctx)``) at x: (batch, C, H, W), t = 500,
    ctx: (batch, L, D). -> {"fwd", "fwd_bwd" (when backward), "params"}. ``build`` runs under
    ``torch.device(device)``: on "meta" nothing is allocated or computed."""
    c, h, w = input_shape
    L, D = context_shape
    with torch.device(device):
        model = build()
        x = torch.randn(batch, c, h, w)
        t = torch.full((batch,), 500, dtype=torch.long)
        ctx = torch.randn(batch, L, D)
    with flop_counter() as fc:
        with torch.no_grad():
            model(x, t, ctx=ctx)
    out = {"fwd": fc.get_total_flops() / batch}
    if backward:
        with flop_counter() as fc:
            model(x, t, ctx=ctx).float().pow(2).mean().backward()
        out["fwd_bwd"] = fc.get_total_flops() / batch
    out["params"] = sum(p.numel() for p in model.parameters())
    return out
