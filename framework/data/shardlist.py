"""Shard lists with sample counts: specs -> ``[Shard(url, count)]``, without reading tars when a
count source exists. No torch.

Where a count comes from, first found wins:
1. ``shards.json`` beside the shards (the writer's manifest, or the count cache below);
2. img2dataset's ``{shard}_stats.json`` (``successes``): nothing else is opened;
3. local tars with neither: their headers are read once, in parallel (a thread pool: the time
   is I/O latency; the data is seeked over), a damaged or truncated tar counted as far as it reads, and the counts are
   cached: a ``shards.json`` beside the tars when that folder is writable (a counts-only
   manifest: ``"source": {"kind": "counted"}``, each entry with the tar's ``bytes`` and
   ``mtime_ns`` so that a changed tar is counted again), else in ``cache_dir``
   (``data.count_cache``, default ``~/.cache/framework/shard-counts``). Several processes
   starting at once (ranks of one job) count once: the first takes a lock file beside the cache
   and the others wait for its result.
Remote shards (http(s), pipe:, ...) are counted only through a manifest; without one their
count is None (the loader then asks for ``data.samples_per_epoch``).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from framework.files import atomic_write_text
from framework.data.shardformat import (FORMAT, MANIFEST, DataError, is_remote, join_url, local_path, read_manifest,
                          read_stats_count, url_dir, write_manifest)
from framework.data.tario import count_tar

__all__ = ["Shard", "expand_spec", "count_local_tars", "default_cache_dir", "TAR_EXTS"]

log = logging.getLogger(__name__)
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
_POOL_MIN = 64                 # fewer tars than this are counted in-process


@dataclass(frozen=True)
class Shard:
    url: str
    count: Optional[int]       # samples (None: unknown)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "framework", "shard-counts")


# ---------------------------------------------------------------------------------------------
# Counting local tars (parallel, cached)
# ---------------------------------------------------------------------------------------------
def _stat(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _count_many(paths: list[str], heartbeat=None) -> list[tuple[int, Optional[str]]]:
    """``count_tar`` over many tars, in a thread pool. Counting is a few small reads and seeks per
    sample: on a network filesystem its time is I/O latency, which threads overlap (the reads
    release the GIL). Processes would add nothing there and cost more: ``spawn`` re-imports the
    caller's main module in every worker (seconds), ``fork`` is unsafe once torch, gloo or CUDA
    threads run."""
    if len(paths) < _POOL_MIN:
        return [count_tar(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    out = []
    with ThreadPoolExecutor(min(32, 4 * (os.cpu_count() or 1))) as ex:
        for i, r in enumerate(ex.map(count_tar, paths)):
            out.append(r)
            if heartbeat is not None and i % 500 == 0:
                heartbeat()
    return out


class _Lock:
    """``path.lock`` created exclusively; others wait while it is fresh (its holder touches it)."""

    def __init__(self, path: str, stale_s: float = 120.0):
        self.path, self.stale_s, self.held = path + ".lock", stale_s, False

    def acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError:
            return True                 # cannot lock here (read-only, ...): count without one
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        self.held = True
        return True

    def touch(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def fresh(self) -> bool:
        try:
            return time.time() - os.stat(self.path).st_mtime < self.stale_s
        except OSError:
            return False

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            self.held = False


def _writable(folder: str) -> bool:
    return os.access(folder, os.W_OK)


def _cache_file(folder: str, cache_dir: Optional[str]) -> str:
    """The counts cache of a folder of tars: its shards.json when writable (and not a writer's
    manifest, which is never replaced), else one in cache_dir."""
    own = os.path.join(folder, MANIFEST)
    if _writable(folder) and _counted_only(own):
        return own
    h = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:16]
    return os.path.join(cache_dir or default_cache_dir(), f"{h}-{MANIFEST}")


def _read_cached(path: str) -> dict[str, dict]:
    """{basename: entry} of a manifest or counts cache; {} when absent or unreadable."""
    if not os.path.exists(path):
        return {}
    try:
        m = read_manifest(path)
    except (DataError, OSError):
        return {}
    return {os.path.basename(s["url"]): s for s in m["shards"] if isinstance(s, dict) and "url" in s}


def _valid(entry: Optional[dict], st: Optional[tuple[int, int]]) -> bool:
    if entry is None or not isinstance(entry.get("count"), int):
        return False
    if "mtime_ns" in entry:                      # a counted entry: the tar must be unchanged
        return st is not None and (entry.get("bytes"), entry.get("mtime_ns")) == st
    return True                                  # a writer's manifest entry: trusted


def count_local_tars(paths: Sequence[str], cache_dir: Optional[str] = None, wait_s: float = 3600.0
                     ) -> list[Optional[int]]:
    """Counts of local tars (one folder or several): manifest / ``_stats.json`` / cached / counted
    now (see the module docstring). A missing tar counts None."""
    counts: list[Optional[int]] = [None] * len(paths)
    by_dir: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_dir.setdefault(os.path.dirname(os.path.abspath(local_path(p))), []).append(i)
    for folder, idx in by_dir.items():
        cache_path = _cache_file(folder, cache_dir)
        sources = [_read_cached(os.path.join(folder, MANIFEST))]
        if cache_path != os.path.join(folder, MANIFEST):
            sources.append(_read_cached(cache_path))
        todo: list[int] = []
        stats: dict[int, tuple[int, int]] = {}
        new: dict[str, dict] = {}                # entries to add to the cache
        for i in idx:
            p = local_path(paths[i])
            name = os.path.basename(p)
            st = _stat(p)
            if st is None:
                continue
            stats[i] = st
            entry = next((s[name] for s in sources if name in s and _valid(s[name], st)), None)
            if entry is not None:
                counts[i] = int(entry["count"])
                continue
            c = read_stats_count(p)
            if c is not None:
                counts[i] = c
                new[name] = {"url": name, "count": c, "bytes": st[0], "mtime_ns": st[1], "from": "_stats.json"}
            else:
                todo.append(i)
        if not todo:
            if new:
                _write_cache(cache_path, folder, {**sources[-1], **new})
            continue
        lock = _Lock(cache_path)
        deadline = time.time() + wait_s
        while not lock.acquire():                # another process is counting: wait for its cache
            if not lock.fresh() or time.time() > deadline:
                try:
                    os.remove(lock.path)         # stale (its holder died): take it over
                except OSError:
                    pass
                continue
            time.sleep(0.2)
        try:
            cached = _read_cached(cache_path)    # the other process may have counted them meanwhile
            still = []
            for i in todo:
                name = os.path.basename(local_path(paths[i]))
                if _valid(cached.get(name), stats[i]):
                    counts[i] = int(cached[name]["count"])
                else:
                    still.append(i)
            if still:
                t0 = time.perf_counter()
                res = _count_many([local_path(paths[i]) for i in still], heartbeat=lock.touch)
                for i, (n, problem) in zip(still, res):
                    counts[i] = n
                    name = os.path.basename(local_path(paths[i]))
                    new[name] = {"url": name, "count": n, "bytes": stats[i][0], "mtime_ns": stats[i][1]}
                    if problem:
                        new[name]["problem"] = problem
                        log.warning("shard %s: counted %d samples as far as it reads (%s)", paths[i], n, problem)
                log.info("counted %d tars in %s in %.1f s", len(still), folder, time.perf_counter() - t0)
            if new:
                _write_cache(cache_path, folder, {**cached, **new})
        finally:
            lock.release()
    return counts


def _write_cache(cache_path: str, folder: str, entries: dict[str, dict]) -> None:
    shards = [entries[k] for k in sorted(entries)]
    m = {"format": FORMAT, "total": sum(s["count"] for s in shards), "shards": shards,
         "source": {"kind": "counted", "folder": os.path.abspath(folder)},
         "caption_lines": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        if os.path.basename(cache_path) == MANIFEST:
            write_manifest(os.path.dirname(cache_path), m)
        else:
            atomic_write_text(cache_path, json.dumps(m, indent=1) + "\n")
    except OSError as e:
        log.warning("could not cache shard counts in %s: %s", cache_path, e)


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
def _counted_only(path: str) -> bool:
    """No manifest at ``path``, or only a counts cache (which is checked against the tars)."""
    if not os.path.exists(path):
        return True
    try:
        return read_manifest(path).get("source", {}).get("kind") == "counted"
    except (DataError, OSError):
        return False


def _is_manifest(part: str) -> bool:
    return part.endswith(".json")


def expand_spec(spec: Union[str, Sequence[str]], allow_pipe: bool = True, count_local: bool = True,
                cache_dir: Optional[str] = None) -> tuple[list[Shard], Optional[dict]]:
    """A shard spec -> (shards with counts, the first manifest found, if any).

    ``spec``: a path, brace pattern or URL, a ``shards.json`` (or a folder: its manifest, else its
    tars), ``a::b`` (several), or a list of those. Brace patterns are expanded with
    ``braceexpand``. Counts: see the module docstring (``count_local=False``: local tars without
    a manifest or stats file stay None)."""
    import braceexpand

    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for s in items for p in str(s).split("::") if p.strip()]
    shards: list[Shard] = []
    manifest: Optional[dict] = None
    for part in parts:
        if part.startswith("pipe:") and not allow_pipe:
            raise ValueError(f"pipe: URL {part!r} runs a shell command; set data.allow_pipe=true to allow it")
        local = not is_remote(part)
        folder = local and os.path.isdir(local_path(part))
        if folder and _counted_only(os.path.join(local_path(part), MANIFEST)):
            tars = sorted(p for ext in TAR_EXTS for p in glob.glob(os.path.join(local_path(part), "*" + ext)))
            if not tars:
                raise DataError(f"shard folder {part} has no {MANIFEST} and no .tar files")
            counts = count_local_tars(tars, cache_dir) if count_local else [read_stats_count(t) for t in tars]
            shards.extend(Shard(t, c) for t, c in zip(tars, counts))
            continue
        if _is_manifest(part) or folder:
            mpath = os.path.join(local_path(part), MANIFEST) if folder else part
            if local and not os.path.exists(local_path(mpath)):
                raise DataError(f"shard manifest {mpath} not found")
            m = read_manifest(mpath)
            base = url_dir(mpath)
            shards.extend(Shard(join_url(base, sh["url"]), sh.get("count")) for sh in m["shards"])
            manifest = manifest or (m if m.get("source", {}).get("kind") != "counted" else None)
            continue
        urls = list(braceexpand.braceexpand(part))
        if not local:
            shards.extend(Shard(u, None) for u in urls)
            continue
        if count_local:
            counts = count_local_tars(urls, cache_dir)
        else:
            beside = _read_cached(os.path.join(url_dir(urls[0]), MANIFEST))
            counts = []
            for u in urls:
                e = beside.get(os.path.basename(u))
                counts.append(int(e["count"]) if _valid(e, _stat(local_path(u))) else read_stats_count(u))
        if manifest is None:
            mp = os.path.join(url_dir(urls[0]), MANIFEST)
            if os.path.exists(mp):
                try:
                    m = read_manifest(mp)
                    if m.get("source", {}).get("kind") != "counted":
                        manifest = m
                except (DataError, OSError):
                    pass
        shards.extend(Shard(u, c) for u, c in zip(urls, counts))
    return shards, manifest
