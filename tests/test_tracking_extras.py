"""MLflow-native extras of the tracking (issue 16): the population as a meta run's dataset input,
system metrics on stage runs that stop with the run, one PCA basis for every picture of theta, and
the MLflow UI showing the stage runs nested under the pipeline run (headless Chromium).

Fast unit tests first (SQLite store, no Ray); the integration tests start a real ``mlflow server``,
moto's S3 server or Chromium on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from dynamo_dist import plots, tracking
from dynamo_dist.analysis.geometry import EmbeddingGeometry
from dynamo_dist.config import MetaConfig, TrackingConfig
from dynamo_dist.data import store
import browser
from servers import mlflow_server, s3_server

MONITOR = "SystemMetricsMonitor"  # the name MLflow gives its sampling thread


def _population(root: str, accuracy_of_m1: float = 0.75) -> list[dict]:
    """A population root with 5 complete models and one failed one (no training: rows only)."""
    store.init_root(root, {"groups": []})
    rows = [{"model_id": f"m{i}", "group": "ab"[i % 2], "task": "mnist1d", "arch": "gru", "hidden_size": 8,
             "input_shape": [40, 1], "test_accuracy": accuracy_of_m1 if i == 1 else 0.5 + i / 100,
             "weights_path": f"weights/m{i}.safetensors", "status": "complete"} for i in range(5)]
    rows.append({**rows[0], "model_id": "x-failed", "status": "failed", "error": "RuntimeError: boom"})
    store.upsert_manifest(root, rows)
    return rows


def _meta_run(st: tracking.Store, root: str) -> str:
    """A finished meta run logged as every meta path logs it (params at the start, results at the end)."""
    with st.for_stage("meta").run("meta") as run:
        run.log_params(tracking.meta_params(MetaConfig(), root, 5))
        tracking.log_meta_results(run, {"mean_agreement": 0.5}, {}, [], [])
    return run.run_id


def _dataset_inputs(st: tracking.Store, run_id: str):
    return st.client().get_run(run_id).inputs.dataset_inputs


# ---------------------------------------------------------------- dataset input


def test_a_meta_run_has_its_population_manifest_as_a_training_dataset_input(tmp_path, monkeypatch):
    st = tracking.Store.at(tmp_path / "run", TrackingConfig(system_metrics=False))
    root = str(tmp_path / "pop")
    _population(root)
    (inp,) = _dataset_inputs(st, _meta_run(st, root))
    ds = inp.dataset
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}
    assert ds.name == "pop" and ds.source_type == "local" and json.loads(ds.source) == {"uri": root}
    columns = [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]]
    assert columns == store.read_manifest(root).column_names
    assert json.loads(ds.profile)["num_rows"] == 5  # the complete models a meta run trains on, not the failed one

    # the digest is the root's and its content's: another meta run on the root shares it, one changed
    # number changes it, and a copy elsewhere is a dataset of its own (with its own source)
    again = _dataset_inputs(st, _meta_run(st, root))[0].dataset
    copy = str(tmp_path / "copy" / "pop")
    _population(copy)
    copied = _dataset_inputs(st, _meta_run(st, copy))[0].dataset
    assert again.digest == ds.digest != copied.digest and json.loads(copied.source) == {"uri": copy}
    _population(root, accuracy_of_m1=0.76)
    assert _dataset_inputs(st, _meta_run(st, root))[0].dataset.digest not in (ds.digest, copied.digest)

    # a scheme MLflow has no dataset source for: the URI as it is (its rows read as from any root)
    azure = "abfs://c@acct.dfs.core.windows.net/studies/pop"
    monkeypatch.setattr(store, "manifest_rows", lambda r: store.read_manifest(copy).to_pylist()[:5])
    with st.run("meta-azure", tags={}) as run:
        tracking.log_population_input(run, azure)
    (inp,) = _dataset_inputs(st, run.run_id)
    assert inp.dataset.source_type == "uri" and json.loads(inp.dataset.source) == {"uri": azure}
    assert inp.dataset.name == "pop" and json.loads(inp.dataset.profile)["num_rows"] == 5


@pytest.mark.integration
def test_a_population_in_a_bucket_is_the_dataset_source(tmp_path, monkeypatch):
    with s3_server(tmp_path, buckets=("bucket",)) as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        root = "s3://bucket/studies/pop"
        _population(root)
        st = tracking.Store.at(tmp_path / "run", TrackingConfig(system_metrics=False))
        (inp,) = _dataset_inputs(st, _meta_run(st, root))
    assert inp.dataset.source_type == "s3" and json.loads(inp.dataset.source) == {"uri": root}
    assert inp.dataset.name == "pop" and json.loads(inp.dataset.profile)["num_rows"] == 5


# ---------------------------------------------------------------- system metrics


def _monitors() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == MONITOR and t.is_alive()]


def _system_points(client, run_id: str) -> dict[str, list]:
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    return {k: client.get_metric_history(run_id, k) for k in keys}


def test_stage_runs_log_system_metrics_until_they_end_and_nothing_after(tmp_path, monkeypatch, capfd):
    for var in ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"):
        monkeypatch.delenv(var, raising=False)
    st = tracking.Store.at(tmp_path / "run", TrackingConfig(system_metrics_interval_s=0.25))
    client = st.client()
    with st.run("warm-up", tags={}):  # creates the SQLite store (its INFO lines are not the monitor's)
        pass
    capfd.readouterr()
    assert not _monitors()

    stage = st.for_stage("a stage").start_run("stage")
    trial = st.start_run("trial", parent_run_id=stage.run_id)  # nested explicitly (sweep trials): no monitor
    assert len(_monitors()) == 1
    deadline = time.monotonic() + 30
    while len(_system_points(client, stage.run_id).get("system/cpu_utilization_percentage", [])) < 2:
        assert time.monotonic() < deadline, "the stage run's monitor logged fewer than 2 samples in 30 s"
        time.sleep(0.1)
    trial.end()
    stage.end()
    assert not _monitors()  # stopped by the end, not by its next look at the run
    points = _system_points(client, stage.run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(points)
    assert len(points["system/cpu_utilization_percentage"]) >= 2
    end_ms = client.get_run(stage.run_id).info.end_time
    assert max(m.timestamp for ms in points.values() for m in ms) <= end_ms
    time.sleep(0.75)  # three sampling intervals: an orphaned monitor would have logged again
    assert {k: len(v) for k, v in _system_points(client, stage.run_id).items()} == {k: len(v) for k, v in points.items()}
    assert not _system_points(client, trial.run_id)

    # a handle dropped without ``end`` (a Ray Train rank 0 hands its run to the driver) stops its monitor
    dropped = st.for_stage("rank 0").start_run("rank0")
    assert len(_monitors()) == 1
    del dropped
    gc.collect()
    assert not _monitors()

    off = tracking.Store.at(tmp_path / "run", TrackingConfig(system_metrics=False)).for_stage("off").start_run("off")
    assert not _monitors()
    off.end()
    out, err = capfd.readouterr()
    assert "system metrics" not in (out + err).lower(), out + err  # MLflow's INFO lines stay off the console


def test_each_run_directory_is_its_own_experiment_unless_one_is_named():
    """Smoke runs, demos and sweeps sharing a tracking server stay apart: the default experiment is the
    run directory's name; a name given in the config wins."""
    server = "http://127.0.0.1:9"
    assert tracking.Store.at("runs/demo", TrackingConfig(tracking_uri=server)).experiment == "demo"
    assert tracking.Store.at("runs/smoke/", TrackingConfig(tracking_uri=server)).experiment == "smoke"
    assert tracking.Store.at("s3://bucket/studies/lr", TrackingConfig(tracking_uri=server)).experiment == "lr"
    assert tracking.Store.at("runs/demo", TrackingConfig(tracking_uri=server, experiment="mine")).experiment == "mine"


