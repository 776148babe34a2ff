"""Tests for dynamo_dist.data: shapes, splits, determinism, tokenisation, user files."""

from __future__ import annotations

import csv
import math
import pickle
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dynamo_dist.data import tasks as D
from dynamo_dist.data.tasks import PAD_ID, UNK_ID, Split, fraction_subset, load_task, token_id

SMALL = {  # keep loads fast; None = the task's natural size is already small
    "mnist1d": 1000,
    "mnist1d_parity": 1000,
    "tweets": 3000,
    "tweets3": 3000,
    "digits": None,
    "fake_images": 200,
}


def _rows(split: Split) -> set[bytes]:
    """Each example as bytes, for exact-row set comparisons across splits."""
    flat = split.x.reshape(len(split), -1).contiguous().numpy()
    return {r.tobytes() for r in flat}


def _write_csv(path, rows, header=("text", "label")) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


# ---------------------------------------------------------------- shapes / dtypes
@pytest.mark.parametrize("name", list(SMALL))
def test_shapes_dtypes_and_split_sizes(name):
    task = load_task(name, num_examples=SMALL[name])
    assert task.name == name and task.input_kind in D.INPUT_KINDS
    assert len(task.class_names) == task.num_classes
    splits = (task.base_train, task.probe, task.test)
    # probe is the other half of the pool: sizes differ by at most one
    assert abs(len(task.base_train) - len(task.probe)) <= 1
    for s in splits:
        assert len(s) > 0
        assert tuple(s.x.shape[1:]) == task.input_shape
        assert s.y.dtype == torch.int64 and s.lengths.dtype == torch.int64
        assert s.y.shape == s.lengths.shape == (len(s),)
        assert int(s.y.min()) >= 0 and int(s.y.max()) < task.num_classes
    if task.input_kind == "sequence":
        assert task.input_shape == (40, 1)
        assert all(s.x.dtype == torch.float32 and bool((s.lengths == 40).all()) for s in splits)
    elif task.input_kind == "image":
        assert len(task.input_shape) == 3
        assert all(s.x.dtype == torch.float32 and bool((s.lengths == 1).all()) for s in splits)
    else:
        assert task.input_shape == (32,) and task.vocab_size == len(task.vocab)
        assert task.vocab[:2] == ("<pad>", "<unk>")
        assert all(s.x.dtype == torch.int64 for s in splits)
        assert all(int(s.x.max()) < task.vocab_size for s in splits)
    assert (task.vocab is None) == (task.input_kind != "tokens")


def test_known_sizes_and_classes():
    # digits: 1797 images, 20% test = 359, pool 1438 halved
    d = load_task("digits")
    assert (len(d.base_train), len(d.probe), len(d.test)) == (719, 719, 359)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    # MNIST-1D keeps the package's 80/20 split of the generated samples
    m = load_task("mnist1d", num_examples=1000)
    assert (len(m.base_train), len(m.probe), len(m.test)) == (400, 400, 200)
    assert m.class_names == tuple("0123456789")
    assert load_task("tweets", num_examples=3000).class_names == ("negative", "positive")
    assert load_task("tweets3", num_examples=3000).class_names == ("negative", "neutral", "positive")
    f = load_task("fake_images", num_examples=200)
    assert f.input_shape == (3, 16, 16) and (len(f.base_train), len(f.probe), len(f.test)) == (80, 80, 40)


def test_full_tweet_corpus_loads():
    task = load_task("tweets3")
    total = len(task.base_train) + len(task.probe) + len(task.test)
    # 38,158 rows less exact token-level duplicates; all three sentiments present
    assert 30000 < total <= 38158
    assert set(task.base_train.y.tolist()) == {0, 1, 2}
    assert task.vocab_size <= 20000


# ------------------------------------------------------------------- standardising
@pytest.mark.parametrize("name,dims", [("mnist1d", (0, 1)), ("digits", (0, 2, 3)), ("fake_images", (0, 2, 3))])
def test_standardised_with_base_train_statistics(name, dims):
    task = load_task(name, num_examples=SMALL[name])
    x = task.base_train.x
    assert torch.allclose(x.mean(dim=dims), torch.zeros(1), atol=1e-4)
    assert torch.allclose(x.std(dim=dims), torch.ones(1), atol=1e-4)
    # probe was not used for the statistics, so it is not exactly standardised
    assert not torch.allclose(task.probe.x.mean(dim=dims), torch.zeros(1), atol=1e-6)


