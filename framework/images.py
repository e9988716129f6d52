"""Tensors in [-1, 1] to PNG images and labelled grids. No model, no deepspeed."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from framework.files import atomic_file

__all__ = ["to_uint8", "to_pil", "make_grid", "save_grid"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B,C,H,W) in [-1,1] -> (B,H,W,C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    arr = to_uint8(x)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def _pil_list(images: Union[torch.Tensor, Sequence[torch.Tensor]]) -> list[Image.Image]:
    if isinstance(images, torch.Tensor):
        return to_pil(images)
    return [p for x in images for p in to_pil(x if x.ndim == 4 else x[None])]


def make_grid(images: Union[torch.Tensor, Sequence[torch.Tensor]], nrow: int, scale: int = 1, pad: int = 2,
              row_labels: Optional[Sequence[str]] = None, col_labels: Optional[Sequence[str]] = None,
              label_width: int = 0) -> Image.Image:
    """A grid of ``nrow`` images per row; optional text labels left of rows and above columns.

    ``images``: a (B, C, H, W) tensor, or a sequence of (C, H, W) / (b, C, H, W) tensors of any
    shapes (aspect-ratio buckets): every cell is then as tall as the tallest image and as wide as
    the widest, and each image sits centred in its cell, unscaled, on the white background (so
    shapes compare at their true pixel sizes)."""
    pil = [im.convert("RGB") for im in _pil_list(images)]
    if not pil:
        raise ValueError("make_grid: no images")
    if scale != 1:
        pil = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in pil]
    w, h = max(im.width for im in pil), max(im.height for im in pil)
    ncol = nrow
    nrows = (len(pil) + ncol - 1) // ncol
    font = ImageFont.load_default()
    lw = label_width or (max((len(s) for s in row_labels), default=0) * 6 + 6 if row_labels else 0)
    th = 14 if col_labels else 0
    grid = Image.new("RGB", (lw + ncol * (w + pad) + pad, th + nrows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(pil):
        r, c = divmod(i, ncol)
        grid.paste(im, (lw + pad + c * (w + pad) + (w - im.width) // 2,
                        th + pad + r * (h + pad) + (h - im.height) // 2))
    for r, text in enumerate(row_labels or []):
        draw.text((2, th + pad + r * (h + pad) + h // 2 - 5), str(text), fill="black", font=font)
    for c, text in enumerate(col_labels or []):
        draw.text((lw + pad + c * (w + pad), 1), str(text), fill="black", font=font)
    return grid


def save_grid(images: Union[torch.Tensor, Sequence[torch.Tensor]], path: str, nrow: int, **kwargs) -> str:
    grid = make_grid(images, nrow, **kwargs)
    with atomic_file(path, suffix=".png") as tmp:
        grid.save(tmp)
    return path
