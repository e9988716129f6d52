"""Precomputed text embeddings: encode every caption of a shard set once with the frozen encoder
and write the same shards with ``emb.npy`` / ``mask.npy`` (``pooled.npy``) added (the packing is
``shardformat.pack_embeddings``), plus the null condition and a new ``shards.json``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from framework.files import atomic_write_bytes, atomic_write_text
from framework.data.shardformat import (MANIFEST, join_url, manifest_caption_lines, npy_bytes, pack_embeddings, read_manifest,
                          sample_captions, write_manifest)
from framework.data.shards import TAR_MTIME
from framework.data.tario import iter_shard_samples

__all__ = ["precompute_text"]


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
    import webdataset as wds

    log = log or (lambda s: None)
    src_manifest_path = src if src.endswith(".json") else os.path.join(src, MANIFEST)
    manifest = read_manifest(src_manifest_path)
    lines = manifest_caption_lines(manifest)
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

    mine = [(i, sh) for i, sh in enumerate(manifest["shards"]) if i % world_size == rank]
    done = []
    for i, sh in mine:
        samples = list(iter_shard_samples(join_url(src_dir, sh["url"])))
        encode([c for s in samples for c in sample_captions(s, "txt", lines)])
        name = os.path.basename(sh["url"])
        tmp = os.path.join(out_dir, name + f".tmp.{os.getpid()}")
        with open(tmp, "wb") as f:
            tw = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME)
            for s in samples:
                out = {k: v for k, v in s.items() if not k.startswith("__")}
                out["__key__"] = s["__key__"]
                caps = sample_captions(s, "txt", lines)
                if caps:
                    got = [cache[c] for c in caps]
                    pooled = np.stack([g[2] for g in got]) if got[0][2] is not None else None
                    out.update(pack_embeddings(np.stack([g[0] for g in got]),
                                               np.stack([g[1] for g in got]), pooled))
                tw.write(out)
            tw.close()                  # the end-of-archive blocks; f stays open
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(out_dir, name))
        done.append({"index": i, "url": name, "count": len(samples),
                     "bytes": os.path.getsize(os.path.join(out_dir, name))})
        log(f"rank {rank}: {name}: {len(samples)} samples")
    run_id = {"source_created": manifest.get("created"), "encoder": encoder_info, "world_size": world_size}
    atomic_write_text(os.path.join(out_dir, f".precompute.rank{rank}.json"),
                      json.dumps({"shards": done, "dims": dims, "run": run_id}))
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
    atomic_write_bytes(os.path.join(out_dir, "null_emb.npy"), npy_bytes(null_ctx.astype(np.float32)))
    atomic_write_bytes(os.path.join(out_dir, "null_mask.npy"), npy_bytes(null_mask))
    emb = {**encoder_info, "L": int(dims["L"]), "D": int(dims["D"]), "dtype": "float16",
           "stored": "valid tokens only (emb.npy rows where mask.npy is true), zero-padded on read",
           "null_emb": "null_emb.npy", "null_mask": "null_mask.npy"}
    if getattr(null, "pooled", None) is not None:
        atomic_write_bytes(os.path.join(out_dir, "null_pooled.npy"),
                           npy_bytes(null.pooled[0].float().cpu().numpy().astype(np.float32)))
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
    write_manifest(out_dir, new)
    return new
