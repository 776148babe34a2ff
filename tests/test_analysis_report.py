"""End to end: tiny populations -> meta run -> run_analysis -> report, tables, MLflow run.

Two module-scoped runs (MNIST-1D GRUs with MLflow logging; tweet-sentiment GRUs for word
valence), about 15 s each on an idle 2-core machine; the browser screenshot is an
integration test on the MNIST-1D report.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dynamo_dist.analysis import run_analysis
from dynamo_dist.config import AnalyzeConfig, GroupSpec, MetaConfig, PopulationConfig, TrackingConfig
from dynamo_dist.meta.local import run_meta_local
from dynamo_dist.population.train import run_local
from scripts_util import load_script

REPO = Path(__file__).resolve().parents[1]
CFG = AnalyzeConfig(landscape_grid=3, fixed_point_states=24, fixed_point_iters=40, ssl_steps=15, bootstrap=50, seed=0)


def _reject(token):
    raise ValueError(f"not strict JSON: {token}")


def strict_loads(text: str):
    """json.loads that rejects the NaN/Infinity tokens Python's json accepts by default."""
    return json.loads(text, parse_constant=_reject)


def test_to_json_writes_non_finite_numbers_as_null():
    from dynamo_dist.data.store import to_json

    obj = {"nan": float("nan"), "inf": float("-inf"), "np": np.float32("nan"), "ok": np.float64(0.5),
           "n": np.int64(3), "nested": [{"x": float("inf")}, (1.0, True)], "path": Path("a")}
    assert strict_loads(to_json(obj)) == {"nan": None, "inf": None, "np": None, "ok": 0.5, "n": 3,
                                          "nested": [{"x": None}, [1.0, True]], "path": "a"}


def test_analyze_job_prints_strict_json(monkeypatch, capsys):
    import dynamo_dist.analysis

    job = load_script("jobs/analyze.py")  # a thin call into `dynamo-dist analyze`
    monkeypatch.setattr(dynamo_dist.analysis, "run_analysis", lambda *a, **k: {"dynamo.silhouette": float("nan"), "num_models": 4,
                                                              "report": "r.html", "analysis_json": "a.json"})
    assert job.main(["--recipe", "smoke", "--no-log"]) == 0
    printed, report_line = capsys.readouterr().out.rsplit("report:", 1)
    assert strict_loads(printed) == {"dynamo.silhouette": None, "num_models": 4}
    assert report_line.strip() == "r.html"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("analysis_e2e")
    groups = (GroupSpec(name="a", task="mnist1d", arch="gru", hidden_size=12, train_fraction=1.0, num_seeds=2, epochs=2),
              GroupSpec(name="b", task="mnist1d", arch="gru", hidden_size=8, train_fraction=0.25, num_seeds=2, epochs=1))
    pop = PopulationConfig(root=str(root / "population"), groups=groups, num_examples=1000, num_probe=64, num_test=64)
    run_local(pop, progress=False)
    meta = MetaConfig(output_dir=str(root / "meta"), steps=30, hidden_size=16,
                      embedding_dim=3, batch_size=16, models_per_step=2, eval_every=30)
    from dynamo_dist import tracking

    mlflow_store = tracking.Store.at(root, TrackingConfig(experiment="analysis-e2e"))
    run_meta_local(meta, pop.root, progress=False, tracking_store=mlflow_store)
    try:
        result = run_analysis(meta.output_dir, CFG, log=True)
    finally:
        torch.set_num_threads(before)
    return Path(meta.output_dir), result


