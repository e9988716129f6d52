"""framework/data/loader.py on real webdataset shards written to a tmp dir (tiny: 8x8 images)."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from framework.config import DataConfig
from framework.data.loader import DataError, build_loader, expand_spec, iter_shard_samples
from framework.data.shards import ShardWriter
from tests._fixtures import loader_run, take

COUNTS = [12, 9, 15, 11, 12, 8, 14, 10, 13, 12]     # 10 shards, unequal, 116 samples


def _png(rng, size=8, mode="L"):
    arr = rng.integers(0, 256, (size, size) if mode == "L" else (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def make_dataset(path, counts=COUNTS, prefix="d", size=8, seed=0, captions=None, bad=None):
    """Shards with keys '{prefix}{shard:02d}x{i:03d}'; ``bad``: {key: kind} writes a bad sample."""
    rng = np.random.default_rng(seed)
    bad = bad or {}
    w = ShardWriter(str(path), prefix=prefix, max_count=10_000)
    for s, n in enumerate(counts):
        for i in range(n):
            key = f"{prefix}{s:02d}x{i:03d}"
            cap = captions(key) if captions else f"caption of {key}"
            kind = bad.get(key)
            if kind == "undecodable":
                w.write(key, (b"\x89PNG\r\n\x1a\n this is not a png", "png"), cap, {"label": i % 10})
            elif kind == "no_caption":
                w.write(key, _png(rng, size), None, {"label": i % 10})
            elif kind == "empty":
                w.write(key, (b"", "png"), cap, {"label": i % 10})
            else:
                w.write(key, _png(rng, size), cap, {"label": i % 10})
        w.next_shard()
    return w.close()


def shard_of(key: str) -> int:
    return int(key[1:3])


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    make_dataset(d)
    return str(d)


def cfg_for(urls, **kw) -> DataConfig:
    base = dict(urls=urls if isinstance(urls, list) else [urls], image_size=8, channels=1,
                shuffle_buffer=16, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


# ---------------------------------------------------------------------------------------------
def test_batch_format(ds):
    L = build_loader(cfg_for(ds, num_workers=0), batch_size=4, rank=0, world_size=1, seed=0)
    b = next(L)
    assert b["image"].shape == (4, 1, 8, 8) and b["image"].dtype == torch.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["label"].dtype == torch.int64 and b["label"].shape == (4,)
    assert len(b["caption"]) == 4 and b["caption"][0] == f"caption of {b['key'][0]}"
    assert set(b) == {"image", "caption", "key", "label"}
    # 116 samples, one reader, batch 4 -> 29 steps, nothing dropped
    assert L.steps_per_epoch == 29 and L.dropped_per_epoch == 0
    # RGB conversion, a size change and the resize/crop path
    L3 = build_loader(cfg_for(ds, channels=3, image_size=6, crop="random", random_flip=True), 4, 0, 1, 0)
    assert next(L3)["image"].shape == (4, 3, 6, 6)


def test_two_ranks_two_workers_disjoint_and_cover(ds):
    """2 ranks x 2 workers: each reader gets its own samples (whole shards plus at most two pieces
    of shards), every sample is read by exactly one reader but for the explicit equal-steps drop,
    which is less than one batch per reader; both ranks run the same number of steps."""
    B, R, W = 4, 2, 2
    C = R * W
    loaders = [build_loader(cfg_for(ds, num_workers=W), B, r, R, seed=3) for r in range(R)]
    S = loaders[0].steps_per_epoch
    assert S == loaders[1].steps_per_epoch and S % W == 0
    T = sum(COUNTS) // C                                  # 29 samples per reader
    assert S // W == T // B                               # 7 batches per reader (whole shards: 6)
    all_keys = {f"d{s:02d}x{i:03d}" for s, n in enumerate(COUNTS) for i in range(n)}

    def piece_keys(url, a, b):
        s = int(os.path.basename(url)[2:8])               # d-0000NN.tar
        return {f"d{s:02d}x{i:03d}" for i in range(a, COUNTS[s] if b is None else b)}

    for epoch in range(2):
        pieces = loaders[0].epoch_pieces(epoch)
        assert pieces == loaders[1].epoch_pieces(epoch)
        assert all(sum(b is not None for _, _, b in v) <= 2 for v in pieces.values())
        groups = {rw: set().union(*(piece_keys(*p) for p in v)) for rw, v in pieces.items()}
        assert all(len(g) == T for g in groups.values())
        union = set().union(*groups.values())
        assert len(union) == C * T and union <= all_keys                      # disjoint
        assert len(all_keys - union) == sum(COUNTS) % C                       # the remainder, < C
        seen_keys: list[str] = []
        for r, L in enumerate(loaders):
            batches = take(L, S)
            for i, b in enumerate(batches):
                w = i % W      # DataLoader round robin: step i of the epoch comes from worker i % W
                assert set(b["key"]) <= groups[(r, w)], (epoch, r, w)
            seen_keys += keys_of(batches)
        assert len(seen_keys) == len(set(seen_keys)) == S * B * R          # nobody read a sample twice
        dropped = sum(COUNTS) - len(seen_keys)
        assert dropped == loaders[0].dropped_per_epoch == sum(COUNTS) - C * (S // W) * B
        assert dropped < C * B                                               # < one batch per reader
        assert all(L.epoch == epoch + 1 for L in loaders)
    assert "dropped" not in loaders[0].summary() and "4 samples (3.45%) left out" in loaders[0].summary()
    for L in loaders:
        L.close()


def _run(urls, steps, B, rank, R, W, seed=5, sd=None, **kw):
    batches, st, stats = loader_run(cfg_for(urls, num_workers=W, **kw), steps, B, rank, R, seed, sd)
    return keys_of(batches), st, stats


@pytest.fixture(scope="module")
def ds_bad(tmp_path_factory):
    """Like ds, plus a few bad samples (they must be skipped identically after a resume)."""
    d = tmp_path_factory.mktemp("dsbad")
    make_dataset(d, bad={"d01x003": "undecodable", "d04x000": "no_caption", "d07x009": "empty"})
    return str(d)


@pytest.mark.parametrize("W,R", [(0, 1), (2, 1), (0, 2), (2, 2)])
def test_kill_and_resume_is_exact(ds_bad, W, R):
    """Stop after k steps, restart from the state dict: the rest of the key sequence equals the
    uninterrupted run's, on every rank, across the epoch boundary, with bad samples in the data."""
    B = 3
    L = build_loader(cfg_for(ds_bad, num_workers=W, max_bad_fraction=0.5), B, 0, R, 5)
    S = L.steps_per_epoch
    L.close()
    total = 2 * S + 2                                    # into the third epoch
    for rank in range(R):
        ref, ref_sd, ref_stats = _run(ds_bad, total, B, rank, R, W, max_bad_fraction=0.5)
        assert len(ref) == total * B
        for k in (1, S - 1, S, S + 2):                   # early, just before/at/after the epoch end
            head, sd, _ = _run(ds_bad, k, B, rank, R, W, max_bad_fraction=0.5)
            assert head == ref[:k * B]
            assert sd["step"] == k and sd["epoch"] == k // S
            tail, sd2, stats2 = _run(ds_bad, total - k, B, rank, R, W, sd=sd, max_bad_fraction=0.5)
            assert head + tail == ref, (rank, k)
            assert sd2 == ref_sd and stats2 == ref_stats   # counters continue too
        assert ref_stats["bad"] > 0 or R > 1


