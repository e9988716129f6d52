"""framework/bucket_demo.py: the canvases, captions and halves the bucket demo's evaluation relies on
(the training runs themselves are tools/bucket_demo.py, minutes; docs/buckets_demo.md)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from framework import bucket_demo as D
from framework.data.sources import FASHION_ROOT

needs_fmnist = pytest.mark.skipif(not os.path.isdir(FASHION_ROOT), reason="dataset-fashion-mnist not installed")


def test_canvas_puts_the_item_in_the_named_half_and_half_takes_it_back():
    item = np.full((28, 28), 200, dtype=np.uint8)
    for place, ((h, w), k) in D.PLACES.items():
        c = D.canvas(item, place)
        assert c.shape == (h, w)
        t = torch.from_numpy(c).float().div(127.5).sub(1)[None, None]
        got = D.half(t, place)
        other = D.half(t, {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[place])
        assert got.shape == (1, 1, 28, 28)
        assert got.min() > 0.5 and other.max() < -0.999         # the item in its half, black elsewhere
    assert D.caption(7, "left") == "a sneaker on the left" and D.caption(8, "bottom") == "a bag at the bottom"
    sq = torch.zeros(2, 1, D.ITEM, D.ITEM)
    assert D.half(sq, "left").shape == (2, 1, 28, 28)          # a square is taken whole


def test_center_crop_cuts_every_item_in_half():
    """Why the demo: the 16x16 center crop of a canvas keeps exactly half of the item."""
    from PIL import Image
    item = np.full((28, 28), 200, dtype=np.uint8)
    for place in D.PLACES:
        c = D.canvas(item, place)
        h, w = c.shape
        s = D.ITEM
        crop = c[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        assert (crop > 100).sum() == s * s // 2
    del Image


@needs_fmnist
def test_canvas_shards_hold_the_classes_and_places(tmp_path):
    from framework.data.loader import build_loader
    from framework.config import BucketConfig, DataConfig
    m = D.write_canvas_shards(str(tmp_path), 64)
    assert m["total"] == 64
    cfg = DataConfig(urls=[str(tmp_path)], image_size=D.ITEM, channels=1, num_workers=0, shuffle_buffer=0,
                     buckets=BucketConfig(enabled=True, sizes=[list(D.WIDE), list(D.TALL)]))
    L = build_loader(cfg, 4, 0, 1, 0)
    for _ in range(8):
        b = next(L)
        h, w = b["image"].shape[-2:]
        for cap in b["caption"]:
            place = next(p for p in D.PLACES if p in cap)
            assert D.PLACES[place][0] == (h, w)                  # wide captions in wide batches
            assert any(D.NAMES[c] in cap for c in D.CLASSES)
    L.close()
