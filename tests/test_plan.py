"""framework/train/plan.py and tools/plan.py: closed forms, the probe, the CLI, and the plan against what
the real DeepSpeed engine holds on 1, 2 and 4 gloo ranks and against the bench's largest micro batch."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from framework.train import plan as P
from framework.config import Config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Probes write to a cache of this test session, not to the user's."""
    monkeypatch.setenv("FRAMEWORK_PLAN_CACHE", str(tmp_path_factory.getbasetemp() / "plan_cache.json"))


def _env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


TINY_ACT = {"bytes_per_image": 7.5 * 2 ** 20, "fixed_bytes": 1.0 * 2 ** 20}


def tiny(**kw) -> P.Workload:
    return P.Workload.from_preset("tiny", **{"precision": "fp32", **kw})


# ---------------------------------------------------------------------------------------------
# FLOPs: the bench's count, exactly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", pytest.param("sd2", marks=pytest.mark.slow)])
def test_flops_identical_to_bench(preset):
    from tools import bench
    ref = bench.count_flops(preset, "ours")
    w = P.Workload.from_preset(preset)
    f = P.model_facts(w)
    assert (f["flops_fwd"], f["flops_fwd_bwd"], f["params"]) == (ref["fwd"], ref["fwd_bwd"], ref["params"])
    assert tuple(w.input_shape) == bench.input_shapes(preset)[0] and tuple(w.context) == bench.input_shapes(preset)[1]
    if preset == "sd2":       # docs/benchmarks.md: 181.09 / 539.31 GFLOP, 865,910,724 parameters
        assert f["params"] == 865_910_724 and round(f["flops_fwd_bwd"] / 1e9, 2) == 539.31


def test_checkpointing_adds_the_recomputed_forward():
    """Executed FLOPs with every block checkpointed = model fwd+bwd + the blocks' forward again:
    more than fwd+bwd, less than fwd+bwd + a whole forward (conv_in/out, time embedding are not
    recomputed)."""
    f0 = P.model_facts(tiny())
    f1 = P.model_facts(tiny(activation_checkpointing=True))
    assert f1["flops_fwd_bwd"] == f0["flops_fwd_bwd"]
    assert f0["flops_fwd_bwd"] < f1["flops_executed"] <= f0["flops_fwd_bwd"] + f0["flops_fwd"]
    assert f1["flops_executed"] > f0["flops_fwd_bwd"] + 0.8 * f0["flops_fwd"]


# ---------------------------------------------------------------------------------------------
# Memory: the DeepSpeed facts as closed forms
# ---------------------------------------------------------------------------------------------
def test_rank_memory_closed_forms():
    w = tiny(precision="bf16")
    f = P.model_facts(w)
    p = f["params"]
    for n in (1, 2, 4, 64):
        part = math.ceil(p / n)
        z1 = P.rank_memory(dataclasses.replace(w, zero_stage=1), n, f, None, "cuda")
        z2 = P.rank_memory(dataclasses.replace(w, zero_stage=2), n, f, None, "cuda")
        z3 = P.rank_memory(dataclasses.replace(w, zero_stage=3), n, f, None, "cuda")
        for z in (z1, z2):        # fp32 master + Adam m, v: 12 bytes per parameter, partitioned
            assert z["master_fp32"] + z["optimizer"] == 12 * part and z["params"] == 2 * p
            assert z["ema"] == 4 * p                   # a full fp32 copy on every rank
        assert z1["grads"] == 2 * p + 4 * part and z2["grads"] == 6 * part     # ZeRO-2 partitions them
        z3part = sum(math.ceil(k / n) for k in f["numels"])                   # each parameter padded to N
        assert z3["params"] == 2 * z3part and z3["master_fp32"] + z3["optimizer"] == 12 * z3part
        assert z3["ema"] == 4 * z3part and z3["grads"] == 2 * z3part
        assert p / n <= z3part < p / n + len(f["numels"])
    # fp32: every ZeRO stage still keeps a separate fp32 master partition; ZeRO-0 (torch's AdamW) none
    w32 = tiny()
    assert P.rank_memory(dataclasses.replace(w32, zero_stage=2), 2, f, None)["master_fp32"] == 4 * math.ceil(p / 2)
    z3part = sum(math.ceil(k / 2) for k in f["numels"])
    assert P.rank_memory(dataclasses.replace(w32, zero_stage=3), 2, f, None)["master_fp32"] == 4 * z3part
    assert P.rank_memory(dataclasses.replace(w32, zero_stage=0), 2, f, None)["master_fp32"] == 0
    assert P.rank_memory(dataclasses.replace(w32, ema=False), 2, f, None)["ema"] == 0
    # the bucket: DeepSpeed allocates reduce_bucket_size elements on CUDA; on CPU only touched pages count
    assert P.rank_memory(w, 2, f, None, "cuda")["buckets"] == 2 * P.DS_REDUCE_BUCKET
    assert P.rank_memory(w, 2, f, None, "cpu")["buckets"] == 2 * p