def test_resume_from_epoch_only_and_start_epoch(ds):
    B = 4
    ref, _, _ = _run(ds, 40, B, 0, 1, 0)
    S = 29
    L = build_loader(cfg_for(ds), B, 0, 1, 5, epoch=1)
    assert keys_of(take(L, 5)) == ref[S * B:(S + 5) * B]
    L2 = build_loader(cfg_for(ds), B, 0, 1, 5)
    L2.load_state_dict({"epoch": 1})                    # the trainer's "world size changed" fallback
    assert keys_of(take(L2, 5)) == ref[S * B:(S + 5) * B]


def test_state_from_other_setup_restarts_next_epoch(ds, caplog):
    _, sd, _ = _run(ds, 3, 4, 0, 1, 0)
    L = build_loader(cfg_for(ds), 2, 0, 1, 5)           # another batch size
    with caplog.at_level(logging.WARNING, logger="framework.data.loader"):
        L.load_state_dict(sd)
    assert "cannot resume exactly" in caplog.text
    assert L.step == L.steps_per_epoch and L.epoch == 1


def test_epochs_reshuffle_and_shuffle_is_seeded(ds):
    a, _, _ = _run(ds, 58, 4, 0, 1, 0)
    b, _, _ = _run(ds, 58, 4, 0, 1, 0)
    c, _, _ = _run(ds, 58, 4, 0, 1, 0, seed=6)
    assert a == b and a != c
    e0, e1 = a[:116], a[116:]
    assert sorted(e0) == sorted(e1) and e0 != e1         # every sample once per epoch, new order
    ordered, _, _ = _run(ds, 29, 4, 0, 1, 0, shuffle_buffer=0, shardshuffle=False)
    assert ordered == sorted(ordered)                   # no shuffle: the written order


