"""Reading webdataset tars: members, samples with their positions, counting. No torch.

    for s in iter_shard_samples(url, events, expected): ...     # {"__key__", "__url__", ext: bytes}
    r = ShardReader(url, start=j, offset=off)                   # continue at sample j (byte offset off)
    n, problem = count_tar(path)                                # headers only (seeks over the data)

Opening is webdataset's ``gopen`` (local files, http(s) via curl, ``pipe:``). Grouping follows
webdataset's ``group_by_keys``: consecutive members with the same key (``base_plus_ext``: the
name up to its first dot) form a sample, suffixes lower-cased, a repeated suffix within a sample
is dropped (and reported). Unlike ``group_by_keys``, the reader knows where each sample starts
(index ``j`` in the shard and the byte offset of its first tar header), so a reader can be
restarted at any sample boundary without re-reading what came before: a local uncompressed tar is
opened and ``seek``-ed there; a remote one skips the bytes unread; a compressed one is read and
discarded up to it.

Damage: uncompressed tars are parsed directly (ustar/GNU/pax), several times faster than
``tarfile``, with ``ignore_zeros``-style recovery: a header block whose checksum fails is skipped,
so one damaged header loses one member, not the shard. A truncated tar yields what it holds.
Problems are collected as strings; ``shard_events`` turns them (and a shortfall against the
expected count) into ``("corrupt_tar", url, detail, n_lost)`` events.
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import Callable, Iterator, Optional, Sequence

from framework.data.shardformat import DataError, is_remote, local_path

__all__ = ["tar_members", "tar_records", "ShardReader", "iter_shard_samples", "shard_events",
           "count_tar", "read_samples_at"]

_ZERO_BLOCK = bytes(512)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
_REGULAR = (b"0", b"\0", b"7")


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:                     # GNU base-256
        return int.from_bytes(field[1:], "big")
    return int(field.replace(b"\0", b" ").strip() or b"0", 8)


def _pax_path(data: bytes) -> Optional[str]:
    i = 0
    while i < len(data):
        sp = data.index(b" ", i)
        n = int(data[i:sp])
        key, _, value = data[sp + 1:i + n - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        i += n
    return None


class _Prefixed(io.RawIOBase):
    """A stream with some already-read bytes put back in front (for tarfile's fallback)."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.rest.read(len(b))
        b[:len(data)] = data
        return len(data)


def _skip_bytes(f, n: int, seekable: bool) -> bool:
    """Move ``n`` bytes forward; False when the stream ends first."""
    if n <= 0:
        return True
    if seekable:
        f.seek(n, 1)
        return True
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            return False
        n -= len(chunk)
    return True


def tar_records(f, url: str, problems: list, base: int = 0, skip: Optional[Callable[[str], bool]] = None,
                size: Optional[int] = None) -> Iterator[tuple[str, Optional[bytes], Optional[int]]]:
    """(name, data, offset) of the regular files of a tar stream, in order. ``offset`` is where the
    member's header chain (pax / GNU long-name headers included) starts, counted from the start of
    the tar when ``f`` is positioned at byte ``base`` of it (None for compressed tars). When
    ``skip(name)`` is true the data is not read (``seek`` when ``size``, the file size, is given,
    else read and dropped) and ``data`` is None. Problems are appended to ``problems``."""
    hdr = f.read(512)
    if hdr.startswith(_COMPRESSED):
        try:
            tf = tarfile.open(fileobj=_Prefixed(hdr, f), mode="r|*", ignore_zeros=True)
        except Exception as e:
            raise DataError(f"shard {url} is unreadable: {e!r}") from e
        try:
            for ti in tf:
                if ti.isreg():
                    data = tf.extractfile(ti).read()
                    if len(data) != ti.size:
                        problems.append(f"{ti.name}: truncated")
                        return
                    yield ti.name, (None if skip is not None and skip(ti.name) else data), None
                tf.members = []
        except Exception as e:
            problems.append(repr(e))
        return
    seekable = size is not None
    pos = base                                   # offset of the block in hdr
    long_name: Optional[str] = None
    chain_start: Optional[int] = None
    in_bad_run = False
    end_marker = False
    while True:
        if len(hdr) < 512:
            if hdr:
                problems.append("truncated tar header")
            elif not end_marker:
                problems.append("truncated (no end-of-archive blocks)")
            return
        here = pos
        pos += 512
        if hdr == _ZERO_BLOCK:
            end_marker = True
        else:
            end_marker = False
            try:
                chk = _tar_number(hdr[148:156])
                ok = chk == sum(hdr[:148]) + 256 + sum(hdr[156:])
                msize = _tar_number(hdr[124:136]) if ok else 0
            except ValueError:
                ok = False
            if not ok:
                if not in_bad_run:
                    problems.append("damaged tar header (skipped)")
                in_bad_run = True
            else:
                in_bad_run = False
                name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                if hdr[257:263] == b"ustar\x00":
                    prefix = hdr[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix.decode("utf-8", "replace") + "/" + name
                typ = hdr[156:157]
                pad = -msize % 512
                full = long_name or name
                if typ in _REGULAR and skip is not None and skip(full):
                    if seekable and pos + msize > size:
                        problems.append(f"{full}: truncated")
                        return
                    if not _skip_bytes(f, msize + pad, seekable):
                        problems.append(f"{full}: truncated")
                        return
                    yield full, None, (chain_start if chain_start is not None else here)
                    pos += msize + pad
                    long_name = chain_start = None
                    hdr = f.read(512)
                    continue
                data = f.read(msize)
                if len(data) < msize:
                    problems.append(f"{name}: truncated")
                    return
                if pad and len(f.read(pad)) < pad:
                    problems.append(f"{name}: truncated")
                    if typ in _REGULAR:
                        yield full, data, (chain_start if chain_start is not None else here)   # complete bytes
                    return
                pos += msize + pad
                if typ == b"x":                           # pax header of the next member
                    long_name = _pax_path(data) or long_name
                    chain_start = here if chain_start is None else chain_start
                elif typ == b"L":                         # GNU long name of the next member
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                    chain_start = here if chain_start is None else chain_start
                elif typ in _REGULAR:
                    yield full, data, (chain_start if chain_start is not None else here)
                    long_name = chain_start = None
                elif typ != b"g":
                    long_name = chain_start = None        # directories, links, ...: skipped
        hdr = f.read(512)


def tar_members(f, url: str, problems: list) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream, in order (see ``tar_records``)."""
    for name, data, _ in tar_records(f, url, problems):
        yield name, data


def _split_name(name: str) -> tuple[Optional[str], str]:
    """webdataset's ``base_plus_ext``: ``dir/key.a.b`` -> (``dir/key``, ``a.b``)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash or "/" in name[dot:]:
        return None, ""
    return name[:dot], name[dot + 1:]


def _is_meta(name: str) -> bool:
    return "/" not in name and name.startswith("__") and name.endswith("__")


def _open(url: str, offset: int) -> tuple[object, Optional[int], int]:
    """(stream, file size if seekable else None, byte offset the stream is at)."""
    if not is_remote(url):
        path = local_path(url)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise DataError(f"shard {url} is missing or unreadable: {e}") from e
        size = os.fstat(f.fileno()).st_size
        if offset:
            f.seek(offset)
        return f, size, offset
    from webdataset.gopen import gopen
    try:
        f = gopen(url)
    except Exception as e:
        raise DataError(f"shard {url} is missing or unreadable: {e}") from e
    if offset and not _skip_bytes(f, offset, False):
        return f, None, offset          # the read below finds the end: a truncation problem
    return f, None, offset


class ShardReader:
    """Samples ``[start, stop)`` of one shard (``stop`` None: to the end), each a dict
    ``{"__key__", "__url__", ext: bytes}``. ``offset``: the byte offset of sample ``start`` when
    known (from an earlier reader), else the samples before ``start`` are skipped member by member
    without reading their data. After each yielded sample, ``j`` is the index of the next sample,
    ``next_offset`` its byte offset (None: unknown), ``done`` whether the range is finished, and
    ``problems`` what went wrong so far (``problems`` can be handed in: a restarted reader)."""

    def __init__(self, url: str, start: int = 0, offset: Optional[int] = None, stop: Optional[int] = None,
                 problems: Sequence[str] = (), fileobj=None, wanted: Optional[set] = None):
        self.url, self.start, self.stop = url, start, stop
        self.wanted = wanted                    # only these sample indices (the others: headers only)
        self.fileobj = fileobj                  # an open local file to use (and leave open)
        self.offset = offset if start > 0 else 0
        self.problems = list(problems)
        self.j = start
        self.next_offset = self.offset
        self.last_offset: Optional[int] = None  # byte offset of the sample yielded last
        self.done = stop is not None and start >= stop

    def state(self) -> list:
        return [self.j, self.next_offset, list(self.problems[:8]), self.done]

    @classmethod
    def from_state(cls, url: str, state: Sequence, stop: Optional[int]) -> "ShardReader":
        j, off, problems, done = state
        r = cls(url, j, off, stop, problems)
        r.done = bool(done)
        return r

    def __iter__(self) -> Iterator[dict]:
        if self.done:
            return
        url, start, stop, wanted = self.url, self.start, self.stop, self.wanted
        base = self.offset or 0
        if self.fileobj is not None:
            f, size = self.fileobj, os.fstat(self.fileobj.fileno()).st_size
            f.seek(base)
        else:
            f, size, _ = _open(url, base)
        idx = (start if self.offset is not None else 0) - 1     # index of the sample being assembled
        key: Optional[str] = None
        cur: Optional[dict] = None
        cur_off: Optional[int] = None

        def skip(name: str) -> bool:            # read no data of samples outside [start, stop)
            if _is_meta(name):
                return True
            prefix, _ = _split_name(name)
            i = idx + (prefix is not None and prefix != key)
            return i < start or (stop is not None and i >= stop) or (wanted is not None and i not in wanted)

        # skip only where data is to be passed over (a sample after the range costs one member read)
        needed = (start > 0 and self.offset is None) or wanted is not None
        try:
            for name, data, off in tar_records(f, url, self.problems, base=base, skip=skip if needed else None,
                                               size=size):
                if _is_meta(name):
                    continue
                prefix, suffix = _split_name(name)
                if prefix is None:
                    continue
                if prefix != key:
                    if cur is not None:
                        self.j, self.next_offset, self.last_offset = idx + 1, off, cur_off
                        self.done = stop is not None and idx + 1 >= stop
                        yield cur
                        if self.done:
                            return
                    idx += 1
                    key, cur_off = prefix, off
                    cur = ({"__key__": prefix, "__url__": url}
                           if idx >= start and (wanted is None or idx in wanted) else None)
                    if stop is not None and idx >= stop:       # reached while skipping
                        self.j, self.next_offset, self.done = idx, off, True
                        return
                if cur is None:
                    continue
                suffix = suffix.lower()
                if suffix in cur:
                    self.problems.append(f"{name}: duplicate file name in sample {prefix}")
                    continue
                cur[suffix] = data
            if cur is not None:
                self.j, self.next_offset, self.last_offset, self.done = idx + 1, None, cur_off, True
                yield cur
            self.done = True
            self.j = max(self.j, idx + 1)
        finally:
            if self.fileobj is None:
                try:
                    f.close()
                except Exception as e:   # a pipe: command that failed reports here
                    self.problems.append(repr(e))


def _truncated(problems: Sequence[str]) -> bool:
    return any("truncated" in p for p in problems)


def shard_events(url: str, problems: Sequence[str], n: int, expected: Optional[int], events: list) -> None:
    """Append the ``corrupt_tar`` event of a finished shard (range) to ``events``: samples missing
    against ``expected`` (at least one when the tar is truncated: its last sample is cut), or,
    with no expectation, one per problem."""
    lost = (expected - n) if expected is not None and n < expected else 0
    if expected is not None and _truncated(problems):
        lost = max(lost, 1)
    if problems or lost:
        events.append(("corrupt_tar", url, "; ".join(problems[:3]) or f"{n} of {expected} samples readable",
                       lost if expected is not None else max(1, len(problems))))


def iter_shard_samples(url: str, events: Optional[list] = None, expected: Optional[int] = None
                       ) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one shard. Damage is appended to
    ``events`` (see ``shard_events``); with ``expected`` (the manifest count) a shortfall is
    reported as lost samples. A shard that cannot be opened at all raises ``DataError``."""
    events = events if events is not None else []
    r = ShardReader(url)
    n = 0
    for s in r:
        n += 1
        yield s
    if n == 0 and expected != 0:
        raise DataError(f"shard {url} is unreadable: no sample could be read"
                        + (f" ({'; '.join(r.problems[:3])})" if r.problems else f" (the manifest says {expected})"))
    shard_events(url, r.problems, n, expected, events)


def read_samples_at(url: str, refs: Sequence[tuple[int, Optional[int]]]) -> dict[int, dict]:
    """Samples ``j`` of one shard by (j, byte offset or None): {j: sample}. One pass from the first
    wanted sample to the last, the others' data seeked over (headers only). Used to refill a
    shuffle buffer on resume. Samples that cannot be read are missing from the result."""
    want = sorted(set((int(j), off) for j, off in refs), key=lambda r: r[0])
    if not want:
        return {}
    (j0, off0), last = want[0], want[-1][0]
    r = ShardReader(url, j0, off0, last + 1, wanted={j for j, _ in want})
    out = {}
    for s in r:
        out[r.j - 1] = s
    return out


def count_tar(path: str) -> tuple[int, Optional[str]]:
    """Samples in a local tar by its headers only (data is seeked over), counted as far as it
    reads: (count, the first problem or None). A file that is not a tar counts 0."""
    problems: list[str] = []
    n = 0
    try:
        f, size, _ = _open(path, 0)
    except DataError as e:
        return 0, str(e)
    key = None
    try:
        for name, _, _ in tar_records(f, path, problems, skip=lambda name: True, size=size):
            if _is_meta(name):
                continue
            prefix, _ = _split_name(name)
            if prefix is not None and prefix != key:
                n += 1
                key = prefix
    except DataError as e:
        problems.append(str(e))
    finally:
        f.close()
    return n, (problems[0] if problems else None)