def test_peak_and_max_micro_batch_solve_the_inequality():
    w = tiny()
    f = P.model_facts(w)
    c = P.cluster("a100-40x8", memory_gib=4, runtime_gib=0.1)       # 1.9 GB of it: the fp32 reduce bucket
    b = P.max_micro_batch(w, c, f, TINY_ACT)
    usable = 4 * P.GiB - 0.1 * P.GiB
    fits = P.rank_memory(w, c.world, f, TINY_ACT, "cuda", micro_batch=b)["peak"]
    over = P.rank_memory(w, c.world, f, TINY_ACT, "cuda", micro_batch=b + 1)["peak"]
    assert 0 < b and fits <= usable < over
    assert P.max_micro_batch(w, c, f, None) is None
    assert P.max_micro_batch(w, P.cluster("a100-40x8", memory_gib=0.01), f, TINY_ACT) == 0


# ---------------------------------------------------------------------------------------------
# Communication and the rest of the plan
# ---------------------------------------------------------------------------------------------
def test_ring_collectives_intra_and_inter_node():
    S = 1e9
    one = P.cluster("h100x8", nodes=1, comm_efficiency=1.0)
    t = P.collective_seconds(S, one, "reduce_scatter")
    assert t["inter_s"] == 0 and t["s"] == pytest.approx(7 / 8 * S / 450e9)
    assert P.collective_seconds(S, one, "all_reduce")["s"] == pytest.approx(2 * t["s"])
    four = P.cluster("h100x8", nodes=4, comm_efficiency=1.0)
    t4 = P.collective_seconds(S, four, "all_gather")
    assert t4["intra_s"] == pytest.approx(t["s"]) and t4["inter_s"] == pytest.approx(3 / 4 * S / 400e9)
    assert P.collective_seconds(S, P.cluster("cpu", gpus_per_node=1, runtime_gib=0), "all_gather")["s"] == 0


def test_zero3_moves_1_5x_the_bytes_of_zero2_and_accumulation_scales():
    w = P.Workload.from_preset("sd2", micro_batch=8)
    P_ = 865_910_724
    v2 = P.comm_bytes(dataclasses.replace(w, zero_stage=2), P_)
    v3 = P.comm_bytes(dataclasses.replace(w, zero_stage=3), P_)
    assert sum(v3.values()) == 1.5 * sum(v2.values()) == 1.5 * 2 * 2 * P_
    v2a = P.comm_bytes(dataclasses.replace(w, zero_stage=2, grad_accum=4), P_)
    assert v2a["reduce_scatter"] == 4 * 2 * P_ and v2a["all_gather"] == 2 * P_
    v1a = P.comm_bytes(dataclasses.replace(w, zero_stage=1, grad_accum=4), P_)
    assert v1a == {"reduce_scatter": 2 * P_, "all_gather": 2 * P_}