# ------------------------------------------------------------------------- splits
@pytest.mark.parametrize("name", ["mnist1d", "digits", "fake_images", "tweets"])
def test_same_seed_same_split_different_seed_different_split(name):
    a = load_task(name, seed=3, num_examples=SMALL[name])
    D._load_task_cached.cache_clear()  # rebuild from scratch, not the cached object
    b = load_task(name, seed=3, num_examples=SMALL[name])
    assert a is not b
    c = load_task(name, seed=4, num_examples=SMALL[name])
    for key in ("base_train", "probe", "test"):
        sa, sb = getattr(a, key), getattr(b, key)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y) and torch.equal(sa.lengths, sb.lengths)
    assert not torch.equal(a.base_train.y, c.base_train.y) or not torch.equal(a.base_train.x, c.base_train.x)


def test_load_task_is_cached():
    assert load_task("digits", seed=1) is load_task("digits", seed=1)
    assert load_task("digits", seed=1) is not load_task("digits", seed=2)


@pytest.mark.parametrize("name", ["mnist1d", "digits", "fake_images"])
def test_splits_disjoint_and_pool_is_reshuffled_not_changed(name):
    a = load_task(name, seed=0, num_examples=SMALL[name])
    b = load_task(name, seed=1, num_examples=SMALL[name])
    ra, pa_, ta = _rows(a.base_train), _rows(a.probe), _rows(a.test)
    # continuous-valued data: a shared row would mean an example is in two splits
    assert not (ra & pa_) and not (ra & ta) and not (pa_ & ta)
    if name == "mnist1d":
        # the generated data is the same for every seed; only the base/probe halving moves
        ya = torch.sort(torch.cat([a.base_train.y, a.probe.y])).values
        yb = torch.sort(torch.cat([b.base_train.y, b.probe.y])).values
        assert torch.equal(ya, yb) and torch.equal(a.test.y, b.test.y)


def test_mnist1d_parity_labels_are_digit_mod_2_on_identical_inputs():
    digit = load_task("mnist1d", seed=5, num_examples=1000)
    parity = load_task("mnist1d_parity", seed=5, num_examples=1000)
    assert parity.num_classes == 2 and parity.class_names == ("even", "odd")
    for key in ("base_train", "probe", "test"):
        sd, sp = getattr(digit, key), getattr(parity, key)
        assert torch.equal(sd.x, sp.x)
        assert torch.equal(sp.y, sd.y % 2)
    assert set(parity.base_train.y.tolist()) == {0, 1}


def test_mnist1d_generation_leaves_global_rngs_alone():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load_task("mnist1d", num_examples=110)  # size used nowhere else: forces generation
    assert np.random.rand() == expected_np and random.random() == expected_py


# ---------------------------------------------------------------- fraction_subset
def test_fraction_subset_sizes_nesting_determinism():
    split = load_task("digits").base_train  # 719 rows
    full = fraction_subset(split, 1.0, seed=0)
    assert torch.equal(full.x, split.x)
    half = fraction_subset(split, 0.5, seed=0)
    quarter = fraction_subset(split, 0.25, seed=0)
    assert (len(half), len(quarter)) == (round(0.5 * 719), round(0.25 * 719))
    assert torch.equal(half.x, fraction_subset(split, 0.5, seed=0).x)
    assert not torch.equal(half.x, fraction_subset(split, 0.5, seed=1).x)
    assert _rows(quarter) <= _rows(half) <= _rows(split)
    assert len(fraction_subset(split, 1e-9, seed=0)) == 1


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, math.nan, "0.5"])
def test_fraction_subset_rejects_bad_fraction(bad):
    split = load_task("digits").base_train
    with pytest.raises(ValueError, match="fraction"):
        fraction_subset(split, bad, seed=0)


def test_split_subset_and_validation():
    s = Split(torch.arange(12.0).reshape(6, 2), torch.arange(6), torch.ones(6, dtype=torch.int64))
    assert s.subset([4, 1]).y.tolist() == [4, 1]
    assert s.subset(torch.tensor([True, False, True, False, False, False])).y.tolist() == [0, 2]
    assert s.subset(slice(1, 3)).y.tolist() == [1, 2]
    assert len(s.subset(np.array([0, 0, 5]))) == 3
    with pytest.raises(ValueError, match="lengths"):
        Split(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))


# ------------------------------------------------------------------------ tokens
def test_tokens_left_padded_and_last_step_real():
    task = load_task("tweets", num_examples=3000, max_len=12)
    for s in (task.base_train, task.probe, task.test):
        assert bool((s.x[:, -1] != PAD_ID).all())
        assert bool((s.lengths >= 1).all()) and bool((s.lengths <= 12).all())
        steps = torch.arange(12).expand(len(s), 12)
        is_real = steps >= (12 - s.lengths)[:, None]
        assert torch.equal(s.x != PAD_ID, is_real)