# ---------------------------------------------------------------------------------------------
# bad samples and broken shards
# ---------------------------------------------------------------------------------------------
def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    bad = {"d00x001": "undecodable", "d02x004": "no_caption", "d03x002": "empty"}
    make_dataset(tmp_path, bad=bad)
    # a corrupt tar member: cut shard 5 (8 samples) in the middle of a member
    p = tmp_path / "d-000005.tar"
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2 + 700])
    n_ok = len(list(iter_shard_samples(str(p))))
    assert 0 < n_ok < 8
    cfg = cfg_for(str(tmp_path), max_bad_fraction=0.5, bad_check_after=10, bad_warn_every=1)
    L = build_loader(cfg, 4, 0, 1, 0)
    with caplog.at_level(logging.WARNING, logger="framework.data.loader"):
        keys = keys_of(take(L, L.steps_per_epoch))
    st = L.stats()
    assert st["bad_decode"] == 1 and st["bad_no_caption"] == 1 and st["bad_empty_file"] == 1
    assert st["bad_corrupt_tar"] == 8 - n_ok
    assert not set(bad) & set(keys)
    assert "d00x001" in caplog.text and "d-000000.tar" in caplog.text      # names shard and key
    assert "d-000005.tar" in caplog.text
    # the run continues into the next epoch with the same skips
    more = keys_of(take(L, L.steps_per_epoch))
    assert not set(bad) & set(more)
    assert L.stats()["bad"] == 2 * st["bad"]


def test_too_many_bad_samples_abort(tmp_path):
    bad = {f"d{s:02d}x{i:03d}": "undecodable" for s in range(10) for i in range(3)}
    make_dataset(tmp_path, bad=bad)
    for W in (0, 2):
        L = build_loader(cfg_for(str(tmp_path), num_workers=W, max_bad_fraction=0.1, bad_check_after=20),
                         4, 0, 1, 0)
        with pytest.raises(DataError, match=r"max_bad_fraction=0.1.*decode"):
            take(L, L.steps_per_epoch)
        L.close()


def test_missing_shard_is_an_error_naming_it(ds, tmp_path):
    with pytest.raises(DataError, match=r"33 of 43 shards missing: \S*d-000010.tar"):
        build_loader(cfg_for(os.path.join(ds, "d-{000000..000042}.tar")), 4, 0, 1, 0)
    # a shard that disappears after the loader was built
    d = tmp_path / "copy"
    shutil.copytree(ds, d)
    L = build_loader(cfg_for(str(d), shardshuffle=False), 4, 0, 1, 0)
    os.remove(d / "d-000000.tar")
    with pytest.raises(DataError, match="d-000000.tar"):
        next(L)
    # a shard that is not a tar at all
    (d / "d-000000.tar").write_bytes(b"garbage" * 100)
    L = build_loader(cfg_for(str(d), shardshuffle=False), 4, 0, 1, 0)
    with pytest.raises(DataError, match="d-000000.tar"):
        next(L)


def test_pipe_urls_need_allow_pipe(ds):
    url = "pipe:cat " + os.path.join(ds, "d-{000000..000009}.tar")
    with pytest.raises(ValueError, match="allow_pipe"):
        build_loader(cfg_for(url), 4, 0, 1, 0)
    # allowed: counts are unknown for a pipe, so the epoch is given in samples
    L = build_loader(cfg_for(url, allow_pipe=True, samples_per_epoch=40), 4, 0, 1, 0)
    assert L.steps_per_epoch == 10
    keys = keys_of(take(L, 10))
    assert len(set(keys)) == 40
    with pytest.raises(DataError, match="samples_per_epoch"):
        build_loader(cfg_for(url, allow_pipe=True), 4, 0, 1, 0)


