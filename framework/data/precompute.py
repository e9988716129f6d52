"""Precomputed text embeddings: encode every caption of a shard set once with the frozen encoder
and write the same shards with ``emb.npy`` / ``mask.npy`` (``pooled.npy``) added (the packing is
``shardformat.pack_embeddings``), plus the null condition and a new ``shards.json``.

The pieces are shared with the latent pass (``framework.data.latents``, ``--text-encoder``), so the
two write the same bytes: ``CaptionEmbedder`` (captions -> packed members, a cache of unique
captions encoded in chunks), ``write_null_condition`` (the null files and the manifest's
``embeddings`` entry) and ``text_encoder_info`` (the encoder's identity in the manifest).
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

__all__ = ["precompute_text", "CaptionEmbedder", "write_null_condition", "text_encoder_info", "EMBEDDING_MEMBERS"]

EMBEDDING_MEMBERS = ("emb.npy", "mask.npy", "pooled.npy")   # what pack_embeddings writes into a sample


def text_encoder_info(tcfg) -> dict:
    """The encoder's identity recorded in the manifest's ``embeddings`` entry (``text.*`` settings)."""
    from framework.models.text import resolve_encoder
    return {"encoder": tcfg.encoder, "resolved": os.path.basename(os.path.normpath(resolve_encoder(tcfg.encoder))),
            "kind": tcfg.kind, "max_length": tcfg.max_length, "layer": tcfg.layer, "null": tcfg.null,
            "pooled": tcfg.pooled}


class CaptionEmbedder:
    """Captions -> packed embedding members, through the frozen ``encoder`` (``encode(list[str]) ->
    Condition(ctx (B,L,D), mask (B,L), pooled)``). ``encode(captions)`` encodes the unique ones not
    seen yet in chunks of ``batch_size`` (a cache: class-template captions repeat); ``members(caps)``
    is a sample's ``emb.npy``/``mask.npy`` (``pooled.npy``). The same calls in the same order give
    the same bits (the chunks, hence the kernels, are the same)."""

    def __init__(self, encoder: Any, batch_size: int = 256):
        self.encoder, self.batch_size = encoder, batch_size
        self.cache: dict[str, tuple] = {}
        self.dims: dict[str, int] = {}

    def encode(self, caps: list[str]) -> None:
        import torch

        todo = [c for c in dict.fromkeys(caps) if c not in self.cache]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            with torch.no_grad():
                cond = self.encoder.encode(chunk)
            ctx = cond.ctx.float().cpu().numpy()
            mask = cond.mask.bool().cpu().numpy()
            pooled = cond.pooled.float().cpu().numpy() if getattr(cond, "pooled", None) is not None else None
            self.dims.update(L=ctx.shape[1], D=ctx.shape[2])
            if pooled is not None:
                self.dims["P"] = pooled.shape[1]
            for j, c in enumerate(chunk):
                self.cache[c] = (ctx[j], mask[j], None if pooled is None else pooled[j])
        if len(self.cache) > 200_000:      # long-tail captions: keep memory bounded
            for c in list(self.cache)[:100_000]:
                del self.cache[c]

    def members(self, caps: list[str]) -> dict[str, bytes]:
        """The packed embeddings of a sample's captions (each encoded by an earlier ``encode``)."""
        got = [self.cache[c] for c in caps]
        pooled = np.stack([g[2] for g in got]) if got[0][2] is not None else None
        return pack_embeddings(np.stack([g[0] for g in got]), np.stack([g[1] for g in got]), pooled)


def write_null_condition(out_dir: str, encoder: Any, encoder_info: dict, dims: dict) -> dict:
    """``null_emb.npy``/``null_mask.npy`` (``null_pooled.npy``) in ``out_dir``: the encoder's null
    condition; -> the manifest's ``embeddings`` entry (encoder identity, L, D, the null files)."""
    import torch

    with torch.no_grad():
        null = encoder.null(1)
    null_ctx = null.ctx[0].float().cpu().numpy()
    null_mask = null.mask[0].bool().cpu().numpy()
    dims = dict(dims)
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
    return emb


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
    embedder = CaptionEmbedder(encoder, batch_size)

    mine = [(i, sh) for i, sh in enumerate(manifest["shards"]) if i % world_size == rank]
    done = []
    for i, sh in mine:
        samples = list(iter_shard_samples(join_url(src_dir, sh["url"])))
        embedder.encode([c for s in samples for c in sample_captions(s, "txt", lines)])
        name = os.path.basename(sh["url"])
        tmp = os.path.join(out_dir, name + f".tmp.{os.getpid()}")
        with open(tmp, "wb") as f:
            tw = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME)
            for s in samples:
                # embeddings of an earlier encoding are replaced (a stale pooled.npy would outlive them)
                out = {k: v for k, v in s.items() if not k.startswith("__") and k not in EMBEDDING_MEMBERS}
                out["__key__"] = s["__key__"]
                caps = sample_captions(s, "txt", lines)
                if caps:
                    out.update(embedder.members(caps))
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
                      json.dumps({"shards": done, "dims": embedder.dims, "run": run_id}))
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
    dims: dict[str, int] = {}
    for p in parts.values():
        dims.update(p["dims"])
    emb = write_null_condition(out_dir, encoder, encoder_info, dims)
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