def test_report_embeds_every_figure(analysed):
    """Self-contained: every image is a data URI holding exactly the PNG file it names, so the report
    renders the same from disk, copied alone, or from MLflow's artifact viewer."""
    import base64
    import io

    from PIL import Image

    meta_dir, result = analysed
    report = Path(result["report"])
    assert report == meta_dir / "analysis" / "report.html" and report.is_file()
    html = report.read_text()
    imgs = re.findall(r'<img src="([^"]+)" title="([^"]+)"', html)
    assert len(imgs) >= 10 and len(imgs) == html.count("<img ")
    for src, name in imgs:
        assert src.startswith("data:image/png;base64,"), name
        data = base64.b64decode(src.split(",", 1)[1])
        assert data == (report.parent / name).read_bytes(), name
        w, h = Image.open(io.BytesIO(data)).size
        assert w > 100 and h > 100, (name, w, h)
    for section in ("Embedding geometry", "SVCCA / CKA baseline", "Methods compared like for like", "Model averaging",
                    "θ landscape",
                    "Semi-supervised θ", "Fixed points", "Word valence", "Paper claims vs this run"):
        assert f">{section}</h2>" in html
    assert "Word valence needs token inputs" in html  # MNIST-1D: skipped with a note
    assert "Raw weights: not compared: the models&#x27; parameter shapes differ" in html  # hidden sizes 12 and 8


def test_headline_numbers_and_tables(analysed):
    meta_dir, result = analysed
    out = meta_dir / "analysis"
    doc = strict_loads((out / "analysis.json").read_text())  # NaN written as null
    assert doc["sections"]["valence"]["status"] == "skipped"
    assert all(doc["sections"][k]["status"] == "ok" for k in ("geometry", "baseline", "comparison", "averaging",
                                                               "landscape", "ssl", "fixed_points"))
    assert result["num_models"] == 4 and result["embedding_dim"] == 3
    assert 1 <= result["dynamo.num_components_95"] <= 3
    # theta's axes against the numeric manifest columns that vary here (fractions 1 / 0.25, hidden 12 / 8,
    # epochs 2 / 1, accuracy), three components each
    axes = pq.read_table(out / "tables" / "embedding_axes.parquet").to_pandas()
    assert sorted(set(axes["column"])) == ["epoch", "hidden_size", "test_accuracy", "train_fraction"]
    assert len(axes) == 4 * 3
    for _, row in axes.iterrows():
        key = f"dynamo.axes.{row['column']}.{row['component'].lower()}"
        assert result[f"{key}.spearman"] == pytest.approx(row["spearman"], nan_ok=True)
        assert 0 < row["p_value"] <= 1 and row["num_models"] == 4
    for key in ("dynamo.silhouette", "svcca.silhouette", "cka.silhouette", "averaging.a.centroid_accuracy",
                "landscape.mnist1d.best_accuracy", "ssl.mnist1d.test_accuracy", "ssl.mnist1d.best_base_accuracy"):
        assert key in result, key
    assert 0.0 <= result["ssl.mnist1d.test_accuracy"] <= 1.0
    # four models, fewer than analyze.baseline_models: every model is compared, in one like-for-like table
    assert result["baseline.num_models"] == result["comparison.num_models"] == 4
    assert doc["headline"]["comparison.num_bootstrap"] == CFG.bootstrap
    table = pq.read_table(out / "tables" / "method_comparison.parquet").to_pandas().set_index("method")
    # no raw weights (the groups' shapes differ); the base-outputs reference: one task, one set of classes
    assert list(table.index) == ["dynamo", "svcca", "cka", "outputs"]
    for metric in ("silhouette_full", "silhouette_2d", "ari_full", "ari_2d", "nn_accuracy"):
        assert (table[f"{metric}_low"] <= table[metric] + 1e-12).all() and (table[metric] <= table[f"{metric}_high"] + 1e-12).all()
        assert result[f"comparison.svcca.{metric}"] == pytest.approx(table.loc["svcca", metric], nan_ok=True)
    assert table.loc["svcca", "silhouette_full"] == pytest.approx(result["svcca.silhouette"])  # the same distances
    assert table.loc["svcca", "ari_2d"] == pytest.approx(result["svcca.adjusted_rand"])  # k-means on the same MDS-2
    assert table.loc["dynamo", "silhouette_full"] == pytest.approx(result["dynamo.silhouette"])  # θ, all 4 models
    assert isinstance(result["landscape.mnist1d.best_inside_hull"], bool)
    assert result["ssl.mnist1d.num_labelled"] == 10  # 1% of an 800-example pool, at least one per class
    dist = pq.read_table(out / "tables" / "baseline_distances.parquet").to_pandas()
    # the table is the full symmetric matrix; its diagonal is filled, not computed (the distances'
    # own known answers are in test_analysis.py), so what is checked here is the off-diagonal part
    assert len(dist) == 16 and (dist.svcca >= 0).all()
    pairs = dist.query("model_a != model_b").set_index(["model_a", "model_b"])
    assert (pairs.svcca > 1e-3).all() and (pairs.cka > 0).all()  # four trained models, none a copy of another
    swapped = pairs.rename_axis(["model_b", "model_a"]).reorder_levels(["model_a", "model_b"]).loc[pairs.index]
    assert np.allclose(pairs.svcca, swapped.svcca) and np.allclose(pairs.cka, swapped.cka)
    grid = pq.read_table(out / "tables" / "landscape.parquet").to_pandas()
    assert len(grid) == CFG.landscape_grid ** 2 and grid.accuracy.between(0, 1).all()
    path = pq.read_table(out / "tables" / "ssl_path_mnist1d.parquet").to_pandas()
    assert len(path) == CFG.ssl_steps + 1 and np.allclose(path.theta.iloc[0], 0.0)
    fp = pq.read_table(out / "tables" / "fixed_points_meta.parquet").to_pandas()
    assert {"centroid a", "centroid b"} <= set(fp.theta) and (fp.num_slow_points >= 1).all()
    assert (fp.num_fixed_points == np.where(fp.converged, fp.num_slow_points, 0)).all()  # none claimed unconverged
    land = pq.read_table(out / "tables" / "landscape.parquet").to_pandas()
    best = land.accuracy.max()
    assert result["landscape.mnist1d.best_beats_best_base"] == (best > result["landscape.mnist1d.best_base_accuracy"])
    emb = pq.read_table(out / "tables" / "embedding_pca.parquet").to_pandas()
    assert sorted(emb.model_id) == ["a-s000", "a-s001", "b-s000", "b-s001"]