def test_the_setting_travels_with_the_store():
    st = tracking.Store.at("/tmp", TrackingConfig(tracking_uri="http://127.0.0.1:9", system_metrics_interval_s=3))
    assert st.system_metrics_s == 3
    # to Ray workers (as a dict) and to the analysis (meta_run.json records ``location``)
    assert tracking.Store(**st.for_stage("x").as_dict()).system_metrics_s == 3
    assert tracking.Store(**st.location().as_dict()).system_metrics_s == 3
    assert tracking.Store.at("/tmp", TrackingConfig(tracking_uri="http://x:1", system_metrics=False)).system_metrics_s \
        is None
    with pytest.raises(ValueError, match="system_metrics_interval_s"):
        TrackingConfig(system_metrics_interval_s=0)


# ---------------------------------------------------------------- one PCA basis


def _theta(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Three groups of embeddings in 6-D with unequal spreads (distinct principal axes)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, 6))
    theta = np.concatenate([c + rng.normal(0, 0.3 + i, (10, 6)) for i, c in enumerate(centres)])
    return theta, [g for g in "abc" for _ in range(10)]


def _points(fig, new: bool) -> np.ndarray:
    """The scatter offsets of a figure as drawn: the new models' stars, or every other marker."""
    pts = [c.get_offsets() for ax in fig.axes for c in ax.collections
           if len(c.get_offsets()) and (c.get_label() == "new") == new]
    return np.asarray(np.concatenate(pts), dtype=np.float64)