def test_tokenize_known_answers():
    assert D.tokenize("I DON'T like it!! :( http://t.co/x #Fail @bob") == [
        "i", "don't", "like", "it", "!", "!", ":(", "<url>", "fail", "<user>",
    ]
    assert D.tokenize("caf\u00e9 &amp; ...") == ["caf"]  # ASCII words only; entities unescaped


def _vocab_csv(tmp_path, n=40):
    """Row i: its own word twice, a once-per-row word, shared words; label alternates."""
    rows = [(f"uniq{i} uniq{i} once{i} good movie", "pos" if i % 2 else "neg") for i in range(n)]
    return _write_csv(tmp_path / "vocab.csv", rows)


def test_vocabulary_built_from_base_train_only(tmp_path):
    task = load_task("csv:" + _vocab_csv(tmp_path), seed=0, max_len=8)
    vocab = set(task.vocab)
    uniq_in_vocab = {w for w in vocab if w.startswith("uniq")}
    # each base_train row contributes its word (count 2); probe/test words never enter
    assert len(uniq_in_vocab) == len(task.base_train)
    assert not any(w.startswith("once") for w in vocab)  # count 1 < min count 2
    assert {"good", "movie"} <= vocab
    # base_train rows: the doubled word is known; probe/test rows: it is <unk> twice
    # (layout: pad*3, uniq, uniq, once, good, movie)
    assert bool((task.base_train.x[:, 3:5] != UNK_ID).all())
    for s in (task.probe, task.test):
        assert bool((s.x[:, 3:5] == UNK_ID).all())
    assert bool((task.base_train.x[:, 5] == UNK_ID).all())  # once<i>
    assert task.class_names == ("neg", "pos")


def test_encode_truncates_to_last_tokens_and_matches_vocab(tmp_path):
    task = load_task("csv:" + _vocab_csv(tmp_path), seed=0, max_len=4)
    ids = task.encode(["good movie", "zzz good good movie movie", ""])
    good, movie = token_id(task, "good"), token_id(task, "movie")
    assert good not in (PAD_ID, UNK_ID) and token_id(task, "GOOD") == good
    assert token_id(task, "neverseen") == UNK_ID
    assert ids.dtype == torch.int64 and ids.shape == (3, 4)
    assert ids[0].tolist() == [PAD_ID, PAD_ID, good, movie]
    assert ids[1].tolist() == [good, good, movie, movie]  # 'zzz' cut: the last 4 tokens kept
    assert ids[2].tolist() == [PAD_ID] * 4
    # encode agrees with how the data itself was encoded
    assert ids[0, -2:].tolist() == task.base_train.x[0, -2:].tolist()
    with pytest.raises(ValueError, match="tokens"):
        load_task("digits").encode(["x"])
    with pytest.raises(ValueError):
        token_id(load_task("digits"), "x")


# ---------------------------------------------------------------- user text data
def test_user_csv_and_parquet_give_the_same_task(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    texts = [f"{words[i % 5]} {words[(i * 7) % 5]} row{i} row{i}" for i in range(60)]
    labels = [(2, 10, 3)[i % 3] for i in range(60)]
    csv_path = _write_csv(tmp_path / "d.csv", zip(texts, labels))
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": texts, "label": labels, "extra": list(range(60))}), pq_path)
    a, b = load_task("csv:" + csv_path, seed=2), load_task(f"parquet:{pq_path}", seed=2)
    # integer labels sort numerically in both formats: 2 < 3 < 10
    assert a.class_names == b.class_names == ("2", "3", "10")
    assert a.vocab == b.vocab
    for key in ("base_train", "probe", "test"):
        sa, sb = getattr(a, key), getattr(b, key)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y) and torch.equal(sa.lengths, sb.lengths)
    assert (len(a.base_train), len(a.probe), len(a.test)) == (24, 24, 12)
    # labels stay with their texts: base_train rows are fully in the vocabulary (row<i>
    # appears twice), so re-encoding each text identifies the row and its label
    expected = {tuple(a.encode([t])[0].tolist()): a.class_names.index(str(l)) for t, l in zip(texts, labels)}
    for row, y in zip(a.base_train.x.tolist(), a.base_train.y.tolist()):
        assert UNK_ID not in row
        assert expected[tuple(row)] == y


def test_user_text_duplicates_and_empty_texts_dropped(tmp_path):
    rows = [(f"w{i} common", "a" if i % 2 else "b") for i in range(30)]
    rows += [("w1 common", "a"), ("W1  COMMON!", "a")]  # duplicates of row 1 ('!' makes the second differ)
    rows += [("w2 common", "a")]  # same tokens as row 2 but other label: both dropped
    rows += [("", "a"), ("\u00e9\u00e9", "b")]  # no tokens
    task = load_task("csv:" + _write_csv(tmp_path / "dup.csv", rows))
    total = len(task.base_train) + len(task.probe) + len(task.test)
    assert total == 30 - 1 + 1  # 30 rows, row 2 dropped, 'w1 common !' kept