def test_analysis_is_logged_to_the_meta_runs_store(analysed):
    from dynamo_dist import tracking

    meta_dir, result = analysed
    client = tracking.Store.at(meta_dir.parent).client()  # the store the meta run logged to
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.run_name == "analyze" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "analysis-e2e"  # the meta run's experiment
    meta_run_id = json.loads((meta_dir / "summary.json").read_text())["mlflow_run_id"]
    assert run.data.tags["mlflow.parentRunId"] == meta_run_id
    assert run.data.metrics["num_models"] == 4
    assert run.data.metrics["dynamo.num_components_95"] == result["dynamo.num_components_95"]
    assert run.data.params["landscape_grid"] == "3"
    # the run starts when the analyses do: it lasts at least as long as they took
    assert (run.info.end_time - run.info.start_time) / 1000 >= result["analysis_seconds"] > 1.0
    names = {f.path for f in client.list_artifacts(run.info.run_id, "analysis")}
    assert {"analysis/report.html", "analysis/analysis.json", "analysis/figures", "analysis/tables"} <= names


def test_analyze_job_reports_user_errors(tmp_path, capsys):
    job = load_script("jobs/analyze.py")
    assert job.main(["--recipe", "smoke", "--meta-dir", str(tmp_path / "missing"), "--no-log"]) == 2
    assert "meta run directory not found" in capsys.readouterr().err
    assert job.main(["--recipe", "smoke", "--set", "analyze.landscape_grid=1", "--meta-dir", str(tmp_path)]) == 2
    assert "landscape_grid" in capsys.readouterr().err


