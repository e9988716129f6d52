"""The webdataset pipeline: shard lists, node/worker split, shuffle, decode, crop, exact resume.

    loader = build_loader(cfg.data, batch_size=32, rank=rank, world_size=world, seed=cfg.seed)
    batch = next(loader)      # {"image": (B,C,H,W) in [-1,1], "caption": [...], "key": [...],
                              #  "label": (B,) int64 (-1 if absent), ["ctx" (B,L,D), "ctx_mask" (B,L)]}
                              # data.latents: "image" is the scaled latent draw z0 (B,c,h,w)
    sd = loader.state_dict()  # small, JSON-able; loader.load_state_dict(sd) continues exactly

No torch.distributed, no deepspeed: rank and world size are passed in.

Shards and datasets
    ``cfg.urls`` entries are local paths, brace patterns (``data-{000000..000099}.tar``), ``http(s)://``
    URLs, ``pipe:`` commands (only with ``cfg.allow_pipe``), a ``shards.json`` manifest or a folder
    holding one, or a folder of tars without one (img2dataset's output read as it is). Per-shard
    sample counts come from the manifest, img2dataset's ``_stats.json``, or a cached count of the
    tar headers (``framework/shardlist.py``). Several entries without ``cfg.weights`` form one
    dataset; with weights each entry is a dataset and samples are mixed by a seeded draw per sample.

Who reads what (the plan)
    A rank has W logical workers (``num_workers``, 1 when 0); consumer ``c = rank * W + worker``.
    With known counts the N samples are split once into ``world * W`` groups of exactly
    ``T = N // (world * W)`` samples: the shards are ordered by a balanced partition (largest
    first onto the lightest group) and cut every T samples, so a group is whole shards plus at
    most two pieces of shards (sample ranges ``[a, b)``; the reader skips the first a samples
    member by member, reading headers only). Without counts a group is whole shards, balanced by
    number. Epoch e gives group ``perm_e[c]`` to consumer c (``perm_e`` a permutation seeded by
    seed and e when ``shardshuffle``) and reads its pieces in an order seeded by (seed, e, c). So
    within an epoch no two consumers (ranks x workers) read the same sample. Each consumer's
    samples go through a shuffle buffer (webdataset's algorithm, with a counter-based seeded draw
    so that its state is a position), are decoded, and are batched INSIDE the worker.

Equal steps on every rank
    Every worker yields exactly ``s`` batches per epoch and every rank ``steps_per_epoch = s * W``,
    whatever the shard sizes. With ``samples_per_epoch == 0`` (finite, not resampled, one dataset),
    ``s = floor(T / batch)``: what is dropped each epoch (``loader.dropped_per_epoch``, said at
    startup by ``loader.summary()``) is less than one batch per reader. Otherwise
    ``s = samples_per_epoch // (world * W * batch)`` (at least 1) and a consumer whose group runs
    out reads it again (a new pass, reshuffled; counted as ``repeated``).

Epochs of resampled / infinite streams, and ``with_epoch``
    webdataset's ``.with_epoch(n)`` cuts the stream it is applied to after n items: per DataLoader
    worker, and in samples or batches depending on where it sits in the pipeline, which is the
    usual confusion (webdataset #278, #379). Here an epoch is always a number of optimizer-side
    steps: ``steps_per_epoch`` per rank (so ``world * steps_per_epoch * batch`` samples in all);
    ``samples_per_epoch`` is global (all ranks, all workers). With ``cfg.resampled`` each consumer
    draws shards with replacement (seeded by (seed, e, c)); no disjointness is promised there.
    The loader never stops: after epoch e comes epoch e+1 (reshuffled); the trainer pulls ``next()``.

Exact resume
    torch's DataLoader hands out work to its workers round-robin and returns their outputs in that
    order, so global step k of the current run comes from logical worker ``k % W`` and each
    worker's stream is a pure function of (seed, epoch, consumer). Each batch carries its worker's
    position: epoch, batches done, counters, and where its stream stands -- per dataset the pass,
    the piece being read (sample index and byte offset in its shard), the number of shuffle draws
    and the shuffle buffer as (piece, sample index, byte offset) references. ``state_dict()`` holds
    the step and the position of every worker after the last batch the trainer CONSUMED (not the
    prefetched ones). On ``load_state_dict`` the DataLoader is restarted; DataLoader worker j plays
    logical worker ``(j + step) % W``, continues the piece it was reading at its byte offset and
    re-reads a buffered sample when the shuffle draws it (a seek to its offset; remote or
    compressed shards: each shard in the buffer read once at the restart): the cost of a resume
    is O(shuffle buffer) at most, not O(epoch). Bad samples are found at
    decode time, after the buffer, so skips replay exactly.

Bad samples
    Undecodable image, missing caption or image, empty member, wrong shape, corrupt tar member
    (fewer samples readable than the manifest says) are skipped and counted by reason
    (``loader.stats()``), with a warning naming shard and key (the first, then every
    ``bad_warn_every``-th). Once ``bad_check_after`` samples were read, a bad fraction above
    ``max_bad_fraction`` aborts with ``DataError``. A missing or unreadable shard is a ``DataError``
    naming it.

Images and captions
    A ``.txt`` is one caption (newlines and tabs are whitespace); several captions come from a
    JSON caption member or ``data.captions=lines`` (or a manifest that says ``caption_lines``, as
    this project's writer does); one is drawn per sample and epoch. 16-bit images (PNG/TIFF
    ``I;16``, ``I``) are scaled to 8 bits (``v * 255 / 65535``), not clipped. Images with alpha (RGBA,
    LA, palette transparency) are composited onto WHITE before the mode conversion: transparent
    product shots and emoji then look as they do in a browser, and no black halo appears where
    colour under alpha 0 is undefined.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from framework.data.buckets import BucketBatcher, assign, bucket_name, buckets_from_config, format_histogram
from framework.config import ConfigError
from framework.data.shardformat import (LATENT_BUCKET, DataError, is_remote, join_url, local_path, manifest_caption_lines,
                                        read_latent_bucket, sample_captions, unpack_embedding, url_dir)
from framework.data.shardlist import Shard, expand_spec
from framework.data.tario import ShardReader, iter_shard_samples, read_samples_at, shard_events

__all__ = ["build_loader", "ShardLoader", "DataError", "Shard", "expand_spec", "iter_shard_samples",
           "decode_sample", "STATE_VERSION", "BAD_REASONS"]

log = logging.getLogger(__name__)
STATE_VERSION = 2
BAD_REASONS = ("decode", "no_image", "no_caption", "empty_file", "shape", "no_embedding", "corrupt_tar",
               "no_latent")


# ---------------------------------------------------------------------------------------------
# Decoding one sample
# ---------------------------------------------------------------------------------------------
def _sample_rng(*parts: Any) -> random.Random:
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


class _Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


_16BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open_image(data: bytes, cfg, draft: Optional[tuple[int, int]] = None,
                buckets: Optional[Sequence] = None, rng: Optional[random.Random] = None):
    """bytes -> (PIL image in the configured mode, its bucket Placement or None). ``draft``: the
    (w, h) a JPEG may be decoded at (reduced scale >= it); with ``buckets`` the placement is chosen
    from the image's stored size first and the draft is its resize size."""
    im = Image.open(io.BytesIO(data))
    pl = None
    if buckets:
        w0, h0 = im.size
        pl = assign(h0, w0, buckets, crop=cfg.crop, rng=rng)
        draft = (pl.resize[1], pl.resize[0])
    if im.format == "JPEG" and draft is not None:   # let libjpeg decode at a reduced scale (>= the target)
        im.draft("L" if cfg.channels == 1 else "RGB", draft)
    im.load()
    if im.mode in _16BIT:         # 16-bit grey: scale to 8 bits (Pillow's convert("L") would clip at 255)
        a = np.asarray(im).astype(np.float32) * np.float32(255 / 65535)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:                 # composite onto white (see the module docstring)
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    mode = "L" if cfg.channels == 1 else "RGB"
    if im.mode != mode:
        im = im.convert(mode)
    return im, pl


