"""The shard format, in one place: what the writer writes and the reader reads.

A dataset is a folder (or URL prefix) of webdataset tars. A sample is the group of consecutive
tar members that share a key (``KEY.png``, ``KEY.txt``, ``KEY.json``, ``KEY.emb.npy`` ...; the key
ends at the first dot of the file name). Beside the tars, optionally:

``shards.json`` (the manifest; written last and atomically, so a folder with one is complete)::

    {"format": "framework-shards/1", "total": N, "url": "data-{000000..000009}.tar",
     "shards": [{"url": "data-000000.tar", "count": 1000, "bytes": ...}, ...],
     "caption_lines": true, "source": {...}, "image_key": "png", "image_size": [H, W] | null,
     "channels": 1 | 3 | null, "skipped": {"reason": n}, "embeddings": {...} (after precompute)}

``{shard}_stats.json`` (img2dataset's, one per tar): ``successes`` is the number of samples in it.

Captions. A ``.txt`` member is ONE caption: newlines and tabs are whitespace (webdataset's and
img2dataset's convention). Several captions per sample come from a JSON list (a ``.json``
caption member: a list, or an object with ``captions``/``caption``) or from the explicit
``caption_lines`` option: one caption per line of ``.txt``. Shards written by this project
(``format`` framework-shards/1) store several captions one per line and say so in their
manifest (``caption_lines: true``; manifests written before that key existed imply it).

Precomputed text embeddings (``pack_embeddings``): ``emb.npy`` (sum of valid tokens, D) fp16, the
valid tokens of the sample's K captions one after another; ``mask.npy`` (K, L) bool;
``pooled.npy`` (K, P) fp16.

Precomputed latents with aspect-ratio buckets (``tools.precompute_latents`` with ``data.buckets``):
each sample's ``zbucket.json`` (``LATENT_BUCKET``) says where its image went before it was encoded::

    {"bucket": [H, W], "size_cond": [orig_h, orig_w, crop_top, crop_left, H, W], "shape": [c, h, w]}

(pixel bucket, SDXL's size condition, the latent shape ``(c, H / f, W / f)`` of the stored
posterior); the manifest's ``latents.buckets`` lists the bucket set (pixels) it was encoded with.
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Any, Optional

import numpy as np

from framework.files import atomic_write_text

__all__ = ["DataError", "MANIFEST", "FORMAT", "IMAGE_EXTS", "KEY_RE", "slug", "is_remote", "local_path",
           "join_url", "url_dir", "manifest_path", "read_manifest", "write_manifest", "manifest_caption_lines",
           "stats_path", "read_stats_count", "parse_captions", "sample_captions", "npy_bytes",
           "pack_embeddings", "unpack_embedding", "LATENT_BUCKET", "latent_bucket_bytes", "read_latent_bucket"]

MANIFEST = "shards.json"
FORMAT = "framework-shards/1"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
LATENT_BUCKET = "zbucket.json"  # a bucketed latent sample's placement (see the module docstring)


class DataError(ValueError):
    """A data problem the run cannot continue past (missing shard, too many bad samples, ...)."""


def slug(text: str) -> str:
    """A webdataset-safe key fragment: no dots, no slashes, no spaces."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return s or "x"


# ---------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------
def is_remote(url: str) -> bool:
    """http(s)://, s3://, pipe:, ... (anything with a scheme except file:)."""
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", url)) and not url.startswith("file:")


def local_path(url: str) -> str:
    return re.sub(r"^file://?", "/", url) if url.startswith("file:") else url


def join_url(base: str, url: str) -> str:
    """``url`` relative to the folder (or URL prefix) ``base``; absolute ones as they are."""
    if is_remote(url) or os.path.isabs(url):
        return url
    return base.rstrip("/") + "/" + url if is_remote(base) else os.path.join(base, url)


def url_dir(url: str) -> str:
    """The folder (or URL prefix) holding ``url``."""
    return url.rsplit("/", 1)[0] if is_remote(url) else os.path.dirname(os.path.abspath(local_path(url)))


# ---------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------
def manifest_path(path: str) -> str:
    """A manifest file, or the folder holding one -> the manifest file."""
    if not is_remote(path) and os.path.isdir(local_path(path)):
        return os.path.join(local_path(path), MANIFEST)
    return path


def read_manifest(path: str) -> dict:
    """Read ``shards.json`` (a file, a URL, or the folder holding it); shard urls stay relative."""
    path = manifest_path(path)
    try:
        if is_remote(path):
            from webdataset.gopen import gopen
            with gopen(path) as f:
                m = json.loads(f.read())
        else:
            with open(local_path(path), encoding="utf-8") as f:
                m = json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not a shard manifest ({e})") from e
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        raise DataError(f"{path}: not a shard manifest (no 'shards' list)")
    return m


