"""Trajectories read on demand under a memory budget: what keeps a meta worker's memory flat in N.

``TrajectoryCache`` decodes a model's trajectory file the first time a step (or an
evaluation) asks for it, keeps it in its storage precision (float16 stays float16), and
evicts the least recently used trajectories when the decoded bytes would exceed
``budget_bytes``. ``view(split)`` is the ``model_id -> Trajectory`` mapping the meta
trainer indexes; ``info(model_id)`` answers sizes and shapes from the file's footer
without decoding it. ``prefetch`` decodes models a later step will sample on a
background thread (pyarrow decodes without the GIL), so a step rarely waits on a read.

With ``spill_bytes``, every decoded trajectory is also written once, raw, to a private
directory on local disk (``SpillFiles``, removed with the cache): a trajectory evicted from
memory and sampled again is read back from there, a plain file read, instead of being decoded
from Parquet again (``benchmarks/bench_spill.py``: 0.18 vs 3.5 ms for a 133 KB float16 trajectory on
a busy 2-core machine). Populations whose
decoded size exceeds ``budget_bytes`` re-read models all the time; that is the case it is for.
"""

from __future__ import annotations

import json
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

from . import store


class Spilled(NamedTuple):
    """A spilled trajectory: its tensors' bytes, where they start in its file, each one's (dtype, shape);
    no layout yet while the file is being written."""

    size: int
    offset: int = 0
    layout: list[tuple[str, tuple[int, ...]]] | None = None


class SpillFiles:
    """Decoded trajectories as raw files in a private temporary directory, at most ``budget_bytes``
    of them (the oldest written are deleted first). A file is a JSON header line (each tensor's
    dtype and shape) and the tensors' bytes; it is written under a temporary name and renamed, so
    a reader sees a whole file or none. The directory goes when this object does."""

    def __init__(self, budget_bytes: int, parent: str | None = None):
        self.budget_bytes = budget_bytes
        self.dir = tempfile.mkdtemp(prefix="dynamo-spill-", dir=parent)
        self._cleanup = weakref.finalize(self, _remove_tree, self.dir)
        self._files: OrderedDict[tuple[str, str], Spilled] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.reads = 0  # trajectories read back from here

    def _path(self, key: tuple[str, str]) -> str:
        return os.path.join(self.dir, f"{key[0]}.{key[1]}.raw")  # model ids are file-name safe (store)

    def get(self, key: tuple[str, str]) -> store.Trajectory | None:
        with self._lock:
            entry = self._files.get(key)
        if entry is None or entry.layout is None:  # none, or still being written
            return None
        buf = bytearray(entry.size)  # the layout is known: one read of the tensors' bytes, nothing parsed
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                got = os.preadv(f.fileno(), [buf], entry.offset)
        except FileNotFoundError:  # deleted for room since the check: decode it again
            return None
        if got != entry.size:
            return None
        tensors, at = [], 0
        for dtype, shape in entry.layout:
            count = int(np.prod(shape))
            tensors.append(torch.from_numpy(np.frombuffer(buf, dtype=dtype, count=count, offset=at).reshape(shape)))
            at += count * np.dtype(dtype).itemsize
        with self._lock:
            self.reads += 1
        return store.Trajectory(model_id=key[0], hiddens=tensors[:-1], outputs=tensors[-1])

    def put(self, key: tuple[str, str], traj: store.Trajectory) -> None:
        tensors = [*traj.hiddens, traj.outputs]
        size = sum(t.numel() * t.element_size() for t in tensors)
        with self._lock:
            if key in self._files or size > self.budget_bytes:
                return
            while self._files and self.nbytes + size > self.budget_bytes:
                old, spilled = self._files.popitem(last=False)
                self.nbytes -= spilled.size
                _unlink(self._path(old))
            self._files[key] = Spilled(size)  # claimed now: a second put of the key returns above, get() waits
            self.nbytes += size
        path = self._path(key)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        layout = [(str(t.numpy().dtype), tuple(t.shape)) for t in tensors]
        head = json.dumps({"tensors": [[d, list(s)] for d, s in layout]}).encode() + b"\n"
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                for t in tensors:
                    f.write(memoryview(np.ascontiguousarray(t.numpy())).cast("B"))
            os.replace(tmp, path)
            with self._lock:
                if key in self._files:
                    self._files[key] = Spilled(size, len(head), layout)
                else:  # evicted for room while it was written
                    _unlink(path)
        except OSError:  # e.g. the disk is full: no copy of this one, nothing half-written kept
            _unlink(tmp)
            with self._lock:
                if self._files.pop(key, None) is not None:
                    self.nbytes -= size

    def close(self) -> None:
        self._cleanup()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class TrajectoryCache:
    """LRU of decoded trajectories of one population root, keyed by (model_id, split).

    ``budget_bytes`` None keeps everything once read (the small-population fast path). A
    trajectory larger than the whole budget is a ValueError naming ``meta.cache_bytes``.
    ``spill_bytes``: the raw copies kept on local disk (``SpillFiles``, under ``spill_dir``,
    default the system's temp dir); None or 0 = none.
    """

    def __init__(self, root: str, budget_bytes: int | None = None, spill_bytes: int | None = None,
                 spill_dir: str | None = None):
        self.root = root
        self.budget_bytes = budget_bytes
        self.spill = SpillFiles(spill_bytes, spill_dir) if spill_bytes else None
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
