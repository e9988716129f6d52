"""Small real inputs for tests: webdataset shards written with webdataset's own TarWriter, and a
tiny random transformers encoder saved to disk."""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def class_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grayscale pattern that depends on the label: a bar whose position encodes the class."""
    img = rng.integers(0, 40, (size, size), dtype=np.uint8)
    lo = (label * size) // 10
    img[:, lo:lo + max(1, size // 8)] = 220
    return img


def write_shards(directory: str, n_shards: int, per_shard, size: int = 16, seed: int = 0,
                 prefix: str = "data") -> list[str]:
    """n_shards tar files; per_shard is an int or a list of counts. Returns the shard paths."""
    import webdataset as wds

    os.makedirs(directory, exist_ok=True)
    counts = per_shard if isinstance(per_shard, (list, tuple)) else [per_shard] * n_shards
    rng = np.random.default_rng(seed)
    paths, idx = [], 0
    for s, n in enumerate(counts):
        path = os.path.join(directory, f"{prefix}-{s:06d}.tar")
        with wds.TarWriter(path) as w:
            for _ in range(n):
                label = idx % 10
                buf = io.BytesIO()
                Image.fromarray(class_image(label, size, rng), mode="L").save(buf, format="PNG")
                w.write({"__key__": f"s{idx:07d}", "png": buf.getvalue(),
                         "txt": f"a photo of a {CLASSES[label]}",
                         "json": json.dumps({"label": label, "class": CLASSES[label]}).encode()})
                idx += 1
        paths.append(path)
    manifest = {"shards": [{"url": os.path.basename(p), "count": c} for p, c in zip(paths, counts)],
                "total": int(sum(counts))}
    with open(os.path.join(directory, "shards.json"), "w") as f:
        json.dump(manifest, f)
    return paths


def tiny_encoder(directory: str) -> str:
    from framework.models.text import make_tiny_encoder
    return make_tiny_encoder(directory)


def engine_assets(d) -> dict:
    """A tiny encoder and 16 shards of exactly 4 samples under ``d`` (a pathlib dir): with no shuffling,
    rank r of 2 reads shards r, r+2, ... so the 2-rank global batch of step k (shards 2k, 2k+1) is
    exactly the 1-rank batch of 8 at step k."""
    enc = tiny_encoder(str(d / "enc"))
    write_shards(str(d / "shards"), 16, 4, size=16)
    return {"enc": enc, "urls": str(d / "shards" / "data-{000000..000015}.tar"), "dir": d}


def take(loader, n: int) -> list:
    return [next(loader) for _ in range(n)]


def loader_run(cfg, steps: int, batch: int, rank: int, world: int, seed: int = 5, state=None):
    """``steps`` batches of the loader of ``cfg`` (DataConfig) as rank ``rank`` of ``world``, resumed
    from ``state`` when given (through JSON, as a checkpoint stores it) -> (batches, the loader's state
    dict after them, its stats). The loader is closed."""
    from framework.data.loader import build_loader
    L = build_loader(cfg, batch, rank, world, seed)
    if state is not None:
        L.load_state_dict(json.loads(json.dumps(state)))
    batches = take(L, steps)
    st, stats = L.state_dict(), L.stats()
    L.close()
    return batches, st, stats
