"""Run directory layout, atomic checkpoints, ``latest``, keep-last-k. No deepspeed import.

A run directory::

    RUN/config.yaml                      the resolved config
    RUN/metrics.jsonl                    one JSON line per logged step
    RUN/samples/step00001000.png         sample grids
    RUN/checkpoints/latest               text file: the newest COMPLETE tag
    RUN/checkpoints/step00001000/        one checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt ...   DeepSpeed's files (module, optimizer shards, client state)
        rank00000.pt                     our per-rank state: RNG streams, data position
        ema-rank00000.pt                 EMA weights (full under ZeRO 0-2, this rank's partition under ZeRO-3)
        complete.json                    written last: world size, ZeRO stage, step, every file's size

Atomicity: every rank writes into ``.tmp-stepXXXXXXXX``; after a barrier rank 0 writes
``complete.json`` and renames the directory to its final tag, then rewrites ``latest`` with
``os.replace``. A directory without a valid ``complete.json`` (killed mid-save, truncated file,
missing file) is never loaded: resume falls back to the previous complete tag with a warning.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from typing import Any, Optional

from framework.files import atomic_write_text

__all__ = ["TAG_RE", "tag_for", "tmp_tag_for", "ckpt_dir", "finalize", "validate", "complete_tags",
           "find_resume", "read_meta", "update_latest", "prune", "rank_file", "ema_file",
           "convert_to_universal", "CheckpointWriteError", "CheckpointError", "WriteRecorder", "discard_tmp"]

TAG_RE = re.compile(r"^step(\d{8,})$")
MANIFEST = "complete.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def tmp_tag_for(step: int) -> str:
    return f".tmp-{tag_for(step)}"


def ckpt_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def rank_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rank{rank:05d}.pt")


def ema_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"ema-rank{rank:05d}.pt")


class CheckpointError(FileNotFoundError):
    """The checkpoint asked for is missing, incomplete or unreadable."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written completely (every rank agrees it failed); the previous
    checkpoint and ``latest`` are untouched."""


class WriteRecorder:
    """Run this rank's checkpoint writes, recording the first failure instead of raising it.

    A rank whose write fails must still reach every collective of the save (DeepSpeed's barriers,
    then the vote on the outcome), else the other ranks wait for it forever; so the failure is kept
    and reported after the vote. ``wrap(fn)`` makes ``fn`` a recorded call (skipped once a write failed).
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.error: Optional[str] = None

    def run(self, what: str, fn, *args, **kwargs):
        if self.error is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except (OSError, RuntimeError) as e:   # torch.save reports a failed write as RuntimeError
            self.error = f"rank {self.rank}: {what}: {_short(e)}"
            return None

    def wrap(self, what: str, fn):
        def recorded(*args, **kwargs):
            return self.run(what, fn, *args, **kwargs)
        return recorded


def _short(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def discard_tmp(directory: str, step: int) -> None:
    """Remove the temporary directory of a failed save of ``step`` (rank 0, after the vote)."""
    shutil.rmtree(os.path.join(directory, tmp_tag_for(step)), ignore_errors=True)


def _file_sizes(tag_dir: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(tag_dir):
        for name in files:
            if name == MANIFEST:
                continue
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, tag_dir)] = os.path.getsize(full)
    return sizes


def finalize(directory: str, step: int, meta: dict[str, Any]) -> str:
    """Seal ``.tmp-stepN`` (all ranks done writing) into ``stepN``: manifest, rename, ``latest``.
    Returns the final tag directory. Call on one process per file system (rank 0)."""
    tmp = os.path.join(directory, tmp_tag_for(step))
    final = os.path.join(directory, tag_for(step))
    manifest = dict(meta, step=step, tag=tag_for(step), files=_file_sizes(tmp))
    atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    if os.path.exists(final):   # a re-save of the same step (e.g. resumed, then preempted at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    update_latest(directory, tag_for(step))
    return final


def update_latest(directory: str, tag: str) -> None:
    atomic_write_text(os.path.join(directory, "latest"), tag + "\n")