def test_analyze_help_lists_the_analysis_settings(capsys):
    from dynamo_dist.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--help"])
    text = capsys.readouterr().out
    for name in ("color_by", "baseline_models", "baseline_rows", "bootstrap"):
        assert f"\n  {name} (default " in text, name
    assert "--set analyze.FIELD=VALUE" in text


def test_unknown_color_by_names_the_field(analysed):
    meta_dir, _ = analysed
    with pytest.raises(ValueError, match="color_by"):
        run_analysis(str(meta_dir), CFG.replace(color_by="nope"), out_dir=str(meta_dir / "x"), log=False)


@pytest.fixture(scope="module")
def analysed_tweets(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("analysis_tweets")
    gru = dict(task="tweets", arch="gru", hidden_size=8, embed_dim=8, num_seeds=2, epochs=1)
    groups = (GroupSpec(name="full", train_fraction=1.0, **gru), GroupSpec(name="half", train_fraction=0.5, **gru))
    pop = PopulationConfig(root=str(root / "population"), groups=groups, num_examples=600, num_probe=64, num_test=64)
    run_local(pop, progress=False)
    meta = MetaConfig(output_dir=str(root / "meta"), steps=20, hidden_size=16, embed_dim=8,
                      embedding_dim=2, batch_size=16, models_per_step=2, eval_every=20)
    run_meta_local(meta, pop.root, progress=False)
    try:
        result = run_analysis(meta.output_dir, CFG.replace(landscape_grid=2, ssl_steps=5), log=False)
    finally:
        torch.set_num_threads(before)
    return Path(meta.output_dir), result


def test_word_valence_on_a_token_sentiment_population(analysed_tweets):
    meta_dir, result = analysed_tweets
    out = meta_dir / "analysis"
    doc = strict_loads((out / "analysis.json").read_text())
    assert doc["sections"]["valence"]["status"] == "ok"
    assert doc["sections"]["fixed_points"]["status"] == "ok"
    assert (out / "figures" / "valence_map_tweets.png").is_file()
    assert (out / "figures" / "valence_words_tweets.png").is_file()
    rows = pq.read_table(out / "tables" / "valence.parquet").to_pandas()
    assert sorted(rows.model_id) == ["full-s000", "full-s001", "half-s000", "half-s001"]
    assert np.isfinite(rows.score).all() and (rows.neutral_readout >= 0).all()
    assert np.isfinite(result["valence.tweets.mean_score"])
    html = Path(result["report"]).read_text()
    assert "missing from the vocabulary" in html  # Table 3 words unseen in 300 tweets are listed, not scored


@pytest.mark.integration
def test_report_screenshot_is_not_blank(analysed, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import screenshot_report
    finally:
        sys.path.pop(0)
    try:
        screenshot_report.find_chromium()
    except FileNotFoundError:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    _, result = analysed
    png = tmp_path / "report.png"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "screenshot_report.py"), result["report"], "-o",
                           str(png), "--height", "2400"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    img = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert img.shape == (2400, 1280)
    assert img.std() > 20  # text, tables and plots, not a blank page
    assert (img < 128).mean() > 0.01  # a fair amount of dark ink


@pytest.fixture(scope="module")
def served(analysed):
    """A real `mlflow ui` on the analysed run's store (127.0.0.1), stopped by its process group."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    from dynamo_dist import tracking

    meta_dir, result = analysed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(tracking.ui_command(meta_dir.parent, port=port), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=5):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@pytest.mark.integration
def test_report_from_mlflows_artifact_endpoint_is_the_self_contained_report(analysed, served):
    """The server hands out the logged report.html whole: the UI's artifact viewer shows that text in a
    frame of its own URL, where relative image links broke; embedded ones cannot."""
    import urllib.request

    _, result = analysed
    url = f"{served}/get-artifact?path=analysis/report.html&run_uuid={result['mlflow_run_id']}"
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    assert text == Path(result["report"]).read_text()  # the whole report, images inside it
    assert text.count('<img src="data:image/png;base64,') == text.count("<img ") >= 10


@pytest.mark.integration
def test_mlflows_artifact_viewer_shows_every_figure_of_the_report(analysed, served):
    """Headless Chromium on the MLflow UI's artifact page of report.html (the viewer puts the artifact
    in a sandboxed frame of its own URL, where relative image links broke): every image in that frame
    has decoded, at the pixel size of the PNG embedded for it (a broken image has natural size 0)."""
    import asyncio
    import base64
    import struct

    import browser
    from mlflow.tracking import MlflowClient

    browser.skip_unless_available()
    _, result = analysed
    run = MlflowClient(served).get_run(result["mlflow_run_id"])
    url = f"{served}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifactPath/analysis/report.html"
    js = ("JSON.stringify(Array.from(document.images).map(i => ({complete: i.complete, w: i.naturalWidth, "
          "h: i.naturalHeight})))")

    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)"', Path(result["report"]).read_text())
    sizes = [struct.unpack(">II", base64.b64decode(b[:44])[16:24]) for b in embedded]  # the PNG's IHDR

    async def images() -> list[dict]:
        async with browser.page(url) as page:
            deadline = time.time() + 60
            while time.time() < deadline:
                for frame in await page.child_frames():
                    shown = json.loads(await page.eval_in(frame["id"], js) or "[]")
                    # the frame's document may still be parsing: 12 of its 16 images were there once (load ~9)
                    if len(shown) >= len(sizes) and all(i["complete"] for i in shown):
                        return shown
                await asyncio.sleep(0.5)
        return []

    shown = asyncio.run(asyncio.wait_for(images(), 120))
    assert len(shown) == len(sizes) >= 10
    assert [(i["w"], i["h"]) for i in shown] == [tuple(wh) for wh in sizes]
    assert all(w > 100 and h > 100 for w, h in sizes)


@pytest.mark.integration
def test_per_model_metrics_and_embeddings_load_as_mlflow_tables(analysed, served, monkeypatch):
    """The meta run's per-model metrics and embeddings are MLflow tables: ``mlflow.load_table`` through
    the server gives one row per model with the values of model_metrics.parquet / embeddings.parquet."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from dynamo_dist.meta.outputs import read_summary

    meta_dir, _ = analysed
    run_id = read_summary(meta_dir)["mlflow_run_id"]
    # load_table searches the active experiment's runs: the meta run's
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", MlflowClient(served).get_run(run_id).info.experiment_id)
    mlflow.set_tracking_uri(served)
    try:
        table = mlflow.load_table("model_metrics.json", run_ids=[run_id])
        emb = mlflow.load_table("embeddings.json", run_ids=[run_id]).sort_values("model_id")
    finally:
        mlflow.set_tracking_uri(None)
    want = pq.read_table(meta_dir / "model_metrics.parquet").to_pandas().sort_values("model_id")
    got = table.sort_values("model_id")
    assert list(got["model_id"]) == list(want["model_id"]) and len(got) == 4
    for col in ("agreement", "hidden_r2", "meta_accuracy", "base_accuracy"):
        np.testing.assert_allclose(got[col].to_numpy(dtype=float), want[col].to_numpy(dtype=float), rtol=0,
                                   atol=1e-9)  # JSON keeps 10 decimals
    want = pq.read_table(meta_dir / "embeddings.parquet").to_pandas().sort_values("model_id")
    assert list(emb["model_id"]) == list(want["model_id"]) and list(emb["group"]) == list(want["group"])
    for i in range(3):  # d = 3
        np.testing.assert_allclose(emb[f"theta_{i}"].to_numpy(dtype=float), want[f"theta_{i}"].to_numpy(dtype=float),
                                   rtol=0, atol=1e-9)