def _rows_sorted(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def _draw(monkeypatch, tmp_path, theta, groups, new):
    """The post-hoc plot's and the meta run's plot's (embedding_pca.png) figures of ``theta``."""
    figs = []
    real = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: (figs.append(fig), real(fig, path))[1])
    plots.posthoc_pca_plot(theta, groups, new, [f"n{i}" for i in range(len(new))], tmp_path / "posthoc.png")
    emb = pa.table({"model_id": [f"m{i}" for i in range(len(theta))], "theta": [list(t) for t in theta],
                    "group": groups})
    plots.embedding_pca_plot(emb, "group", tmp_path / "meta.png")
    monkeypatch.setattr(plots, "save", real)
    return figs


def test_posthoc_and_meta_plots_are_drawn_in_the_analysis_pca_basis(monkeypatch, tmp_path):
    theta, groups = _theta()
    new = theta[:3] + 0.1
    analysis = EmbeddingGeometry(random_state=0).fit(theta, groups)  # as the report fits it
    posthoc, meta = _draw(monkeypatch, tmp_path, theta, groups, new)
    np.testing.assert_allclose(_rows_sorted(_points(posthoc, new=False)), _rows_sorted(analysis.coords_), atol=1e-9)
    np.testing.assert_allclose(_points(posthoc, new=True), analysis.transform(new), atol=1e-9)
    np.testing.assert_allclose(_rows_sorted(_points(meta, new=False)), _rows_sorted(analysis.coords_), atol=1e-9)
    # the models in another order: the same picture
    order = np.random.default_rng(1).permutation(len(theta))
    shuffled = EmbeddingGeometry().fit(theta[order])
    np.testing.assert_allclose(shuffled.coords_, analysis.coords_[order], atol=1e-9)


@pytest.mark.parametrize("flip", [(-1.0, 1.0), (1.0, -1.0), (-1.0, -1.0)])
def test_a_sign_flip_of_the_svd_changes_no_picture(monkeypatch, tmp_path, flip):
    """An SVD solver may return any axis negated (LAPACK builds and sklearn's svd_flip differ):
    the basis fixes the signs itself, so a flipped SVD gives the same coordinates, not a mirror image."""
    theta, groups = _theta(2)
    new = theta[-2:] - 0.2
    before = EmbeddingGeometry().fit(theta)
    real_svd = np.linalg.svd
    raw = []

    def flipped_svd(a, *args, **kwargs):
        u, s, vt = real_svd(a, *args, **kwargs)
        f = np.ones(len(s))
        f[:2] = flip
        raw.append((vt[:2], (vt * f[:, None])[:2]))
        return u * f, s, vt * f[:, None]

    monkeypatch.setattr(np.linalg, "svd", flipped_svd)
    after = EmbeddingGeometry().fit(theta)
    posthoc, meta = _draw(monkeypatch, tmp_path, theta, groups, new)
    monkeypatch.setattr(np.linalg, "svd", real_svd)
    assert len(raw) == 3  # the analysis' fit and both plots went through the flipped SVD
    unflipped, given = raw[0]
    assert not np.allclose(unflipped, given)  # the solver's axes really were mirrored
    np.testing.assert_allclose(after.components_, before.components_, atol=1e-12)
    np.testing.assert_allclose(after.coords_, before.coords_, atol=1e-9)
    np.testing.assert_allclose(_rows_sorted(_points(posthoc, new=False)), _rows_sorted(before.coords_), atol=1e-9)
    np.testing.assert_allclose(_points(posthoc, new=True), before.transform(new), atol=1e-9)
    np.testing.assert_allclose(_rows_sorted(_points(meta, new=False)), _rows_sorted(before.coords_), atol=1e-9)


