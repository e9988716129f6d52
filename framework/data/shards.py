"""Writing webdataset shards: a source -> ``{prefix}-000000.tar ...`` + ``shards.json``.

A sample is a group of tar members that share a key (webdataset convention)::

    fmnist-train-00042.png    the image (png, jpg, or npy for precomputed arrays)
    fmnist-train-00042.txt    the caption; several captions one per line (the manifest says
                              ``caption_lines: true``; the reader picks one per sample and epoch)
    fmnist-train-00042.json   metadata ({"label": 7, "class": "Sneaker", ...})
    fmnist-train-00042.emb.npy, .mask.npy, .pooled.npy   precomputed text embeddings (optional)

Shards are closed at ``max_count`` samples or ``max_bytes`` bytes, whichever comes first. Each shard
is written under a temporary name, fsync-ed and renamed when complete; ``shards.json`` is written
LAST, atomically, so a directory with a manifest is always a complete dataset. The format itself
(manifest, captions, embeddings) is ``framework/shardformat.py``; the sources are
``framework/sources.py``.
"""
from __future__ import annotations

import collections
import io
import json
import os
import random
import re
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from framework.data.shardformat import FORMAT, KEY_RE, MANIFEST, npy_bytes, write_manifest
from framework.data.sources import Source

__all__ = ["ShardWriter", "write_shards", "TAR_MTIME"]

