"""What each rank of the real DeepSpeed engine holds, by category, to check framework.train.plan against.

    python tests/plan_memory_worker.py OUT.json [STAGES] [PRECISION]                 # one rank
    torchrun --standalone --nproc_per_node 4 tests/plan_memory_worker.py OUT.json 1,2,3

For each ZeRO stage: the tiny UNet under ``deepspeed.initialize`` with the engine's own DeepSpeed
config (``framework.train.engine.build_ds_config``), a torch AdamW passed in, the trainer's EMA, one
training step (so Adam's state exists), then, from the live tensors:

- ``memory_stats``: the element counts the trainer logs (memory/params_local, memory/optim_local);
- bytes of the module's weights (ZeRO-3: this rank's partitions), of the optimizer's parameter
  tensors that are not the module's (the fp32 master partition), of Adam's state, of the EMA;
- a checkpoint written by ``framework.train.engine.save_checkpoint`` (every rank), its bytes on disk.

Rank 0 writes {stage: {...}} to OUT.json (per-rank numbers are equal up to one element of padding).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen and st.nbytes():
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure(stage: int, precision: str, run_root: str) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist

    from framework.train import engine as E
    from framework.config import Config, load_config
    from framework.dist import dist_env
    from framework.models.unet import UNet

    cfg = Config()
    cfg.unet = load_config(os.path.join(ROOT, "configs", "unet", "tiny.yaml")).unet
    cfg.engine.zero_stage, cfg.engine.precision, cfg.engine.micro_batch = stage, precision, 2
    cfg.engine.device = "cpu"
    cfg.run_dir = os.path.join(run_root, f"z{stage}")
    denv = dist_env()
    ds_config = E.build_ds_config(cfg, denv.world_size, "cpu")
    torch.manual_seed(0)
    ctx_init = deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False) \
        if stage == 3 else torch.device("cpu")
    with ctx_init:
        model = UNet(cfg.unet)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    ema = E.EMA(engine.module, zero3=stage == 3)
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    x = torch.randn(2, 3, 32, 32).to(dtype)
    out = engine(x, torch.full((2,), 500), ctx=torch.randn(2, 77, cfg.unet.context_dim).to(dtype))
    engine.backward(out.float().pow(2).mean())
    engine.step()
    ema.update(0.9)

    zero3 = stage == 3
    params = [p.ds_tensor if zero3 else p for p in engine.module.parameters()]
    param_ptrs = {t.untyped_storage().data_ptr() for t in params}
    inner = engine.optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    # the fp32 master partitions: ZeRO-1/2 single_partition_of_fp32_groups, ZeRO-3
    # fp32_partitioned_groups_flat (the inner optimizer sees them only during its step)
    zopt = engine.optimizer
    masters = getattr(zopt, "single_partition_of_fp32_groups", None) or \
        getattr(zopt, "fp32_partitioned_groups_flat", None) or []
    group_tensors = [t for t in masters if t.untyped_storage().data_ptr() not in param_ptrs]
    state = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim > 0]
    rec = {**E.memory_stats(engine, zero3), "world": denv.world_size, "stage": stage, "precision": precision,
           "bytes_params": storage_bytes(params), "bytes_master": storage_bytes(group_tensors),
           "bytes_optimizer": storage_bytes(state), "bytes_ema": storage_bytes(ema.shadow)}
    path = E.save_checkpoint(engine, cfg, denv, 1, 2 * denv.world_size, ema, {"noise": None, "data": None})
    dist.barrier()
    rec["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
                                  for f in fs if f.endswith(".pt"))
    rec["checkpoint_files"] = sorted(f for _, _, fs in os.walk(path) for f in fs if f.endswith(".pt"))
    del engine, opt, model
    return rec


def main() -> None:
    out = sys.argv[1]
    stages = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "1,2,3").split(",")]
    precision = sys.argv[3] if len(sys.argv) > 3 else "fp32"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    torch.set_num_threads(1)
    from framework.train.engine import init_distributed
    init_distributed("cpu")
    import torch.distributed as dist
    root = [tempfile.mkdtemp(prefix="planmem-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(root)
    res = {s: measure(s, precision, root[0]) for s in stages}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
