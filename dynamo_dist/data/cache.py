"""Trajectories read on demand under a memory budget: what keeps a meta worker's memory flat in N.

``TrajectoryCache`` decodes a model's trajectory file the first time a step (or an
evaluation) asks for it, keeps it in its storage precision (float16 stays float16), and
evicts the least recently used trajectories when the decoded bytes would exceed
``budget_bytes``. ``view(split)`` is the ``model_id -> Trajectory`` mapping the meta
trainer indexes; ``info(model_id)`` answers sizes and shapes from the file's footer
without decoding it. ``prefetch`` decodes models a later step will sample on a
background thread (pyarrow decodes without the GIL), so a step rarely waits on a read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from . import store


class TrajectoryCache:
    """LRU of decoded trajectories of one population root, keyed by (model_id, split).

    ``budget_bytes`` None keeps everything once read (the small-population fast path). A
    trajectory larger than the whole budget is a ValueError naming ``meta.cache_bytes``.
    """

    def __init__(self, root: str, budget_bytes: int | None = None):
        self.root = root
        self.budget_bytes = budget_bytes
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
        traj = store.read_trajectory(self.root, model_id, split, dtype=None)
        if keep:
            self._put(key, traj)
        else:
            with self._lock:
                self.reads += 1
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
            self._put(key, store.read_trajectory(self.root, key[0], key[1], dtype=None))
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def view(self, split: str, model_ids: Iterable[str], keep: bool = True) -> TrajectoryView:
        return TrajectoryView(self, split, model_ids, keep)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


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