def _to_image(data: bytes, cfg, rng: random.Random) -> np.ndarray:
    """bytes -> (C, S, S) uint8: decode, mode, resize shorter side, crop, flip."""
    size = cfg.image_size
    im, _ = _open_image(data, cfg, (size, size))
    w, h = im.size
    if min(w, h) != size:
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
    if (w, h) != (size, size):
        if cfg.crop == "random":
            left, top = rng.randint(0, w - size), rng.randint(0, h - size)
        else:
            left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)                  # (C, S, S) view
    if cfg.random_flip and rng.random() < 0.5:
        arr = arr[:, :, ::-1]                                                      # a view: copied once by stack
    return arr


def _to_bucket_image(data: bytes, cfg, rng: random.Random, buckets: Sequence) -> tuple[np.ndarray, list]:
    """bytes -> ((C, h, w) uint8, size_cond): the image resized (aspect kept) to cover the bucket
    nearest its aspect ratio and cropped to it (``buckets.assign``); size_cond is SDXL's
    [orig_h, orig_w, crop_top, crop_left, h, w], its crop_left mirrored when the image is flipped."""
    im, pl = _open_image(data, cfg, buckets=buckets, rng=rng)
    rh, rw = pl.resize
    if im.size != (rw, rh):
        im = im.resize((rw, rh), Image.BICUBIC)
    if pl.crop != (0, 0):
        im = im.crop(pl.box)
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    sc = pl.size_cond()
    if cfg.random_flip and rng.random() < 0.5:
        arr = arr[:, :, ::-1]
        sc[3] = rw - pl.bucket[1] - pl.left           # the crop seen from the mirrored image's left edge
    return arr, sc


def decode_sample(sample: dict, cfg, rng: random.Random, emb_dims: Optional[tuple] = None,
                  caption_lines: bool = False, buckets: Optional[Sequence] = None, latents=None) -> dict:
    """A raw sample -> {"image", "caption", "key", "label"[, "ctx", "ctx_mask", "pooled"]}.
    ``caption_lines``: the .txt holds one caption per line. ``buckets`` ((h, w) pixels, aspect-ratio
    buckets on): the image goes to its nearest-aspect bucket and the sample gets "bucket" (h, w) and
    "size_cond". ``latents`` (a ``vae.LatentSpec``, data.latents): "image" is a latent draw z0 (c,h,w)
    from the sample's stored posterior instead of a decoded image. Raises ``_Reject(reason)`` for a
    bad sample."""
    image_keys = [k.strip().lower() for k in cfg.image_keys.split(";") if k.strip()]
    ext = next((k for k in image_keys if k in sample), None)
    if ext is None and latents is None:
        raise _Reject("no_image", f"no member of {image_keys}")
    if cfg.caption_key not in sample:
        raise _Reject("no_caption", f"no .{cfg.caption_key}")
    if (ext is not None and len(sample[ext]) == 0) or len(sample[cfg.caption_key]) == 0:
        raise _Reject("empty_file", f".{ext if ext is not None and not sample[ext] else cfg.caption_key} is empty")
    caps = sample_captions(sample, cfg.caption_key, caption_lines)
    if not caps:
        raise _Reject("no_caption", "blank caption")
    k = rng.randrange(len(caps)) if len(caps) > 1 else 0
    out: dict[str, Any] = {"key": sample["__key__"], "caption": caps[k], "label": -1}
    if latents is not None:       # z0 = scaled draw from the stored posterior (framework/vae.py)
        if buckets:               # the bucket its image was encoded at, stored by precompute_latents
            out["bucket"], out["size_cond"], shape = _latent_bucket(sample, buckets, latents)
            latents = dataclasses.replace(latents, shape=shape)
        try:
            out["image"] = latents.draw(sample, rng)
        except ValueError as e:
            raise _Reject(getattr(e, "reason", "shape"), str(e)) from None
    elif ext == "npy":
        try:
            arr = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
        except Exception as e:
            raise _Reject("decode", repr(e)) from None
        # a .npy image is taken as it is (no resize): with buckets its (h, w) must be a bucket's
        # (precomputed latents carry their bucket in zbucket.json: data.latents, above)
        if buckets:
            if arr.ndim != 3 or arr.shape[0] != cfg.channels or tuple(arr.shape[1:]) not in set(map(tuple, buckets)):
                raise _Reject("shape", f"npy shape {arr.shape}: not ({cfg.channels}, h, w) of a data.buckets bucket")
            out["bucket"] = (int(arr.shape[1]), int(arr.shape[2]))
            out["size_cond"] = [*out["bucket"], 0, 0, *out["bucket"]]
        else:
            want = (cfg.channels, cfg.image_size, cfg.image_size)
            if arr.shape != want:
                raise _Reject("shape", f"npy shape {arr.shape}, expected {want}")
        out["image"] = arr.astype(np.float32)
    else:
        try:
            if buckets:
                out["image"], out["size_cond"] = _to_bucket_image(sample[ext], cfg, rng, buckets)
                out["bucket"] = (int(out["size_cond"][4]), int(out["size_cond"][5]))
            else:
                out["image"] = _to_image(sample[ext], cfg, rng)
        except Exception as e:
            raise _Reject("decode", repr(e)) from None
    if "json" in sample and sample["json"]:
        try:
            meta = json.loads(sample["json"])
            if isinstance(meta, dict) and meta.get(cfg.label_key) is not None:
                out["label"] = int(meta[cfg.label_key])
        except (ValueError, TypeError):
            pass
    if cfg.use_embeddings:
        if "emb.npy" not in sample or "mask.npy" not in sample:
            raise _Reject("no_embedding", "no emb.npy/mask.npy (run tools.precompute_text)")
        try:
            emb = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
            mask = np.load(io.BytesIO(sample["mask.npy"]), allow_pickle=False)
            if mask.ndim == 1:
                mask = mask[None]
            if mask.shape[0] != len(caps):
                raise ValueError(f"{mask.shape[0]} embeddings for {len(caps)} captions")
            ctx, m = unpack_embedding(emb, mask, k)
        except Exception as e:
            raise _Reject("shape", f"embedding: {e}") from None
        if emb_dims is not None and ctx.shape != tuple(emb_dims[:2]):
            raise _Reject("shape", f"embedding {ctx.shape}, manifest says (L, D) = {tuple(emb_dims[:2])}")
        out["ctx"], out["ctx_mask"] = ctx, m
        if "pooled.npy" in sample:
            try:
                out["pooled"] = np.load(io.BytesIO(sample["pooled.npy"]), allow_pickle=False)[k].astype(np.float32)
            except Exception as e:
                raise _Reject("shape", f"pooled: {e}") from None
    return out