def test_user_file_errors(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_task(f"csv:{missing}")
    bad_col = _write_csv(tmp_path / "badcol.csv", [("hi", "x")], header=("text", "sentiment"))
    with pytest.raises(ValueError, match="'label'"):
        load_task("csv:" + bad_col)
    pq_path = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"body": ["a"], "label": [1]}), pq_path)
    with pytest.raises(ValueError, match="'text'"):
        load_task(f"parquet:{pq_path}")
    one_class = _write_csv(tmp_path / "one.csv", [(f"w{i} x", "same") for i in range(20)])
    with pytest.raises(ValueError, match="2 classes"):
        load_task("csv:" + one_class)
    tiny = _write_csv(tmp_path / "tiny.csv", [("a b", "x"), ("c d", "y")])
    with pytest.raises(ValueError, match="empty"):
        load_task("csv:" + tiny)


def test_edited_user_file_is_reloaded(tmp_path):
    path = tmp_path / "edit.csv"
    _write_csv(path, [(f"w{i} w{i}", i % 2) for i in range(20)])
    first = load_task(f"csv:{path}")
    _write_csv(path, [(f"w{i} w{i}", i % 2) for i in range(40)])
    second = load_task(f"csv:{path}")
    assert len(second.base_train) > len(first.base_train)


# -------------------------------------------------------------------- argument errors
def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError, match="unknown task 'mnist2d'") as e:
        load_task("mnist2d")
    for name in D.TASKS:
        assert name in str(e.value)
    assert set(D.TASKS) >= {"mnist1d", "mnist1d_parity", "tweets", "tweets3", "digits", "cifar10", "cifar100", "fake_images"}


@pytest.mark.parametrize("kwargs,field", [
    ({"seed": -1}, "seed"), ({"max_len": 0}, "max_len"), ({"max_vocab": 2}, "max_vocab"), ({"num_examples": 0}, "num_examples"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        load_task("digits", **kwargs)


def test_max_vocab_caps_vocabulary():
    task = load_task("tweets", num_examples=3000, max_vocab=50)
    assert task.vocab_size == 50
    assert int(task.base_train.x.max()) == 49


# -------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_files_name_the_directory(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)) as e:
        load_task(name, data_dir=str(tmp_path))
    assert folder in str(e.value)
    (tmp_path / folder).mkdir()  # folder present but batch files missing
    with pytest.raises(FileNotFoundError, match="missing or corrupt"):
        load_task(name, data_dir=str(tmp_path))


def test_cifar10_from_python_format_batches(tmp_path, monkeypatch):
    """A tiny CIFAR-10 in torchvision's on-disk format (md5 check patched out)."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)

    def batch(n, file):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (root / file).write_bytes(pickle.dumps(entry))

    for i in range(1, 6):
        batch(8, f"data_batch_{i}")
    batch(10, "test_batch")
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    task = load_task("cifar10", data_dir=str(tmp_path))
    assert task.input_shape == (3, 32, 32) and task.class_names == tuple(names)
    assert (len(task.base_train), len(task.probe), len(task.test)) == (20, 20, 10)
    x = task.base_train.x
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_mnist1d_disk_cache_is_used_and_a_corrupt_one_is_regenerated(tmp_path, monkeypatch):
    import mnist1d.data

    from dynamo_dist.data import tasks as data_mod

    monkeypatch.setenv("DYNAMO_DATA_DIR", str(tmp_path))
    data_mod._mnist1d_arrays.cache_clear()
    fresh = data_mod._mnist1d_arrays(200)
    (cache,) = (tmp_path / "mnist1d").glob("mnist1d-*-n200.npz")
    assert not list((tmp_path / "mnist1d").glob(".*.tmp"))

    # a cache hit must not generate again
    data_mod._mnist1d_arrays.cache_clear()
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: pytest.fail("regenerated despite a cache file"))
    cached = data_mod._mnist1d_arrays(200)
    for a, b in zip(fresh, cached):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    monkeypatch.undo()

    # a damaged cache file is regenerated (same values) and replaced by a readable one
    monkeypatch.setenv("DYNAMO_DATA_DIR", str(tmp_path))
    cache.write_bytes(cache.read_bytes()[:100])
    data_mod._mnist1d_arrays.cache_clear()
    again = data_mod._mnist1d_arrays(200)
    for a, b in zip(fresh, again):
        np.testing.assert_array_equal(a, b)
    with np.load(cache) as z:
        np.testing.assert_array_equal(z["x"], fresh[0])
    data_mod._mnist1d_arrays.cache_clear()
