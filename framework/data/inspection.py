"""Inspecting shards: per-shard counts (vs the manifest), key uniqueness, member types, image
sizes and modes, caption and label histograms, problems; a PNG contact sheet.

    report = inspect_shards("data/photos", contact_sheet="sheet.png")
    print(format_report(report))
"""
from __future__ import annotations

import collections
import io
import json
import os
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from framework.files import atomic_write_bytes
from framework.data.shardformat import manifest_caption_lines, sample_captions
from framework.data.shardlist import expand_spec
from framework.data.tario import iter_shard_samples

__all__ = ["inspect_shards", "format_report"]


def inspect_shards(spec: Union[str, Sequence[str]], contact_sheet: Optional[str] = None,
                   n_images: int = 64, top: int = 15, max_samples: int = 0) -> dict:
    """Read shards raw (no training decode) and summarise: per-shard counts (and the manifest's),
    key uniqueness, member types, image sizes and modes, caption and label histograms. Optionally
    write a PNG contact sheet of the first ``n_images`` images with their captions."""
    shards, manifest = expand_spec(spec)
    lines = manifest_caption_lines(manifest)
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
            caps = sample_captions(s, "txt", lines)
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
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
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