def test_plan_numbers_hang_together():
    w = P.Workload.from_preset("sd2", micro_batch=32, zero_stage=2, mfu=0.5, target_images=1e9)
    c = P.cluster("a100-80x8", nodes=8)
    act = {"bytes_per_image": 50 * 2 ** 20, "fixed_bytes": 2 ** 28, "source": "test", "mode": "given"}
    p = P.make_plan(w, c, act=act, probe="off")        # the other checkpointing kinds: unknown (None)
    s = p["step"]
    assert s["compute_s"] == pytest.approx(32 * p["model"]["flops_executed_per_image"] / (312e12 * 0.5))
    assert s["step_s"] == pytest.approx(s["compute_s"] + s["comm_s"])
    assert s["images_per_s"] == pytest.approx(32 * 64 / s["step_s"])
    assert p["run"]["steps"] == math.ceil(1e9 / (32 * 64))
    assert p["run"]["gpu_hours"] == pytest.approx(p["run"]["hours"] * 64)
    ck = p["checkpoint"]                                  # bf16 module, optimizer, EMA (+ pickling)
    assert ck["total"] - ck["metadata"] == (2 + 12 + 4) * 865_910_724 and ck["metadata"] < 1e-3 * ck["total"]
    d = p["data"]
    assert d["pixel_side"] == 256
    assert d["mb_per_s_per_node"] == pytest.approx(s["images_per_s"] / 8 * d["latents_embeddings"] / 1e6)
    assert p["memory"]["fits"] is True and p["max_micro_batch"]["none"] >= 32
    text = P.format_plan(p)
    assert "largest micro batch" in text and "GPU-hours" in text


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="unknown cluster 'h300x8'"):
        P.cluster("h300x8")
    with pytest.raises(ValueError, match="unknown cluster field"):
        P.cluster("h100x8", gpus=4)
    with pytest.raises(ValueError, match="no UNet preset or config 'sd3'.*sd2"):
        P.Workload.from_preset("sd3")
    with pytest.raises(ValueError, match="zero_stage"):
        P.make_plan(tiny(zero_stage=4), P.cluster("h100x8"), act=TINY_ACT)


# ---------------------------------------------------------------------------------------------
# The activation probe
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fake_probe_equals_real_cpu_probe_and_checkpointing_saves():
    """Fake tensors take the CPU's kernels, so the tracked peaks agree exactly with real tensors;
    checkpointing every block keeps far less per image (docs/benchmarks.md: 2.26 vs 7.53 MB)."""
    u = tiny().unet
    real = P.probe_activations(u, (3, 32, 32), (77, 384), torch.float32, False, (1, 2), mode="cpu")
    assert real["bytes_per_image"] > 6 * 2 ** 20     # the bench's RSS slope: 7.53-7.58 MiB per image
    fake = P.probe_activations(u, (3, 32, 32), (77, 384), torch.float32, False, (1, 2), mode="fake")
    assert real["peaks"] == fake["peaks"]
    ck = P.probe_activations(u, (3, 32, 32), (77, 384), torch.float32, "all", (1, 2), mode="cpu")
    assert 0.2 < ck["bytes_per_image"] / real["bytes_per_image"] < 0.45


# ---------------------------------------------------------------------------------------------
# For the trainer
# ---------------------------------------------------------------------------------------------
def test_predict_rank_memory_and_check_fits(monkeypatch):
    cfg = Config()
    from framework.config import load_config
    cfg.unet = load_config(os.path.join(ROOT, "configs", "unet", "tiny.yaml")).unet
    cfg.engine.micro_batch = 4
    key_act = dict(TINY_ACT)
    monkeypatch.setattr(P, "activation_profile", lambda w, probe="auto", record=True: key_act)
    mem = P.predict_rank_memory(cfg, 2, "cpu")
    assert mem["activations"] == pytest.approx(1.05 * (TINY_ACT["fixed_bytes"] + 4 * TINY_ACT["bytes_per_image"]))
    assert mem["peak"] == mem["static"] + mem["activations"]
    assert P.check_fits(cfg, 2, "cpu", memory=mem) is None
    cfg.engine.micro_batch = 10 ** 6                     # 7.5 TB of activations
    warn = P.check_fits(cfg, 2, "cpu")
    assert warn and "engine.micro_batch=1000000" in warn and "engine.activation_checkpointing=true" in warn
    b = int(warn.split("engine.micro_batch=")[2].split()[0])
    assert 0 < b < 10 ** 6
    fields = P.log_fields(mem, P.measured_peak_bytes("cpu"), "cpu")
    assert fields["plan/peak_gib"] == mem["peak"] / P.GiB and fields["memory/peak_gib"] > 0.1   # this process's heap
    assert fields["plan/peak_with_runtime_gib"] > fields["plan/peak_gib"]


