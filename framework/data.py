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
    holding one. Per-shard sample counts come from the manifest (for plain local tars without one,
    by scanning the tar headers). Several entries without ``cfg.weights`` form one dataset;
    with weights each entry is a dataset and samples are mixed by a seeded draw per sample.

Who reads what (the plan)
    A rank has W logical workers (``num_workers``, 1 when 0); consumer ``c = rank * W + worker``.
    The shards are partitioned once into ``world * W`` groups balanced by sample count (largest
    first onto the lightest group). Epoch e gives group ``perm_e[c]`` to consumer c (``perm_e`` a
    permutation seeded by seed and e when ``shardshuffle``) and reads its shards in an order seeded
    by (seed, e, c). So within an epoch no two consumers (ranks x workers) read the same shard.
    Each consumer's samples go through a shuffle buffer (webdataset's ``shuffle``, seeded by
    (seed, e, c)), are decoded, and are batched INSIDE the worker.

Equal steps on every rank
    Every worker yields exactly ``s`` batches per epoch and every rank ``steps_per_epoch = s * W``,
    whatever the shard sizes. With ``samples_per_epoch == 0`` (finite, not resampled, one dataset),
    ``s = min over consumers of floor(samples in its group / batch)``: the surplus of the larger
    groups is dropped each epoch (``loader.dropped_per_epoch``). Otherwise
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
    position (epoch, raw samples drawn, batches done, counters). ``state_dict()`` holds the step and
    the position of every worker after the last batch the trainer CONSUMED (not the prefetched
    ones). On ``load_state_dict`` the DataLoader is restarted; DataLoader worker j plays logical
    worker ``(j + step) % W``, re-opens its epoch stream and fast-forwards the raw samples it had
    drawn WITHOUT decoding them (tar reading and the shuffle buffer only). Bad samples are found at
    decode time, so a position counts raw samples, not good ones: skips replay exactly.

Bad samples
    Undecodable image, missing caption or image, empty member, wrong shape, corrupt tar member
    (fewer samples readable than the manifest says) are skipped and counted by reason
    (``loader.stats()``), with a warning naming shard and key (the first, then every
    ``bad_warn_every``-th). Once ``bad_check_after`` samples were read, a bad fraction above
    ``max_bad_fraction`` aborts with ``DataError``. A missing or unreadable shard is a ``DataError``
    naming it.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

__all__ = ["build_loader", "ShardLoader", "DataError", "Shard", "expand_spec", "iter_shard_samples",
           "decode_sample", "STATE_VERSION"]

log = logging.getLogger(__name__)
STATE_VERSION = 1
MANIFEST = "shards.json"
BAD_REASONS = ("decode", "no_image", "no_caption", "empty_file", "shape", "no_embedding", "corrupt_tar",
               "no_latent")


class DataError(ValueError):
    """A data problem the run cannot continue past (missing shard, too many bad samples, ...)."""


@dataclass(frozen=True)
class Shard:
    url: str
    count: Optional[int]       # samples, from the manifest (None: unknown)


