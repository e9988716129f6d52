"""Aspect-ratio buckets (framework/data/buckets.py): the bucket set of a rule, nearest-aspect assignment,
the crop bound (< one step on each side), homogeneous batches and their exact resume. Pure Python."""
from __future__ import annotations

import json
import math
import random

import pytest

from framework.data.buckets import (BucketBatcher, assign, bucket_name, buckets_from_config, check_buckets,
                               format_histogram, histogram, make_buckets, max_crop_fraction, size_cond)
from framework.config import BucketConfig, ConfigError, load_config

# (max_area, step): pixel-space and latent-space steps, coarse and fine grids, areas that are and are
# not multiples of step^2
SETTINGS = [(256 * 256, 64), (512 * 512, 64), (768 * 768, 64), (1024 * 1024, 64), (1024 * 1024, 128),
            (256 * 256, 8), (1024 * 1024, 8), (32 * 32, 8), (16 * 16, 4), (300 * 200, 16), (65536 + 4000, 64)]


def brute(max_area, step, lo, hi):
    """Every (h, w) multiples of step, area <= max_area, not growable by one step on both sides."""
    return {(h, w) for h in range(step, max_area // step + 1, step) for w in range(step, max_area // h + 1, step)
            if h * w <= max_area < (h + step) * (w + step) and lo <= w / h <= hi}


@pytest.mark.parametrize("max_area,step", SETTINGS)
def test_rule_gives_exactly_the_cells_the_area_curve_crosses(max_area, step):
    got = make_buckets(max_area, step, 0.5, 2.0)
    assert len(got) == len(set(got)) and set(got) == brute(max_area, step, 0.5, 2.0)
    assert [w / h for h, w in got] == sorted(w / h for h, w in got)           # tall first
    # kohya's / NovelAI's buckets (each height with the widest width the area allows) are all in it
    for h in range(step, max_area // step + 1, step):
        w = max_area // h // step * step
        if w >= step and 0.5 <= w / h <= 2.0:
            assert (h, w) in got
    # symmetric range: the set is closed under transposition
    assert {(w, h) for h, w in got} == set(got)
    # neighbours differ by one step on one side (the staircase the crop bound rests on)
    for (h1, w1), (h2, w2) in zip(got, got[1:]):
        assert (h1 - h2, w2 - w1) in ((step, 0), (0, step)), ((h1, w1), (h2, w2))


def test_rule_examples_and_errors():
    assert make_buckets(256 * 256, 64) == [(320, 192), (256, 192), (256, 256), (192, 256), (192, 320)]
    assert make_buckets(256 * 256, 64, 1.0, 1.0) == [(256, 256)]
    with pytest.raises(ValueError, match="no bucket"):
        make_buckets(256 * 256, 64, 1.9, 1.95)
    with pytest.raises(ValueError, match="step"):
        make_buckets(256 * 256, 0)
    with pytest.raises(ValueError, match="min_aspect"):
        make_buckets(256 * 256, 64, 2.0, 0.5)


def test_nearest_aspect_in_log_space():
    buckets = make_buckets(1024 * 1024, 64)
    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(50, 4000), rng.randint(50, 4000)
        p = assign(h, w, buckets)
        d = abs(math.log(w / h) - math.log(p.bucket[1] / p.bucket[0]))
        assert all(d <= abs(math.log(w / h) - math.log(b[1] / b[0])) + 1e-12 for b in buckets)
    # log space, not linear: between buckets of aspect 1/2 and 1 the log-midpoint is 1/sqrt(2) = 0.7071,
    # the linear one 0.75; aspect 0.72 goes to 1 (a linear rule would say 1/2), 0.705 to 1/2
    two = [(64, 32), (64, 64)]
    assert assign(1000, 720, two).bucket == (64, 64)
    assert assign(1000, 705, two).bucket == (64, 32)
    assert assign(720, 1000, [(32, 64), (64, 64)]).bucket == (64, 64)      # the same for wide images
    # ties go to the larger area
    assert assign(100, 100, [(32, 32), (64, 64), (48, 48)]).bucket == (64, 64)


def real_crop(aspect: float, bucket) -> tuple[float, float]:
    """Rows and columns the real-valued cover resize of an image of ``aspect`` crops to ``bucket``."""
    bh, bw = bucket
    if aspect >= bw / bh:
        return 0.0, bh * aspect - bw
    return bw / aspect - bh, 0.0


@pytest.mark.parametrize("max_area,step", SETTINGS)
@pytest.mark.parametrize("lo,hi", [(0.5, 2.0), (0.75, 1.5), (0.6, 1.0)])
def test_crop_is_less_than_one_step(max_area, step, lo, hi):
    """The bound of the module docstring, checked exactly: within a bucket's nearest-aspect cell the
    crop grows monotonically away from the bucket's aspect, so its maximum sits at the cell's ends,
    the log-midpoints between neighbours (where BOTH neighbours must crop < step). Then densely, on
    whole-pixel images through ``assign`` itself."""
    buckets = make_buckets(max_area, step, lo, hi)
    logs = [math.log(w / h) for h, w in buckets]
    for i in range(len(buckets) - 1):
        m = math.exp((logs[i] + logs[i + 1]) / 2)
        for b in (buckets[i], buckets[i + 1]):
            assert max(real_crop(m, b)) < step, (m, b, real_crop(m, b))
    a_lo, a_hi = logs[0], logs[-1]
    rng = random.Random(1)
    for k in range(800):
        a = math.exp(a_lo + (a_hi - a_lo) * k / 799)
        h = rng.randint(max(200, int(max_area ** 0.5) // 4), max(400, 4 * int(max_area ** 0.5)))
        w = round(h * a)
        if not a_lo <= math.log(w / h) <= a_hi:      # rounded outside the buckets' aspects: no promise
            continue
        p = assign(h, w, buckets)
        rows, cols = p.crop
        assert 0 <= rows < step and 0 <= cols < step and min(rows, cols) == 0, (h, w, p)
        # the resize keeps the aspect (to the pixel) and covers the bucket
        assert p.resize[0] >= p.bucket[0] and p.resize[1] >= p.bucket[1]
        assert abs(p.resize[1] - p.resize[0] * w / h) <= 1 + 1e-9 * w or abs(p.resize[0] - p.resize[1] * h / w) <= 1
        # centred
        assert p.top == rows // 2 and p.left == cols // 2


def test_the_bound_needs_the_aspect_range():
    """Outside [1/2, 2] neighbouring buckets can crop a step or more: the documented limit. Reported
    as a fraction of a side by max_crop_fraction."""
    buckets = make_buckets(256 * 256, 64, 0.25, 4.0)
    worst = 0.0
    for k in range(2001):
        a = math.exp(math.log(0.25) + math.log(16) * k / 2000)
        p = assign(1000, max(1, round(1000 * a)), buckets)
        worst = max(worst, max(p.crop))
    assert worst >= 64
    f = max_crop_fraction(make_buckets(1024 * 1024, 64), 0.5, 2.0)
    assert 0 < f < 0.1                           # a 1024^2 grid of 64 px steps crops < 10% of a side
    assert max_crop_fraction([(64, 64)], 1.0, 1.0) == 0.0
    assert max_crop_fraction([(64, 64)], 0.5, 2.0) == pytest.approx(0.5)


def test_random_crop_stays_in_the_slack():
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        p = assign(300, 1000, [(64, 192)], crop="random", rng=rng)
        assert 0 <= p.left <= p.crop[1] and p.top == 0
        seen.add(p.left)
    assert len(seen) > 1
    with pytest.raises(ValueError, match="rng"):
        assign(300, 1000, [(64, 192)], crop="random")


def test_size_cond_is_sdxl_order():
    p = assign(1000, 800, [(256, 192)])
    assert p.size_cond() == [1000, 800, p.top, p.left, 256, 192]
    assert size_cond((5, 6), (1, 2), (3, 4)) == [5, 6, 1, 2, 3, 4]
    assert p.box == (p.left, p.top, p.left + 192, p.top + 256)


def test_config_and_factor_check():
    cfg = load_config(None, ["data.buckets.enabled=true", "data.buckets.max_area=65536", "data.image_size=256"])
    assert cfg.data.buckets.step == 64
    assert buckets_from_config(cfg.data.buckets, cfg.data.image_size, 8) == make_buckets(65536, 64)
    assert buckets_from_config(BucketConfig(), 256, 8) == []                       # off by default
    assert buckets_from_config(BucketConfig(enabled=True, step=16), 32, 4) == make_buckets(32 * 32, 16)
    with pytest.raises(ValueError, match=r"data.buckets.step=24 must be a multiple of 16"):
        buckets_from_config(BucketConfig(enabled=True, step=24), 256, 16)
    sizes = load_config(None, ["data.buckets.enabled=true", "data.buckets.sizes=[[32,64],[64,32]]"]).data.buckets
    assert buckets_from_config(sizes, 32, 8) == [(32, 64), (64, 32)]
    with pytest.raises(ValueError, match=r"data.buckets.sizes\[1\] = \[64, 36\].*multiples of 8"):
        check_buckets([[32, 64], [64, 36]], 8, "data.buckets.sizes")
    with pytest.raises(ValueError, match=r"\[height, width\]"):
        check_buckets([[32, 64, 1]], 8)
    with pytest.raises(ConfigError, match="data.buckets.max_aspect"):
        load_config(None, ["data.buckets.max_aspect=wide"])
    with pytest.raises(ConfigError, match="Did you mean 'data.buckets.step'"):
        load_config(None, ["data.buckets.stepp=8"])


# ---------------------------------------------------------------------------------------------
# The batcher
# ---------------------------------------------------------------------------------------------
BUCKETS = [(32, 64), (48, 48), (64, 32)]


def stream(n: int, seed: int = 0):
    """n samples: (ref, item, bucket), buckets unevenly popular (as real data)."""
    rng = random.Random(seed)
    for i in range(n):
        b = rng.choices(BUCKETS, weights=[5, 3, 1])[0]
        yield ["shard-%d" % (i // 10), i], {"pixels": i * 7}, b


def run(batcher: BucketBatcher, samples) -> list:
    out = []
    for ref, item, b in samples:
        batch = batcher.add(ref, b, item)
        if batch is not None:
            out.append((b, batch))
    return out


def test_batches_are_full_and_of_one_bucket():
    bb = BucketBatcher(4, BUCKETS)
    samples = list(stream(300))
    batches = run(bb, samples)
    by_ref = {tuple(r): b for r, _, b in samples}
    for b, batch in batches:
        assert len(batch) == 4 and all(by_ref[tuple(r)] == b for r, _ in batch)
        assert all(item["pixels"] == r[1] * 7 for r, item in batch)
    emitted = sum(len(x) for _, x in batches)
    assert emitted + bb.pending() == 300 and bb.pending() <= len(BUCKETS) * 3     # leftovers carried
    # first in, first out per bucket; batches come out in stream order of their last member
    for b in BUCKETS:
        seq = [r[1] for bb_, batch in batches if bb_ == b for r, _ in batch]
        assert seq == sorted(seq)
    assert [batch[-1][0][1] for _, batch in batches] == sorted(batch[-1][0][1] for _, batch in batches)
    hist = bb.histogram()
    assert sum(hist.values()) == emitted and set(hist) == {bucket_name(b) for b in BUCKETS}


@pytest.mark.parametrize("cut", [0, 1, 37, 150, 299])
def test_state_round_trip_continues_exactly(cut):
    samples = list(stream(300, seed=3))
    whole = run(BucketBatcher(4, BUCKETS), samples)

    first = BucketBatcher(4, BUCKETS)
    head = run(first, samples[:cut])
    state = json.loads(json.dumps(first.state_dict()))        # JSON-safe, small
    assert len(json.dumps(state)) < 200 + 30 * first.pending()

    second = BucketBatcher(4, BUCKETS)
    second.load_state_dict(state)
    items = {tuple(r): it for r, it, _ in samples[:cut]}       # the reader re-decodes queued refs
    if second.missing():
        with pytest.raises(RuntimeError, match="fill"):
            second.add(*samples[cut][:1], samples[cut][2], samples[cut][1])
    for ref in second.missing():
        second.fill(ref, items[tuple(ref)])
    assert second.missing() == []
    tail = run(second, samples[cut:])
    assert head + tail == whole
    assert second.histogram() == _hist(whole)                  # the per-bucket counts resume too


def _hist(batches) -> dict:
    out = {bucket_name(b): 0 for b in BUCKETS}
    for b, batch in batches:
        out[bucket_name(b)] += len(batch)
    return out


def test_batcher_errors():
    bb = BucketBatcher(2, BUCKETS)
    with pytest.raises(ValueError, match="16x16 is not one of"):
        bb.add("k", (16, 16))
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatcher(0, BUCKETS)
    bb.add("a", (32, 64), 1)
    sd = bb.state_dict()
    with pytest.raises(ValueError, match="another batch size"):
        BucketBatcher(3, BUCKETS).load_state_dict(sd)
    with pytest.raises(ValueError, match="another batch size or bucket list"):
        BucketBatcher(2, BUCKETS[:2]).load_state_dict(sd)
    fresh = BucketBatcher(2, BUCKETS)
    fresh.load_state_dict(sd)
    with pytest.raises(KeyError):
        fresh.fill("zzz", 0)


def test_histogram_helpers():
    h = histogram([(32, 64), (32, 64), (64, 32)])
    assert h == {"bucket/32x64": 2, "bucket/64x32": 1}
    text = format_histogram(h, width=10)
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "64x32" and "66.7%" in lines[1]