_ANON_PROBE = r"""
import json, mmap, os, sys
from framework.train.plan import peak_anon_bytes, proc_status
N = 64 * 2 ** 20
def hwm():
    return proc_status("VmHWM")["VmHWM"]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                   # the peak RSS starts again from the current RSS
a0, h0 = peak_anon_bytes(), hwm()
with open(sys.argv[1], "wb") as f:
    f.write(os.urandom(N))
with open(sys.argv[1], "rb") as f:
    fm = mmap.mmap(f.fileno(), N, access=mmap.ACCESS_READ)
    sum(fm[i] for i in range(0, N, 4096))          # file-backed pages: in the RSS, not anonymous
    a1, h1 = peak_anon_bytes(), hwm()
    am = mmap.mmap(-1, N)
    for i in range(0, N, 4096):
        am[i] = 1                                  # anonymous pages, then given back
    am.close()
    a2, h2 = peak_anon_bytes(), hwm()
    fm.close()
print(json.dumps({"file_rss": (h1 - h0) / 2 ** 20, "file_anon": (a1 - a0) / 2 ** 20,
                  "anon_peak": (a2 - a1) / 2 ** 20, "anon_rss": (h2 - h1) / 2 ** 20}))
"""


def test_peak_anon_bytes_counts_the_heap_not_library_pages(tmp_path):
    """The CPU peak the planner and the bench compare (peak_anon_bytes) rises by a 64 MiB anonymous
    map that is already freed (it is a peak) and not by 64 MiB of a file mapped and read, which the
    peak RSS counts (control: VmHWM does rise by it). The bound, 4 MiB, is what the interpreter may
    allocate between the reads (its own objects: well under 1 MiB) with room to spare, and far
    below the 64 MiB that a wrong count would add or miss."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc")
    p = subprocess.run([sys.executable, "-c", _ANON_PROBE, str(tmp_path / "f.bin")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(p.stdout.strip().splitlines()[-1])
    assert abs(d["file_rss"] - 64) <= 4, d               # the control: the RSS counts the file's pages
    assert abs(d["file_anon"]) <= 4, d                   # ... the anonymous peak does not
    assert abs(d["anon_peak"] - 64) <= 4, d              # a freed 64 MiB map is in the peak
    assert abs(d["anon_rss"] - 64) <= 4, d


def test_calibrated_mfu_gives_back_the_measured_step_time(tmp_path, monkeypatch, capsys):
    """tools.plan --calibrate: from bench train records (three runs of two presets; the fields the
    bench writes), the plan's step time of each preset is the measured fastest step (of the median
    run) to rounding of the stored MFU (4 digits: 5e-5 relative at an MFU of ~0.5), whichever peak each
    bench process happened to probe."""
    from tools import plan as cli
    monkeypatch.setenv("FRAMEWORK_PLAN_CACHE", str(tmp_path / "cache.json"))
    batch = {"tiny": 32, "latent_small": 64}
    steps = {"tiny": [0.45, 0.43, 0.52], "latent_small": [0.70, 0.61, 0.66]}     # seconds, three runs
    recs, flops = [{"bench": "env"}], {}
    for k, b in batch.items():
        w = P.Workload.from_preset(k, micro_batch=b, precision="fp32", zero_stage=2)
        flops[k] = P.model_facts(w, flops=True)["flops_executed"]
        for i, s in enumerate(steps[k]):
            recs.append({"bench": "train", "preset": k, "model": "ours", "variant": "base", "device": "cpu",
                         "batch": b, "precision": "fp32", "flops_per_image": flops[k], "step_s_min": s,
                         "step_s_median": 1.2 * s, "peak_tflops": 0.13 + 0.01 * i, "mfu": 0.3})
        recs.append(dict(recs[-1], model="diffusers", step_s_min=0.01))     # another model: not counted
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in recs))
    entries = cli.run(["--cluster", "cpu", "--calibrate", str(bench)])
    assert set(entries) == {"tiny|cpu|cpu", "latent_small|cpu|cpu"}
    assert "written to" in capsys.readouterr().err
    c = P.cluster("cpu")
    for k, b in batch.items():
        step = P.make_plan(P.Workload.from_preset(k, micro_batch=b, precision="fp32", zero_stage=2), c,
                           probe="off")["step"]
        assert step["mfu_source"] == "table"
        assert step["step_s"] == pytest.approx(sorted(steps[k])[1], rel=1e-4), (k, step)
    (tmp_path / "env.jsonl").write_text(json.dumps(recs[0]) + "\n")
    with pytest.raises(SystemExit, match="no train records"):
        cli.run(["--cluster", "cpu", "--calibrate", str(tmp_path / "env.jsonl")])
    with pytest.raises(SystemExit, match="cache.json: Expecting"):            # not JSON lines
        cli.run(["--cluster", "cpu", "--calibrate", str(tmp_path / "cache.json")])
    with pytest.raises(SystemExit, match="measured on \\['cpu'\\]"):
        cli.run(["--cluster", "h200x8", "--calibrate", str(bench)])


def test_frozen_models_are_in_the_rank_memory(tmp_path):
    """A diffusion trainer that encodes captions (and images) on the fly holds the text encoder (and
    the VAE) on every rank: the plan counts their stored parameters in the dtype they load in, and
    that equals what the loaded models hold. Bound 0.1%: the stored weights may carry a buffer the
    module keeps outside its parameters (MiniLM: 512 position ids)."""
    from framework.models.text import TextEncoder
    from framework.models.vae import FrozenVAE, make_tiny_vae
    cfg = Config()
    cfg.unet = load_config(os.path.join(ROOT, "configs", "unet", "tiny.yaml")).unet
    cfg.vae.path = make_tiny_vae(str(tmp_path / "vae"), in_channels=3)
    shutil.copy(os.path.join(cfg.vae.path, "diffusion_pytorch_model.safetensors"),   # a Hub-style variant:
                os.path.join(cfg.vae.path, "diffusion_pytorch_model.fp16.safetensors"))   # not loaded, not counted
    fb = P.frozen_bytes(cfg, "cpu")
    enc = TextEncoder(cfg.text, device="cpu")
    vae = FrozenVAE.from_config(cfg.vae, device="cpu")
    for name, module in (("text_encoder", enc.model), ("vae", vae.model)):
        held = sum(p.numel() * p.element_size() for p in module.parameters())
        assert fb[name] == pytest.approx(held, rel=1e-3), (name, fb, held)
    mem = P.predict_rank_memory(cfg, 1, "cpu", probe="off")
    assert mem["frozen"] == sum(fb.values()) and mem["static"] == pytest.approx(
        sum(v for k, v in mem.items() if k not in ("activations", "transient_after_backward", "static", "peak")))
    cfg.data.use_embeddings, cfg.data.latents = True, True          # both precomputed: nothing frozen held
    assert P.frozen_bytes(cfg, "cpu") == {} and P.predict_rank_memory(cfg, 1, "cpu", probe="off")["frozen"] == 0
    cfg.text.dtype = "bf16"
    cfg.data.use_embeddings = False
    assert P.frozen_bytes(cfg, "cpu")["text_encoder"] == pytest.approx(fb["text_encoder"] / 2)


def test_cli_json_and_table(capsys):
    from tools import plan as cli
    args = ["--preset", "tiny", "--cluster", "a100-40x8", "--nodes", "2", "--zero", "3", "--micro-batch", "8",
            "--precision", "fp32", "--probe", "off", "--json", "--target-images", "1e6"]
    res = cli.run(args)
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["workload"]["zero_stage"] == 3 and doc["cluster"]["world"] == 16
    assert doc["activations"]["source"] == "plan_table.json" and doc["memory"]["fits"] is True    # shipped
    assert "memory per rank" in err and res["run"]["steps"] == math.ceil(1e6 / (8 * 16))
    cli.run(args + ["--context", "50"])                   # 50 tokens: in no table, and no probe allowed
    doc = json.loads(capsys.readouterr()[0])
    assert doc["memory"]["fits"] is None and doc["max_micro_batch"]["none"] is None and doc["activations"] is None
    cli.run(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--override", "unet.context_dim=32",
             "--cluster", "cpu", "--memory-gib", "1", "--probe", "off", "--json"])    # a run config
    doc = json.loads(capsys.readouterr()[0])
    assert doc["workload"]["input"] == [1, 16, 16] and doc["workload"]["context"] == [8, 32]
    assert doc["workload"]["precision"] == "fp32" and doc["workload"]["micro_batch"] == 4
    with pytest.raises(SystemExit):
        cli.run(["--preset", "tiny", "--zero", "5"])


# ---------------------------------------------------------------------------------------------
# Against the real engine and the bench
# ---------------------------------------------------------------------------------------------
def _worker(nproc: int, out: str, stages: str = "1,2,3", precision: str = "fp32") -> dict:
    script = os.path.join(ROOT, "tests", "plan_memory_worker.py")
    cmd = [sys.executable, script, out, stages, precision] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, out,
         stages, precision]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def compare_engine(measured: dict, precision: str = "fp32") -> list[tuple]:
    """(what, stage, world, plan, measured) for every quantity the plan predicts."""
    rows = []
    w0 = tiny(precision=precision)
    f = P.model_facts(w0)
    for stage, m in measured.items():
        w = dataclasses.replace(w0, zero_stage=int(stage))
        n = m["world"]
        pm = P.rank_memory(w, n, f, None, "cpu")
        ck = P.checkpoint_bytes(w, f["params"], n, len(f["numels"]))
        rows += [("params_local (elements)", stage, n, pm["params"] / w.weight_bytes, m["memory/params_local"]),
                 ("optim_local (elements)", stage, n, pm["optimizer"] / 4, m["memory/optim_local"]),
                 ("params (bytes)", stage, n, pm["params"], m["bytes_params"]),
                 ("master fp32 (bytes)", stage, n, pm["master_fp32"], m["bytes_master"]),
                 ("optimizer (bytes)", stage, n, pm["optimizer"], m["bytes_optimizer"]),
                 ("ema (bytes)", stage, n, pm["ema"], m["bytes_ema"]),
                 ("checkpoint (bytes, all ranks)", stage, n, ck["total"], m["checkpoint_bytes"])]
    return rows


def _assert_within(rows, tol=0.01):
    """The issue asks 10%; the model is exact up to ZeRO's padding (a few elements) and the checkpoint
    files' pickling (measured within 0.4%), so 1% still catches any wrong factor."""
    bad = [r for r in rows if not (abs(r[3] - r[4]) <= tol * max(abs(r[4]), 1) or (r[3] == r[4] == 0))]
    assert not bad, "\n".join(f"{r[0]} ZeRO-{r[1]} x{r[2]}: plan {r[3]:,.0f} measured {r[4]:,.0f}" for r in bad)


