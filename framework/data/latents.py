"""Precomputed latents: encode a shard set once with the frozen VAE, so that the trainers read
latents only (no image decode, no VAE).

    precompute_latents(src, out, vae, data_cfg, rank, world)   # shards in -> shards out

Every output sample keeps its input members (caption ``.txt``, ``.json``, precomputed text
embeddings, ...) except the image (``keep_images`` keeps it too), and gains the RAW (unscaled)
posterior of its image, fp16::

    KEY.zmean.npy   (c, h, w)   mu of q(z|x)
    KEY.zstd.npy    (c, h, w)   sigma of q(z|x)

The trainer (``data.latents=true``) draws a fresh z = mu + sigma * eps per (seed, epoch, key) and
scales it once (``framework.models.vae.LatentSpec``). ``shards.json`` records the VAE (path, sha256 of its
weights), the scaling (scale, shift) and the latent shape, and the samples skipped by reason.

Splitting and resuming: output shard i is written by rank ``i % world`` (torchrun, any number of
nodes: each process reads RANK / WORLD_SIZE). Each shard is written under a temporary name and
renamed, then its record ``.latents/NAME.json`` (counts) is written the same way; a shard whose
record exists and matches this VAE and image geometry is skipped, so a killed job, started again,
continues where it stopped. Rank 0 waits for every record and writes ``shards.json`` last.
Images that cannot be decoded (or have no caption, or a wrong shape) are skipped and counted.

Aspect-ratio buckets (``data.buckets`` enabled, the same setting the trainer uses): each image goes
to its bucket exactly as the pixel loader puts it there (``buckets.assign``, resize, center crop:
``loader.decode_sample`` itself), images of one bucket are encoded together (a VAE batch holds one
shape), and the sample gains ``zbucket.json`` (its pixel bucket, SDXL's size condition, the latent
shape; ``shardformat.LATENT_BUCKET``). ``shards.json``'s ``latents.buckets`` records the bucket set
(the trainer refuses another one) and ``latents.bucket_counts`` the samples per bucket;
``latents.shape`` stays the square ``image_size``'s latent shape (the default sampling size).

Text embeddings in the same pass (``text_encoder``): every caption is encoded as
``tools.precompute_text`` does (``precompute.CaptionEmbedder``: the same members, the same bits) and
the null condition and the encoder's identity go into the manifest's ``embeddings`` entry, so
``data.use_embeddings=true data.latents=true`` trains with no image, no VAE and no text encoder.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from framework.config import DataConfig
from framework.data.buckets import bucket_name, buckets_from_config
from framework.data.loader import decode_sample, expand_spec, iter_shard_samples
from framework.data.precompute import EMBEDDING_MEMBERS, CaptionEmbedder, write_null_condition
from framework.data.shardformat import (LATENT_BUCKET, join_url, latent_bucket_bytes, manifest_caption_lines,
                                        sample_captions)
from framework.models.vae import LATENT_MEAN, LATENT_STD, FrozenVAE

__all__ = ["iter_images", "precompute_latents", "latent_export_info", "add_latent_config", "write_export_vae",
           "RECORDS_DIR"]

MANIFEST = "shards.json"
RECORDS_DIR = ".latents"
_MTIME = 1_700_000_000          # fixed member mtime: same input, same bytes


def _image_cfg(data_cfg: DataConfig) -> DataConfig:
    """Decode images as evaluation does: center crop, no flip, no embeddings, pixels."""
    return dataclasses.replace(data_cfg, crop="center", random_flip=False, use_embeddings=False, latents=False)


def _to_float(image: np.ndarray) -> np.ndarray:
    """(C,H,W) uint8 -> [-1,1] float32 (npy images are taken as they are, like the loader's collate)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return image.astype(np.float32)


def iter_images(urls, data_cfg: DataConfig, limit: int = 0, bad: Optional[dict] = None) -> Iterator[dict]:
    """The images of a shard spec in shard order, decoded like training (``data.decode_sample``) with
    a center crop and no flip: ``{"image": (C,S,S) float32 in [-1,1], "key", "raw"}``. Bad samples are
    skipped and counted in ``bad`` by reason."""
    cfg = _image_cfg(data_cfg)
    shards, _ = expand_spec(urls, allow_pipe=data_cfg.allow_pipe)
    bad = bad if bad is not None else {}
    n = 0
    for sh in shards:
        events: list = []
        for raw, item in _decoded(iter_shard_samples(sh.url, events, sh.count), events, cfg, bad):
            yield {"image": _to_float(item["image"]), "key": raw["__key__"], "raw": raw}
            n += 1
            if limit and n >= limit:
                return


def _decoded(raws, events: list, cfg: DataConfig, bad: dict,
             buckets: Optional[list] = None) -> Iterator[tuple[dict, dict]]:
    """(raw, decoded item) of the raw samples ``raws`` of one shard; decode failures and the shard
    reader's ``events`` (lost samples) counted in ``bad``."""
    for raw in raws:
        try:
            item = decode_sample(raw, cfg, random.Random(0), buckets=buckets or None)
        except Exception as e:          # data.py's rejection (reason attribute) or anything unexpected
            reason = getattr(e, "reason", "decode")
            bad[reason] = bad.get(reason, 0) + 1
            continue
        yield raw, item
    for reason, _url, _detail, lost in events:
        bad[reason] = bad.get(reason, 0) + int(lost)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def precompute_latents(src: str, out_dir: str, vae: FrozenVAE, data_cfg: DataConfig, rank: int = 0,
                       world_size: int = 1, batch_size: int = 64, keep_images: bool = False,
                       wait_s: float = 3600.0, log: Optional[Callable[[str], None]] = None,
                       text_encoder=None, text_info: Optional[dict] = None,
                       text_batch_size: int = 256) -> Optional[dict]:
    """Encode every image of the shard set ``src`` (a shards.json or its folder) with ``vae`` and write
    the latent shard set ``out_dir`` (see the module docstring). ``data_cfg``: image_size, channels,
    image_keys, caption_key, buckets (images are decoded as the loader does, center crop). With
    ``text_encoder`` (a ``models.text.TextEncoder``; ``text_info`` its identity,
    ``precompute.text_encoder_info``) the captions' embeddings are written too. Returns the new
    manifest on rank 0 (None on the others)."""
    import webdataset as wds

    log = log or (lambda s: None)
    src_manifest_path = src if src.endswith(".json") else os.path.join(src, MANIFEST)
    if not os.path.isfile(src_manifest_path):
        raise FileNotFoundError(f"precompute_latents: {src_manifest_path} not found (--src: a shard folder "
                                f"with shards.json, see tools.make_shards)")
    with open(src_manifest_path) as f:
        manifest = json.load(f)
    src_dir = os.path.dirname(os.path.abspath(src_manifest_path))
    if os.path.abspath(out_dir) == src_dir:
        raise ValueError("precompute_latents: out_dir must differ from the source folder")
    if text_encoder is not None and text_info is None:
        raise ValueError("precompute_latents: text_encoder needs text_info (precompute.text_encoder_info)")
    records = os.path.join(out_dir, RECORDS_DIR)
    os.makedirs(records, exist_ok=True)
    out_manifest = os.path.join(out_dir, MANIFEST)
    if rank == 0 and os.path.exists(out_manifest):
        os.remove(out_manifest)        # rewritten last, once every shard is complete

    cfg = _image_cfg(data_cfg)
    shape = vae.latent_shape(cfg.channels, cfg.image_size, cfg.image_size)
    # the trainer's bucket rule, in pixels; every side must divide by the VAE's factor
    buckets = buckets_from_config(cfg.buckets, cfg.image_size, vae.factor)
    ident = {"vae_sha256": vae.digest, "image_size": cfg.image_size, "channels": cfg.channels,
             "image_keys": cfg.image_keys, "keep_images": keep_images}
    if buckets:
        ident["buckets"] = [list(b) for b in buckets]
    if text_encoder is not None:
        ident["text"] = text_info
    image_exts = {k.strip().lower() for k in cfg.image_keys.split(";") if k.strip()}
    lines = manifest_caption_lines(manifest)
    embedder = CaptionEmbedder(text_encoder, text_batch_size) if text_encoder is not None else None
    dropped = set(image_exts if not keep_images else ()) | (set(EMBEDDING_MEMBERS) if embedder else set())

    def encode(batch: list[tuple[dict, np.ndarray, Optional[list]]], tw, counts: dict) -> int:
        x = torch.from_numpy(np.stack([img for _, img, _ in batch]))                   # (B,C,H,W), one shape
        mean, std = vae.encode(x)                                                       # raw posterior
        mean = mean.cpu().numpy().astype(np.float16)
        std = std.cpu().numpy().astype(np.float16)
        written = 0
        for j, (raw, _, sc) in enumerate(batch):
            if not (np.isfinite(mean[j]).all() and np.isfinite(std[j]).all()):
                bad["nonfinite_latent"] = bad.get("nonfinite_latent", 0) + 1
                continue
            sample = {k: v for k, v in raw.items() if not k.startswith("__") and k not in dropped}
            sample["__key__"] = raw["__key__"]
            sample[LATENT_MEAN] = _npy(mean[j])
            sample[LATENT_STD] = _npy(std[j])
            if sc is not None:         # bucketed: where the image went before it was encoded
                sample[LATENT_BUCKET] = latent_bucket_bytes(sc[4:], sc, mean[j].shape)
                counts[bucket_name(sc[4:])] = counts.get(bucket_name(sc[4:]), 0) + 1
            if embedder is not None:
                caps = sample_captions(raw, "txt", lines)
                if caps:
                    sample.update(embedder.members(caps))
            tw.write(sample)
            written += 1
        return written

    mine = [(i, sh) for i, sh in enumerate(manifest["shards"]) if i % world_size == rank]
    t0, n_done = time.perf_counter(), 0
    for i, sh in mine:
        name = os.path.basename(sh["url"])
        rec_path = os.path.join(records, name + ".json")
        rec = _read_json(rec_path)
        if rec is not None and rec.get("ident") == ident and os.path.isfile(os.path.join(out_dir, name)):
            log(f"rank {rank}: {name}: complete, skipped")
            continue
        url = join_url(src_dir, sh["url"])
        events: list = []
        raws = iter_shard_samples(url, events, sh.get("count"))
        if embedder is not None:       # every caption of the shard first, as precompute_text encodes them
            raws = list(raws)          # (one read of the shard: the samples are decoded from this list)
            embedder.encode([c for s in raws for c in sample_captions(s, "txt", lines)])
        bad: dict[str, int] = {}
        counts: dict[str, int] = {}
        count = 0
        tmp = os.path.join(out_dir, f"{name}.tmp.{os.getpid()}")
        with open(tmp, "wb") as f:
            tw = wds.TarWriter(f, encoder=False, mtime=_MTIME)
            groups: dict = {}          # bucket (or None: the square size) -> samples waiting for a VAE batch
            for raw, item in _decoded(raws, events, cfg, bad, buckets):
                key = item.get("bucket")
                g = groups.setdefault(key, [])
                g.append((raw, _to_float(item["image"]), item.get("size_cond")))
                if len(g) == batch_size:
                    count += encode(g, tw, counts)
                    groups[key] = []
            for key in [None] + buckets:
                if groups.get(key):
                    count += encode(groups[key], tw, counts)
            tw.close()
        os.replace(tmp, os.path.join(out_dir, name))
        _atomic_json(rec_path, {"index": i, "url": name, "count": count,
                                "bytes": os.path.getsize(os.path.join(out_dir, name)), "bad": bad, "ident": ident,
                                "buckets": counts, "dims": embedder.dims if embedder is not None else {}})
        n_done += count
        log(f"rank {rank}: {name}: {count} samples" + (f", skipped {bad}" if bad else "")
            + f" ({n_done / max(1e-9, time.perf_counter() - t0):.1f} samples/s)")
    if rank != 0:
        return None

    # ---- rank 0: wait for every shard's record, then the manifest (last) ------------------------
    deadline = time.time() + wait_s
    names = [os.path.basename(sh["url"]) for sh in manifest["shards"]]
    while True:
        recs = [_read_json(os.path.join(records, n + ".json")) for n in names]
        if all(r is not None and r.get("ident") == ident for r in recs):
            break
        if time.time() > deadline:
            missing = [n for n, r in zip(names, recs) if r is None or r.get("ident") != ident]
            raise TimeoutError(f"precompute_latents: shards {missing[:5]} were not written within {wait_s} s")
        time.sleep(1.0)
    skipped: dict[str, int] = {}
    bucket_counts: dict[str, int] = {}
    dims: dict[str, int] = {}
    for r in recs:
        for k, v in r["bad"].items():
            skipped[k] = skipped.get(k, 0) + v
        for k, v in (r.get("buckets") or {}).items():
            bucket_counts[k] = bucket_counts.get(k, 0) + v
        dims.update(r.get("dims") or {})
    new = dict(manifest)
    if embedder is not None:           # this pass's encoder replaces any earlier embeddings
        new["embeddings"] = write_null_condition(out_dir, text_encoder, text_info, dims)
    else:
        for k in ("embeddings",):      # files the manifest names travel with it
            e = new.get(k) or {}
            for key, value in e.items():
                if key.startswith("null_") and isinstance(value, str) and os.path.isfile(os.path.join(src_dir, value)):
                    shutil.copyfile(os.path.join(src_dir, value), os.path.join(out_dir, value))
    latents = {"shape": list(shape), "scaling_factor": vae.scale, "shift_factor": vae.shift,
               "dtype": "float16", "mean": LATENT_MEAN, "std": LATENT_STD,
               "stored": "raw posterior N(mean, std^2) of the VAE (unscaled); "
                         "z0 = (mean + std * eps - shift_factor) * scaling_factor",
               "image_size": cfg.image_size, "channels": cfg.channels, "vae": vae.identity()}
    if buckets:
        latents.update(buckets=[list(b) for b in buckets], bucket_counts=bucket_counts,
                       bucket_member=LATENT_BUCKET)
    new.update(shards=[{"url": r["url"], "count": r["count"], "bytes": r["bytes"]} for r in recs],
               total=sum(r["count"] for r in recs),
               image_key=manifest.get("image_key") if keep_images else None,
               latents=latents,
               skipped_latents=skipped,
               source={**manifest.get("source", {}), "latents_from": src_dir},
               created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _atomic_json(out_manifest, new)
    return new


# ---------------------------------------------------------------------------------------------
# Exports of latent models: which VAE, which scaling
# ---------------------------------------------------------------------------------------------
def latent_export_info(cfg) -> Optional[dict]:
    """For a run trained on precomputed latents (``cfg.data.latents``): the VAE that made them and the
    scaling training used, checked; for one that encoded on the fly (``vae.path`` without
    ``data.latents``): that VAE and its scaling. None for a pixel-space run. The VAE is ``cfg.vae.path`` or else
    the path recorded in the shards' manifest; its weights must be the ones that encoded the shards."""
    from framework.config import ConfigError
    from framework.models.vae import FrozenVAE, LatentSpec, weights_digest

    if not getattr(cfg.data, "latents", False):
        if not cfg.vae.path:
            return None                   # pixel space
        vae = FrozenVAE.from_config(cfg.vae, device="cpu")     # encoded on the fly by the trainer
        shape = vae.latent_shape(cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        return {"vae": "vae", "source": os.path.abspath(cfg.vae.path), "sha256": vae.digest,
                "scaling_factor": vae.scale, "shift_factor": vae.shift, "shape": list(shape),
                "image_size": int(cfg.data.image_size)}

    manifests = [expand_spec(u, allow_pipe=cfg.data.allow_pipe)[1] for u in cfg.data.urls]
    spec = LatentSpec.from_manifests(manifests, cfg.data.latent_scaling_factor)
    path = cfg.vae.path or spec.vae.get("path", "")
    if not path or not os.path.isdir(path):
        raise ConfigError(f"vae.path={path!r}: the VAE that encoded the training latents is needed to export "
                          f"a latent model (set vae.path to its diffusers AutoencoderKL folder)")
    digest = weights_digest(path)
    if spec.vae.get("sha256") and spec.vae["sha256"] != digest:
        raise ConfigError(f"vae.path={path!r}: its weights (sha256 {digest}) are not those that encoded the "
                          f"training latents ({spec.vae['sha256']})")
    return {"vae": "vae", "source": os.path.abspath(path), "sha256": digest, "scaling_factor": spec.scale,
            "shift_factor": spec.shift, "shape": list(spec.shape),
            "image_size": int(spec.shape[1]) * int(spec.vae.get("factor", 1))}


def add_latent_config(config: dict, latent: dict) -> None:
    """An export's config.yaml for a latent model: "image" describes the diffusion space (the latent
    c, h), ``latent`` the VAE folder and the scaling; no x0 clipping (latents are not in [-1, 1])."""
    config["image"] = {"size": int(latent["shape"][1]), "channels": int(latent["shape"][0])}
    config["latent"] = {k: v for k, v in latent.items()}
    config.setdefault("inference", {})["clip_x0"] = None


def write_export_vae(latent: dict, out_dir: str) -> list[str]:
    """``out_dir/vae/``: the VAE (weights byte for byte) with the training scaling in its config.json."""
    from framework.models.vae import save_vae_dir
    files = save_vae_dir(latent["source"], os.path.join(out_dir, latent["vae"]),
                         latent["scaling_factor"], latent["shift_factor"])
    return [f"{latent['vae']}/{f}" for f in files]