# ---------------------------------------------------------------------------------------------
# Shard lists
# ---------------------------------------------------------------------------------------------
def _is_remote(url: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", url)) and not url.startswith("file:")


def _local_path(url: str) -> str:
    return re.sub(r"^file://?", "/", url) if url.startswith("file:") else url


def _count_tar(path: str) -> int:
    """Samples in a local tar (distinct keys of consecutive members), by reading headers only."""
    from webdataset.tariterators import base_plus_ext

    n, last = 0, None
    with tarfile.open(path, mode="r:", ignore_zeros=True) as tf:
        for ti in tf:
            if not ti.isreg():
                continue
            prefix, _ = base_plus_ext(ti.name)
            if prefix is not None and prefix != last:
                n += 1
                last = prefix
    return n


def _read_manifest_file(path: str) -> dict:
    if _is_remote(path):
        from webdataset.gopen import gopen
        with gopen(path) as f:
            m = json.loads(f.read())
    else:
        with open(_local_path(path), encoding="utf-8") as f:
            m = json.load(f)
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        raise DataError(f"{path}: not a shard manifest (no 'shards' list)")
    return m


def _join(base: str, url: str) -> str:
    if _is_remote(url) or os.path.isabs(url):
        return url
    return base.rstrip("/") + "/" + url if _is_remote(base) else os.path.join(base, url)


def expand_spec(spec: Union[str, Sequence[str]], allow_pipe: bool = True,
                count_local: bool = True) -> tuple[list[Shard], Optional[dict]]:
    """A shard spec -> (shards with counts, the manifest if one was found).

    ``spec``: a path, brace pattern or URL, a ``shards.json`` (or a folder with one), ``a::b``
    (several), or a list of those. Brace patterns are expanded with ``braceexpand``. For local tars
    the counts come from a ``shards.json`` beside them, else from their headers."""
    import braceexpand

    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for s in items for p in str(s).split("::") if p.strip()]
    shards: list[Shard] = []
    manifest: Optional[dict] = None
    for part in parts:
        if part.startswith("pipe:") and not allow_pipe:
            raise ValueError(f"pipe: URL {part!r} runs a shell command; set data.allow_pipe=true to allow it")
        local = not _is_remote(part)
        if part.endswith(".json") or (local and os.path.isdir(_local_path(part))):
            mpath = os.path.join(_local_path(part), MANIFEST) if local and os.path.isdir(_local_path(part)) else part
            if local and not os.path.exists(_local_path(mpath)):
                raise DataError(f"shard manifest {mpath} not found")
            m = _read_manifest_file(mpath)
            base = os.path.dirname(os.path.abspath(_local_path(mpath))) if local else mpath.rsplit("/", 1)[0]
            for sh in m["shards"]:
                shards.append(Shard(_join(base, sh["url"]), sh.get("count")))
            manifest = manifest or m
            continue
        urls = list(braceexpand.braceexpand(part))
        counts: dict[str, int] = {}
        if local:
            d = os.path.dirname(os.path.abspath(_local_path(urls[0])))
            mp = os.path.join(d, MANIFEST)
            if os.path.exists(mp):
                try:
                    m = _read_manifest_file(mp)
                    counts = {os.path.basename(s["url"]): s.get("count") for s in m["shards"]}
                    manifest = manifest or m
                except (ValueError, OSError):
                    counts = {}
        for u in urls:
            c = counts.get(os.path.basename(u)) if local else None
            if local and c is None and count_local and os.path.exists(_local_path(u)):
                try:
                    c = _count_tar(_local_path(u))
                except (tarfile.TarError, OSError):
                    c = None
            shards.append(Shard(u, c))
    return shards, manifest


# ---------------------------------------------------------------------------------------------
# Reading one shard: webdataset's gopen + group_by_keys, a tolerant member iterator
# ---------------------------------------------------------------------------------------------
_ZERO_BLOCK = bytes(512)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:                     # GNU base-256
        return int.from_bytes(field[1:], "big")
    return int(field.replace(b"\0", b" ").strip() or b"0", 8)


