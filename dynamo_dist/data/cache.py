"""Trajectories read on demand under a memory budget: what keeps a meta worker's memory flat in N.

``TrajectoryCache`` decodes a model's trajectory file the first time a step (or an
evaluation) asks for it, keeps it in its storage precision (float16 stays float16), and
evicts the least recently used trajectories when the decoded bytes would exceed
``budget_bytes``. ``view(split)`` is the ``model_id -> Trajectory`` mapping the meta
trainer indexes; ``info(model_id)`` answers sizes and shapes from the file's footer
without decoding it. ``prefetch`` decodes models a later step will sample on a
background thread (pyarrow decodes without the GIL), so a step rarely waits on a read.

With ``spill_bytes``, every decoded trajectory is also written once, raw, to a private
unlinked file on local disk (``SpillRing``; it goes with the process): a trajectory evicted from
memory and sampled again is read back from there, one ``preadv``, instead of being decoded from
Parquet again (``benchmarks/bench_spill.py``). Populations whose decoded size exceeds
``budget_bytes`` re-read models all the time; that is the case it is for.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from . import fsio, store


class Spilled(NamedTuple):
    """A spilled trajectory: where its bytes lie in the spill file, how many, and each tensor's
    (dtype, shape); no layout yet while they are being written."""

    offset: int
    size: int
    layout: list[tuple[str, tuple[int, ...]]] | None = None


class SpillRing:
    """Decoded trajectories as raw bytes in one file on local disk, at most ``budget_bytes`` of them:
    a ring, written front to back and then again from the start, each new copy dropping the oldest
    ones it overwrites. The file is made in ``parent`` (default the temp dir) and unlinked at once,
    so it goes with the process, a crash included; blocks are taken as copies are written (a full
    disk fails that put, which then keeps nothing). A put is one ``pwrite``, a get one ``preadv``
    into a fresh buffer (writable tensors), checked afterwards against a copy overwritten meanwhile.
    The layouts are kept here, in memory (about 100 bytes a trajectory)."""

    def __init__(self, budget_bytes: int, parent: str | None = None):
        self.budget_bytes = budget_bytes
        self.fd, path = tempfile.mkstemp(prefix="dynamo-spill-", suffix=".raw", dir=parent)
        os.unlink(path)
        self.dir = os.path.dirname(path)
        self._cleanup = weakref.finalize(self, os.close, self.fd)
        self._entries: OrderedDict[tuple[str, str], Spilled] = OrderedDict()  # oldest written first
        self._head = 0  # where the next copy goes
        self._lock = threading.Lock()
        self.nbytes = 0  # bytes of the copies held
        self.reads = 0  # trajectories read back from here

    def get(self, key: tuple[str, str]) -> store.Trajectory | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or entry.layout is None:  # none, or still being written
            return None
        buf = bytearray(entry.size)
        try:
            got = os.preadv(self.fd, [buf], entry.offset)
        except OSError:  # closed with the cache meanwhile
            return None
        with self._lock:
            if got != entry.size or self._entries.get(key) is not entry:  # overwritten while it was read
                return None
            self.reads += 1
        tensors, at = [], 0
        for dtype, shape in entry.layout:
            count = int(np.prod(shape))
            tensors.append(torch.from_numpy(np.frombuffer(buf, dtype=dtype, count=count, offset=at).reshape(shape)))
            at += count * np.dtype(dtype).itemsize
        return store.Trajectory(model_id=key[0], hiddens=tensors[:-1], outputs=tensors[-1])

    def put(self, key: tuple[str, str], traj: store.Trajectory) -> None:
        tensors = [*traj.hiddens, traj.outputs]
        size = sum(t.numel() * t.element_size() for t in tensors)
        with self._lock:
            if key in self._entries or size > self.budget_bytes or not self._make_room(size):
                return
            entry = Spilled(self._head, size)  # claimed now: a second put of the key returns above
            self._entries[key] = entry
            self._head += size
            self.nbytes += size
        try:
            at = entry.offset
            for t in tensors:
                data = memoryview(np.ascontiguousarray(t.numpy())).cast("B")
                fsio.pwrite_all(self.fd, data, at)
                at += len(data)
        except OSError:  # e.g. the disk is full: no copy of this one
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
                    self.nbytes -= size
            return
        with self._lock:
            if self._entries.get(key) is entry:
                self._entries[key] = entry._replace(layout=[(str(t.numpy().dtype), tuple(t.shape)) for t in tensors])

    def _make_room(self, size: int) -> bool:
        """Move the head where ``size`` bytes fit (back to the start past the end) and drop the copies
        they overlap, oldest first (caller holds the lock). False when that would drop a copy still
        being written: this one is not kept."""
        if self._head + size > self.budget_bytes:
            # what lies beyond this lap's last copy is older than every copy of the lap: it goes now
            while self._entries and next(iter(self._entries.values())).offset >= self._head:
                if not self._drop_oldest():
                    return False
            self._head = 0
        while self._entries:
            first = next(iter(self._entries.values()))
            if first.offset >= self._head + size or first.offset + first.size <= self._head:
                break  # the oldest copy lies clear of [head, head + size): so do the newer ones
            if not self._drop_oldest():
                return False
        return True

    def _drop_oldest(self) -> bool:
        key, entry = next(iter(self._entries.items()))
        if entry.layout is None:
            return False
        del self._entries[key]
        self.nbytes -= entry.size
        return True

    def close(self) -> None:
        self._cleanup()


class TrajectoryCache:
    """LRU of decoded trajectories of one population root, keyed by (model_id, split).

    ``budget_bytes`` None keeps everything once read (the small-population fast path). A
    trajectory larger than the whole budget is a ValueError naming ``meta.cache_bytes``.
    ``spill_bytes``: the raw copies kept on local disk (``SpillRing``, in ``spill_dir``,
    default the system's temp dir); None or 0 = none.
    """

    def __init__(self, root: str, budget_bytes: int | None = None, spill_bytes: int | None = None,
                 spill_dir: str | None = None):
        self.root = root
        self.budget_bytes = budget_bytes
        self.spill = SpillRing(spill_bytes, spill_dir) if spill_bytes else None
        self._items: OrderedDict[tuple[str, str], store.Trajectory] = OrderedDict()
        self._sizes: dict[tuple[str, str], int] = {}
        self._infos: dict[tuple[str, str], store.TrajectoryInfo] = {}
        self._pending: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.nbytes = 0        # decoded bytes held now
        self.peak_bytes = 0    # most ever held at once
        self.reads = 0         # files decoded (misses)
        self.hits = 0

    # ---------------------------------------------------------------- footer facts

    def info(self, model_id: str, split: str = "probe") -> store.TrajectoryInfo:
        key = (model_id, split)
        if key not in self._infos:
            self._infos[key] = store.trajectory_info(self.root, model_id, split)
        return self._infos[key]

    # ---------------------------------------------------------------- reads

    def get(self, model_id: str, split: str = "probe", keep: bool = True) -> store.Trajectory:
        """The decoded trajectory; ``keep=False`` reads a trajectory that is not held yet without
        holding it (a split evaluated once per model, e.g. the test split at the end of training)."""
        key = (model_id, split)
        with self._lock:
            held, pending = self._held(key), self._pending.get(key)
        if held is None and pending is not None:
            pending.result()  # a prefetch is decoding it: wait for that one read
            with self._lock:
                held = self._held(key)
        if held is not None:
            return held
        traj = self._read(key, spill=keep)  # a split read once is not kept on disk either
        if keep:
            self._put(key, traj)
        else:
            with self._lock:
                self.reads += 1
        return traj

    def _read(self, key: tuple[str, str], spill: bool = True) -> store.Trajectory:
        """Decode a trajectory: its raw copy when one was spilled, else its Parquet file (then
        spilled, unless ``spill`` is False)."""
        if self.spill is not None:
            traj = self.spill.get(key)
            if traj is not None:
                return traj
        traj = store.read_trajectory(self.root, key[0], key[1], dtype=None)
        if self.spill is not None and spill:
            self.spill.put(key, traj)
        return traj

    def _held(self, key: tuple[str, str]) -> store.Trajectory | None:
        """The held trajectory, marked most recently used (caller holds the lock)."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return self._items[key]

    def _put(self, key: tuple[str, str], traj: store.Trajectory) -> None:
        size = sum(h.numel() * h.element_size() for h in traj.hiddens) + traj.outputs.numel() * traj.outputs.element_size()
        if self.budget_bytes is not None and size > self.budget_bytes:
            raise ValueError(f"meta.cache_bytes={self.budget_bytes} is smaller than one trajectory "
                             f"({size} bytes: model {key[0]!r}, {key[1]} split); raise it to at least {size}")
        with self._lock:
            self.reads += 1
            if key in self._items:
                return
            if self.budget_bytes is not None:
                while self._items and self.nbytes + size > self.budget_bytes:
                    old, _ = self._items.popitem(last=False)
                    self.nbytes -= self._sizes.pop(old)
            self._items[key] = traj
            self._sizes[key] = size
            self.nbytes += size
            self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def prefetch(self, model_ids: Iterable[str], split: str = "probe") -> None:
        """Decode these models' trajectories in the background (no-op for those held or pending)."""
        for mid in model_ids:
            key = (mid, split)
            with self._lock:
                if key in self._items or key in self._pending:
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="trajectory-prefetch")
                self._pending[key] = self._pool.submit(self._load, key)

    def _load(self, key: tuple[str, str]) -> None:
        try:
            self._put(key, self._read(key))
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def view(self, split: str, model_ids: Iterable[str], keep: bool = True) -> TrajectoryView:
        return TrajectoryView(self, split, model_ids, keep)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.spill is not None:
            self.spill.close()


class TrajectoryView(Mapping):
    """``model_id -> Trajectory`` of one split, read through the cache."""

    def __init__(self, cache: TrajectoryCache, split: str, model_ids: Iterable[str] = (), keep: bool = True):
        self.cache, self.split, self.keep = cache, split, keep
        self.model_ids = list(model_ids)
        self._ids = set(self.model_ids)

    def __getitem__(self, model_id: str) -> store.Trajectory:
        return self.cache.get(model_id, self.split, self.keep)

    def __contains__(self, model_id: object) -> bool:  # membership without reading the file
        return model_id in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self.model_ids)

    def __len__(self) -> int:
        return len(self.model_ids)

    def info(self, model_id: str) -> store.TrajectoryInfo:
        return self.cache.info(model_id, self.split)

    def prefetch(self, model_ids: Iterable[str]) -> None:
        self.cache.prefetch(model_ids, self.split)