def test_http_urls(ds):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=ds)
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        base = f"http://127.0.0.1:{srv.server_port}"
        # the manifest over http gives the counts
        L = build_loader(cfg_for(f"{base}/shards.json", shardshuffle=False, shuffle_buffer=0), 4, 0, 1, 0)
        assert L.steps_per_epoch == 29
        assert keys_of(take(L, 3))[:4] == ["d00x000", "d00x001", "d00x002", "d00x003"]
        L2 = build_loader(cfg_for(f"{base}/d-{{000000..000009}}.tar", samples_per_epoch=16), 4, 0, 1, 0)
        assert len(keys_of(take(L2, 4))) == 16
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------------------------------
# several datasets, resampling, npy arrays, captions
# ---------------------------------------------------------------------------------------------
def test_mixing_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_dataset(a, counts=[40, 40], prefix="a")
    make_dataset(b, counts=[30, 30], prefix="b")
    cfg = cfg_for([str(a), str(b)], weights=[3.0, 1.0], samples_per_epoch=800)
    L = build_loader(cfg, 8, 0, 1, 0)
    assert L.steps_per_epoch == 100
    keys = keys_of(take(L, 100))
    frac_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(frac_a - 0.75) < 0.04, frac_a
    # deterministic, and a resumed mixed stream continues exactly
    ref, _, _ = _run([str(a), str(b)], 30, 8, 0, 1, 2, weights=[3.0, 1.0], samples_per_epoch=160)
    head, sd, _ = _run([str(a), str(b)], 13, 8, 0, 1, 2, weights=[3.0, 1.0], samples_per_epoch=160)
    tail, _, _ = _run([str(a), str(b)], 17, 8, 0, 1, 2, sd=sd, weights=[3.0, 1.0], samples_per_epoch=160)
    assert head + tail == ref
    with pytest.raises(ValueError, match="weights"):
        build_loader(cfg_for([str(a), str(b)], weights=[1.0]), 8, 0, 1, 0)


def test_resampled_epochs_by_count_and_resume(ds):
    kw = dict(resampled=True, samples_per_epoch=64)
    with pytest.raises(DataError, match="samples_per_epoch"):
        build_loader(cfg_for(ds, resampled=True), 4, 0, 1, 0)
    L = build_loader(cfg_for(ds, num_workers=2, **kw), 4, 1, 2, 0)
    assert L.steps_per_epoch == 64 // (2 * 4)
    ref, _, _ = _run(ds, 20, 4, 1, 2, 2, **kw)
    head, sd, _ = _run(ds, 7, 4, 1, 2, 2, **kw)
    tail, _, _ = _run(ds, 13, 4, 1, 2, 2, sd=sd, **kw)
    assert head + tail == ref


def test_samples_per_epoch_with_fewer_samples_repeats(ds):
    L = build_loader(cfg_for(ds, samples_per_epoch=200), 4, 0, 1, 0)
    assert L.steps_per_epoch == 50
    keys = keys_of(take(L, 50))
    assert set(keys) == {f"d{s:02d}x{i:03d}" for s, n in enumerate(COUNTS) for i in range(n)}
    assert L.stats()["repeated"] == 200 - 116
    assert sorted(keys[:116]) == sorted(set(keys))       # pass 2 starts after every sample was seen


def test_npy_arrays_read_as_is_with_shape_check(tmp_path):
    w = ShardWriter(str(tmp_path), prefix="z", max_count=6)
    rng = np.random.default_rng(0)
    arrs = {}
    for i in range(12):
        a = rng.standard_normal((4, 2, 2)).astype(np.float16 if i % 2 else np.float32) * 3
        if i == 5:
            a = np.zeros((4, 3, 3), np.float32)       # wrong shape
        arrs[f"z{i:03d}"] = a
        w.write(f"z{i:03d}", a, f"latent {i}")
    w.close()
    cfg = cfg_for(str(tmp_path), channels=4, image_size=2, shuffle_buffer=0, shardshuffle=False,
                  max_bad_fraction=0.5)
    L = build_loader(cfg, 5, 0, 1, 0)
    b = next(L)
    assert b["image"].shape == (5, 4, 2, 2) and b["image"].dtype == torch.float32
    for k, x in zip(b["key"], b["image"]):
        np.testing.assert_allclose(x.numpy(), arrs[k].astype(np.float32))    # no resize, no rescale
    next(L)
    assert L.stats()["bad_shape"] == 1