def read_meta(tag_dir: str) -> dict[str, Any]:
    with open(os.path.join(tag_dir, MANIFEST)) as f:
        return json.load(f)


def validate(tag_dir: str) -> Optional[str]:
    """None if the checkpoint is complete, else the reason it is not."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return "no complete.json (the save did not finish)"
    try:
        meta = read_meta(tag_dir)
    except (OSError, ValueError) as e:
        return f"unreadable complete.json ({e})"
    for rel, size in meta.get("files", {}).items():
        full = os.path.join(tag_dir, rel)
        if not os.path.isfile(full):
            return f"missing file {rel}"
        actual = os.path.getsize(full)
        if actual != size:
            return f"{rel} has {actual} bytes, expected {size} (truncated?)"
    return None


def complete_tags(directory: str) -> list[str]:
    """Tags with a finished save, oldest first (not validated file by file)."""
    if not os.path.isdir(directory):
        return []
    tags = [t for t in os.listdir(directory) if TAG_RE.match(t)
            and os.path.isfile(os.path.join(directory, t, MANIFEST))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def find_resume(directory: str, resume: str) -> Optional[str]:
    """Resolve ``checkpoint.resume`` to a valid tag directory, or None to start fresh.

    "" -> None. "auto" -> the newest valid tag (``latest`` first), None if there is none.
    A tag name or a path -> that checkpoint, which must be valid.
    Invalid candidates are skipped with a warning naming the reason; nothing partial is loaded.
    """
    if not resume:
        return None
    if resume != "auto":
        tag_dir = resume if os.path.isdir(resume) else os.path.join(directory, resume)
        reason = validate(tag_dir) if os.path.isdir(tag_dir) else "does not exist"
        if reason:
            have = complete_tags(directory)
            raise CheckpointError(f"checkpoint.resume={resume}: {tag_dir} {reason} (complete checkpoints "
                                  f"in {directory}: {', '.join(have) if have else 'none'})")
        return tag_dir
    candidates = complete_tags(directory)
    latest = os.path.join(directory, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            named = f.read().strip()
        if named in candidates:   # try the named one first, then older ones
            candidates = [t for t in candidates if t != named] + [named]
    for tag in reversed(candidates):
        tag_dir = os.path.join(directory, tag)
        reason = validate(tag_dir)
        if reason is None:
            return tag_dir
        warnings.warn(f"skipping checkpoint {tag_dir}: {reason}; trying the previous one")
    return None


def prune(directory: str, keep_last: int, keep_every: int = 0) -> list[str]:
    """Delete old complete tags and stale temporary ones; keep the newest ``keep_last`` and every
    tag whose step is a multiple of ``keep_every``. Returns the deleted tags."""
    tags = complete_tags(directory)
    keep = set(tags[-keep_last:]) if keep_last > 0 else set(tags)
    if keep_every > 0:
        keep |= {t for t in tags if int(TAG_RE.match(t).group(1)) % keep_every == 0}
    removed = []
    for t in tags:
        if t not in keep:
            shutil.rmtree(os.path.join(directory, t), ignore_errors=True)
            shutil.rmtree(os.path.join(directory, t + "_universal"), ignore_errors=True)
            removed.append(t)
    newest = int(TAG_RE.match(tags[-1]).group(1)) if tags else -1
    for t in os.listdir(directory) if os.path.isdir(directory) else []:
        m = re.match(r"^\.tmp-step(\d+)$", t)
        if m and int(m.group(1)) <= newest:   # a save that died before finishing
            shutil.rmtree(os.path.join(directory, t), ignore_errors=True)
            removed.append(t)
    return removed


def convert_to_universal(tag_dir: str, zero_stage: int) -> str:
    """DeepSpeed's universal checkpoint of ``tag_dir`` (cached next to it): loads on any world size."""
    out = tag_dir.rstrip("/") + "_universal"
    if os.path.isfile(os.path.join(out, "converted.ok")):
        return out
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
           "--output_folder", out, "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if zero_stage < 3:
        cmd.append("--inject_missing_state")
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"universal conversion of {tag_dir} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    atomic_write_text(os.path.join(out, "converted.ok"), "ok\n")
    return out