@pytest.mark.integration
def test_meta_model_loads_as_an_mlflow_pyfunc_in_a_fresh_process(analysed, served, tmp_path):
    """mlflow.pyfunc.load_model from the tracking server, in a new process, reproduces the meta-model's
    outputs at a model's own theta and at a theta given in the input."""
    import pandas as pd

    from dynamo_dist.data import store
    from dynamo_dist.meta.outputs import load_meta_run, read_summary

    meta_dir, _ = analysed
    uri = read_summary(meta_dir)["mlflow_model_uri"]
    run = load_meta_run(meta_dir)
    mid, row = run.model_ids[1], 1
    x = store.read_inputs(run.population_root, "mnist1d", "test").x[:5]
    theta = [0.5] * run.cfg.embedding_dim
    df = pd.DataFrame({"model_id": [mid] * 6, "x": [v.reshape(-1).tolist() for v in x] + [x[0].reshape(-1).tolist()],
                       "theta": [None] * 5 + [theta]})
    df.to_json(tmp_path / "in.json", orient="records")
    code = ("import sys, json, mlflow, pandas as pd; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model(sys.argv[2]); "
            "df = pd.read_json(sys.argv[3], orient='records'); "
            "df['theta'] = [t if isinstance(t, list) else None for t in df['theta']]; "
            "print(m.predict(df).to_json(orient='records'))")
    proc = subprocess.run([sys.executable, "-c", code, served, uri, str(tmp_path / "in.json")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        th = run.embeddings.theta[row].detach()[None].expand(5, -1)
        hs, outs = run.meta(x, th)
        want_logits = outs["mnist1d"][:, -1]
        want_hidden = run.embeddings.apply_maps(row, hs)[0][:, -1]
        _, outs_t = run.meta(x[:1], torch.tensor([theta]))
    for j in range(5):
        np.testing.assert_allclose(got[j]["logits"], want_logits[j].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[j]["hidden"], want_hidden[j].numpy(), rtol=1e-5, atol=1e-5)
        assert got[j]["prediction"] == int(want_logits[j].argmax())
    np.testing.assert_allclose(got[5]["logits"], outs_t["mnist1d"][0, -1].numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[5]["logits"], got[0]["logits"])  # the given theta is what was used


@pytest.mark.integration
def test_meta_model_registers_through_a_tracking_server(analysed, served):
    """--register-model against a server: each registration is a new version of the run's MLflow Model."""
    from dynamo_dist import tracking
    from dynamo_dist.meta.outputs import read_summary

    meta_dir, _ = analysed
    summary = read_summary(meta_dir)
    server = tracking.Store(served, "analysis-e2e")
    assert tracking.register_meta_model(server, summary, "dynamo-served") == "models:/dynamo-served/1"
    assert tracking.register_meta_model(server, summary, "dynamo-served") == "models:/dynamo-served/2"
    version = server.client().get_model_version("dynamo-served", "2")
    assert version.run_id == summary["mlflow_run_id"] and version.status == "READY"
    assert version.source.endswith(f"{summary['mlflow_run_id']}/artifacts/meta_model")


def test_analyze_again_keeps_the_earlier_report(analysed, tmp_path):
    """`analyze --out DIR` twice: the second report is written, the first moves to DIR/earlier/<time>/."""
    import shutil

    from dynamo_dist import cli

    meta_dir, _ = analysed
    out = tmp_path / "report"
    shutil.copytree(meta_dir / "analysis", out)  # an earlier analysis in the target directory
    first = (out / "report.html").read_bytes()
    rc = cli.main(["analyze", "--recipe", "smoke", "--meta-dir", str(meta_dir), "--out", str(out), "--no-log",
                   "--set", "analyze.baseline=false", "--set", "analyze.fixed_points=false",
                   "--set", "analyze.landscape_grid=2", "--set", "analyze.ssl_steps=2"])
    assert rc == 0
    (earlier,) = (out / "earlier").iterdir()
    assert (earlier / "report.html").read_bytes() == first and (earlier / "analysis.json").is_file()
    assert (out / "report.html").is_file() and (out / "report.html").read_bytes() != first
