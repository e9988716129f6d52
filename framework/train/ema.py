"""Exponential moving average of the trained weights: torch only (no deepspeed at import time).

The trainer updates it after every optimizer step; the export reads its files back
(``EMA.full_state``) without the training engine.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

__all__ = ["EMA", "ema_decay_for"]


class EMA:
    """Exponential moving average of the trained weights, in fp32.

    ZeRO 0-2: a full copy on every rank. ZeRO-3: each rank holds the EMA of its own partition of
    each parameter (the same flat slice DeepSpeed gives it), updated from the fp32 master
    partition, so no rank ever holds the whole EMA. ``full_state(shards)`` re-assembles.
    """

    def __init__(self, module: torch.nn.Module, zero3: bool):
        self.zero3 = zero3
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [t.detach().clone().float() for t in self._current()]

    def _current(self) -> list[torch.Tensor]:
        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param   # only a ZeRO-3 run has one
            return [safe_get_local_fp32_param(p).detach().flatten() for _, p in self.named]
        return [p.detach().float() for _, p in self.named]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.shadow, self._current(), 1.0 - decay)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        for s, c in zip(self.shadow, self._current()):
            s.copy_(c)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.cpu() for (n, _), s in zip(self.named, self.shadow)}

    def meta(self) -> dict[str, Any]:
        shapes = {}
        for n, p in self.named:
            shapes[n] = list(p.ds_shape) if self.zero3 else list(p.shape)
        return {"ema_partitioned": self.zero3, "shapes": shapes}

    @staticmethod
    def full_state(shards: list[dict[str, torch.Tensor]], shapes: dict[str, list[int]],
                   partitioned: bool) -> dict[str, torch.Tensor]:
        """Rank files (in rank order) -> full tensors. Partitions are contiguous flat slices."""
        if not partitioned:
            return {n: shards[0][n] for n in shapes}
        out = {}
        for n, shape in shapes.items():
            numel = math.prod(shape)
            out[n] = torch.cat([s[n].flatten() for s in shards])[:numel].view(shape).clone()
        return out

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor], rank: int, world: int) -> None:
        """Take this rank's part of full tensors (any saved world size -> the current one)."""
        missing = [n for n, _ in self.named if n not in full]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for (n, p), s in zip(self.named, self.shadow):
            src = full[n].float().flatten()
            if self.zero3:
                part = s.numel()
                chunk = src[rank * part:(rank + 1) * part]
                s.zero_()
                s[:chunk.numel()].copy_(chunk.to(s.device))
            else:
                s.copy_(src.view_as(s).to(s.device))

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily run the module with EMA weights (all ranks must enter together)."""
        if self.zero3:
            saved = [p.ds_tensor.data.clone() for _, p in self.named]
            for (_, p), s in zip(self.named, self.shadow):
                p.ds_tensor.data.copy_(s.view_as(p.ds_tensor).to(p.ds_tensor.dtype))
        else:
            saved = [p.data.clone() for _, p in self.named]
            for (_, p), s in zip(self.named, self.shadow):
                p.data.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            for (_, p), b in zip(self.named, saved):
                (p.ds_tensor if self.zero3 else p).data.copy_(b)


def ema_decay_for(ecfg, step: int, global_batch: int) -> float:
    """The EMA decay after optimizer step ``step`` (engine config ``ecfg``): 0 (copy) during
    ema_warmup_steps, else 0.5 ** (global batch / ema_halflife_images) when a half-life is set, else
    ema_decay."""
    if step < ecfg.ema_warmup_steps:
        return 0.0
    if ecfg.ema_halflife_images > 0:
        return 0.5 ** (global_batch / ecfg.ema_halflife_images)
    return ecfg.ema_decay