ALL = os.environ.get("PLAN_TEST_ALL") == "1"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("nproc,precision", [(2, "fp32"), (1, "bf16")] +
                         ([(1, "fp32"), (2, "bf16"), (4, "fp32")] if ALL else []))
def test_plan_matches_engine_memory(nproc, precision, tmp_path):
    """ZeRO 1/2/3 per rank: the element counts the trainer logs, the bytes of weights, fp32 master,
    Adam state and EMA, and the checkpoint on disk (all ranks), against the plan (see
    _assert_within). PLAN_TEST_ALL=1 adds 1 rank fp32, 2 ranks bf16 and 4 ranks fp32 (4 gloo ranks
    on 2 cores: minutes; docs/plan.md records that run)."""
    _assert_within(compare_engine(_worker(nproc, str(tmp_path / "m.json"), precision=precision), precision))


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.bench
def test_largest_micro_batch_within_10pct_of_bench(tmp_path):
    """tools/bench.py --sections maxbatch (ZeRO-2 + EMA, fp32, peak anonymous memory under a limit)
    against the plan's largest micro batch on the cpu cluster with that limit as its memory. While
    both counted the peak RSS, a fresh clone's venv found 62-63 and an older one 70 (plan 72): the
    RSS holds a varying number of shared-library pages (peak_anon_bytes). A measurement of the
    machine, not of the code: it runs with `make test-bench`, not in CI."""
    limit_mb = 1000
    out = tmp_path / "mb.jsonl"
    p = subprocess.run([sys.executable, "-m", "tools.bench", "--threads", "1", "--presets", "tiny", "--sections",
                        "maxbatch", "--maxbatch", "train", "--maxbatch-variants", "base", "--no-diffusers",
                        "--mem-limit-mb", str(limit_mb), "--maxbatch-probes", "8",
                        "--out", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = [json.loads(ln) for ln in out.read_text().splitlines() if '"maxbatch"' in ln and '"max_batch"' in ln][0]
    assert rec["first_fail"] and rec["first_fail"] - rec["max_batch"] <= 0.05 * rec["max_batch"], rec   # bracketed
    w = tiny(zero_stage=2)
    plan = P.make_plan(w, P.cluster("cpu", memory_gib=limit_mb / 1024))
    assert abs(plan["max_micro_batch"]["none"] - rec["max_batch"]) <= 0.10 * rec["max_batch"], (plan["max_micro_batch"], rec)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.bench
def test_step_time_ratios_between_presets_within_20pct(tmp_path):
    """The plan's step times for three presets of very different shape (tiny: 0.58M parameters at
    32x32 px; latent_small: 6.3M at 8x8x4 latents; base64: 220M at 64x64 px), each at the MFU the
    bench measured once (plan_table.json), against a fresh bench run of the real Trainer step:
    the ratios to tiny agree within 20%. On this kind of machine the MFU differs by preset (0.28 to
    0.51: small convolutions vs wide ones), so one MFU for all would miss by up to 1.8x; the table is
    what makes the ratios hold. A measurement of the machine: `make test-bench`, not CI."""
    batch = {"tiny": 32, "latent_small": 64, "base64": 2}
    out = tmp_path / "train.jsonl"
    p = subprocess.run([sys.executable, "-m", "tools.bench", "--threads", "1", "--presets", ",".join(batch),
                        "--sections", "train", "--variants", "base", "--no-diffusers",
                        "--batch", ",".join(f"{k}={v}" for k, v in batch.items()),
                        "--steps", "tiny=20,latent_small=20,base64=3", "--warmup", "1", "--out", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    measured = {r["preset"]: r["step_s_min"] for r in recs if r["bench"] == "train" and r["model"] == "ours"}
    assert set(measured) == set(batch), recs
    c = P.cluster("cpu")
    planned = {k: P.make_plan(P.Workload.from_preset(k, micro_batch=b, precision="fp32", zero_stage=2), c,
                              probe="off")["step"] for k, b in batch.items()}
    assert all(s["mfu_source"] == "table" for s in planned.values()), planned
    for k in ("latent_small", "base64"):
        want = measured[k] / measured["tiny"]
        got = planned[k]["step_s"] / planned["tiny"]["step_s"]
        print(f"{k} / tiny step time: plan {got:.3f}, measured {want:.3f} ({got / want - 1:+.1%}); "
              f"steps measured {measured[k]:.3f} s / {measured['tiny']:.3f} s")
        assert abs(got / want - 1) <= 0.20, (k, got, want, measured, {x: s["step_s"] for x, s in planned.items()})
