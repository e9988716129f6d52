"""Weight files: safetensors state dicts, one file or Hugging Face-style shards with an index, and
the names of the inference directory's format. Torch and safetensors only: the export writes these
files, the Pipeline and the classifier loader read them."""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Union

import torch

__all__ = ["FORMAT", "DTYPES", "WEIGHTS_NAME", "DIFFUSERS_NAME", "parse_size", "save_tensors",
           "save_state_dict", "load_state_dict_dir"]

FORMAT = "framework-export/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS_NAME = "model"                            # model.safetensors / model-0000i-of-0000N.safetensors
DIFFUSERS_NAME = "diffusion_pytorch_model"        # diffusers' file name for a UNet


def parse_size(text: Union[str, int, None]) -> int:
    """'2GB', '500MB', '10KiB', 123456 -> bytes (decimal units as HF: 1GB = 10^9; KiB/MiB/GiB binary).
    0 / None / '' -> 0 (no sharding)."""
    if text is None or text == "" or text == 0:
        return 0
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 2GB, 500MB, 100000)")
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_tensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    """safetensors' save_file, then the usual permissions (it creates files 0600)."""
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_state_dict(sd: dict[str, torch.Tensor], out_dir: str, name: str = WEIGHTS_NAME,
                    max_shard_size: Union[int, str, None] = 0,
                    metadata: Optional[dict[str, str]] = None) -> list[str]:
    """Write ``sd`` as ``{name}.safetensors``, or, when larger than ``max_shard_size`` bytes, as
    ``{name}-00001-of-0000N.safetensors`` ... + ``{name}.safetensors.index.json``
    (``{"metadata": {"total_size"}, "weight_map": {tensor: file}}``, the Hugging Face convention).
    Tensors keep their order; a tensor larger than the limit gets a shard of its own.
    Returns the file names written."""
    limit = parse_size(max_shard_size)
    meta = {"format": "pt", **(metadata or {})}
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    total = sum(_nbytes(v) for v in sd.values())
    os.makedirs(out_dir, exist_ok=True)
    if not limit or total <= limit:
        fname = f"{name}.safetensors"
        save_tensors(sd, os.path.join(out_dir, fname), meta)
        return [fname]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        if shards[-1] and size + _nbytes(v) > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += _nbytes(v)
    n = len(shards)
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"{name}-{i + 1:05d}-of-{n:05d}.safetensors"
        save_tensors(shard, os.path.join(out_dir, fname), meta)
        files.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, f"{name}.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return files + [f"{name}.safetensors.index.json"]


def load_state_dict_dir(directory: str, name: str = WEIGHTS_NAME, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read ``{name}.safetensors`` or the shards listed in ``{name}.safetensors.index.json``."""
    from safetensors.torch import load_file

    single = os.path.join(directory, f"{name}.safetensors")
    index = os.path.join(directory, f"{name}.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single, device=device)
    if not os.path.isfile(index):
        raise FileNotFoundError(f"neither {single} nor {index} exists")
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    sd: dict[str, torch.Tensor] = {}
    for fname in dict.fromkeys(weight_map.values()):
        sd.update(load_file(os.path.join(directory, fname), device=device))
    missing = set(weight_map) - set(sd)
    if missing:
        raise KeyError(f"{index} lists tensors absent from its shards: {sorted(missing)[:5]}")
    return {k: sd[k] for k in weight_map}


