"""Unit tests of dynamo_dist.store: Parquet layout, schema, atomic writes, manifest, errors."""

from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from dynamo_dist.data import store
from dynamo_dist.data.tasks import Split

N, T, H, C = 12, 7, 5, 3  # examples, steps, hidden units, classes


def _rnn_arrays(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, T, H, generator=g)], torch.randn(N, T, C, generator=g)


def _cnn_arrays(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 6, 6), (8, 3, 3), (2, 2, 2), (16, 1, 1)]
    return [torch.randn((N,) + s, generator=g) for s in shapes], torch.randn(N, 1, C, generator=g)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "pop"
    store.init_root(r, {"test": True})
    return r


@pytest.fixture
def three_models(root):
    """Three RNN models' probe trajectories written through the store; returns {model_id: (hiddens, outputs)}."""
    out = {}
    for i, mid in enumerate(("m-a", "m-b", "m-c")):
        hs, o = _rnn_arrays(seed=i)
        store.write_trajectory(root, mid, "probe", hs, o, "rnn", "float32")
        out[mid] = (hs, o)
    return out


# ---------------------------------------------------------------- round trips and schema


def test_rnn_round_trip_float32_is_exact_and_schema_is_documented(root):
    hs, o = _rnn_arrays()
    rel = store.write_trajectory(root, "m-1", "probe", hs, o, "rnn", "float32")
    assert rel == "trajectories/split=probe/model_id=m-1/part-0.parquet"
    traj = store.read_trajectory(root, "m-1", "probe")
    assert traj.model_id == "m-1" and traj.num_examples == N
    assert len(traj.hiddens) == 1 and traj.hiddens[0].dtype == torch.float32
    assert torch.equal(traj.hiddens[0], hs[0]) and torch.equal(traj.outputs, o)

    pf = pq.ParquetFile(root / rel)
    schema = pf.schema_arrow
    assert schema.field("sample").type == pa.int32()
    assert schema.field("step").type == pa.int16()
    assert schema.field("hidden").type == pa.list_(pa.float32())
    assert schema.field("output").type == pa.list_(pa.float32())
    meta = schema.metadata
    assert meta[b"dynamo.schema_version"] == str(store.SCHEMA_VERSION).encode()
    assert meta[b"dynamo.model_id"] == b"m-1"
    assert json.loads(meta[b"dynamo.hidden_shapes"]) == [[H]]
    assert pf.metadata.row_group(0).column(2).compression == "ZSTD"
    table = pf.read()
    assert table.num_rows == N * T
    # rows sorted by (sample, step), steps 1..T
    assert table.column("sample").to_pylist() == [i for i in range(N) for _ in range(T)]
    assert table.column("step").to_pylist() == list(range(1, T + 1)) * N
    # row (sample=i, step=t) holds h[i, t-1]
    assert np.array_equal(np.array(table.column("hidden")[3 * T + 4].as_py(), np.float32), hs[0][3, 4].numpy())


