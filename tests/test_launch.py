"""The launch/ scripts, for real: each starts a tiny 2-process training job on CPU (gloo).

Fast tests check the commands the scripts build (FW_DRY_RUN=1). The slow ones train
configs/tiny.yaml for a few steps under
  - launch/local.sh (torchrun --standalone, 2 processes),
  - launch/deepspeed.sh with a `localhost slots=2` hostfile,
  - launch/torchrun_multinode.sh on two "hosts": two network namespaces joined by a veth pair,
    one node in each, c10d rendezvous across the veth addresses; both ranks end with identical
    weights (a hash each rank writes, tests/launch_entry.py),
  - launch/slurm_body.sh under a simulated SLURM allocation (stub scontrol and srun): ranks and the
    master address derived from SLURM_* by framework.dist; SIGUSR1 -> checkpoint, exit 0,
    `scontrol requeue`; the requeued run resumes from the checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")
ENTRY = os.path.join(ROOT, "tests", "launch_entry.py")
SCRIPTS = ["env.sh", "local.sh", "deepspeed.sh", "torchrun_multinode.sh", "slurm_body.sh", "slurm.sbatch"]
STEPS = 3
RUN_TIMEOUT = 240   # per training run; a loaded 2-core machine takes 15-35 s

# variables a launcher sets: never inherit them from the shell running pytest
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "NNODES",
                "NPROC_PER_NODE", "TORCHELASTIC_RUN_ID", "FW_ENTRY", "FW_DRY_RUN", "RDZV", "LOCAL_ADDR",
                "DS_ENV_FILE", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "FW_IFNAME")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: str, **kw) -> subprocess.Popen:
    f = open(log, "wb")
    p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **kw)
    f.close()
    return p


def finish(p: subprocess.Popen, log: str, timeout: float = RUN_TIMEOUT) -> str:
    """Wait for p (its whole process group is killed on timeout); return its output."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        raise AssertionError(f"timed out after {timeout} s:\n{_tail(log)}")
    return open(log, errors="replace").read()


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def _tail(log: str, n: int = 6000) -> str:
    return open(log, errors="replace").read()[-n:]


def run_script(args: list[str], env: dict, log: str, cwd: str = ROOT) -> str:
    out = finish(start(args, env, log, cwd=cwd), log)
    return out


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def records(run_dir: str, world: int) -> list[dict]:
    out = []
    for r in range(world):
        with open(os.path.join(run_dir, f"launch-rank{r:05d}.json")) as f:
            out.append(json.load(f))
    return out


def dry(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash"] + args, env=clean_env(FW_DRY_RUN="1", **env), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny shards and a tiny encoder, shared by every run in this file
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _fixtures import tiny_encoder, write_shards
    base = tmp_path_factory.mktemp("launch-data")
    shards = write_shards(str(base / "shards"), n_shards=4, per_shard=16, size=16)
    enc = tiny_encoder(str(base / "enc"))
    return {"urls": "data.urls=[" + ",".join(shards) + "]", "encoder": f"text.encoder={enc}"}


def overrides(data: dict, run_dir: str, steps: int = STEPS, *more: str) -> list[str]:
    return [data["urls"], data["encoder"], "unet.context_dim=32", f"run_dir={run_dir}",
            f"engine.steps={steps}", "engine.log_every=1", "log.tensorboard=false", *more]


# The first STEPS losses of each 2-rank run, by launcher: every launcher must form the same world
# (same ranks, same data split, same noise), so the losses agree whichever ran first.
_LOSSES: dict[str, list[float]] = {}


def assert_same_losses(name: str, losses: list[float]) -> None:
    losses = losses[:STEPS]
    for other, ref in _LOSSES.items():
        assert losses == pytest.approx(ref, rel=1e-4), f"{name} {losses} != {other} {ref}"
    _LOSSES[name] = losses


def assert_trained(run_dir: str, steps: int, world: int, micro: int = 4) -> None:
    m = metrics(run_dir)
    assert [r["step"] for r in m][-steps:] == list(range(m[-1]["step"] - steps + 1, m[-1]["step"] + 1))
    # images_seen counts the global batch: micro batch x world size, so it proves the world size
    assert m[-1]["images_seen"] == m[-1]["step"] * micro * world, m[-1]
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in m)