def test_caption_choice_is_seeded_per_sample_and_epoch(tmp_path):
    make_dataset(tmp_path, counts=[8, 8], captions=lambda k: ["one " + k, "two " + k, "three " + k])
    a, _, _ = _run(str(tmp_path), 8, 4, 0, 1, 0, shuffle_buffer=0, shardshuffle=False)
    L = build_loader(cfg_for(str(tmp_path), shuffle_buffer=0, shardshuffle=False), 4, 0, 1, 5)
    caps = [c for b in take(L, 8) for c in b["caption"]]
    first = {c.split()[1]: c.split()[0] for c in caps[:16]}
    second = {c.split()[1]: c.split()[0] for c in caps[16:]}
    assert set(first.values()) == {"one", "two", "three"}
    assert first != second                               # a new choice in the next epoch
    L2 = build_loader(cfg_for(str(tmp_path), shuffle_buffer=0, shardshuffle=False), 4, 0, 1, 5)
    assert [c for b in take(L2, 8) for c in b["caption"]] == caps


def test_too_few_shards_for_readers_is_a_clear_error(ds):
    with pytest.raises(DataError, match="10 shards for 4 ranks x 3 workers"):
        build_loader(cfg_for(ds, num_workers=3), 4, 0, 4, 0)
    with pytest.raises(ValueError, match="rank"):
        build_loader(cfg_for(ds), 4, 2, 2, 0)