# ---------------------------------------------------------------- the MLflow UI (headless Chromium)

EXPANDER = '[data-component-id$="runnamecellrenderer.tsx_46"]'  # the parent row's "+" in MLflow 3.17's runs table
ROWS_JS = r"""JSON.stringify(Array.from(document.querySelectorAll('.ag-pinned-left-cols-container [role=row]'))
  .map(r => { const cell = r.querySelector('[col-id="attributes.`Run Name`"]');
              const link = cell && cell.querySelector('a[href*="/runs/"]');
              const indent = cell && cell.querySelector('div[style*="width"]');
              return link && {row: Number(r.getAttribute('row-index')), name: link.innerText.trim(),
                              run_id: link.getAttribute('href').split('/runs/')[1],
                              indent_px: indent ? parseFloat(indent.style.width) : 0,
                              expander: !!cell.querySelector('""" + EXPANDER + r"""')}; })
  .filter(Boolean).sort((a, b) => a.row - b.row))"""


async def _runs_table(url: str, child_names: set[str]) -> tuple[list[dict], list[dict]]:
    """The runs table's rows as rendered, before and after a click on the parent row's expander."""
    async with browser.page(url) as page:
        before = await page.json_when(ROWS_JS, lambda rows: any(r["expander"] for r in rows or []))
        await asyncio.sleep(1.0)  # children hidden now are hidden, not late
        before = await page.json_when(ROWS_JS, lambda rows: True) or []
        await page.eval(f"document.querySelector('{EXPANDER}').click()")
        after = await page.json_when(ROWS_JS, lambda rows: child_names <= {r["name"] for r in rows or []}) or []
    return before, after


@pytest.mark.integration
def test_the_mlflow_ui_shows_the_stage_runs_nested_under_the_pipeline_run(tmp_path):
    browser.skip_unless_available()
    stages = ("population", "meta-w1", "analyze")
    with mlflow_server(tmp_path) as uri:
        # the runs as the pipeline makes them: a parent, then each stage's run under it, in a store of its own
        st = tracking.Store.at(tmp_path, TrackingConfig(tracking_uri=uri, experiment="nested", system_metrics=False))
        with st.for_stage("the whole pipeline").run("pipeline", tags={"dynamo.stage": "pipeline"}) as parent:
            children = {}
            for name in stages:
                with st.for_stage(f"stage {name}", parent.run_id).run(name, tags={"dynamo.stage": name}) as run:
                    children[name] = run.run_id
        with st.run("unrelated", tags={}) as other:  # a top-level run: a row of its own, no expander
            pass
        exp = st.client().get_experiment_by_name("nested")
        url = f"{uri}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        before, after = asyncio.run(asyncio.wait_for(_runs_table(url, set(stages)), 60))

    # collapsed: the top-level runs only, the pipeline run with an expander
    assert sorted(r["name"] for r in before) == ["pipeline", "unrelated"], before
    by_name = {r["name"]: r for r in before}
    assert by_name["pipeline"]["expander"] and not by_name["unrelated"]["expander"]
    assert by_name["pipeline"]["run_id"] == parent.run_id and by_name["unrelated"]["run_id"] == other.run_id
    # expanded: the stage runs right under the pipeline run, indented one level deeper
    names = [r["name"] for r in after]
    i = names.index("pipeline")
    block = after[i + 1:i + 1 + len(stages)]
    assert sorted(r["name"] for r in block) == sorted(stages), names
    assert {r["name"]: r["run_id"] for r in block} == children
    assert all(r["indent_px"] > after[i]["indent_px"] and not r["expander"] for r in block), after
    assert {r["name"]: r["indent_px"] for r in after}["unrelated"] == after[i]["indent_px"]
