"""tools/bench.py: FLOP counts ours vs diffusers, the counter itself, and that the CLI prints valid
JSON lines with the expected keys. No timing thresholds: timings on shared CPUs mean nothing here."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from framework.train.flops import flop_counter
from tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="optional: pip install diffusers (extra 'bench')")


def _run_cli(args: list[str], timeout: int = 600) -> list[dict]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert lines, p.stderr[-3000:]
    recs = [json.loads(ln) for ln in lines]            # every stdout line is one JSON object
    assert all(isinstance(r, dict) and "bench" in r and "device" in r and "loadavg" in r for r in recs)
    return recs


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def test_flop_counter_counts_attention_on_cpu_like_meta():
    """torch registers attention FLOP formulas for the CUDA kernels only; on a CPU device SDPA's
    fused kernel would count 0. Our counter maps it, so CPU and meta (which decomposes to bmm) agree."""
    meta = bench.count_flops("tiny", "ours", batch=1, device="meta")
    cpu = bench.count_flops("tiny", "ours", batch=1, device="cpu")
    assert cpu["fwd"] == meta["fwd"] and cpu["fwd_bwd"] == meta["fwd_bwd"]
    assert 2 * meta["fwd"] < meta["fwd_bwd"] < 3.5 * meta["fwd"]      # backward ~ 2 x forward
    # attention is in there: 2 (QK^T, AV) x 2 FLOP/MAC x heads*d x N x L per layer, L = 77 tokens
    with flop_counter() as fc:
        with torch.device("meta"):
            q = torch.randn(1, 2, 64, 16)
            k = torch.randn(1, 2, 77, 16)
        torch.nn.functional.scaled_dot_product_attention(q, k, k)
    assert fc.get_total_flops() == 2 * 2 * 2 * 16 * 64 * 77


@needs_diffusers
def test_flops_tiny_match_diffusers():
    rec = bench.flops_record("tiny", with_diffusers=True)
    assert rec["ours_params"] == rec["diffusers_params"]
    assert abs(rec["rel_diff_fwd"]) < 0.02 and abs(rec["rel_diff_fwd_bwd"]) < 0.02
    assert rec["within_2pct"] is True


@needs_diffusers
def test_flops_sd2_match_diffusers_meta():
    """SD2 preset (32x32x4 latent, 77x1024 context), forward and forward+backward, on the meta device."""
    rec = bench.flops_record("sd2", with_diffusers=True)
    assert rec["ours_params"] == rec["diffusers_params"] == 865_910_724
    assert abs(rec["rel_diff_fwd"]) < 0.02 and abs(rec["rel_diff_fwd_bwd"]) < 0.02
    assert rec["ours_fwd"] > 1e11                                   # ~181 GFLOP per latent forward


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def test_parse_variant_and_per_preset():
    assert bench.parse_variant("base") == frozenset()
    assert bench.parse_variant("channels_last+compile") == {"channels_last", "compile"}
    with pytest.raises(ValueError, match="unknown variant"):
        bench.parse_variant("channel_last")
    d = {"tiny": 32, "base64": 2, "sd2": 1}
    assert bench._per_preset(None, d, ["tiny", "sd2"]) == {"tiny": 32, "sd2": 1}
    assert bench._per_preset("8", d, ["tiny", "sd2"]) == {"tiny": 8, "sd2": 8}
    assert bench._per_preset("sd2=2", d, ["tiny", "sd2"]) == {"tiny": 32, "sd2": 2}


def test_interleaved_rotates_order():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = bench._interleaved(fns, 4, torch.device("cpu"))
    assert all(len(v) == 4 for v in times.values())
    firsts = [calls[i * 3] for i in range(4)]
    assert len(set(firsts)) > 1                                       # not always the same one first


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------
TRAIN_KEYS = {"preset", "model", "variant", "engine", "precision", "batch", "images_per_s", "step_s_median",
              "step_s_all", "flops_per_image", "tflops", "peak_tflops", "mfu", "peak_mem_mb", "mem_kind"}
SAMPLE_KEYS = {"preset", "model", "variant", "batch", "forward_batch", "sample_steps", "images_per_s",
               "s_per_batch_median", "flops_per_image", "mfu", "finite"}


def test_cli_quick_prints_json_lines():
    recs = _run_cli(["--presets", "tiny", "--steps", "2", "--quick", "--threads", "1"])
    by = {}
    for r in recs:
        by.setdefault(r["bench"], []).append(r)
    assert set(by) >= {"env", "peak", "flops", "train", "sample", "data", "done"}
    assert by["done"][0]["errors"] == 0, [r for r in recs if "error" in r]
    assert by["env"][0]["machine"]["cpus"] >= 1 and by["env"][0]["threads"] == 1
    assert by["peak"][0]["tflops"] > 0
    models = {"ours", "diffusers"} if HAS_DIFFUSERS else {"ours"}
    train = {r["model"]: r for r in by["train"]}
    assert set(train) == models
    for r in train.values():
        assert TRAIN_KEYS <= set(r), TRAIN_KEYS - set(r)
        assert r["preset"] == "tiny" and r["steps"] == 2 and len(r["step_s_all"]) == 2
        assert r["engine"] == "deepspeed-zero2" and r["precision"] == "fp32" and r["loss_finite"]
        assert r["images_per_s"] > 0 and 0 < r["mfu"] and r["peak_mem_mb"] >= 0
    sample = {r["model"]: r for r in by["sample"]}
    assert set(sample) == models
    for r in sample.values():
        assert SAMPLE_KEYS <= set(r), SAMPLE_KEYS - set(r)
        assert r["forward_batch"] == 2 * r["batch"] and r["finite"]
    if HAS_DIFFUSERS:
        ratios = {r["what"]: r for r in by["ratio"]}
        assert set(ratios) == {"train", "sample"}
        assert all(r["ours_over_diffusers"] > 0 and r["paired"] for r in ratios.values())
        assert by["flops"][0]["within_2pct"] is True
    assert {r["what"] for r in by["data"]} >= {"bare_pil_decode", "pipeline_decode_augment_batch"}


@pytest.mark.slow
def test_cli_isolated_worker_channels_last_under_deepspeed():
    """The subprocess-per-group path, and channels_last under the DeepSpeed engine (channels_last
    weights used to break deepspeed.initialize)."""
    recs = _run_cli(["--presets", "tiny", "--sections", "train", "--variants", "base,channels_last",
                     "--no-diffusers", "--batch", "2", "--warmup", "1", "--steps", "2", "--threads", "1",
                     "--peak-n", "128", "--isolate"])
    train = {r["variant"]: r for r in recs if r["bench"] == "train"}
    assert not [r for r in recs if "error" in r]
    assert set(train) == {"base", "channels_last"} and all(r["loss_finite"] for r in train.values())
    (var,) = [r for r in recs if r["bench"] == "variants"]
    assert var["model"] == "ours" and set(var["speedup_vs_base"]) == {"channels_last"} and var["paired"]


# ---------------------------------------------------------------------------------------------
# Largest micro batch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixed,per_image,limit,start", [
    (20_000.0, 95.0, 141_000.0, 8),       # SD2-like training on an H200: ~1,270
    (1_000.0, 3.0, 141_000.0, 8),         # sampling: tens of thousands
    (500.0, 0.7, 900.0, 2),
    (300.0, 2.0, 141_000.0, 64),
])
def test_find_max_batch_brackets_the_limit_in_few_probes(fixed, per_image, limit, start):
    """Memory linear in B with a 2% wobble: the search ends with a fitting B and a failing B+r,
    r within 3%, the true answer inside, in at most 8 probes (bisection from 8 would need ~20)."""
    import random
    rng = random.Random(0)

    def probe(b):
        peak = fixed + per_image * b * (1 + 0.02 * rng.random())
        return peak <= limit, peak
    r = bench.find_max_batch(probe, start, limit, tol=0.03, max_probes=10)
    lo, hi = r["max_batch"], r["first_fail"]
    assert 0 < lo < hi <= lo + max(1, int(0.03 * lo)), r
    assert (limit - fixed) / (per_image * 1.02) - 1 <= hi and lo <= (limit - fixed) / per_image, r
    assert len(r["probes"]) <= 8, r["probes"]
    assert all(p["fits"] == (p["batch"] <= lo) for p in r["probes"] if p["batch"] <= lo or p["batch"] >= hi)


def test_find_max_batch_nothing_fits():
    r = bench.find_max_batch(lambda b: (False, None), 8, 100.0)
    assert r["max_batch"] == 0 and r["first_fail"] == 1 and [p["batch"] for p in r["probes"]] == [8, 4, 2, 1]


@pytest.mark.slow
@pytest.mark.long      # ~50 s of real probes: make test-long (CI runs it), keeping make test under 15 min
def test_cli_maxbatch_train_and_sample_on_cpu():
    """The real probes (DeepSpeed ZeRO-2 training step with EMA; one CFG sampling step) under an RSS
    limit: every probe's verdict agrees with its measured peak, the answer is bracketed."""
    limit = 800.0
    recs = _run_cli(["--presets", "tiny", "--sections", "maxbatch", "--threads", "1", "--no-diffusers",
                     "--maxbatch-variants", "base", "--mem-limit-mb", str(limit), "--maxbatch-probes", "6"])
    mb = {r["what"]: r for r in recs if r["bench"] == "maxbatch"}
    assert set(mb) == {"train", "sample"}, recs
    for what, r in mb.items():
        assert "error" not in r, r
        assert r["max_batch"] >= 8 and r["first_fail"] > r["max_batch"], r
        for p in r["probes"]:
            if abs(p["peak_mb"] - limit) > 0.1:          # the record rounds the peak to 0.1 MB
                assert p["fits"] == (p["peak_mb"] <= limit), p
        fitting = {p["batch"] for p in r["probes"] if p["fits"]}
        assert r["max_batch"] == max(fitting) and r["first_fail"] not in fitting
        assert r["mb_per_image"] > 0 and r["images_per_s_at_max"] > 0
    # the forward-only sampling step holds no gradients, optimizer state or saved activations
    assert mb["sample"]["max_batch"] > mb["train"]["max_batch"]