def _pax_path(data: bytes) -> Optional[str]:
    i = 0
    while i < len(data):
        sp = data.index(b" ", i)
        n = int(data[i:sp])
        key, _, value = data[sp + 1:i + n - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        i += n
    return None


class _Prefixed(io.RawIOBase):
    """A stream with some already-read bytes put back in front (for tarfile's fallback)."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.rest.read(len(b))
        b[:len(data)] = data
        return len(data)


def _tar_members(f, url: str, problems: list) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream, in order.

    Uncompressed tar (what webdataset writes): a direct ustar/GNU/pax header parser, several times
    faster than ``tarfile`` per member, with ``tarfile``'s ``ignore_zeros`` recovery: a block whose
    header checksum fails is skipped, so one damaged header loses one member, not the shard.
    Compressed tars go through ``tarfile`` (``r|*``). Problems are appended to ``problems``."""
    hdr = f.read(512)
    if hdr.startswith(_COMPRESSED):
        try:
            tf = tarfile.open(fileobj=_Prefixed(hdr, f), mode="r|*", ignore_zeros=True)
        except Exception as e:
            raise DataError(f"shard {url} is unreadable: {e!r}") from e
        try:
            for ti in tf:
                if ti.isreg():
                    data = tf.extractfile(ti).read()
                    if len(data) != ti.size:
                        problems.append(f"{ti.name}: truncated")
                        return
                    yield ti.name, data
                tf.members = []
        except Exception as e:
            problems.append(repr(e))
        return
    long_name: Optional[str] = None
    in_bad_run = False
    end_marker = False
    while True:
        if len(hdr) < 512:
            if hdr:
                problems.append("truncated tar header")
            elif not end_marker:
                problems.append("truncated (no end-of-archive blocks)")
            return
        if hdr == _ZERO_BLOCK:
            end_marker = True
        else:
            end_marker = False
            try:
                chk = _tar_number(hdr[148:156])
                ok = chk == sum(hdr[:148]) + 256 + sum(hdr[156:])
                size = _tar_number(hdr[124:136]) if ok else 0
            except ValueError:
                ok = False
            if not ok:
                if not in_bad_run:
                    problems.append("damaged tar header (skipped)")
                in_bad_run = True
            else:
                in_bad_run = False
                name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                if hdr[257:263] == b"ustar\x00":
                    prefix = hdr[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix.decode("utf-8", "replace") + "/" + name
                typ = hdr[156:157]
                data = f.read(size)
                if len(data) < size:
                    problems.append(f"{name}: truncated")
                    return
                pad = -size % 512
                if pad and len(f.read(pad)) < pad:
                    problems.append(f"{name}: truncated")
                    if typ in (b"0", b"\0", b"7"):
                        yield (long_name or name), data      # its bytes are complete
                    return
                if typ == b"x":                           # pax header of the next member
                    long_name = _pax_path(data) or long_name
                elif typ == b"L":                         # GNU long name of the next member
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                elif typ in (b"0", b"\0", b"7"):
                    yield (long_name or name), data
                    long_name = None
                elif typ != b"g":
                    long_name = None                      # directories, links, ...: skipped
        hdr = f.read(512)


def iter_shard_samples(url: str, events: Optional[list] = None, expected: Optional[int] = None
                       ) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one shard.

    Opening is webdataset's ``gopen`` (local, http(s) via curl, pipe:); grouping is its
    ``group_by_keys``. Members are read with ``ignore_zeros`` so that one damaged header loses one
    member, not the rest of the shard. Damage is appended to ``events`` as
    ``("corrupt_tar", url, detail, n_lost)``; with ``expected`` (the manifest count) a shortfall is
    reported as lost samples. A shard that cannot be opened at all raises ``DataError``."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys

    events = events if events is not None else []
    try:
        stream = gopen(url)
    except Exception as e:
        raise DataError(f"shard {url} is missing or unreadable: {e}") from e
    problems: list[str] = []

    def members():
        try:
            for name, data in _tar_members(stream, url, problems):
                if "/" not in name and name.startswith("__") and name.endswith("__"):
                    continue
                yield {"fname": name, "data": data, "__url__": url}
        finally:
            try:
                stream.close()
            except Exception as e:   # a pipe: command that failed reports here
                problems.append(repr(e))

    def handler(exn: Exception) -> bool:
        problems.append(repr(exn))
        return True

    n = 0
    for sample in group_by_keys(members(), handler=handler):
        n += 1
        yield sample
    if n == 0 and expected != 0:
        raise DataError(f"shard {url} is unreadable: no sample could be read"
                        + (f" ({'; '.join(problems[:3])})" if problems else f" (the manifest says {expected})"))
    lost = (expected - n) if expected is not None and n < expected else 0
    if problems or lost:
        events.append(("corrupt_tar", url, "; ".join(problems[:3]) or f"{n} of {expected} samples readable",
                       lost if expected is not None else max(1, len(problems))))


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


def _captions_of(raw: bytes, key: str) -> list[str]:
    text = raw.decode("utf-8", errors="replace")
    if key in ("json", "jsn") or text.lstrip().startswith("["):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            obj = obj.get("captions", obj.get("caption"))
        if isinstance(obj, str):
            obj = [obj]
        if isinstance(obj, list):
            return [" ".join(str(c).split()) for c in obj if str(c).strip()]
        if key in ("json", "jsn"):
            return []
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _to_image(data: bytes, cfg, rng: random.Random) -> np.ndarray:
    """bytes -> (C, S, S) uint8: decode, mode, resize shorter side, crop, flip."""
    size = cfg.image_size
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":       # let libjpeg decode at a reduced scale (>= the target size)
        im.draft("L" if cfg.channels == 1 else "RGB", (size, size))
    im.load()
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    mode = "L" if cfg.channels == 1 else "RGB"
    if im.mode != mode:
        im = im.convert(mode)
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


def decode_sample(sample: dict, cfg, rng: random.Random, emb_dims: Optional[tuple] = None,
                  latents=None) -> dict:
    """A raw sample -> {"image", "caption", "key", "label"[, "ctx", "ctx_mask", "pooled"]}.
    With ``latents`` (a ``vae.LatentSpec``, data.latents) "image" is a latent draw z0 (c,h,w) from the
    sample's stored posterior instead of a decoded image. Raises ``_Reject(reason)`` for a bad sample."""
    image_keys = [k.strip().lower() for k in cfg.image_keys.split(";") if k.strip()]
    ext = next((k for k in image_keys if k in sample), None)
    if ext is None and latents is None:
        raise _Reject("no_image", f"no member of {image_keys}")
    if cfg.caption_key not in sample:
        raise _Reject("no_caption", f"no .{cfg.caption_key}")
    if (ext is not None and len(sample[ext]) == 0) or len(sample[cfg.caption_key]) == 0:
        raise _Reject("empty_file", f".{ext if ext is not None and not sample[ext] else cfg.caption_key} is empty")
    caps = _captions_of(sample[cfg.caption_key], cfg.caption_key)
    if not caps:
        raise _Reject("no_caption", "blank caption")
    k = rng.randrange(len(caps)) if len(caps) > 1 else 0
    out: dict[str, Any] = {"key": sample["__key__"], "caption": caps[k], "label": -1}
    if latents is not None:       # [latent path] z0 = scaled draw from the stored posterior (framework/vae.py)
        try:
            out["image"] = latents.draw(sample, rng)
        except ValueError as e:
            raise _Reject(getattr(e, "reason", "shape"), str(e)) from None
    elif ext == "npy":
        try:
            arr = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
        except Exception as e:
            raise _Reject("decode", repr(e)) from None
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if arr.shape != want:
            raise _Reject("shape", f"npy shape {arr.shape}, expected {want}")
        out["image"] = arr.astype(np.float32)
    else:
        try:
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
        from .shards import unpack_embedding
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
    return batch


# ---------------------------------------------------------------------------------------------
# The plan: who reads which shards, how many batches per epoch
# ---------------------------------------------------------------------------------------------
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


class _Plan:
    """Everything a worker needs, picklable: shard lists, groups, quotas, seeds."""

    def __init__(self, cfg, datasets: list[list[Shard]], weights: Optional[list[float]], batch_size: int,
                 rank: int, world_size: int, seed: int, emb_dims: Optional[tuple]):
        self.cfg = cfg
        self.datasets = datasets
        self.weights = weights
        self.B, self.rank, self.R, self.seed = batch_size, rank, world_size, seed
        self.W = max(1, cfg.num_workers)
        self.C = self.R * self.W
        self.emb_dims = emb_dims
        self.latents = None           # a vae.LatentSpec with data.latents (set by ShardLoader)
        self.resampled = bool(cfg.resampled)
        self.groups: list[list[list[int]]] = []
        for d, shards in enumerate(datasets):
            counts = [s.count if s.count is not None else 1 for s in shards]
            if self.resampled:
                self.groups.append([list(range(len(shards)))] * self.C)
                continue
            if len(shards) < self.C:
                raise DataError(
                    f"dataset {d} has {len(shards)} shards for {self.R} ranks x {self.W} workers = "
                    f"{self.C} readers: every reader needs its own shard(s). Write more, smaller shards "
                    f"(tools.make_shards --max-count), lower data.num_workers, or set data.resampled=true")
            self.groups.append(_balanced_groups(counts, self.C))
        known = all(s.count is not None for ds in datasets for s in ds)
        spe = cfg.samples_per_epoch
        self.dropped_per_epoch = 0
        if spe <= 0 and not self.resampled and len(datasets) == 1:
            if not known:
                raise DataError("shard sample counts are unknown (no shards.json beside remote/pipe "
                                "shards): set data.samples_per_epoch")
            counts = [s.count for s in datasets[0]]
            group_n = [sum(counts[i] for i in g) for g in self.groups[0]]
            self.s = min(n // batch_size for n in group_n)
            if self.s == 0:
                raise DataError(f"the smallest reader group has {min(group_n)} samples, fewer than one "
                                f"batch of {batch_size}: lower the batch size or data.num_workers")
            self.dropped_per_epoch = sum(counts) - self.s * batch_size * self.C
        else:
            if spe <= 0:
                if self.resampled or not known:
                    raise DataError("data.samples_per_epoch is required for resampled streams and for "
                                    "shards without known counts")
                spe = sum(s.count for ds in datasets for s in ds)
            self.s = max(1, spe // (self.C * batch_size))
        self.steps_per_epoch = self.s * self.W
        ident = {"datasets": [[(os.path.basename(s.url), s.count) for s in ds] for ds in datasets],
                 "weights": weights, "resampled": self.resampled, "spe": cfg.samples_per_epoch,
                 "shardshuffle": cfg.shardshuffle, "shuffle_buffer": cfg.shuffle_buffer}
        self.fingerprint = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    # -- assignment --------------------------------------------------------------------------
    def group_of(self, d: int, epoch: int, c: int) -> list[int]:
        """Shard indices of dataset d read by consumer c in epoch e (in reading order, pass 0)."""
        g = c
        if self.cfg.shardshuffle:
            perm = list(range(self.C))
            random.Random(f"{self.seed}:groups:{d}:{epoch}").shuffle(perm)
            g = perm[c]
        return list(self.groups[d][g])

    def group_samples(self, c: int) -> int:
        """Samples (known counts) in consumer c's largest group over datasets."""
        return max(sum(self.datasets[d][i].count or 0 for i in self.groups[d][c % len(self.groups[d])])
                   for d in range(len(self.datasets)))

    def epoch_assignment(self, epoch: int, d: int = 0) -> dict[tuple[int, int], list[str]]:
        """{(rank, worker): shard urls} of an epoch (pass 0), for inspection and tests."""
        return {(c // self.W, c % self.W): [self.datasets[d][i].url for i in self.group_of(d, epoch, c)]
                for c in range(self.C)}

    # -- raw streams -----------------------------------------------------------------------------
    def _shuffled(self, src: Iterator[dict], *tag: Any) -> Iterator[dict]:
        from webdataset.filters import _shuffle

        buf = self.cfg.shuffle_buffer
        if buf and buf > 1:
            return _shuffle(src, bufsize=buf, initial=min(buf, 100),
                            rng=random.Random(":".join(map(str, (self.seed, "shuffle") + tag))))
        return src

    def _shard_samples(self, shards: Sequence[Shard], p: int, events: list) -> Iterator[dict]:
        for sh in shards:
            for s in iter_shard_samples(sh.url, events, sh.count):
                s["__pass__"] = p
                yield s

    def _dataset_stream(self, d: int, epoch: int, c: int, events: list) -> Iterator[dict]:
        """Dataset d's raw samples for consumer c in epoch e, shuffled, endless. A finite group is
        read pass after pass; each pass is shuffled on its own, so pass p+1 starts only when every
        sample of pass p was given out (no sample twice before all were seen once)."""
        shards = self.datasets[d]
        if self.resampled:
            rng = random.Random(f"{self.seed}:resample:{d}:{epoch}:{c}")

            def draws():
                while True:
                    yield shards[rng.randrange(len(shards))]
            yield from self._shuffled(
                (s for sh in draws() for s in self._shard_samples([sh], 0, events)), d, epoch, c)
            return
        base = self.group_of(d, epoch, c)
        p = 0
        while True:
            order = list(base)
            if self.cfg.shardshuffle:
                random.Random(f"{self.seed}:order:{d}:{epoch}:{c}:{p}").shuffle(order)
            n = 0
            for s in self._shuffled(self._shard_samples([shards[i] for i in order], p, events), d, epoch, c, p):
                n += 1
                yield s
            if n == 0:
                raise DataError(f"no readable samples in {[shards[i].url for i in order]}")
            p += 1

    def epoch_stream(self, epoch: int, c: int, events: list) -> Iterator[dict]:
        """The raw samples of consumer c in epoch e: deterministic, endless (passes repeat)."""
        streams = [self._dataset_stream(d, epoch, c, events) for d in range(len(self.datasets))]
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(f"{self.seed}:mix:{epoch}:{c}")
        idx = list(range(len(streams)))
        while True:
            d = rng.choices(idx, weights=self.weights)[0]
            s = next(streams[d])
            s["__dataset__"] = d
            yield s


def _new_pos(epoch: int) -> dict:
    return {"epoch": epoch, "raw": 0, "batches": 0, "seen": 0, "good": 0, "repeated": 0,
            "bad": {}, "bad_run": 0}


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
        plan, cfg, B = self.plan, self.plan.cfg, self.plan.B
        c = plan.rank * plan.W + w
        warn_every = max(1, cfg.bad_warn_every)
        while True:
            if pos["batches"] >= plan.s:                     # this worker's epoch is done
                pos.update(epoch=pos["epoch"] + 1, raw=0, batches=0)
            epoch = pos["epoch"]
            events: list = []
            stream = plan.epoch_stream(epoch, c, events)
            try:
                for _ in range(pos["raw"]):                  # fast-forward: no decode
                    next(stream)
                del events[:]
                items: list[dict] = []
                while pos["batches"] < plan.s:
                    sample = next(stream)
                    pos["raw"] += 1
                    for ev in events:                        # shard-level damage
                        reason, url, detail, n = ev
                        pos["bad"][reason] = pos["bad"].get(reason, 0) + n
                        pos["seen"] += n
                        log.warning("bad shard data (%s) in %s: %s", reason, url, detail)
                    del events[:]
                    p = sample.get("__pass__", 0)
                    pos["seen"] += 1
                    rng = _sample_rng(plan.seed, epoch, p, sample.get("__dataset__", 0),
                                      os.path.basename(sample.get("__url__", "")), sample["__key__"])
                    try:
                        item = decode_sample(sample, cfg, rng, plan.emb_dims, plan.latents)
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
                    items.append(item)
                    if len(items) == B:
                        pos["batches"] += 1
                        batch = _collate(items)
                        items = []
                        batch["__pos__"] = (w, json.loads(json.dumps(pos)))
                        yield batch
            finally:
                stream.close()


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
            shards, m = expand_spec(spec, allow_pipe=cfg.allow_pipe)
            if not shards:
                raise DataError(f"no shards in {spec}")
            missing = [sh.url for sh in shards if not _is_remote(sh.url) and not os.path.exists(_local_path(sh.url))]
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
        weights = [float(w) for w in cfg.weights] if cfg.weights else None
        self.plan = _Plan(cfg, datasets, weights, batch_size, rank, world_size, seed, emb_dims)
        self.latents = None
        if getattr(cfg, "latents", False):   # [latent path] precomputed VAE posteriors (framework/vae.py)
            from .vae import LatentSpec
            self.latents = self.plan.latents = LatentSpec.from_manifests(manifests, cfg.latent_scaling_factor)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers = max(0, cfg.num_workers)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.dropped_per_epoch = self.plan.dropped_per_epoch
        self._it: Optional[Iterator] = None
        self._loader = None
        self._reset(epoch * self.steps_per_epoch, [_new_pos(epoch) for _ in range(self.plan.W)])

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
        """Plain ints/strings (JSON- and ``torch.load(weights_only=True)``-safe), a few hundred bytes:
        the global step and, per logical worker, its position after the last CONSUMED batch plus its
        counters. The positions are this rank's: save it per rank (the step is the same on all)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step % self.steps_per_epoch, "rank": self.rank,
                **self._topology(), "workers": json.loads(json.dumps(self.positions))}

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly where ``sd`` was taken. ``{"epoch": e}`` alone starts epoch e afresh
        (e.g. after a change of world size). A state from a different topology (batch size, world
        size, workers, seed, shards) cannot be continued exactly: it warns and starts the epoch
        after the saved one."""
        if "workers" not in sd or "step" not in sd:
            e = int(sd.get("epoch", 0))
            self._reset(e * self.steps_per_epoch, [_new_pos(e) for _ in range(self.plan.W)])
            return
        if int(sd.get("version", 0)) != STATE_VERSION:
            raise ValueError(f"data loader state version {sd.get('version')} (this code: {STATE_VERSION})")
        mine = self._topology()
        diff = {k: (sd.get(k), v) for k, v in mine.items() if sd.get(k) != v}
        if diff:
            e = int(sd["epoch"]) + 1
            log.warning("data loader state from a different setup (%s: saved vs now): cannot resume "
                        "exactly; starting epoch %d", diff, e)
            self._reset(e * self.steps_per_epoch, [_new_pos(e) for _ in range(self.plan.W)])
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
        return out

    def epoch_assignment(self, epoch: int, dataset: int = 0) -> dict[tuple[int, int], list[str]]:
        return self.plan.epoch_assignment(epoch, dataset)

    def null_condition(self):
        """The null (unconditional) condition recorded by precompute_text: a ``Condition`` with
        ctx (1,L,D), mask (1,L) [, pooled (1,P)] -- the one to use in null-text dropout and CFG."""
        if not self.embeddings or not self.manifest:
            raise DataError("null_condition(): these shards carry no precomputed embeddings")
        from .text import Condition

        base = self._manifest_dir()
        e = self.embeddings

        def load(name):
            from webdataset.gopen import gopen
            with gopen(_join(base, name)) as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)

        ctx = torch.from_numpy(load(e["null_emb"]).astype(np.float32))[None]
        mask = torch.from_numpy(load(e["null_mask"]).astype(bool))[None]
        pooled = torch.from_numpy(load(e["null_pooled"]).astype(np.float32))[None] if e.get("null_pooled") else None
        return Condition(ctx=ctx, mask=mask, pooled=pooled)

    def _manifest_dir(self) -> str:
        first = self.plan.datasets[0][0].url
        return first.rsplit("/", 1)[0] if _is_remote(first) else os.path.dirname(os.path.abspath(_local_path(first)))


def build_loader(cfg, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0) -> ShardLoader:
    """The training data: an endless iterator of batches (see the module docstring)."""
    return ShardLoader(cfg, batch_size, rank, world_size, seed, epoch)
