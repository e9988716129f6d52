"""Aspect-ratio buckets: which (height, width) each image trains at, and batches of one shape.

Pure functions and one small class; no torch, no model, no data reading (``framework/data.py`` calls
these). All sizes are PIXELS, (height, width); a latent model's bucket is its pixel bucket divided by
the VAE's factor, so ``step`` must be a multiple of (UNet factor x VAE factor).

The bucket set of a rule (``make_buckets``)
    With ``N = max_area / step^2`` and sides counted in steps, the buckets are every (p, q) with

        p * q <= N < (p + 1) * (q + 1)          (fits the area; one step larger on BOTH sides does not)

    whose aspect q / p lies in [min_aspect, max_aspect]: the cells of the step grid that the curve
    h * w = max_area passes through, i.e. ``round_down(aspect-preserving size at max_area)`` for some
    aspect. It holds kohya's / NovelAI's buckets (each side with the other side as large as the area
    allows) and fills the gaps between them.

Assignment (``assign``): the bucket nearest the image's aspect w / h in log space (ties: the larger
area, then the first listed), the image resized (aspect kept) to the smallest size covering the
bucket, then center-cropped to it. One side is then exactly the bucket's, the other crops
``bucket_side * (exp(|log a - log b|) - 1)`` pixels.

The crop bound (proved in tests/test_buckets.py)
    Bucket (p, q) crops less than one step on both sides exactly for the image aspects in
    ``(q / (p + 1), (q + 1) / p)`` (the aspects of the rays through its grid cell). Neighbouring
    buckets of the set above differ by one step on one side; for (p, q) -> (p, q + 1) the log-midpoint
    sqrt(q (q + 1)) / p lies inside both intervals iff q > p^2 / (2p + 1), true whenever q / p >= 1/2;
    for (p, q) -> (p - 1, q) iff p - 1 > q^2 / (2q + 1), true whenever q / (p - 1) <= 2. Hence with
    1/2 <= min_aspect and max_aspect <= 2, nearest-aspect assignment crops < one step on each side,
    relative to the aspect-preserving size, for every image whose aspect lies between the extreme
    buckets' aspects. Images outside that range go to the extreme bucket and lose more (as a square
    center crop would); ``max_crop_fraction`` reports it. An explicit list of buckets has no such
    guarantee: the crop is what the aspect gap to its nearest bucket demands.

Batching (``BucketBatcher``): a shuffled stream of samples in, batches of exactly ``batch_size``
samples of one bucket out, the moment a bucket's queue fills. Nothing random inside (the stream is
already shuffled), so the resume state is the pending queues as JSON-safe sample references.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

__all__ = ["Bucket", "Placement", "make_buckets", "buckets_from_config", "check_buckets", "assign",
           "max_crop_fraction", "size_cond", "BucketBatcher", "bucket_name", "histogram",
           "format_histogram"]

Bucket = tuple[int, int]        # (height, width) in pixels


def bucket_name(b: Sequence[int]) -> str:
    """(h, w) -> "HxW" (the key of histograms and of the batcher's state)."""
    return f"{int(b[0])}x{int(b[1])}"


def _parse_name(name: str) -> Bucket:
    h, w = name.split("x")
    return int(h), int(w)


def _aspect(b: Sequence[int]) -> float:
    return b[1] / b[0]


# ---------------------------------------------------------------------------------------------
# The bucket set
# ---------------------------------------------------------------------------------------------
def make_buckets(max_area: int, step: int, min_aspect: float = 0.5, max_aspect: float = 2.0) -> list[Bucket]:
    """Every (h, w), multiples of ``step``, with h * w <= max_area < (h + step) * (w + step) and
    min_aspect <= w / h <= max_aspect, sorted by aspect w / h (tall first). See the module docstring
    for why this set (and not only the largest width per height) bounds the crop."""
    for name, v in (("max_area", max_area), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not 0 < min_aspect <= max_aspect:
        raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
    if step * step > max_area:
        raise ValueError(f"max_area {max_area} is smaller than one step squared ({step}x{step})")
    s2, out = step * step, []
    p = 1
    while p * s2 <= max_area:                         # p = height in steps
        q_hi = max_area // (p * s2)                   # p q s^2 <= A
        q_lo = max(1, max_area // ((p + 1) * s2))     # (p+1)(q+1) s^2 > A  <=>  q >= floor(A / ((p+1) s^2))
        for q in range(q_lo, q_hi + 1):
            if min_aspect <= q / p <= max_aspect:
                out.append((p * step, q * step))
        p += 1
    if not out:
        raise ValueError(f"no bucket of area <= {max_area} with step {step} has an aspect in "
                         f"[{min_aspect}, {max_aspect}]")
    return sorted(out, key=lambda b: (_aspect(b), -b[0] * b[1]))


def check_buckets(buckets: Iterable[Sequence[int]], multiple: int, key: str = "data.buckets") -> list[Bucket]:
    """-> the buckets as (h, w) int tuples, each side a positive multiple of ``multiple`` (the UNet's
    downsampling factor, times the VAE's for a latent model); duplicates removed, order kept."""
    out: list[Bucket] = []
    for i, b in enumerate(buckets):
        if not isinstance(b, (list, tuple)) or len(b) != 2 or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b):
            raise ValueError(f"{key}[{i}]: expected [height, width] in pixels, got {b!r}")
        h, w = int(b[0]), int(b[1])
        if h % multiple or w % multiple:
            raise ValueError(f"{key}[{i}] = [{h}, {w}]: height and width must be multiples of {multiple} "
                             f"(the model's downsampling factor)")
        if (h, w) not in out:
            out.append((h, w))
    if not out:
        raise ValueError(f"{key}: no buckets")
    return out


def buckets_from_config(bcfg: Any, image_size: int, multiple: int = 1) -> list[Bucket]:
    """``data.buckets`` (framework.config.BucketConfig) -> the bucket list: ``sizes`` when given, else
    the rule (``max_area`` 0: image_size^2, the square run's pixel count). Empty list when disabled.
    ``multiple``: the factor every side must divide by (ValueError naming data.buckets otherwise)."""
    if not bcfg.enabled:
        return []
    if bcfg.sizes:
        return check_buckets(bcfg.sizes, multiple, "data.buckets.sizes")
    if bcfg.step % multiple:
        raise ValueError(f"data.buckets.step={bcfg.step} must be a multiple of {multiple} (the model's "
                         f"downsampling factor, x the VAE's for latents)")
    area = bcfg.max_area or image_size * image_size
    try:
        return make_buckets(area, bcfg.step, bcfg.min_aspect, bcfg.max_aspect)
    except ValueError as e:
        raise ValueError(f"data.buckets: {e}") from None


# ---------------------------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Where an image of ``original`` (h, w) goes: resized (aspect kept) to ``resize`` (h, w), then
    cropped to ``bucket`` (h, w) at (``top``, ``left``)."""
    original: Bucket
    bucket: Bucket
    resize: Bucket
    top: int
    left: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """PIL's crop box (left, top, right, bottom) in the resized image."""
        return self.left, self.top, self.left + self.bucket[1], self.top + self.bucket[0]

    @property
    def crop(self) -> Bucket:
        """Pixels removed from the resized image: (rows, columns); one of them is 0."""
        return self.resize[0] - self.bucket[0], self.resize[1] - self.bucket[1]

    def size_cond(self) -> list[int]:
        """SDXL's micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w]."""
        return size_cond(self.original, (self.top, self.left), self.bucket)


def nearest_bucket(height: int, width: int, buckets: Sequence[Sequence[int]]) -> Bucket:
    """The bucket nearest the aspect width / height in log space (ties: larger area, then first)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    la = math.log(width / height)
    best, key = None, None
    for b in buckets:
        k = (abs(la - math.log(b[1] / b[0])), -b[0] * b[1])
        if key is None or k < key:
            best, key = (int(b[0]), int(b[1])), k
    if best is None:
        raise ValueError("no buckets")
    return best


def assign(height: int, width: int, buckets: Sequence[Sequence[int]], crop: str = "center",
           rng: Optional[random.Random] = None) -> Placement:
    """An image of height x width -> its Placement: the nearest-aspect bucket, the smallest
    aspect-preserving size covering it, the crop offset ("center"; "random": uniform in the slack,
    drawn from ``rng``)."""
    bh, bw = nearest_bucket(height, width, buckets)
    s = max(bh / height, bw / width)                    # cover: both sides >= the bucket's
    # the binding side is the bucket's exactly; the other is rounded DOWN (never more crop than the
    # real-valued aspect-preserving size needs, so the bound below holds in whole pixels too)
    rh, rw = max(bh, math.floor(height * s + 1e-9)), max(bw, math.floor(width * s + 1e-9))
    if crop == "center":
        top, left = (rh - bh) // 2, (rw - bw) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs rng")
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    return Placement((int(height), int(width)), (bh, bw), (rh, rw), top, left)


def max_crop_fraction(buckets: Sequence[Sequence[int]], min_aspect: float, max_aspect: float) -> float:
    """The largest fraction of one side that nearest-aspect assignment crops from an image whose
    aspect lies in [min_aspect, max_aspect]: 1 - exp(-d), d the largest log distance from such an
    aspect to its nearest bucket (at a log-midpoint between neighbours, or at a range end)."""
    logs = sorted({math.log(b[1] / b[0]) for b in buckets})
    lo, hi = math.log(min_aspect), math.log(max_aspect)
    points = [lo, hi] + [(a + b) / 2 for a, b in zip(logs, logs[1:]) if lo <= (a + b) / 2 <= hi]
    d = max(min(abs(x - l) for l in logs) for x in points)
    return 1.0 - math.exp(-d)


def size_cond(original: Sequence[int], crop_top_left: Sequence[int], target: Sequence[int]) -> list[int]:
    """SDXL's add_time_ids order: original (h, w), crop (top, left), target (h, w)."""
    return [int(original[0]), int(original[1]), int(crop_top_left[0]), int(crop_top_left[1]),
            int(target[0]), int(target[1])]


# ---------------------------------------------------------------------------------------------
# Batches of one bucket
# ---------------------------------------------------------------------------------------------
class BucketBatcher:
    """Group a (shuffled) sample stream into batches of exactly ``batch_size`` samples of one bucket.

        batcher = BucketBatcher(batch_size, buckets)
        for ref, item, bucket in stream:                 # ref: JSON-safe (a key, [shard, index], ...)
            batch = batcher.add(ref, bucket, item)       # None, or batch_size (ref, item) pairs
            if batch: yield collate([item for _, item in batch])

    A batch is emitted the moment its bucket's queue holds ``batch_size`` samples (first in, first
    out), so the stream of batches stays shuffled across buckets and every batch is full: every rank
    yields exactly batch_size images per step, whichever bucket each rank is in. Samples still
    queued when an epoch's stream ends stay queued into the next epoch (nothing dropped, nothing
    padded); at most ``len(buckets) * (batch_size - 1)`` samples wait at any time.

    ``state_dict()`` is small and JSON-safe: the queued refs per bucket (not the items) and the
    per-bucket counts. After ``load_state_dict`` the queued refs have no items: the reader
    re-materialises them (``missing()`` lists them, ``fill(ref, item)`` puts each back) before the
    next ``add``; the batch sequence then continues exactly as without the interruption.
    """

    def __init__(self, batch_size: int, buckets: Sequence[Sequence[int]]):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.buckets = [(int(b[0]), int(b[1])) for b in buckets]
        if not self.buckets:
            raise ValueError("BucketBatcher needs at least one bucket")
        self._queues: dict[Bucket, list[list]] = {b: [] for b in self.buckets}   # [ref, item] pairs
        self._n_missing = 0                                                      # refs without items
        self.emitted: dict[Bucket, int] = {b: 0 for b in self.buckets}          # images per bucket

    def add(self, ref: Any, bucket: Sequence[int], item: Any = None) -> Optional[list[tuple[Any, Any]]]:
        """Queue one sample; -> the bucket's batch [(ref, item)] * batch_size when it is full, else None."""
        b = (int(bucket[0]), int(bucket[1]))
        q = self._queues.get(b)
        if q is None:
            raise ValueError(f"bucket {bucket_name(b)} is not one of the batcher's "
                             f"({', '.join(bucket_name(x) for x in self.buckets)})")
        if self._n_missing:
            raise RuntimeError("BucketBatcher: fill() the queued samples of the loaded state before add()")
        q.append([ref, item])
        if len(q) < self.batch_size:
            return None
        out = [(r, it) for r, it in q[:self.batch_size]]
        del q[:self.batch_size]
        self.emitted[b] += self.batch_size
        return out

    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def missing(self) -> list:
        """Refs restored by load_state_dict whose items have not been filled in yet."""
        return [r for q in self._queues.values() for r, it in q if it is _MISSING]

    def fill(self, ref: Any, item: Any) -> None:
        """Give a restored ref its item again (the reader re-decoded it)."""
        for q in self._queues.values():
            for entry in q:
                if entry[1] is _MISSING and entry[0] == ref:
                    entry[1] = item
                    self._n_missing -= 1
                    return
        raise KeyError(f"{ref!r} is not a queued sample waiting for its item")

    def state_dict(self) -> dict:
        return {"version": 1, "batch_size": self.batch_size,
                "buckets": [list(b) for b in self.buckets],
                "pending": {bucket_name(b): [r for r, _ in q] for b, q in self._queues.items() if q},
                "emitted": {bucket_name(b): n for b, n in self.emitted.items() if n}}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != 1:
            raise ValueError(f"bucket batcher state version {sd.get('version')!r}, expected 1")
        if int(sd["batch_size"]) != self.batch_size or [tuple(b) for b in sd["buckets"]] != self.buckets:
            raise ValueError("bucket batcher state was saved with another batch size or bucket list "
                             f"({sd['batch_size']}, {len(sd['buckets'])} buckets; now {self.batch_size}, "
                             f"{len(self.buckets)}): data.buckets or engine.micro_batch changed")
        self._queues = {b: [] for b in self.buckets}
        for name, refs in sd.get("pending", {}).items():
            self._queues[_parse_name(name)] = [[r, _MISSING] for r in refs]
        self._n_missing = self.pending()
        self.emitted = {b: 0 for b in self.buckets}
        for name, n in sd.get("emitted", {}).items():
            self.emitted[_parse_name(name)] = int(n)

    def histogram(self) -> dict[str, int]:
        """Images emitted per bucket ("HxW" -> n), every bucket listed."""
        return {bucket_name(b): n for b, n in self.emitted.items()}


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------
def histogram(buckets: Iterable[Sequence[int]], prefix: str = "bucket/") -> dict[str, int]:
    """Counts of a sequence of per-sample (or per-batch) buckets: {"bucket/HxW": n}, for the metric log."""
    out: dict[str, int] = {}
    for b in buckets:
        k = prefix + bucket_name(b)
        out[k] = out.get(k, 0) + 1
    return out


def format_histogram(counts: dict[str, int], width: int = 40) -> str:
    """A text histogram, one line per bucket: '  256x192  ######  1200 (12.0%)'."""
    total = sum(counts.values()) or 1
    top = max(counts.values(), default=0) or 1
    names = sorted(counts, key=lambda k: _aspect(_parse_name(k.rsplit("/", 1)[-1])))
    return "\n".join(f"  {k.rsplit('/', 1)[-1]:>11}  {'#' * round(width * counts[k] / top):<{width}}  "
                     f"{counts[k]} ({100 * counts[k] / total:.1f}%)" for k in names)