# ---------------------------------------------------------------------------------------------
# Fast: the scripts parse, and build the commands they document
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse(name):
    path = os.path.join(LAUNCH, name)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    if name != "env.sh":
        assert os.stat(path).st_mode & stat.S_IXUSR, f"{name} is not executable"
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-x", f"launch/{name}"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_env_defaults_and_caller_wins():
    show = "source launch/env.sh; fw_set_omp_threads 2; " \
           "echo $NCCL_DEBUG $DEEPSPEED_TIMEOUT $OMP_NUM_THREADS ${GLOO_SOCKET_IFNAME:-none} $PYTHON"
    r = subprocess.run(["bash", "-c", show], env=clean_env(), cwd=ROOT, capture_output=True, text=True)
    nccl, timeout, omp, gloo, py = r.stdout.split()
    assert (nccl, timeout, gloo) == ("WARN", "30", "none") and int(omp) >= 1
    assert py == os.path.join(ROOT, ".venv", "bin", "python") or not os.path.exists(py)
    env = clean_env(NCCL_DEBUG="INFO", DEEPSPEED_TIMEOUT="5", OMP_NUM_THREADS="7", FW_IFNAME="ib0",
                    PYTHON="/usr/bin/python3")
    r = subprocess.run(["bash", "-c", show + " $NCCL_SOCKET_IFNAME"], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.stdout.split() == ["INFO", "5", "7", "ib0", "/usr/bin/python3", "ib0"]


def test_local_command():
    r = dry(["launch/local.sh", "2", "configs/tiny.yaml", "optim.lr=1e-3"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[1:] == ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                                        "--nproc_per_node", "2", "-m", "framework.train", "--config",
                                        "configs/tiny.yaml", "optim.lr=1e-3", ""]
    assert dry(["launch/local.sh", "2"]).returncode == 2
    assert dry(["launch/local.sh", "two", "configs/tiny.yaml"]).returncode == 2
    assert dry(["launch/local.sh", "2", "configs/nope.yaml"]).returncode == 2


def test_multinode_command():
    def cmd(*args, **env):
        r = dry(["launch/torchrun_multinode.sh", *args], **env)
        assert r.returncode == 0, r.stderr
        return r.stdout.split("\n")

    node0 = cmd("2", "0", "10.0.0.1:29600", "4", "configs/tiny.yaml", "a=1")
    s0 = " ".join(node0)
    assert "--nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29600" in s0
    assert "--rdzv_conf is_host=true" in s0 and "-m framework.train --config configs/tiny.yaml a=1" in s0
    node1 = " ".join(cmd("2", "1", "10.0.0.1:29600", "4", "configs/tiny.yaml", LOCAL_ADDR="10.0.0.2"))
    assert "--rdzv_conf is_host=false" in node1 and "--local_addr 10.0.0.2" in node1
    auto = " ".join(cmd("2", "0", "h0", "1", "configs/tiny.yaml", RDZV_IS_HOST="auto", RDZV_CONF="join_timeout=60"))
    assert "--rdzv_endpoint h0:29500" in auto and "--rdzv_conf join_timeout=60" in auto
    static = " ".join(cmd("configs/tiny.yaml", RDZV="static", NNODES="3", NODE_RANK="2", MASTER_ADDR="h0",
                          MASTER_PORT="1234", NPROC_PER_NODE="8"))
    assert "--nnodes 3 --nproc_per_node 8 --rdzv_backend static --node_rank 2 --master_addr h0 " \
           "--master_port 1234" in static and "c10d" not in static
    for bad in (["2", "2", "h0", "1", "configs/tiny.yaml"], ["2", "0", "h0", "1"], ["x.yaml"]):
        assert dry(["launch/torchrun_multinode.sh", *bad]).returncode == 2, bad
    assert dry(["launch/torchrun_multinode.sh", "1", "0", "h", "1", "configs/tiny.yaml"], RDZV="etcd").returncode == 2


def test_deepspeed_command(tmp_path):
    single = tmp_path / "hostfile1"
    single.write_text("# one machine\nlocalhost slots=2\n")
    r = dry(["launch/deepspeed.sh", "--master_port", "29611", str(single), "configs/tiny.yaml", "a=1"],
            GLOO_SOCKET_IFNAME="eth1", BAD_QUOTE='x"y', DS_ENV_EXTRA="BAD_QUOTE", TMPDIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    env_lines = [x[2:] for x in lines if x.startswith("# ") and "=" in x]
    assert "GLOO_SOCKET_IFNAME=eth1" in env_lines and "DEEPSPEED_TIMEOUT=30" in env_lines
    assert not any(x.startswith(("BAD_QUOTE", "FW_DRY_RUN")) for x in env_lines)
    assert "not exporting BAD_QUOTE" in r.stderr
    cmd = " ".join(x for x in lines if not x.startswith("#"))
    assert f"-m deepspeed.launcher.runner --hostfile {single} --master_addr 127.0.0.1 --master_port 29611 " \
           "--no_ssh_check --module framework.train --config configs/tiny.yaml a=1" in cmd
    multi = tmp_path / "hostfile2"
    multi.write_text("n1 slots=8\nn2 slots=8\n")
    r = dry(["launch/deepspeed.sh", "--launcher=openmpi", "--ssh_port=2222", str(multi), "configs/tiny.yaml"],
            DS_INCLUDE="n1@n2:0,1", FW_ENTRY="tools/x.py", TMPDIR=str(tmp_path))
    cmd = " ".join(r.stdout.split("\n"))
    assert f"--hostfile {multi} --include n1@n2:0,1 --launcher openmpi --ssh_port=2222 tools/x.py" in cmd
    assert "--no_ssh_check" not in cmd and "--master_addr" not in cmd
    assert dry(["launch/deepspeed.sh", "--num_gpus", "1", "--exclude", "n1", str(multi),
                "configs/tiny.yaml"]).returncode == 2
    (tmp_path / "bad").write_text("n1 8\n")
    assert dry(["launch/deepspeed.sh", str(tmp_path / "bad"), "configs/tiny.yaml"]).returncode == 2
    assert f"# DS_ENV_FILE={tmp_path}/fw-deepspeed_env." in r.stdout
    assert not list(tmp_path.glob("fw-deepspeed_env*")), "the generated .deepspeed_env was not removed"


def _stub_bin(directory: str, srun_log: str = "", requeue_log: str = "") -> str:
    """scontrol (prints localhost and node2; logs requeue) and srun (starts SLURM_NTASKS local tasks)."""
    os.makedirs(directory, exist_ok=True)
    scontrol = os.path.join(directory, "scontrol")
    with open(scontrol, "w") as f:
        f.write("#!/bin/sh\n"
                'if [ "$1 $2" = "show hostnames" ]; then echo localhost; echo node2; exit 0; fi\n'
                f'if [ "$1" = requeue ]; then echo "$2" >> "{requeue_log or "/dev/null"}"; exit 0; fi\n'
                'echo "stub scontrol: $*" >&2; exit 1\n')
    srun = os.path.join(directory, "srun")
    with open(srun, "w") as f:
        f.write(f"""#!{sys.executable}
# stub srun: one local process per task, SLURM_PROCID/SLURM_LOCALID/SLURM_NODEID set per task,
# signals forwarded to the tasks (as srun does); exits with the worst task status
import os, signal, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
if {srun_log!r}:
    open({srun_log!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
n = int(os.environ["SLURM_NTASKS"])
procs = []
for i in range(n):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0", SLURM_STEP_ID="0")
    procs.append(subprocess.Popen(args, env=env))
def forward(sig, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, forward)
codes = [p.wait() for p in procs]
sys.exit(max((c if c >= 0 else 128 - c) for c in codes))
""")
    for p in (scontrol, srun):
        os.chmod(p, 0o755)
    return directory


def slurm_env(bin_dir: str, job_id: int, **extra: str) -> dict:
    env = clean_env(PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), SLURM_JOB_ID=str(job_id),
                    SLURM_JOB_NAME="fw-test", SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost",
                    SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
                    SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=ROOT)
    env.update(extra)
    return env


def test_slurm_master_is_the_first_host_of_a_long_node_list(tmp_path):
    """`scontrol show hostnames` of a large allocation: the first host is the master, and reading
    only that line must not kill the job (`| head -n1` under pipefail let scontrol die of SIGPIPE:
    ~3% of jobs with two hosts, nearly all with thousands, exited 141 before printing anything)."""
    bin_dir = str(tmp_path / "bin")
    os.makedirs(bin_dir)
    with open(os.path.join(bin_dir, "scontrol"), "w") as f:
        f.write('#!/bin/sh\nseq -f "gpu%05g" 1 20000\n')
    os.chmod(os.path.join(bin_dir, "scontrol"), 0o755)
    env = slurm_env(bin_dir, 4242, FW_DRY_RUN="1", SLURM_JOB_NODELIST="gpu[00001-20000]")
    for _ in range(5):
        r = subprocess.run(["bash", "launch/slurm_body.sh", "configs/tiny.yaml"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "master gpu00001:24242" in r.stderr, (r.returncode, r.stderr[-2000:])


def test_slurm_command(tmp_path):
    bin_dir = _stub_bin(str(tmp_path / "bin"))
    r = subprocess.run(["bash", "launch/slurm_body.sh", "configs/tiny.yaml", "a=1"], cwd=ROOT,
                       env=slurm_env(bin_dir, 4242, FW_DRY_RUN="1"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "master localhost:24242" in r.stderr
    assert " ".join(r.stdout.split()).endswith(
        "-u -m framework.train --config configs/tiny.yaml checkpoint.resume=auto a=1")
    assert r.stdout.startswith("srun\n--kill-on-bad-exit=1\n")
    r = subprocess.run(["bash", "launch/slurm_body.sh", "configs/tiny.yaml"], cwd=ROOT,
                       env=clean_env(FW_DRY_RUN="1"), capture_output=True, text=True)
    assert r.returncode != 0 and "SLURM_JOB_ID" in r.stderr
    # the sbatch file: its topology and preemption directives, and it hands over to the body
    text = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
    for directive in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node=", "--signal=B:USR1@120",
                      "--requeue", "--output=logs/%x-%j.out"):
        assert f"#SBATCH {directive}" in text
    r = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), CONFIG], cwd=str(tmp_path),
                       env=slurm_env(bin_dir, 7, FW_DRY_RUN="1"), capture_output=True, text=True)
    assert r.returncode == 0 and "master localhost:20007" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# Slow: real training runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_local_sh_trains_two_processes(data, tmp_path):
    run_dir = str(tmp_path / "run")
    out = run_script(["bash", os.path.join(LAUNCH, "local.sh"), "2", CONFIG, *overrides(data, run_dir)],
                     clean_env(), str(tmp_path / "log"), cwd=str(tmp_path))
    assert f"done: step {STEPS}" in out, out[-4000:]
    assert_trained(run_dir, STEPS, world=2)
    assert_same_losses("local.sh", [m["loss"] for m in metrics(run_dir)])


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_sh_single_host_hostfile(data, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = str(tmp_path / "run")
    env = clean_env(MASTER_PORT=str(free_port()), TMPDIR=str(tmp_path))
    out = run_script(["bash", os.path.join(LAUNCH, "deepspeed.sh"), str(hostfile), CONFIG,
                      *overrides(data, run_dir)], env, str(tmp_path / "log"), cwd=str(tmp_path))
    assert "--local_rank=1" in out and f"done: step {STEPS}" in out, out[-4000:]
    assert_trained(run_dir, STEPS, world=2)
    assert_same_losses("deepspeed.sh", [m["loss"] for m in metrics(run_dir)])
    assert not list(tmp_path.glob("fw-deepspeed_env*")), "the generated .deepspeed_env was not removed"


# ---- two hosts: network namespaces ----------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: {"ns": [A, B], "if": [vA, vB], "ip": [a, b]}."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` (apt-get install iproute2)")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = f"{os.getpid() % 100000}{int(time.time() * 1000) % 100}"
    ns, ifs = [f"fwl{tag}a", f"fwl{tag}b"], [f"fwv{tag}a", f"fwv{tag}b"]
    subnet = f"10.231.{os.getpid() % 250 + 1}"
    ips = [f"{subnet}.1", f"{subnet}.2"]
    made = []
    try:
        for n in ns:
            _ip("netns", "add", n)
            made.append(n)
        _ip("link", "add", ifs[0], "type", "veth", "peer", "name", ifs[1])
        for n, i, a in zip(ns, ifs, ips):
            _ip("link", "set", i, "netns", n)
            _ip("-n", n, "addr", "add", f"{a}/24", "dev", i)
            _ip("-n", n, "link", "set", "lo", "up")
            _ip("-n", n, "link", "set", i, "up")
    except subprocess.CalledProcessError as e:
        for n in made:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        subprocess.run(["ip", "link", "del", ifs[0]], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {' '.join(e.cmd)}: {e.stderr.strip()}")
    try:
        yield {"ns": ns, "if": ifs, "ip": ips}
    finally:
        for n in ns:   # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_multinode_two_hosts(data, tmp_path, two_hosts):
    """Node 0 in namespace A, node 1 in namespace B; c10d rendezvous at A's veth address."""
    run_dir = str(tmp_path / "run")   # one run directory: both "hosts" share this file system
    port = 29500                       # fresh namespaces: every port is free
    procs, logs = [], []
    try:
        for node, (ns, ifname, addr) in enumerate(zip(two_hosts["ns"], two_hosts["if"], two_hosts["ip"])):
            env = clean_env(GLOO_SOCKET_IFNAME=ifname, LOCAL_ADDR=addr, FW_ENTRY=ENTRY,
                            RDZV_CONF="join_timeout=120")
            log = str(tmp_path / f"node{node}.log")
            cmd = ["ip", "netns", "exec", ns, "bash", os.path.join(LAUNCH, "torchrun_multinode.sh"),
                   "2", str(node), f"{two_hosts['ip'][0]}:{port}", "1", CONFIG,
                   *overrides(data, run_dir, STEPS, f"checkpoint.every={STEPS}")]
            procs.append(start(cmd, env, log, cwd=str(tmp_path)))
            logs.append(log)
        outs = [finish(p, log) for p, log in zip(procs, logs)]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_group(p)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    recs = records(run_dir, 2)
    assert [r["world_size"] for r in recs] == [2, 2] and [r["step"] for r in recs] == [STEPS, STEPS]
    # one rank per namespace, each talking over its own veth
    assert sorted(r["gloo_ifname"] for r in recs) == sorted(two_hosts["if"])
    if all(r["netns"] for r in recs):
        assert recs[0]["netns"] != recs[1]["netns"]
    assert recs[0]["weights_sha256"] == recs[1]["weights_sha256"]
    assert recs[0]["losses"] == recs[1]["losses"] and len(recs[0]["losses"]) == STEPS
    assert_trained(run_dir, STEPS, world=2)
    assert_same_losses("torchrun_multinode.sh", recs[0]["losses"])
    # the checkpoint both nodes wrote into the shared run directory was sealed once, by rank 0
    tag = os.path.join(run_dir, "checkpoints", f"step{STEPS:08d}")
    assert os.path.isfile(os.path.join(tag, "complete.json"))
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read().strip() == f"step{STEPS:08d}"


# ---- SLURM, simulated -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_body_preempt_requeue_resume(data, tmp_path):
    requeue_log, srun_log = str(tmp_path / "requeued"), str(tmp_path / "srun")
    bin_dir = _stub_bin(str(tmp_path / "bin"), srun_log=srun_log, requeue_log=requeue_log)
    job_id = 10000 + os.getpid() % 9000           # MASTER_PORT = 20000 + job id % 20000
    env = slurm_env(bin_dir, job_id, FW_ENTRY=ENTRY)
    run_dir = str(tmp_path / "run")
    body = ["bash", os.path.join(LAUNCH, "slurm_body.sh"), CONFIG]

    # -- 1. a long job; SIGUSR1 (sbatch --signal=B:USR1@120) once it trains
    log1 = str(tmp_path / "job1.log")
    p = start(body + overrides(data, run_dir, 100000), env, log1, cwd=str(tmp_path))
    try:
        deadline = time.time() + RUN_TIMEOUT
        mfile = os.path.join(run_dir, "metrics.jsonl")
        while not (os.path.isfile(mfile) and os.path.getsize(mfile) > 0):
            assert p.poll() is None, _tail(log1)
            assert time.time() < deadline, "no training step within the timeout:\n" + _tail(log1)
            time.sleep(0.5)
        os.kill(p.pid, signal.SIGUSR1)
        out1 = finish(p, log1, timeout=120)
    finally:
        if p.poll() is None:
            _kill_group(p)
    assert p.returncode == 0, out1[-4000:]
    assert open(requeue_log).read().split() == [str(job_id)], out1[-3000:]
    recs = records(run_dir, 2)
    for rank, r in enumerate(recs):   # framework.dist derived all of this from SLURM_* alone
        assert (r["launcher"], r["rank"], r["local_rank"], r["world_size"]) == ("slurm", rank, rank, 2)
        assert (r["master_addr"], r["master_port"]) == ("localhost", 20000 + job_id % 20000)
        assert r["stopped_by_signal"]
    stopped_at = recs[0]["step"]
    if stopped_at >= STEPS:
        assert_same_losses("slurm_body.sh", [m["loss"] for m in metrics(run_dir)])
    assert recs[1]["step"] == stopped_at and 1 <= stopped_at < 100000
    assert recs[0]["weights_sha256"] == recs[1]["weights_sha256"]
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    assert latest == f"step{stopped_at:08d}"

    # -- 2. the requeued job: same command line, resumes from the checkpoint (resume=auto)
    log2 = str(tmp_path / "job2.log")
    p2 = start(body + overrides(data, run_dir, stopped_at + 2), env, log2, cwd=str(tmp_path))
    out2 = finish(p2, log2)
    assert p2.returncode == 0, f"exit {p2.returncode}: {out2[-4000:]}"
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', latest)}" in out2, out2[-4000:]
    recs = records(run_dir, 2)
    assert [(r["step"], r["stopped_by_signal"]) for r in recs] == [(stopped_at + 2, False)] * 2, out2[-3000:]
    assert recs[0]["weights_sha256"] == recs[1]["weights_sha256"]
    assert open(requeue_log).read().split() == [str(job_id)]   # a finished run is not requeued
    assert [m["step"] for m in metrics(run_dir)][-2:] == [stopped_at + 1, stopped_at + 2]
    assert_trained(run_dir, 2, world=2)
    assert open(srun_log).read().split("\n")[0].startswith("--kill-on-bad-exit=1 ")