def _latent_bucket(sample: dict, buckets: Sequence, latents) -> tuple[tuple[int, int], list[int], tuple]:
    """A bucketed latent sample's stored placement (``zbucket.json``) -> (bucket (H, W) pixels,
    size_cond, latent shape (c, H/f, W/f)), checked against data.buckets and the manifest's VAE."""
    if LATENT_BUCKET not in sample:
        raise _Reject("no_latent", f"no {LATENT_BUCKET} (latents precomputed without data.buckets)")
    try:
        bucket, sc, shape = read_latent_bucket(sample[LATENT_BUCKET])
    except (ValueError, KeyError, TypeError) as e:
        raise _Reject("decode", f"{LATENT_BUCKET}: {e!r}") from None
    if bucket not in buckets:
        raise _Reject("shape", f"stored bucket {bucket_name(bucket)} is not one of data.buckets")
    f = int(latents.vae.get("factor") or 0)
    if shape[0] != latents.shape[0] or (f and tuple(shape[1:]) != (bucket[0] // f, bucket[1] // f)):
        raise _Reject("shape", f"stored latent shape {shape} does not fit bucket {bucket_name(bucket)} "
                               f"({latents.shape[0]} channels, VAE factor {f})")
    return bucket, sc, shape


def _check_latent_buckets(manifests: list, buckets: list) -> None:
    """data.latents: the trainer's data.buckets must be the bucket set the shards were encoded with
    (``latents.buckets`` in their shards.json; absent: encoded at one square size)."""
    want = sorted(tuple(b) for b in buckets)

    def names(bs: list) -> str:
        return ", ".join(bucket_name(b) for b in bs)

    for m in manifests:
        got = (m or {}).get("latents", {}).get("buckets")
        got = sorted(tuple(int(v) for v in b) for b in got) if got else []
        if got == want:
            continue
        if not got:
            raise ConfigError("data.buckets.enabled=true, but these latent shards were precomputed without "
                              "buckets (one square size): run tools.precompute_latents with the same "
                              "data.buckets, or set data.buckets.enabled=false")
        if not want:
            raise ConfigError(f"data.buckets: these latent shards were precomputed with aspect-ratio buckets "
                              f"({names(got)}, shards.json latents.buckets); set data.buckets.enabled=true with "
                              f"the settings (and data.image_size) they were encoded with")
        raise ConfigError(f"data.buckets: the bucket set ({names(want)}) differs from the one the latent "
                          f"shards were encoded with ({names(got)}, shards.json latents.buckets); set "
                          f"data.buckets (and data.image_size) as tools.precompute_latents had them")


def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    return t.share_memory_() if torch.utils.data.get_worker_info() is not None else t


def _collate(items: list[dict]) -> dict:
    # uint8 images -> [-1, 1]; npy arrays as they are. numpy, not torch: no intra-op thread pool here.
    # In a DataLoader worker the batch is built directly in shared memory (as torch's default_collate
    # does), so handing it to the main process copies nothing.
    imgs = [it["image"] for it in items]
    image = _empty((len(imgs),) + imgs[0].shape, torch.float32)                 # (B,C,H,W)
    out = image.numpy()
    for i, a in enumerate(imgs):      # a cast-assign per image (3x faster than stacking (C,H,W) views)
        out[i] = a
    scaled = [i for i, a in enumerate(imgs) if a.dtype == np.uint8]
    if len(scaled) == len(imgs):
        out *= np.float32(1 / 127.5)
        out -= np.float32(1.0)
    else:
        for i in scaled:
            out[i] *= np.float32(1 / 127.5)
            out[i] -= np.float32(1.0)
    batch = {"image": image, "caption": [it["caption"] for it in items], "key": [it["key"] for it in items],
             "label": torch.tensor([it["label"] for it in items], dtype=torch.int64)}
    if "ctx" in items[0]:
        batch["ctx"] = torch.from_numpy(np.stack([it["ctx"] for it in items]))          # (B,L,D)
        batch["ctx_mask"] = torch.from_numpy(np.stack([it["ctx_mask"] for it in items]))  # (B,L) bool
        if all("pooled" in it for it in items):
            batch["pooled"] = torch.from_numpy(np.stack([it["pooled"] for it in items]))  # (B,P)
    if "size_cond" in items[0]:       # aspect-ratio buckets: SDXL's size/crop condition per image
        batch["size_cond"] = torch.tensor([it["size_cond"] for it in items], dtype=torch.int64)  # (B,6)
    return batch


# ---------------------------------------------------------------------------------------------
# The plan: who reads which samples, how many batches per epoch
# ---------------------------------------------------------------------------------------------
Piece = tuple[int, int, Optional[int]]   # (shard index, first sample, stop; None: to the end of the shard)


def _balanced_groups(counts: list[int], n_groups: int) -> list[list[int]]:
    """Partition shard indices into n_groups by sample count: largest first onto the lightest."""
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    loads = [0] * n_groups
    for i in order:
        g = min(range(n_groups), key=lambda j: (loads[j], len(groups[j]), j))
        groups[g].append(i)
        loads[g] += counts[i]
    return [sorted(g) for g in groups]


def _even_pieces(counts: list[int], n_groups: int) -> list[list[Piece]]:
    """``n_groups`` groups of exactly ``sum(counts) // n_groups`` samples: the shards in the order
    of a balanced partition, cut every T samples (so each group is whole shards plus at most two
    pieces). The last ``sum % n_groups`` samples belong to no group."""
    T = sum(counts) // n_groups
    out: list[list[Piece]] = [[] for _ in range(n_groups)]
    g, room = 0, T
    for i in (i for grp in _balanced_groups(counts, n_groups) for i in grp):
        a, n = 0, counts[i]
        while a < n and g < n_groups:
            take = min(room, n - a)
            if take:
                out[g].append((i, a, None if (a == 0 and take == n) else a + take))
            a += take
            room -= take
            if room == 0:
                g, room = g + 1, T
    for pieces in out:
        pieces.sort(key=lambda p: (p[0], p[1]))
    return out


class _Plan:
    """Everything a worker needs, picklable: shard lists, groups, quotas, seeds."""

    def __init__(self, cfg, datasets: list[list[Shard]], weights: Optional[list[float]], batch_size: int,
                 rank: int, world_size: int, seed: int, emb_dims: Optional[tuple],
                 caption_lines: Optional[list[bool]] = None):
        self.cfg = cfg
        self.datasets = datasets
        self.weights = weights
        self.B, self.rank, self.R, self.seed = batch_size, rank, world_size, seed
        self.W = max(1, cfg.num_workers)
        self.C = self.R * self.W
        self.emb_dims = emb_dims
        self.latents = None           # a vae.LatentSpec with data.latents (set by ShardLoader)
        self.caption_lines = caption_lines or [False] * len(datasets)
        self.resampled = bool(cfg.resampled)
        bcfg = getattr(cfg, "buckets", None)
        self.buckets: list = buckets_from_config(bcfg, cfg.image_size) if bcfg is not None else []
        self.groups: list[list[list[Piece]]] = []
        for d, shards in enumerate(datasets):
            if self.resampled:
                self.groups.append([[(i, 0, None) for i in range(len(shards))]] * self.C)
                continue
            if len(shards) < self.C:
                raise DataError(
                    f"dataset {d} has {len(shards)} shards for {self.R} ranks x {self.W} workers = "
                    f"{self.C} readers: every reader needs its own shard(s). Write more, smaller shards "
                    f"(tools.make_shards --max-count), lower data.num_workers, or set data.resampled=true")
            if all(s.count is not None for s in shards):
                self.groups.append(_even_pieces([s.count for s in shards], self.C))
            else:          # unknown counts: whole shards, balanced by number
                self.groups.append([[(i, 0, None) for i in g]
                                    for g in _balanced_groups([1] * len(shards), self.C)])
        known = all(s.count is not None for ds in datasets for s in ds)
        spe = cfg.samples_per_epoch
        self.total = sum(s.count for ds in datasets for s in ds) if known else None
        self.dropped_per_epoch = 0
        if spe <= 0 and not self.resampled and len(datasets) == 1:
            if not known:
                remote = [s.url for s in datasets[0] if s.count is None]
                raise DataError(
                    f"shard sample counts are unknown for {len(remote)} shards (e.g. {remote[0]}): no "
                    f"shards.json or _stats.json beside these remote/pipe shards. Either count them once "
                    f"where they are readable (python -m tools.make_shards count DIR_OR_PATTERN writes a "
                    f"shards.json) and put that shards.json beside them, or set data.samples_per_epoch")
            group_n = [self.piece_samples(0, g) for g in self.groups[0]]
            self.s = min(group_n) // batch_size
            if self.s == 0:
                raise DataError(f"each reader gets {min(group_n)} samples, fewer than one batch of "
                                f"{batch_size}: lower the batch size or data.num_workers")
            self.dropped_per_epoch = self.total - self.s * batch_size * self.C
        else:
            if spe <= 0:
                if self.resampled or not known:
                    raise DataError("data.samples_per_epoch is required for resampled streams and for "
                                    "shards without known counts (no shards.json / _stats.json)")
                spe = self.total
            self.s = max(1, spe // (self.C * batch_size))
        self.steps_per_epoch = self.s * self.W
        ident = {"datasets": [[(os.path.basename(s.url), s.count) for s in ds] for ds in datasets],
                 "weights": weights, "resampled": self.resampled, "spe": cfg.samples_per_epoch,
                 "shardshuffle": cfg.shardshuffle, "shuffle_buffer": cfg.shuffle_buffer, "split": "pieces"}
        if self.buckets:           # another batch stream: a state saved without (or with other) buckets restarts
            ident["buckets"] = [list(b) for b in self.buckets]
        self.fingerprint = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    # -- assignment --------------------------------------------------------------------------
    def piece_expected(self, d: int, piece: Piece) -> Optional[int]:
        i, a, b = piece
        return (b - a) if b is not None else self.datasets[d][i].count

    def piece_samples(self, d: int, pieces: Sequence[Piece]) -> int:
        return sum(self.piece_expected(d, p) or 0 for p in pieces)

    def group_of(self, d: int, epoch: int, c: int) -> list[Piece]:
        """Pieces of dataset d read by consumer c in epoch e (before the per-pass order shuffle)."""
        g = c
        if self.cfg.shardshuffle:
            perm = list(range(self.C))
            random.Random(f"{self.seed}:groups:{d}:{epoch}").shuffle(perm)
            g = perm[c]
        return list(self.groups[d][g])

    def group_samples(self, c: int) -> int:
        """Samples (known counts) in consumer c's largest group over datasets."""
        return max(self.piece_samples(d, self.groups[d][c % len(self.groups[d])]) for d in range(len(self.datasets)))

    def epoch_pieces(self, epoch: int, d: int = 0) -> dict[tuple[int, int], list[tuple[str, int, Optional[int]]]]:
        """{(rank, worker): [(shard url, first sample, stop or None)]} of an epoch."""
        return {(c // self.W, c % self.W): [(self.datasets[d][i].url, a, b) for i, a, b in self.group_of(d, epoch, c)]
                for c in range(self.C)}

    def epoch_assignment(self, epoch: int, d: int = 0) -> dict[tuple[int, int], list[str]]:
        """{(rank, worker): shard urls (whole or in part)} of an epoch, for inspection and tests."""
        return {k: [u for u, _, _ in v] for k, v in self.epoch_pieces(epoch, d).items()}

    def pass_order(self, d: int, epoch: int, c: int, p: int) -> list[Piece]:
        order = self.group_of(d, epoch, c)
        if self.cfg.shardshuffle:
            random.Random(f"{self.seed}:order:{d}:{epoch}:{c}:{p}").shuffle(order)
        return order


# ---------------------------------------------------------------------------------------------
# Raw streams with a position: pieces read one after another, a shuffle buffer of references
# ---------------------------------------------------------------------------------------------
def _rng_state(rng: random.Random) -> str:
    """A ``random.Random``'s Mersenne Twister state as 3.3 kB of text (JSON- and checkpoint-safe)."""
    version, internal, gauss = rng.getstate()
    if gauss is not None or version != 3:       # gauss() is never used on these generators
        raise RuntimeError("unexpected random.Random state")
    return base64.b64encode(np.asarray(internal, dtype=np.uint32).tobytes()).decode("ascii")


def _rng_from(state: Optional[str], seed: str) -> random.Random:
    rng = random.Random(seed)
    if state:
        internal = np.frombuffer(base64.b64decode(state), dtype=np.uint32)
        rng.setstate((3, tuple(int(x) for x in internal), None))
    return rng


class _DatasetStream:
    """Dataset d's raw samples for consumer c in epoch e, shuffled, endless, restartable.

    A finite group is read pass after pass; each pass reads the group's pieces in a seeded order
    and is shuffled on its own (pass p+1 starts only when every sample of pass p was given out).
    The shuffle is webdataset's ``filters._shuffle`` step by step (two reads per output while
    filling, output from ``initial`` buffered samples on, ``rng.randint`` picks an entry that is
    swapped with the last), written out here so that its state can be saved: the generator's
    state and the buffer as (shard, sample index, byte offset) references. With ``resampled``
    the pieces are whole shards drawn with replacement from a seeded generator (saved too)."""

    def __init__(self, plan: _Plan, d: int, epoch: int, c: int, events: list, state: Optional[dict] = None):
        self.plan, self.d, self.epoch, self.c, self.events = plan, d, epoch, c, events
        self.shards = plan.datasets[d]
        self.bufsize = plan.cfg.shuffle_buffer if plan.cfg.shuffle_buffer and plan.cfg.shuffle_buffer > 1 else 0
        self.initial = min(self.bufsize, 100)
        st = state or {}
        self.p = int(st.get("p", 0))
        self.si = int(st.get("si", 0))
        self.n = int(st.get("n", 0))
        self.end = bool(st.get("end", False))
        self._new_order(st.get("rng"))
        self.draws = _rng_from(st.get("drng"), f"{plan.seed}:resample:{d}:{epoch}:{c}") if plan.resampled else None
        self.cur: Optional[Piece] = tuple(st["piece"]) if st.get("piece") is not None else None
        self.reader: Optional[ShardReader] = None
        self.it: Optional[Iterator[dict]] = None
        if st.get("r") is not None:
            self.reader = ShardReader.from_state(self.shards[self.cur[0]].url, st["r"], self.cur[2])
        self.buf: list[tuple[Optional[dict], tuple]] = self._restore(st.get("buf") or [])

    def _new_order(self, rng_state: Optional[str] = None) -> None:
        tag = (self.d, self.epoch, self.c) if self.plan.resampled else (self.d, self.epoch, self.c, self.p)
        self.rng = _rng_from(rng_state, ":".join(map(str, (self.plan.seed, "shuffle") + tag)))
        self.order = None if self.plan.resampled else self.plan.pass_order(self.d, self.epoch, self.c, self.p)

    def _restore(self, refs: list) -> list[tuple[Optional[dict], tuple]]:
        """A saved buffer back from its references. Samples of local uncompressed tars (byte offset
        known) are read when drawn (a seek and a few reads each): the first batch after a resume
        costs about what it costs fresh. The others are read now, each shard in one pass."""
        out: list[tuple[Optional[dict], tuple]] = [(None, tuple(r)) for r in refs]
        eager: dict[int, list] = collections.defaultdict(list)
        for n, (i, j, off) in enumerate(refs):
            if off is None or is_remote(self.shards[i].url):
                eager[i].append((n, j, off))
        for i, want in eager.items():
            got = read_samples_at(self.shards[i].url, [(j, off) for _, j, off in want])
            for n, j, off in want:
                out[n] = (self._tagged(got.get(j), i, j), (i, j, off))
        return out

    def _tagged(self, s: Optional[dict], i: int, j: int) -> dict:
        if s is None:
            raise DataError(f"resume: sample {j} of {self.shards[i].url} cannot be read again "
                            f"(the shard changed since the checkpoint?)")
        s["__pass__"] = self.p
        return s

    def _pull(self) -> Optional[tuple[dict, tuple]]:
        """The next raw sample of this pass's pieces with its reference; None at the end of the pass."""
        while True:
            if self.reader is None:
                if self.order is None:
                    self.cur = (self.draws.randrange(len(self.shards)), 0, None)
                elif self.si < len(self.order):
                    self.cur = self.order[self.si]
                else:
                    return None
                i, a, b = self.cur
                self.reader = ShardReader(self.shards[i].url, a, None, b)
            if self.it is None:
                self.it = iter(self.reader)
            s = next(self.it, None)
            if s is not None:
                self.n += 1
                s["__pass__"] = self.p
                return s, (self.cur[0], self.reader.j - 1, self.reader.last_offset)
            self._finish_piece()

    def _finish_piece(self) -> None:
        i, a, b = self.cur
        r, url = self.reader, self.shards[i].url
        expected = self.plan.piece_expected(self.d, self.cur)
        if r.j == 0 and a == 0 and expected != 0:
            raise DataError(f"shard {url} is unreadable: no sample could be read"
                            + (f" ({'; '.join(r.problems[:3])})" if r.problems else ""))
        shard_events(url, r.problems, r.j - a, expected, self.events)
        self.reader = self.it = self.cur = None
        self.si += 1

    def _next_pass(self) -> None:
        if self.n == 0:
            raise DataError(f"no readable samples in {[self.shards[i].url for i, _, _ in self.order]}")
        self.p, self.si, self.n, self.end = self.p + 1, 0, 0, False
        self._new_order()

    def _pick(self) -> dict:
        buf = self.buf
        k = self.rng.randint(0, len(buf) - 1)
        s, ref = buf[k]
        buf[k] = buf[-1]
        buf.pop()
        if s is None:                            # restored by reference: read it now
            i, j, off = ref
            s = self._tagged(read_samples_at(self.shards[i].url, [(j, off)]).get(j), i, j)
        s["__ref__"] = ref                       # where it came from (bucket queues save it)
        return s

    def next(self) -> dict:
        while True:
            if not self.bufsize:
                got = self._pull()
                if got is not None:
                    got[0]["__ref__"] = got[1]
                    return got[0]
                self._next_pass()
                continue
            if not self.end:
                got = self._pull()
                if got is None:
                    self.end = True
                else:
                    self.buf.append(got)
                    if len(self.buf) < self.bufsize:
                        more = self._pull()
                        if more is None:
                            self.end = True
                        else:
                            self.buf.append(more)
            if self.buf and (len(self.buf) >= self.initial or self.end):
                return self._pick()
            if self.end:
                self._next_pass()

    def state(self) -> dict:
        return {"p": self.p, "si": self.si, "n": self.n, "end": self.end,
                "piece": list(self.cur) if self.cur is not None else None,
                "r": self.reader.state() if self.reader is not None else None,
                "rng": _rng_state(self.rng) if self.bufsize else None,
                "drng": _rng_state(self.draws) if self.draws is not None else None,
                "buf": [list(ref) for _, ref in self.buf]}


class _EpochStream:
    """The raw samples of consumer c in epoch e: one dataset's stream, or a seeded mix of several."""

    def __init__(self, plan: _Plan, epoch: int, c: int, events: list, state: Optional[dict] = None):
        st = state or {}
        saved = st.get("ds") or [None] * len(plan.datasets)
        self.plan = plan
        self.streams = [_DatasetStream(plan, d, epoch, c, events, saved[d]) for d in range(len(plan.datasets))]
        self.idx = list(range(len(self.streams)))
        self.mix = _rng_from(st.get("mix"), f"{plan.seed}:mix:{epoch}:{c}") if len(self.streams) > 1 else None

    def next(self) -> dict:
        if self.mix is None:
            return self.streams[0].next()
        d = self.mix.choices(self.idx, weights=self.plan.weights)[0]
        s = self.streams[d].next()
        s["__dataset__"] = d
        return s

    def state(self) -> dict:
        return {"ds": [s.state() for s in self.streams],
                "mix": _rng_state(self.mix) if self.mix is not None else None}


def _new_pos(epoch: int) -> dict:
    return {"epoch": epoch, "raw": 0, "batches": 0, "seen": 0, "good": 0, "repeated": 0,
            "bad": {}, "bad_run": 0, "stream": None}


def _check_bad(pos_list: list[dict], cfg, where: str) -> None:
    seen = sum(p["seen"] for p in pos_list)
    bad = sum(sum(p["bad"].values()) for p in pos_list)
    if seen >= max(1, cfg.bad_check_after) and bad > cfg.max_bad_fraction * seen:
        reasons = collections.Counter()
        for p in pos_list:
            reasons.update(p["bad"])
        raise DataError(f"{where}: {bad} of {seen} samples were bad ({bad / seen:.1%} > "
                        f"data.max_bad_fraction={cfg.max_bad_fraction}): {dict(reasons)}. "
                        f"Check the shards with tools.inspect_shards")


# ---------------------------------------------------------------------------------------------
# The per-worker stream (runs in DataLoader workers, or in-process with num_workers=0)
# ---------------------------------------------------------------------------------------------
class _WorkerStream(torch.utils.data.IterableDataset):
    def __init__(self, plan: _Plan, start_step: int, positions: list[dict]):
        super().__init__()
        self.plan = plan
        self.start_step = start_step
        self.positions = positions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        j = info.id if info is not None else 0
        w = (j + self.start_step) % self.plan.W      # logical worker: round-robin continues
        return self._run(w, json.loads(json.dumps(self.positions[w])))

    def _run(self, w: int, pos: dict) -> Iterator[dict]:
        if self.plan.buckets:
            yield from self._run_buckets(w, pos)
            return
        plan, B = self.plan, self.plan.B
        c = plan.rank * plan.W + w
        while True:
            if pos["batches"] >= plan.s:                     # this worker's epoch is done
                pos.update(epoch=pos["epoch"] + 1, raw=0, batches=0, stream=None)
            epoch = pos["epoch"]
            events: list = []
            stream = _EpochStream(plan, epoch, c, events, pos["stream"])   # continues where it stood
            items: list[dict] = []
            while pos["batches"] < plan.s:
                item, _ = self._next_good(w, c, epoch, stream, events, pos)
                items.append(item)
                if len(items) == B:
                    pos["batches"] += 1
                    pos["stream"] = stream.state()
                    batch = _collate(items)
                    items = []
                    batch["__pos__"] = (w, {**pos, "bad": dict(pos["bad"])})
                    yield batch

    def _next_good(self, w: int, c: int, epoch: int, stream: "_EpochStream", events: list,
                   pos: dict) -> tuple[dict, dict]:
        """The next raw sample of ``stream`` that decodes -> (item, raw sample); bad ones counted."""
        plan, cfg = self.plan, self.plan.cfg
        warn_every = max(1, cfg.bad_warn_every)
        while True:
            sample = stream.next()
            pos["raw"] += 1
            for ev in events:                        # shard-level damage
                reason, url, detail, n = ev
                pos["bad"][reason] = pos["bad"].get(reason, 0) + n
                pos["seen"] += n
                log.warning("bad shard data (%s) in %s: %s", reason, url, detail)
            del events[:]
            p = sample.get("__pass__", 0)
            pos["seen"] += 1
            try:
                item = self._decode(sample, epoch)
            except _Reject as r:
                pos["bad"][r.reason] = pos["bad"].get(r.reason, 0) + 1
                nbad = sum(pos["bad"].values())
                if nbad == 1 or nbad % warn_every == 0:
                    log.warning("bad sample (%s) %s in %s: %s [%d bad of %d read by this worker]",
                                r.reason, sample["__key__"], sample.get("__url__"), r.detail,
                                nbad, pos["seen"])
                _check_bad([pos], cfg, f"rank {plan.rank} worker {w}")
                pos["bad_run"] += 1
                if pos["bad_run"] > max(10_000, 3 * plan.group_samples(c)):
                    raise DataError(f"rank {plan.rank} worker {w}: the last {pos['bad_run']} "
                                    f"samples were all bad ({dict(pos['bad'])})")
                continue
            pos["good"] += 1
            pos["bad_run"] = 0
            if p > 0:
                pos["repeated"] += 1
            return item, sample

    def _decode(self, sample: dict, epoch: int) -> dict:
        """decode_sample with the sample's own seeded generator (a function of seed, epoch, pass,
        dataset, shard and key: the same item however often it is read)."""
        plan = self.plan
        p, d = sample.get("__pass__", 0), sample.get("__dataset__", 0)
        rng = _sample_rng(plan.seed, epoch, p, d, os.path.basename(sample.get("__url__", "")), sample["__key__"])
        return decode_sample(sample, plan.cfg, rng, plan.emb_dims, plan.caption_lines[d], plan.buckets or None,
                             plan.latents)

    # -- aspect-ratio buckets --------------------------------------------------------------------
    def _run_buckets(self, w: int, pos: dict) -> Iterator[dict]:
        """Batches of one bucket each (``buckets.BucketBatcher``), still ``s`` per worker epoch.

        The samples feeding the batcher ("the feed") and the batches coming out are counted apart:
        the feed takes ``s * B`` good samples from epoch e's stream (as the fixed-size path does),
        then goes on with epoch e+1's stream; batch epoch e ends after its ``s``-th batch, which may
        need samples of the feed's next epoch (at most buckets x (B - 1) wait in the queues). The
        position holds the feed's epoch, count and stream state, and the queues as references
        ``[feed epoch, dataset, pass, shard, sample index, byte offset]``: a resume re-reads and
        re-decodes those (the decode is a function of the reference) and continues exactly."""
        plan, B = self.plan, self.plan.B
        c = plan.rank * plan.W + w
        batcher = BucketBatcher(B, plan.buckets)
        pos.setdefault("feed_epoch", pos["epoch"])
        pos.setdefault("feed_good", 0)
        if pos.get("buckets"):
            batcher.load_state_dict(pos["buckets"])
            for ref, item in self._reload(batcher.missing()):
                batcher.fill(ref, item)
        quota = plan.s * B
        while True:
            if pos["feed_good"] >= quota:                    # the feed's epoch is used up
                pos.update(feed_epoch=pos["feed_epoch"] + 1, feed_good=0, raw=0, stream=None)
            fe = pos["feed_epoch"]
            events: list = []
            stream = _EpochStream(plan, fe, c, events, pos["stream"])
            while pos["feed_good"] < quota:
                item, sample = self._next_good(w, c, fe, stream, events, pos)
                pos["feed_good"] += 1
                i, j, off = sample["__ref__"]
                ref = [fe, sample.get("__dataset__", 0), sample.get("__pass__", 0), i, j, off]
                out = batcher.add(ref, item["bucket"], item)
                if out is None:
                    continue
                if pos["batches"] >= plan.s:             # the batch epoch rolls over
                    pos.update(epoch=pos["epoch"] + 1, batches=0)
                pos["batches"] += 1
                pos["stream"] = stream.state()
                pos["buckets"] = batcher.state_dict()
                batch = _collate([it for _, it in out])
                batch["__pos__"] = (w, json.loads(json.dumps(pos)))
                yield batch

    def _reload(self, refs: list) -> list[tuple[list, dict]]:
        """Queued references -> (ref, item), each shard read once (seeks to the saved offsets)."""
        by_shard: dict[tuple[int, int], list] = collections.defaultdict(list)
        for ref in refs:
            by_shard[(ref[1], ref[3])].append(ref)
        out = []
        for (d, i), rs in by_shard.items():
            url = self.plan.datasets[d][i].url
            got = read_samples_at(url, [(r[4], r[5]) for r in rs])
            for r in rs:
                s = got.get(r[4])
                if s is None:
                    raise DataError(f"resume: sample {r[4]} of {url} cannot be read again "
                                    f"(the shard changed since the checkpoint?)")
                s = dict(s, __pass__=r[2])
                if len(self.plan.datasets) > 1:
                    s["__dataset__"] = d
                try:
                    out.append((r, self._decode(s, r[0])))
                except _Reject as e:
                    raise DataError(f"resume: queued sample {r[4]} of {url} no longer decodes "
                                    f"({e.reason}: {e.detail})") from None
        return out


# ---------------------------------------------------------------------------------------------
# The loader the trainer holds
# ---------------------------------------------------------------------------------------------
class ShardLoader:
    """An endless iterator of batches with an exact-resume position. See the module docstring."""

    def __init__(self, cfg, batch_size: int, rank: int, world_size: int, seed: int, epoch: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not cfg.urls:
            raise ValueError("data.urls is empty: give shard paths, brace patterns or a shards.json")
        for u in cfg.urls:
            if str(u).strip().startswith("pipe:") and not cfg.allow_pipe:
                raise ValueError(f"data.urls has a pipe: URL ({u!r}), which runs a shell command; "
                                 f"set data.allow_pipe=true to allow it")
        if cfg.weights and len(cfg.weights) != len(cfg.urls):
            raise ValueError(f"data.weights has {len(cfg.weights)} entries for {len(cfg.urls)} data.urls")
        if cfg.weights and (min(cfg.weights) < 0 or sum(cfg.weights) <= 0):
            raise ValueError(f"data.weights must be >= 0 with a positive sum, got {cfg.weights}")
        self.cfg = cfg
        specs = [[u] for u in cfg.urls] if cfg.weights else [list(cfg.urls)]
        datasets, manifests = [], []
        for spec in specs:
            shards, m = expand_spec(spec, allow_pipe=cfg.allow_pipe, cache_dir=cfg.count_cache or None)
            if not shards:
                raise DataError(f"no shards in {spec}")
            missing = [sh.url for sh in shards if not is_remote(sh.url) and not os.path.exists(local_path(sh.url))]
            if missing:
                raise DataError(f"{len(missing)} of {len(shards)} shards missing: {', '.join(missing[:5])}"
                                + (" ..." if len(missing) > 5 else ""))
            datasets.append(shards)
            manifests.append(m)
        self.manifests = manifests
        self.manifest = manifests[0]
        emb_dims = None
        self.embeddings = None
        if cfg.use_embeddings:
            infos = [(m or {}).get("embeddings") for m in manifests]
            if any(i is None for i in infos):
                raise DataError("data.use_embeddings: the shards' shards.json has no 'embeddings' entry; "
                                "run tools.precompute_text first")
            keyed = {json.dumps({k: i.get(k) for k in ("encoder", "L", "D")}, sort_keys=True) for i in infos}
            if len(keyed) > 1:
                raise DataError(f"data.use_embeddings: the datasets were encoded differently: {keyed}")
            self.embeddings = infos[0]
            emb_dims = (int(infos[0]["L"]), int(infos[0]["D"]))
        caption_lines = [cfg.captions == "lines" or (cfg.captions == "auto" and manifest_caption_lines(m))
                         for m in manifests]
        weights = [float(w) for w in cfg.weights] if cfg.weights else None
        self.plan = _Plan(cfg, datasets, weights, batch_size, rank, world_size, seed, emb_dims, caption_lines)
        self.latents = None
        if cfg.latents:               # precomputed VAE posteriors (framework/vae.py, tools/precompute_latents)
            from framework.models.vae import LatentSpec
            self.latents = self.plan.latents = LatentSpec.from_manifests(manifests, cfg.latent_scaling_factor)
            _check_latent_buckets(manifests, self.plan.buckets)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers = max(0, cfg.num_workers)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.dropped_per_epoch = self.plan.dropped_per_epoch
        self._it: Optional[Iterator] = None
        self._loader = None
        self._reset(epoch * self.steps_per_epoch, [_new_pos(epoch) for _ in range(self.plan.W)])
        if rank == 0:
            log.info("%s", self.summary())

    def summary(self) -> str:
        """One line for the start of a run: samples, readers, steps per epoch, what is left out."""
        p = self.plan
        n = sum(len(ds) for ds in p.datasets)
        line = (f"data: {n} shards, {p.total if p.total is not None else 'unknown'} samples; "
                f"{p.R} ranks x {p.W} workers, {p.s} batches of {p.B} per reader, "
                f"{self.steps_per_epoch} steps per epoch")
        if p.total and self.dropped_per_epoch:
            line += (f"; {self.dropped_per_epoch} samples ({100 * self.dropped_per_epoch / p.total:.2f}%) left out "
                     f"per epoch (equal steps on every rank; < 1 batch per reader)")
        if p.buckets:
            line += (f"; {len(p.buckets)} aspect-ratio buckets ({', '.join(bucket_name(b) for b in p.buckets[:8])}"
                     f"{' ...' if len(p.buckets) > 8 else ''}), batches of one bucket")
        return line

    def bucket_histogram(self) -> dict[str, int]:
        """Images this rank's consumed batches held per bucket ({"bucket/HxW": n}; empty without buckets)."""
        out: dict[str, int] = {}
        for p in self.positions:
            for name, n in ((p.get("buckets") or {}).get("emitted") or {}).items():
                out["bucket/" + name] = out.get("bucket/" + name, 0) + int(n)
        return out

    # -- iteration -------------------------------------------------------------------------------
    def _reset(self, step: int, positions: list[dict]) -> None:
        self.close()
        self.step = step
        self.positions = positions

    def _start(self) -> None:
        ds = _WorkerStream(self.plan, self.step, self.positions)
        if self.num_workers == 0:
            self._it = iter(ds)
            return
        self._loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
            pin_memory=torch.cuda.is_available(), prefetch_factor=2)
        self._it = iter(self._loader)

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        batch = next(self._it)
        w, pos = batch.pop("__pos__")
        expected = self.step % self.plan.W
        if w != expected:    # cannot happen with torch's in-order round robin; never continue silently
            raise RuntimeError(f"data loader order broken: batch from worker {w}, expected {expected}")
        self.positions[w] = pos
        self.step += 1
        _check_bad(self.positions, self.cfg, f"rank {self.rank}")
        if self.plan.buckets and self.rank == 0 and self.step % self.steps_per_epoch == 0:
            log.info("data: images per aspect-ratio bucket so far (rank 0):\n%s",
                     format_histogram(self.bucket_histogram()))
        return batch

    def close(self) -> None:
        """Stop the worker processes (the next ``next()`` restarts them at the current position)."""
        it, self._it, self._loader = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    # -- resume ----------------------------------------------------------------------------------
    def _topology(self) -> dict:
        return {"batch_size": self.batch_size, "world_size": self.world_size, "num_workers": self.plan.W,
                "seed": self.seed, "steps_per_epoch": self.steps_per_epoch,
                "fingerprint": self.plan.fingerprint}

    def state_dict(self) -> dict:
        """Plain ints/strings (JSON- and ``torch.load(weights_only=True)``-safe): the global step
        and, per logical worker, its position after the last CONSUMED batch (counters and where
        its stream stands, the shuffle buffer as references: a few numbers per buffered sample).
        The positions are this rank's: save it per rank (the step is the same on all)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step % self.steps_per_epoch, "rank": self.rank,
                **self._topology(), "workers": json.loads(json.dumps(self.positions))}

    def _restart_epoch(self, e: int) -> None:
        self._reset(e * self.steps_per_epoch, [_new_pos(e) for _ in range(self.plan.W)])

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly where ``sd`` was taken. ``{"epoch": e}`` alone starts epoch e afresh
        (e.g. after a change of world size). A state from a different topology (batch size, world
        size, workers, seed, shards) or an older format cannot be continued exactly: it warns and
        starts the epoch after the saved one."""
        if "workers" not in sd or "step" not in sd:
            self._restart_epoch(int(sd.get("epoch", 0)))
            return
        mine = self._topology()
        diff = {k: (sd.get(k), v) for k, v in mine.items() if sd.get(k) != v}
        if int(sd.get("version", 0)) != STATE_VERSION:
            diff["version"] = (sd.get("version"), STATE_VERSION)
        if diff:
            e = int(sd["epoch"]) + 1
            log.warning("data loader state from a different setup (%s: saved vs now): cannot resume "
                        "exactly; starting epoch %d", diff, e)
            self._restart_epoch(e)
            return
        workers = [dict(p) for p in sd["workers"]]
        if len(workers) != self.plan.W:
            raise ValueError(f"state has {len(workers)} worker positions, expected {self.plan.W}")
        self._reset(int(sd["step"]), workers)

    # -- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Flat numbers (the trainer logs them as data/<key>): samples, bad by reason, ..."""
        bad = collections.Counter()
        for p in self.positions:
            bad.update(p["bad"])
        seen = sum(p["seen"] for p in self.positions)
        out = {"step": self.step, "epoch": self.epoch, "samples": self.step * self.batch_size,
               "read": seen, "bad": sum(bad.values()),
               "bad_fraction": (sum(bad.values()) / seen) if seen else 0.0,
               "repeated": sum(p["repeated"] for p in self.positions),
               "dropped_per_epoch": self.dropped_per_epoch, "steps_per_epoch": self.steps_per_epoch}
        for r in BAD_REASONS:
            out[f"bad_{r}"] = bad.get(r, 0)
        out.update(self.bucket_histogram())
        return out

    def epoch_assignment(self, epoch: int, dataset: int = 0) -> dict[tuple[int, int], list[str]]:
        return self.plan.epoch_assignment(epoch, dataset)

    def epoch_pieces(self, epoch: int, dataset: int = 0) -> dict[tuple[int, int], list[tuple[str, int, Optional[int]]]]:
        return self.plan.epoch_pieces(epoch, dataset)

    def null_condition(self):
        """The null (unconditional) condition recorded by precompute_text: a ``Condition`` with
        ctx (1,L,D), mask (1,L) [, pooled (1,P)] -- the one to use in null-text dropout and CFG."""
        if not self.embeddings or not self.manifest:
            raise DataError("null_condition(): these shards carry no precomputed embeddings")
        from framework.models.text import Condition

        base = url_dir(self.plan.datasets[0][0].url)
        e = self.embeddings

        def load(name):
            from webdataset.gopen import gopen
            with gopen(join_url(base, name)) as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)

        ctx = torch.from_numpy(load(e["null_emb"]).astype(np.float32))[None]
        mask = torch.from_numpy(load(e["null_mask"]).astype(bool))[None]
        pooled = torch.from_numpy(load(e["null_pooled"]).astype(np.float32))[None] if e.get("null_pooled") else None
        return Condition(ctx=ctx, mask=mask, pooled=pooled)


def build_loader(cfg, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0) -> ShardLoader:
    """The training data: an endless iterator of batches (see the module docstring)."""
    return ShardLoader(cfg, batch_size, rank, world_size, seed, epoch)