TAR_MTIME = 1_700_000_000      # fixed integer member mtime: same input, same bytes, no pax headers


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------
class ShardWriter:
    """Write samples to ``{out_dir}/{prefix}-{i:06d}.tar``; ``close()`` writes ``shards.json``.

    ``write(key, image, caption, meta, extra)``: ``image`` is a PIL image (encoded as
    ``image_format``), an ``np.ndarray`` (stored as ``npy``), or ``(bytes, ext)`` (stored as is);
    ``caption`` a string or a list of strings (stored one per line, whitespace runs -> one space);
    ``meta`` a JSON-able dict;
    ``extra`` more members ``{ext: bytes}`` (e.g. ``{"emb.npy": ...}``).
    """

    def __init__(self, out_dir: str, prefix: str = "data", max_count: int = 1000,
                 max_bytes: int = 256 << 20, image_format: str = "png", jpeg_quality: int = 90,
                 source: Optional[dict] = None):
        import webdataset as wds  # noqa: F401  (fail early when missing)

        if image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
        if not re.match(r"^[A-Za-z0-9_-]+$", prefix):
            raise ValueError(f"prefix must match [A-Za-z0-9_-]+, got {prefix!r}")
        if max_count < 1 or max_bytes < 1:
            raise ValueError("max_count and max_bytes must be positive")
        self.out_dir, self.prefix = out_dir, prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.source = dict(source or {})
        os.makedirs(out_dir, exist_ok=True)
        old = os.path.join(out_dir, MANIFEST)
        if os.path.exists(old):      # the directory is being rewritten: it is incomplete until close()
            os.remove(old)
        self.shards: list[dict] = []
        self.keys: set[str] = set()
        self.image_exts: collections.Counter = collections.Counter()
        self.sizes: collections.Counter = collections.Counter()
        self.channels: collections.Counter = collections.Counter()
        self._tar = None
        self._file = None
        self._count = 0
        self._bytes = 0
        self._closed = False

    # -- shard rotation ------------------------------------------------------------------------
    def _shard_name(self, i: int) -> str:
        return f"{self.prefix}-{i:06d}.tar"

    def _open_next(self) -> None:
        import webdataset as wds

        name = self._shard_name(len(self.shards))
        self._tmp = os.path.join(self.out_dir, name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME)
        self.shards.append({"url": name, "count": 0, "bytes": 0})
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()          # the end-of-archive blocks (the file object stays open)
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        final = os.path.join(self.out_dir, self.shards[-1]["url"])
        os.replace(self._tmp, final)
        self.shards[-1]["count"] = self._count
        self.shards[-1]["bytes"] = os.path.getsize(final)
        self._tar = self._file = None

    # -- encoding --------------------------------------------------------------------------------
    def _encode_image(self, image: Any) -> tuple[bytes, str]:
        if isinstance(image, tuple):
            data, ext = image
            ext = ext.lower().lstrip(".")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    self.sizes[(im.height, im.width)] += 1
                    self.channels[len(im.getbands())] += 1
            except Exception:
                pass
            return bytes(data), ext
        if isinstance(image, np.ndarray):
            self.sizes[tuple(int(s) for s in image.shape[-2:])] += 1
            self.channels[int(image.shape[0]) if image.ndim == 3 else 1] += 1
            return npy_bytes(image), "npy"
        if isinstance(image, Image.Image):
            im = image
            if im.mode not in ("L", "RGB", "RGBA", "LA") or (self.image_format == "jpg" and im.mode != "L"):
                im = im.convert("RGB")
            self.sizes[(im.height, im.width)] += 1
            self.channels[len(im.getbands())] += 1
            buf = io.BytesIO()
            if self.image_format == "jpg":
                im.save(buf, format="JPEG", quality=self.jpeg_quality)
                return buf.getvalue(), "jpg"
            im.save(buf, format="PNG")
            return buf.getvalue(), "png"
        raise TypeError(f"image must be a PIL image, an ndarray or (bytes, ext); got {type(image).__name__}")

    def write(self, key: str, image: Any = None, caption: Union[str, Sequence[str], None] = None,
              meta: Optional[dict] = None, extra: Optional[dict[str, bytes]] = None) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} must match [A-Za-z0-9_-]+ (webdataset splits at dots)")
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key!r}")
        sample: dict[str, Any] = {"__key__": key}
        if image is not None:
            data, ext = self._encode_image(image)
            sample[ext] = data
            self.image_exts[ext] += 1
        if caption is not None:
            lines = [caption] if isinstance(caption, str) else list(caption)
            lines = [" ".join(str(c).split()) for c in lines]
            sample["txt"] = "\n".join(c for c in lines if c).encode("utf-8")
        if meta is not None:
            sample["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        for ext, data in (extra or {}).items():
            sample[ext] = bytes(data)
        size = sum(len(v) + 1024 for k, v in sample.items() if k != "__key__")  # + tar headers
        if self._tar is None or self._count >= self.max_count or \
                (self._count > 0 and self._bytes + size > self.max_bytes):
            self._finish_shard()
            self._open_next()
        self._tar.write(sample)
        self.keys.add(key)
        self._count += 1
        self._bytes += size

    def next_shard(self) -> None:
        """Close the current shard now (the next sample starts a new one)."""
        self._finish_shard()

    @property
    def total(self) -> int:
        return len(self.keys)

    def manifest(self, **extra) -> dict:
        n = len(self.shards)
        size = None
        if len(self.sizes) == 1:
            size = list(next(iter(self.sizes)))
        chans = next(iter(self.channels)) if len(self.channels) == 1 else None
        m = {
            "format": FORMAT,
            "total": sum(s["count"] for s in self.shards),
            "url": f"{self.prefix}-{{{0:06d}..{n - 1:06d}}}.tar" if n else "",
            "shards": self.shards,
            "source": self.source,
            "image_key": ";".join(sorted(self.image_exts)) or None,
            "caption_key": "txt",
            "caption_lines": True,
            "image_size": size,
            "channels": chans,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        m.update(extra)
        return m

    def close(self, **extra) -> dict:
        """Finish the last shard and write ``shards.json`` last, atomically. Returns the manifest."""
        if self._closed:
            raise RuntimeError("ShardWriter is already closed")
        self._finish_shard()
        self._closed = True
        m = self.manifest(**extra)
        write_manifest(self.out_dir, m)
        return m

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()
        elif self._tar is not None:    # failed: leave no manifest, drop the partial shard
            try:
                self._tar.close()
            finally:
                if os.path.exists(self._tmp):
                    os.remove(self._tmp)


def _resize_square(im: Image.Image, size: int) -> Image.Image:
    """Shorter side -> size (bicubic), then center crop to size x size."""
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def write_shards(source: Source, out_dir: str, prefix: str = "data", max_count: int = 1000,
                 max_bytes: int = 256 << 20, image_format: str = "auto", limit: int = 0,
                 shuffle: bool = True, seed: int = 0, resize: int = 0, jpeg_quality: int = 90,
                 progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write ``source`` as shards. ``image_format``: png | jpg | auto (original bytes when the
    source has them and no resize is asked; otherwise png). ``shuffle`` permutes the record order
    (seeded) before ``limit``. Returns the manifest (written last)."""
    order = list(range(len(source)))
    if shuffle:
        random.Random(seed).shuffle(order)
    fmt = "png" if image_format == "auto" else image_format
    info = dict(source.info)
    info.update({"shuffle": shuffle, "seed": seed, "limit": limit, "resize": resize})
    skipped: collections.Counter = collections.Counter()
    writer = ShardWriter(out_dir, prefix, max_count, max_bytes, fmt, jpeg_quality, source=info)
    with writer:
        for n, i in enumerate(order):
            if limit and writer.total >= limit:
                break
            rec = source.load(i)
            if isinstance(rec, str):
                skipped[rec] += 1
                continue
            image = rec["image"]
            if isinstance(image, tuple) and (resize or image_format != "auto"):
                try:
                    image = Image.open(io.BytesIO(image[0]))
                    image.load()
                except Exception:
                    skipped["undecodable_image"] += 1
                    continue
            if isinstance(image, Image.Image) and resize:
                if image.mode not in ("L", "RGB"):
                    image = image.convert("RGBA")
                    bg = Image.new("RGBA", image.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(bg, image).convert("RGB")
                image = _resize_square(image, resize)
            writer.write(rec["key"], image, rec.get("caption"), rec.get("meta"))
            if progress is not None and (n + 1) % 1000 == 0:
                progress(writer.total, len(order) if not limit else min(limit, len(order)))
        return writer.close(skipped=dict(skipped))