def test_bench_tool_smoke(tmp_path, capsys):
    from tools import bench_data

    res = bench_data.main(["--n-fmnist", "64", "--n-jpeg", "16", "--seconds", "0.05", "--workers", "0",
                           "--batch", "8", "--tmp", str(tmp_path)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines == res
    kinds = {(r.get("dataset"), r["what"], r.get("image_size")) for r in res}
    assert ("fmnist-28px-png", "bare_pil_decode", None) in kinds
    assert ("synthetic-256px-jpeg", "pipeline_decode_augment_batch", 256) in kinds
    assert all(r["samples_per_s"] > 0 for r in res if "samples_per_s" in r)


def test_tar_reader_matches_tarfile_and_recovers(tmp_path):
    """The direct tar parser against tarfile: GNU long names, pax (unicode) names, ustar prefixes,
    directories and links; gzip shards go through tarfile; one damaged header loses one member."""
    import gzip
    import tarfile

    from framework.data.tario import tar_members as _tar_members

    rng = np.random.default_rng(0)
    files = [("k1.txt", b"hello"), ("d/" + "x" * 120 + ".bin", rng.bytes(700)),
             ("caf\u00e9.txt", b"unicode"), ("a/" * 60 + "deep.txt", b"prefix"), ("empty.txt", b""),
             ("big.bin", rng.bytes(5000))]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"t{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
            link = tarfile.TarInfo("alink")
            link.type, link.linkname = tarfile.SYMTYPE, "k1.txt"
            tf.addfile(link)
            for name, data in files:
                if fmt == tarfile.USTAR_FORMAT and ("\u00e9" in name or len(name.rsplit("/", 1)[-1]) > 100):
                    continue
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        with tarfile.open(path) as tf:
            want = [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]
        problems: list = []
        with open(path, "rb") as f:
            assert list(_tar_members(f, str(path), problems)) == want and problems == []
    # gzip-compressed webdataset shard: read through tarfile, same samples
    make_dataset(tmp_path / "ds", counts=[5])
    raw = (tmp_path / "ds" / "d-000000.tar").read_bytes()
    (tmp_path / "gz.tar.gz").write_bytes(gzip.compress(raw))
    plain = [s["__key__"] for s in iter_shard_samples(str(tmp_path / "ds" / "d-000000.tar"))]
    assert [s["__key__"] for s in iter_shard_samples(str(tmp_path / "gz.tar.gz"))] == plain
    # damage the header of the 2nd sample's png (checksum breaks): that member alone is lost
    with tarfile.open(tmp_path / "ds" / "d-000000.tar") as tf:
        off = [m.offset for m in tf if m.name == "d00x001.png"][0]
    bad = bytearray(raw)
    bad[off + 10:off + 20] = b"\xff" * 10
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    events: list = []
    got = list(iter_shard_samples(str(tmp_path / "bad.tar"), events, expected=5))
    assert [s["__key__"] for s in got] == plain
    assert "png" not in got[1] and "png" in got[2]
    assert events and events[0][0] == "corrupt_tar" and "damaged tar header" in events[0][2]


# ---------------------------------------------------------------------------------------------
# img2dataset's output read as it is; counting and its cache
# ---------------------------------------------------------------------------------------------
def _jpg(rng, size=8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(buf, format="JPEG")
    return buf.getvalue()


def write_img2dataset(path, n_shards, per_shard, stats=True, caption=lambda key: f"a photo {key}", seed=0):
    """A tree as img2dataset writes it: ``00000.tar`` with ``KEY.jpg``, ``KEY.txt``, ``KEY.json``
    (keys of 9 digits), ``00000.parquet`` and ``00000_stats.json`` beside each tar."""
    import tarfile

    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    keys = []
    for s in range(n_shards):
        with tarfile.open(os.path.join(path, f"{s:05d}.tar"), "w") as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                keys.append(key)
                meta = {"key": key, "status": "success", "url": f"http://x/{key}.jpg", "width": 8, "height": 8}
                for ext, data in (("jpg", _jpg(rng)), ("txt", caption(key).encode()),
                                  ("json", json.dumps(meta).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        with open(os.path.join(path, f"{s:05d}.parquet"), "wb") as f:
            f.write(b"PAR1 (img2dataset's per-shard table; not read by the loader) PAR1")
        if stats:
            with open(os.path.join(path, f"{s:05d}_stats.json"), "w") as f:
                json.dump({"count": per_shard + 1, "successes": per_shard, "failed_to_download": 1,
                           "failed_to_resize": 0, "status_dict": {"success": per_shard}}, f)
    return keys


class TarOpens:
    """Counts the tar files the reader opens (framework.data.tario opens local shards with open())."""

    def __init__(self, monkeypatch):
        import builtins

        from framework.data import tario
        self.paths: list[str] = []
        real = builtins.open

        def counting_open(file, *a, **k):
            if str(file).endswith(".tar"):
                self.paths.append(str(file))
            return real(file, *a, **k)
        monkeypatch.setattr(tario, "open", counting_open, raising=False)


def test_img2dataset_tree_without_manifest_reads_no_tar_at_startup(tmp_path, monkeypatch):
    keys = write_img2dataset(tmp_path / "i2d", 6, 5)
    opens = TarOpens(monkeypatch)
    for spec in (str(tmp_path / "i2d"), str(tmp_path / "i2d" / "{00000..00005}.tar")):
        L = build_loader(cfg_for(spec, channels=3, shuffle_buffer=8), 5, 0, 1, 0)
        assert opens.paths == []                                       # counts from _stats.json
        assert L.steps_per_epoch == 6 and L.dropped_per_epoch == 0
        batches = take(L, 6)
        assert opens.paths and sorted(keys_of(batches)) == keys
        b = batches[0]
        assert b["image"].shape == (5, 3, 8, 8) and b["caption"][0] == f"a photo {b['key'][0]}"
        opens.paths.clear()


def test_tars_without_counts_are_counted_once_cached_and_a_truncated_one_starts(tmp_path, monkeypatch, caplog):
    from framework.data import shardlist

    n = 70                                        # >= shardlist._POOL_MIN: the thread pool counts them
    keys = write_img2dataset(tmp_path / "d", n, 2, stats=False)
    p = tmp_path / "d" / "00003.tar"
    import tarfile
    with tarfile.open(p) as tf:
        cut = [m.offset_data for m in tf if m.name == "000030001.jpg"][0] + 100
    p.write_bytes(p.read_bytes()[:cut])         # cut inside the second sample's image
    with caplog.at_level(logging.WARNING, logger="framework.data.shardlist"):
        L = build_loader(cfg_for(str(tmp_path / "d"), channels=3, max_bad_fraction=0.5), 4, 0, 1, 0)
    assert "00003.tar" in caplog.text                                   # counted as far as it reads
    cache = json.load(open(tmp_path / "d" / "shards.json"))
    assert cache["source"]["kind"] == "counted" and len(cache["shards"]) == n
    counts = {s["url"]: s["count"] for s in cache["shards"]}
    assert counts["00003.tar"] == 1 and sum(counts.values()) == 2 * n - 1
    keys_read = keys_of(take(L, L.steps_per_epoch))
    st = L.stats()
    assert st["bad_corrupt_tar"] >= 1                                   # the truncated tar is counted as bad
    assert set(keys_read) <= set(keys) and "000030001" not in keys_read
    # the second start reads no tar; a changed tar (size/mtime) is counted again, alone
    opens = TarOpens(monkeypatch)
    build_loader(cfg_for(str(tmp_path / "d"), channels=3), 4, 0, 1, 0)
    assert opens.paths == []
    q = tmp_path / "d" / "00005.tar"
    q.write_bytes(q.read_bytes())
    os.utime(q, ns=(1, 1))
    build_loader(cfg_for(str(tmp_path / "d"), channels=3), 4, 0, 1, 0)
    assert [os.path.basename(x) for x in opens.paths] == ["00005.tar"]
    # a read-only folder: the counts go to data.count_cache; a writer's manifest is never replaced
    write_img2dataset(tmp_path / "ro", 3, 2, stats=False)
    monkeypatch.setattr(shardlist, "_writable", lambda folder: False)
    opens.paths.clear()
    cfg = cfg_for(str(tmp_path / "ro" / "{00000..00002}.tar"), channels=3, count_cache=str(tmp_path / "cache"))
    assert build_loader(cfg, 2, 0, 1, 0).steps_per_epoch == 3 and len(opens.paths) == 3
    assert not os.path.exists(tmp_path / "ro" / "shards.json") and len(os.listdir(tmp_path / "cache")) == 1
    opens.paths.clear()
    build_loader(cfg, 2, 0, 1, 0)
    assert opens.paths == []


def test_remote_shards_without_counts_name_the_two_fixes(ds):
    url = "pipe:cat " + os.path.join(ds, "d-{000000..000009}.tar")
    with pytest.raises(DataError, match=r"(?s)tools.make_shards count.*data.samples_per_epoch"):
        build_loader(cfg_for(url, allow_pipe=True), 4, 0, 1, 0)


# ---------------------------------------------------------------------------------------------
# caption and image conventions
# ---------------------------------------------------------------------------------------------
def test_a_txt_is_one_caption_and_several_need_a_json_list_or_the_option(tmp_path):
    write_img2dataset(tmp_path / "d", 2, 3, caption=lambda key: "a photo\nof a\tsneaker  \n")
    L = build_loader(cfg_for(str(tmp_path / "d"), channels=3, shuffle_buffer=0), 3, 0, 1, 0)
    assert next(L)["caption"] == ["a photo of a sneaker"] * 3
    L = build_loader(cfg_for(str(tmp_path / "d"), channels=3, captions="lines"), 3, 0, 1, 0)
    caps = {c for b in take(L, 2) for c in b["caption"]}
    assert caps <= {"a photo", "of a sneaker"} and caps                  # the explicit option: one per line
    # a JSON caption member: a list gives several captions, a string one
    import tarfile
    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "j.tar", "w") as tf:
        for i in range(6):
            cap = ["one", "two"] if i % 2 else "three"
            for ext, data in (("jpg", _jpg(rng)), ("json", json.dumps({"captions": cap, "x": 1}).encode())):
                ti = tarfile.TarInfo(f"k{i}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    L = build_loader(cfg_for(str(tmp_path / "j.tar"), channels=3, caption_key="json", shuffle_buffer=0,
                             shardshuffle=False), 6, 0, 1, 0)
    seen = [c for b in take(L, 8) for c in b["caption"]]
    assert set(seen[0::2]) == {"three"} and set(seen[1::2]) == {"one", "two"}


def test_16bit_images_are_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    arr16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    im = Image.fromarray(arr16)
    assert im.mode.startswith("I")
    w = ShardWriter(str(tmp_path), max_count=10)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    for i in range(4):
        w.write(f"k{i}", (buf.getvalue(), "png"), "grey")
    w.close()
    back = Image.open(io.BytesIO(buf.getvalue()))
    back.load()
    assert np.array_equal(np.asarray(back).astype(np.int64), arr16.astype(np.int64))    # a 16-bit PNG indeed
    b = next(build_loader(cfg_for(str(tmp_path), shuffle_buffer=0), 4, 0, 1, 0))
    got = (b["image"][0, 0].numpy() + 1) * 127.5                       # back to 0..255
    want = arr16 / 257.0                                               # 65535 -> 255
    assert np.abs(got - want).max() <= 0.5 + 1e-3                      # rounding only (clipping: 255 - want)
    assert abs(got.mean() - want.mean()) < 0.1


# ---------------------------------------------------------------------------------------------
# resume in O(shuffle buffer); few shards drop less than a batch per reader
# ---------------------------------------------------------------------------------------------
def test_resume_at_90_percent_opens_only_the_buffered_shards(tmp_path, monkeypatch):
    make_dataset(tmp_path, counts=[10] * 40)
    buf = 8
    kw = dict(shuffle_buffer=buf)
    ref, _, _ = _run(str(tmp_path), 100, 4, 0, 1, 0, **kw)
    S = 100                                                            # 400 samples / batch 4
    k = int(0.9 * S)
    head, sd, _ = _run(str(tmp_path), k, 4, 0, 1, 0, **kw)
    refs = sd["workers"][0]["stream"]["ds"][0]["buf"]
    assert 0 < len(refs) <= buf and all(isinstance(off, int) for _, _, off in refs)
    opens = TarOpens(monkeypatch)
    L = build_loader(cfg_for(str(tmp_path), **kw), 4, 0, 1, 5)
    L.load_state_dict(json.loads(json.dumps(sd)))
    first = next(L)
    assert len(set(opens.paths)) <= buf + 1                            # the buffered shards + the current one
    assert head + first["key"] + keys_of(take(L, S - k - 1)) == ref
    L.close()


def test_resume_mid_epoch_two_ranks_two_workers_with_pieces_and_damage(tmp_path):
    """Shards split at sample level across 4 readers, one truncated: resuming at 10%, 50%, 90%
    gives the uninterrupted key sequence and counters on both ranks."""
    make_dataset(tmp_path, counts=[37, 41, 29, 33, 35], bad={"d02x005": "undecodable"})
    p = tmp_path / "d-000003.tar"
    p.write_bytes(p.read_bytes()[:-3000])
    kw = dict(max_bad_fraction=0.5, shuffle_buffer=6)
    B, R, W = 3, 2, 2
    L = build_loader(cfg_for(str(tmp_path), num_workers=W, **kw), B, 0, R, 5)
    S = L.steps_per_epoch
    assert any(b is not None for v in L.epoch_pieces(0).values() for _, _, b in v)   # pieces of shards
    L.close()
    total = S + 3
    for rank in range(R):
        ref, ref_sd, ref_stats = _run(str(tmp_path), total, B, rank, R, W, **kw)
        for k in (S // 10, S // 2, 9 * S // 10):
            head, sd, _ = _run(str(tmp_path), k, B, rank, R, W, **kw)
            tail, sd2, stats2 = _run(str(tmp_path), total - k, B, rank, R, W, sd=sd, **kw)
            assert head + tail == ref, (rank, k)
            assert sd2 == ref_sd and stats2 == ref_stats
        assert ref_stats["bad_corrupt_tar"] + ref_stats["bad_decode"] > 0 or rank == 1


@pytest.mark.parametrize("W", [0, 2])
def test_few_shards_drop_less_than_a_batch_per_reader(tmp_path, W):
    """7 shards on 2 ranks: whole-shard groups would drop most of a shard per epoch; pieces of
    shards leave out less than one batch per reader, and every other sample is read once."""
    counts = [30] * 7
    make_dataset(tmp_path, counts=counts)
    B, R = 4, 2
    C = R * max(1, W)
    loaders = [build_loader(cfg_for(str(tmp_path), num_workers=W), B, r, R, 0) for r in range(R)]
    S = loaders[0].steps_per_epoch
    dropped = loaders[0].dropped_per_epoch
    assert dropped < C * B and dropped == sum(counts) - R * S * B
    keys = [k for L in loaders for k in keys_of(take(L, S))]
    assert len(keys) == len(set(keys)) == sum(counts) - dropped
    s = loaders[0].summary()
    assert f"{dropped} samples ({100 * dropped / sum(counts):.2f}%) left out per epoch" in s
    for L in loaders:
        L.close()