def write_manifest(folder: str, manifest: dict) -> str:
    """Write ``folder/shards.json`` atomically (fsync + rename). Returns its path."""
    path = os.path.join(folder, MANIFEST)
    atomic_write_text(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return path


def manifest_caption_lines(manifest: Optional[dict]) -> bool:
    """Does this manifest's ``.txt`` hold one caption per line? Only where it says so (or is one
    of ours written before the key existed); a ``.txt`` of any other source is one caption."""
    if not manifest:
        return False
    if "caption_lines" in manifest:
        return bool(manifest["caption_lines"])
    return manifest.get("format") == FORMAT


# ---------------------------------------------------------------------------------------------
# img2dataset's per-shard statistics
# ---------------------------------------------------------------------------------------------
def stats_path(tar_path: str) -> str:
    """``.../00042.tar`` -> ``.../00042_stats.json`` (img2dataset's name)."""
    base = tar_path
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[:-len(ext)]
            break
    return base + "_stats.json"


def read_stats_count(tar_path: str) -> Optional[int]:
    """Samples in a local tar according to img2dataset's ``_stats.json`` beside it (``successes``);
    None when there is no such file or it has no usable count."""
    try:
        with open(stats_path(local_path(tar_path)), encoding="utf-8") as f:
            st = json.load(f)
    except (OSError, ValueError):
        return None
    n = st.get("successes") if isinstance(st, dict) else None
    return int(n) if isinstance(n, int) and n >= 0 else None


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
def _one(text: Any) -> str:
    return " ".join(str(text).split())          # newlines, tabs, runs of spaces -> one space


def parse_captions(raw: bytes, ext: str, lines: bool = False) -> list[str]:
    """The captions of one caption member. ``ext`` ending in ``json``: a JSON list of strings, an
    object with ``captions`` (a list) or ``caption``, or a string. Otherwise the member is one
    caption, or one caption per non-blank line with ``lines``. Blank captions are dropped."""
    text = raw.decode("utf-8", errors="replace")
    if ext.endswith("json") or ext == "jsn":
        try:
            obj = json.loads(text)
        except ValueError:
            return []
        if isinstance(obj, dict):
            obj = obj.get("captions", obj.get("caption"))
        if isinstance(obj, str):
            obj = [obj]
        if not isinstance(obj, list):
            return []
        return [c for c in (_one(x) for x in obj if isinstance(x, (str, int, float))) if c]
    if lines:
        return [c for c in (_one(line) for line in text.splitlines()) if c]
    c = _one(text)
    return [c] if c else []


def sample_captions(sample: dict, caption_key: str = "txt", lines: bool = False) -> list[str]:
    """The captions of a raw sample (``{ext: bytes}``), [] when it has none."""
    raw = sample.get(caption_key)
    return parse_captions(raw, caption_key, lines) if raw else []


# ---------------------------------------------------------------------------------------------
# Precomputed text embeddings
# ---------------------------------------------------------------------------------------------
def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def pack_embeddings(ctx: np.ndarray, mask: np.ndarray, pooled: Optional[np.ndarray] = None) -> dict[str, bytes]:
    """K captions of one sample -> tar members. ``ctx`` (K,L,D), ``mask`` (K,L) bool.
    ``emb.npy``: (sum of valid tokens, D) fp16, the valid tokens only (caption after caption);
    ``mask.npy``: (K,L) bool; ``pooled.npy``: (K,P) fp16."""
    ctx = np.asarray(ctx)
    mask = np.asarray(mask, dtype=bool)
    if ctx.ndim != 3 or mask.shape != ctx.shape[:2]:
        raise ValueError(f"pack_embeddings: ctx {ctx.shape} must be (K,L,D) and mask {mask.shape} (K,L)")
    out = {"emb.npy": npy_bytes(ctx[mask].astype(np.float16)), "mask.npy": npy_bytes(mask)}
    if pooled is not None:
        out["pooled.npy"] = npy_bytes(np.asarray(pooled).astype(np.float16))
    return out


def unpack_embedding(emb: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Caption ``k`` of a packed sample -> (ctx (L,D) float32, zero at padding; mask (L,) bool)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 1:
        mask = mask[None]
    counts = mask.sum(1)
    if emb.ndim != 2 or emb.shape[0] != int(counts.sum()):
        raise ValueError(f"emb.npy has shape {emb.shape}, mask.npy marks {int(counts.sum())} tokens")
    off = int(counts[:k].sum())
    ctx = np.zeros((mask.shape[1], emb.shape[1]), np.float32)
    ctx[mask[k]] = emb[off:off + int(counts[k])]
    return ctx, mask[k].copy()


def latent_bucket_bytes(bucket, size_cond, shape) -> bytes:
    """A bucketed latent sample's ``zbucket.json`` member (see the module docstring)."""
    return json.dumps({"bucket": [int(v) for v in bucket], "size_cond": [int(v) for v in size_cond],
                       "shape": [int(v) for v in shape]}, separators=(",", ":")).encode()


def read_latent_bucket(raw: bytes) -> tuple[tuple[int, int], list[int], tuple[int, ...]]:
    """``zbucket.json`` bytes -> (bucket (H, W), size_cond [6], latent shape (c, h, w)); ValueError if malformed."""
    d = json.loads(raw)
    bucket, sc, shape = d["bucket"], d["size_cond"], d["shape"]
    if len(bucket) != 2 or len(sc) != 6 or len(shape) != 3 or list(sc[4:]) != list(bucket):
        raise ValueError(f"malformed {LATENT_BUCKET}: {d}")
    return (int(bucket[0]), int(bucket[1])), [int(v) for v in sc], tuple(int(v) for v in shape)