def test_float16_round_trip_within_half_precision(root):
    hs, o = _rnn_arrays()
    rel = store.write_trajectory(root, "m-16", "probe", hs, o, "rnn", "float16")
    assert pq.read_schema(root / rel).field("hidden").type == pa.list_(pa.float16())
    traj = store.read_trajectory(root, "m-16", "probe")
    assert traj.hiddens[0].dtype == torch.float32  # readers always get float32
    torch.testing.assert_close(traj.hiddens[0], hs[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(traj.outputs, o, rtol=1e-3, atol=1e-3)
    assert not torch.equal(traj.hiddens[0], hs[0])  # it really was stored at half precision


def test_cnn_round_trip_keeps_every_tap_shape(root):
    hs, o = _cnn_arrays()
    store.write_trajectory(root, "r-1", "test", hs, o, "cnn", "float32")
    traj = store.read_trajectory(root, "r-1", "test")
    assert [tuple(h.shape) for h in traj.hiddens] == [tuple(h.shape) for h in hs]
    for got, want in zip(traj.hiddens, hs):
        assert torch.equal(got, want)
    assert torch.equal(traj.outputs, o)


def test_inputs_round_trip(root):
    g = torch.Generator().manual_seed(0)
    split = Split(x=torch.randn(20, T, 1, generator=g), y=torch.arange(20) % C, lengths=torch.full((20,), T))
    rel = store.write_inputs(root, "mnist1d", "probe", split, limit=15)
    back = store.read_inputs(root, "mnist1d", "probe")
    assert rel == "inputs/mnist1d/probe.parquet"
    assert torch.equal(back.x, split.x[:15]) and torch.equal(back.y, split.y[:15])
    assert torch.equal(back.lengths, split.lengths[:15])


# ---------------------------------------------------------------- many-model readers


def test_pyarrow_dataset_reads_hive_layout(root, three_models):
    ds = pads.dataset(root / "trajectories", format="parquet", partitioning="hive")
    table = ds.to_table()
    assert {"split", "model_id", "sample", "step", "hidden", "output"} <= set(table.column_names)
    assert table.num_rows == 3 * N * T
    one = ds.to_table(filter=pads.field("model_id") == "m-b")
    assert one.num_rows == N * T
    hidden = np.array(one.column("hidden").to_pylist(), np.float32).reshape(N, T, H)
    assert np.array_equal(hidden, three_models["m-b"][0][0].numpy())


def test_duckdb_reads_hive_layout_with_expected_shapes(root, three_models):
    glob = store.trajectory_glob(root, "probe")
    rows = duckdb.sql(
        f"select model_id, count(*) as n, count(distinct sample) as n_sample, max(step) as t, "
        f"min(len(hidden)) as h_min, max(len(hidden)) as h_max, max(len(output)) as c "
        f"from read_parquet('{glob}', hive_partitioning=1) group by model_id order by model_id"
    ).fetchall()
    assert rows == [(mid, N * T, N, T, H, H, C) for mid in ("m-a", "m-b", "m-c")]
    h = duckdb.sql(
        f"select hidden from read_parquet('{glob}', hive_partitioning=1) "
        f"where model_id = 'm-c' and sample = 5 and step = 2"
    ).fetchall()[0][0]
    assert np.allclose(np.array(h, np.float32), three_models["m-c"][0][0][5, 1].numpy(), rtol=0, atol=0)


def test_one_model_read_opens_only_its_file(root, three_models):
    layout = store.Layout.at(root)
    os.remove(layout.path(layout.trajectory_rel("m-a", "probe")))
    layout.path(layout.trajectory_rel("m-c", "probe")).write_bytes(b"not parquet at all")
    traj = store.read_trajectory(root, "m-b", "probe")
    assert torch.equal(traj.hiddens[0], three_models["m-b"][0][0])


# ---------------------------------------------------------------- errors name the problem


def test_missing_trajectory_is_file_not_found(root):
    with pytest.raises(FileNotFoundError, match="m-none"):
        store.read_trajectory(root, "m-none", "probe")


def test_corrupt_trajectory_is_value_error_naming_the_file(root, three_models):
    path = store.Layout.at(root).path(store.Layout.at(root).trajectory_rel("m-a", "probe"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated file, as a crashed non-atomic writer would leave
    with pytest.raises(ValueError, match=str(path)):
        store.read_trajectory(root, "m-a", "probe")


def test_nan_in_stored_trajectory_is_value_error_naming_the_file(root, three_models):
    layout = store.Layout.at(root)
    path = layout.path(layout.trajectory_rel("m-a", "probe"))
    table = pq.read_table(path)
    hidden = np.array(table.column("hidden").to_pylist(), np.float32)
    hidden[2, 1] = np.nan
    bad = table.set_column(table.column_names.index("hidden"), "hidden",
                           pa.array(list(hidden), type=pa.list_(pa.float32())))
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), path)  # by hand, like a foreign writer
    with pytest.raises(ValueError, match=rf"{path}.*NaN"):
        store.read_trajectory(root, "m-a", "probe")


def test_writing_nan_raises_and_leaves_no_file(root):
    hs, o = _rnn_arrays()
    hs[0][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="m-nan"):
        store.write_trajectory(root, "m-nan", "probe", hs, o, "rnn")
    assert not [p for p in root.rglob("*") if p.is_file() and "m-nan" in str(p)]


def test_missing_hidden_shapes_metadata_is_value_error(root, three_models):
    layout = store.Layout.at(root)
    path = layout.path(layout.trajectory_rel("m-a", "probe"))
    pq.write_table(pq.read_table(path).replace_schema_metadata({}), path)
    with pytest.raises(ValueError, match="metadata"):
        store.read_trajectory(root, "m-a", "probe")


@pytest.mark.parametrize("bad_id", ["", "../escape", "a/b", "-lead", "sp ace"])
def test_model_ids_that_would_escape_or_break_paths_are_rejected(root, bad_id):
    hs, o = _rnn_arrays()
    with pytest.raises(ValueError, match="model_id"):
        store.write_trajectory(root, bad_id, "probe", hs, o, "rnn")


def test_schema_version_mismatch_is_value_error_and_nothing_is_overwritten(root):
    store.upsert_manifest(root, [{"model_id": "m-a", "task": "t", "status": "complete"}])
    info = store.Layout.at(root).info
    info.write_text(json.dumps({"schema_version": store.SCHEMA_VERSION + 1, "spec": {}}))
    before = (info.read_text(), store.Layout.at(root).manifest.read_bytes())
    with pytest.raises(ValueError, match=rf"schema_version={store.SCHEMA_VERSION + 1}"):
        store.init_root(root, {"test": True})
    with pytest.raises(ValueError, match="schema_version"):
        store.read_manifest(root)
    assert (info.read_text(), store.Layout.at(root).manifest.read_bytes()) == before


def test_unwritable_root_is_value_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        store.init_root(blocker / "pop", {})


def test_missing_population_json_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="population.json"):
        store.read_manifest(tmp_path)


# ---------------------------------------------------------------- manifest and atomicity


def test_upsert_manifest_keeps_each_model_once_and_merges(root):
    store.upsert_manifest(root, [{"model_id": "b", "task": "t", "status": "complete", "test_accuracy": 0.5},
                                 {"model_id": "a", "task": "t", "status": "complete", "test_accuracy": 0.25}])
    store.upsert_manifest(root, [{"model_id": "b", "task": "t", "status": "complete", "test_accuracy": 0.75,
                                  "extra_label": "x"}])
    rows = store.manifest_rows(root)
    assert [r["model_id"] for r in rows] == ["a", "b"]
    assert [r["test_accuracy"] for r in rows] == [0.25, 0.75]
    assert rows[1]["extra_label"] == "x" and rows[0]["extra_label"] is None
    names = pq.read_schema(store.Layout.at(root).manifest).names
    assert names[: len(store.MANIFEST_COLUMNS)] == list(store.MANIFEST_COLUMNS)


def test_writes_leave_no_temp_files(root, three_models):
    store.upsert_manifest(root, [{"model_id": "m-a", "task": "t", "status": "complete"}])
    assert not list(root.rglob("*.tmp"))


def test_temp_files_of_a_crashed_writer_are_invisible_and_removable(root, three_models):
    model_dir = store.Layout.at(root).path(store.Layout.at(root).trajectory_rel("m-a", "probe")).parent
    partial = model_dir / ".part-0.parquet.deadbeef.tmp"
    partial.write_bytes(b"PAR1 half a file")
    assert pads.dataset(root / "trajectories", format="parquet", partitioning="hive").count_rows() == 3 * N * T
    n = duckdb.sql(f"select count(*) from read_parquet('{store.trajectory_glob(root)}', hive_partitioning=1)")
    assert n.fetchall()[0][0] == 3 * N * T
    assert store.remove_temp_files(root) == [partial]
    assert not partial.exists() and store.read_trajectory(root, "m-a").num_examples == N


def test_json_files_are_strict_json_with_non_finite_numbers_as_null(tmp_path):
    import json

    def strict_loads(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in output"))

    path = tmp_path / "summary.json"
    store.write_json_atomic({"a": float("nan"), "b": [np.float32(np.inf), 1.5], "c": np.int64(3)}, path)
    assert strict_loads(path.read_text()) == {"a": None, "b": [None, 1.5], "c": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


def test_manifest_reads_racing_a_rewriting_writer_never_fail(root):
    """A reader sees the old or the new manifest, never a mix: os.replace swaps the file between
    the opens pq.read_table(path) makes (12 of 3,000 such reads failed before store read from one handle)."""
    import threading

    table = store.upsert_manifest(root, [{"model_id": f"m{i:03d}", "task": "t", "status": "complete"}
                                         for i in range(300)])
    stop = threading.Event()

    def rewrite():  # what upsert_manifest ends with, as fast as it goes, each file different
        i = 0
        while not stop.is_set():
            i += 1
            label = pa.array([i + j for j in range(len(table))], pa.int64())
            store.write_table_atomic(table.append_column("race_label", label), store.Layout.at(root).manifest)

    writer = threading.Thread(target=rewrite)
    writer.start()
    errors = []
    try:
        for _ in range(2000):
            try:
                assert len(store.read_manifest(root)) == 300
            except (ValueError, OSError) as err:
                errors.append(str(err))
    finally:
        stop.set()
        writer.join()
    assert errors == []