@needs_diffusers
@pytest.mark.slow
@pytest.mark.long      # four real Trainers: make test-long
def test_cli_vae_section_encode_and_on_the_fly_vs_latents():
    """Section vae on the latent demo's preset: the VAE encode rate and the real Trainer step from
    precomputed latents and with the VAE encoding on the fly, ours and diffusers' UNet; encoding adds
    work, so a step from latents is not slower than the same step plus the encode (within timing
    noise: the median of 3 steps each, interleaved)."""
    recs = _run_cli(["--presets", "latent_small", "--sections", "vae", "--threads", "1", "--batch", "8",
                     "--sample-batch", "8", "--warmup", "1", "--steps", "3", "--no-isolate"])
    enc = [r for r in recs if r["bench"] == "vae_encode"]
    assert len(enc) == 1 and enc[0]["image"] == [1, 32, 32] and enc[0]["latent"] == [4, 8, 8]
    assert enc[0]["images_per_s"] > 0 and enc[0]["vae_params"] > 500_000
    steps = {(r["model"], r["mode"]): r for r in recs if r["bench"] == "train_latent"}
    assert set(steps) == {(m, k) for m in ("ours", "diffusers") for k in ("latents", "on_the_fly")}
    assert steps[("ours", "on_the_fly")]["input"] == [1, 32, 32] and steps[("ours", "latents")]["input"] == [4, 8, 8]
    ratios = {r["model"]: r["precomputed_over_on_the_fly"] for r in recs if r["bench"] == "train_latent_ratio"}
    assert set(ratios) == {"ours", "diffusers"} and all(v > 0 for v in ratios.values())
    skipped = _run_cli(["--presets", "tiny", "--sections", "vae", "--no-diffusers", "--no-isolate"])
    assert any(r["bench"] == "skipped" and r["what"] == "vae" for r in skipped)
