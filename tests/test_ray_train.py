"""Meta-model on Ray Train: sharded theta/V, DDP-synchronised shared weights, resume, bad input.

One local 2-CPU Ray and one tiny population per module; four TorchTrainer fits in all
(clean W=2, W=1 vs single process, W=2 with a killed worker, W=1 resumed from W=2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ray = pytest.importorskip("ray")

from dynamo_dist import tracking  # noqa: E402
from dynamo_dist.meta import checkpoint as checkpoint_format  # noqa: E402
from dynamo_dist.meta import ray_train as meta_ray  # noqa: E402
from dynamo_dist.data import store
from dynamo_dist.config import GroupSpec, MetaConfig  # noqa: E402
from dynamo_dist.meta.trainer import DynamoTrainer, load_population  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
# Same hidden size in both groups: every rank's V maps then have identical shapes, so an
# accidental all-reduce of theta/V would go through silently and make the shards equal.
# Two tasks (10 and 2 classes): a multi-head meta-model, so steps that sample one output
# group only are exercised under DDP (and must still match the single-process trainer).
GROUPS = (
    GroupSpec(name="a", task="mnist1d", arch="gru", hidden_size=12, train_fraction=1.0, num_seeds=4, epochs=1,
              batch_size=64),
    GroupSpec(name="b", task="mnist1d_parity", arch="gru", hidden_size=12, train_fraction=0.25, num_seeds=4,
              epochs=2, batch_size=64),
)


@pytest.fixture(scope="module")
def pop_root(tmp_path_factory, tiny_population) -> str:
    return str(tiny_population(tmp_path_factory.mktemp("meta_ray") / "population", *GROUPS, num_probe=64,
                               num_test=64))


def meta_cfg(pop_root: str, out: Path, **kw) -> MetaConfig:
    base = dict(output_dir=str(out), hidden_size=16, embedding_dim=2, steps=STEPS,
                batch_size=8, models_per_step=2, checkpoint_every=10, eval_every=5, max_failures=1, seed=0,
                num_workers=2)
    return MetaConfig(**{**base, **kw})


def history_of(checkpoint) -> list[dict]:
    with checkpoint.as_directory() as d:
        shared, _, _ = checkpoint_format.read_sharded(d)
    return shared["history"]


def thetas(out: Path) -> dict[str, np.ndarray]:
    t = pq.read_table(Path(out) / "embeddings.parquet").to_pylist()
    return {r["model_id"]: np.array(r["theta"]) for r in t}


@pytest.fixture(scope="module")
def clean_w2(local_ray, pop_root, tmp_path_factory):
    """A W=2 run with per-step parameter checksums, finalised with MLflow logging."""
    out = tmp_path_factory.mktemp("w2") / "meta"
    sums = out.parent / "checksums"
    sums.mkdir()
    cfg = meta_cfg(pop_root, out)
    mlflow_store = tracking.Store.at(out.parent)
    result = meta_ray.build_trainer(cfg, pop_root, tracking_store=mlflow_store, progress=False,
                                    debug={"checksum_dir": str(sums)}).fit()
    summary = meta_ray.finalize(cfg, pop_root, result, tracking_store=mlflow_store)
    return {"cfg": cfg, "result": result, "summary": summary, "out": out, "sums": sums, "store": mlflow_store}


# ---------------------------------------------------------------- unit


def test_assign_shards_balanced_disjoint_stable():
    ids = [f"m{i:02d}" for i in range(11)]
    shards = meta_ray.assign_shards(list(reversed(ids)), 3)
    assert sorted(len(s) for s in shards) == [3, 4, 4]
    assert sorted(m for s in shards for m in s) == ids
    assert shards == meta_ray.assign_shards(ids, 3)  # order of the input does not matter
    assert meta_ray.assign_shards(ids, 1) == [ids]
    with pytest.raises(ValueError, match=r"num_workers=12 .*number of models \(11\)"):
        meta_ray.assign_shards(ids, 12)


# ---------------------------------------------------------------- W=2


def test_two_workers_embed_every_model(clean_w2, pop_root):
    ids = sorted(r["model_id"] for r in store.manifest_rows(pop_root))
    out = clean_w2["out"]
    emb = pq.read_table(out / "embeddings.parquet").to_pylist()
    assert sorted(r["model_id"] for r in emb) == ids and len(ids) == 8
    assert all(len(r["theta"]) == 2 and np.isfinite(r["theta"]).all() for r in emb)
    assert {r["group"] for r in emb} == {"a", "b"}
    assert sorted(pq.read_table(out / "model_metrics.parquet").column("model_id").to_pylist()) == ids
    summary = clean_w2["summary"]
    assert summary["num_workers"] == 2 and summary["steps"] == STEPS and summary["num_models"] == 8
    # the metrics Tune/ASHA rank trials by, from rank 0 but population-wide
    metrics = clean_w2["result"].metrics
    assert {"val_agreement", "val_hidden_r2", "loss", "test_agreement"} <= set(metrics)
    assert 0.0 <= metrics["val_agreement"] <= 1.0
    ckpt = Path(clean_w2["result"].checkpoint.path)
    assert {"shared.pt", "shard-0.pt", "shard-1.pt", "test_metrics-0.json", "test_metrics-1.json"} <= {
        p.name for p in ckpt.iterdir()}
    # the run's checkpoint is the final Ray checkpoint's shard files, linked (same disk) not merged,
    # and loads as a meta run with exactly the workers' theta/V
    from dynamo_dist.meta.outputs import load_meta_run

    kept = out / "checkpoint"
    shared = checkpoint_format.safe_load(kept / "shared.pt")
    assert shared["shards"] == [f"shard-{r}-s{STEPS:08d}.pt" for r in (0, 1)] and shared["step"] == STEPS
    for r in (0, 1):
        assert (kept / shared["shards"][r]).stat().st_ino == (ckpt / f"shard-{r}.pt").stat().st_ino
    assert not (out / "checkpoint.pt").exists()
    _, workers, _ = checkpoint_format.read_sharded(ckpt)
    run = load_meta_run(out)
    assert [r["model_id"] for r in run.rows] == ids
    for i, m in enumerate(ids):
        assert torch.equal(run.embeddings.theta[i].detach(), workers[m]["theta"])
        for k, v in run.embeddings.maps[i].state_dict().items():
            assert torch.equal(v, workers[m]["maps"][k]), (m, k)
    np.testing.assert_allclose(run.theta(), np.array([thetas(out)[m] for m in ids]), rtol=0, atol=1e-7)
    assert checkpoint_format.read_thetas(kept).keys() == set(ids)
    # rank 0 logged the loss history (every step) and val metrics; finalize ended the run
    client = clean_w2["store"].client()
    mlrun = client.get_run(summary["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")) == list(range(1, STEPS + 1))
    assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "val_agreement")) == [5, 10, 15, 20]
    assert mlrun.data.params["num_workers"] == "2" and mlrun.data.params["population_size"] == "8"
    assert mlrun.data.metrics["test_agreement"] == summary["mean_agreement"]  # MLflow names the split
    assert mlrun.data.tags["mlflow.source.name"] and mlrun.data.tags["mlflow.note.content"]
    # per-model metrics: one table artifact, not one metric key per model
    assert not [k for k in mlrun.data.metrics if any(k.startswith(m + ".") for m in ids)]
    table = json.loads(Path(client.download_artifacts(mlrun.info.run_id, "model_metrics.json", str(out.parent)))
                       .read_text())
    got = dict(zip(table["columns"], zip(*table["data"])))
    assert sorted(got["model_id"]) == ids and len(got["agreement"]) == 8


def test_shared_weights_synchronised_theta_v_not(clean_w2, pop_root):
    ids = sorted(r["model_id"] for r in store.manifest_rows(pop_root))
    shards = meta_ray.assign_shards(ids, 2)
    sums = clean_w2["sums"]
    for step in range(1, STEPS + 1):
        r0, r1 = (json.loads((sums / f"step{step:05d}-rank{r}.json").read_text()) for r in (0, 1))
        assert r0["model_ids"] == shards[0] and r1["model_ids"] == shards[1]
        assert r0["shared"] == r1["shared"], f"shared meta-model weights differ between ranks at step {step}"
        assert r0["embeddings"] != r1["embeddings"], f"theta/V identical on both ranks at step {step}"
    # the shared weights move every step (the check above is not vacuous)
    shared_by_step = [json.loads((sums / f"step{s:05d}-rank0.json").read_text())["shared"] for s in (1, 2, 3)]
    assert len(set(shared_by_step)) == 3


# ---------------------------------------------------------------- W=1 == single process


def test_one_worker_matches_single_process(local_ray, pop_root, tmp_path):
    cfg = meta_cfg(pop_root, tmp_path / "w1", num_workers=1)
    result = meta_ray.build_trainer(cfg, pop_root, progress=False).fit()
    ray_hist = history_of(result.checkpoint)

    torch.manual_seed(123)  # the trainer seeds itself; make sure outside state does not matter
    local = DynamoTrainer(cfg, load_population(pop_root))
    local.fit()
    assert [h["step"] for h in ray_hist] == [h["step"] for h in local.history] == list(range(1, STEPS + 1))
    for k in ("loss", "loss_hidden", "loss_output"):
        np.testing.assert_allclose([h[k] for h in ray_hist], [h[k] for h in local.history], rtol=1e-4, atol=1e-6)
    with result.checkpoint.as_directory() as d:
        _, per_model, _ = checkpoint_format.read_sharded(d)
    for m, th in zip(local.embeddings.model_ids, local.embeddings.theta_matrix()):
        np.testing.assert_allclose(per_model[m]["theta"].numpy(), th.numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- faults and resume


def test_killed_worker_resumes_exactly(clean_w2, pop_root, tmp_path):
    marker = tmp_path / "rank1-died"
    cfg = meta_cfg(pop_root, tmp_path / "fault")
    result = meta_ray.build_trainer(
        cfg, pop_root, progress=False,
        debug={"fail_rank": 1, "fail_step": 15, "fail_marker": str(marker)}).fit()
    assert marker.exists(), "the injected failure did not happen"
    summary = meta_ray.finalize(cfg, pop_root, result)
    assert summary["num_models"] == 8
    ids = sorted(r["model_id"] for r in store.manifest_rows(pop_root))
    got = thetas(cfg.output_dir)
    assert sorted(got) == ids
    # resumed from step 10 with theta/V/optimiser state and deterministic sampling:
    # the same trajectory as the run that never failed
    hist = history_of(result.checkpoint)
    assert [h["step"] for h in hist] == list(range(1, STEPS + 1))
    clean = history_of(clean_w2["result"].checkpoint)
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in clean], rtol=1e-5)
    want = thetas(clean_w2["out"])
    for m in ids:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-6)


def test_a_per_model_schedule_resumed_with_another_worker_count_keeps_its_steps(clean_w2):
    """clean_w2's run is 10 updates a model (20 steps of 2 models a worker, W=2, 8 models): a re-run
    of its output directory at W=1 and that schedule finishes those 20 steps, not a fresh run's 40."""
    kw = {k: v for k, v in clean_w2["cfg"].model_dump(exclude_unset=True).items() if k != "steps"}
    cfg = MetaConfig(**{**kw, "updates_per_model": 10, "num_workers": 1})
    assert cfg.for_population(8).steps == 2 * STEPS
    assert meta_ray.resolve_schedule(cfg, 8).steps == STEPS
    assert meta_ray.resolve_schedule(cfg.replace(updates_per_model=20), 8).steps == 4 * STEPS


def test_resume_with_other_worker_count(clean_w2, pop_root, tmp_path):
    """W=2 -> W=1, the resumed worker's V tables in files on disk (meta.table_bytes=0): every model a
    later step did not sample keeps its theta exactly, through the file-to-file shard write, and its V
    is the final solve on its whole training split (varpro's last word, ``refit_maps``) at that theta
    with the resumed run's meta-model."""
    more = 2
    cfg = meta_cfg(pop_root, tmp_path / "w1-resumed", num_workers=1, steps=STEPS + more, table_bytes=0)
    result = meta_ray.build_trainer(cfg, pop_root, progress=False,
                                    resume_from_checkpoint=clean_w2["result"].checkpoint).fit()
    summary = meta_ray.finalize(cfg, pop_root, result)
    assert summary["num_workers"] == 1 and summary["steps"] == STEPS + more
    resumed, clean_theta = thetas(cfg.output_dir), thetas(clean_w2["out"])
    assert sorted(resumed) == sorted(clean_theta)
    # values, not ids: the models no step after the resume sampled keep the W=2 run's theta
    # exactly (one worker now: its rows are the sorted ids, sampled as DynamoTrainer._models_of does)
    ids = sorted(clean_theta)
    sampled = {ids[i] for step in range(STEPS, STEPS + more)
               for i in np.random.default_rng([cfg.seed, 0, step]).choice(len(ids), size=cfg.models_per_step,
                                                                          replace=False)}
    untouched = [m for m in ids if m not in sampled]
    assert len(untouched) >= len(ids) - more * cfg.models_per_step > 0
    _, resumed_maps = checkpoint_format.read_model_state(Path(cfg.output_dir) / "checkpoint")
    _, clean_maps = checkpoint_format.read_model_state(Path(clean_w2["out"]) / "checkpoint")
    from dynamo_dist.meta.objective import refit_maps
    from dynamo_dist.meta.outputs import load_meta_run

    run, data = load_meta_run(cfg.output_dir), load_population(pop_root, with_test=False)
    for m in untouched:
        assert np.array_equal(resumed[m], clean_theta[m]), m
        row, task = run.embeddings.index[m], data.row(m)["task"]
        stored = [p.detach().clone() for p in run.embeddings.parameters_of(row)[1:]]
        idx = torch.arange(int(len(data.probe_inputs[task]) * 0.9))
        idx = idx[idx < data.probe[m].num_examples]
        refit_maps(run.meta, run.embeddings, row, data.probe_inputs[task].x[idx], data.probe_inputs[task].lengths[idx],
                   [h[idx] for h in data.probe[m].hiddens])
        for a, b in zip(stored, run.embeddings.parameters_of(row)[1:]):
            torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)
    assert any(not np.array_equal(resumed[m], clean_theta[m]) for m in sampled)  # the control: they trained on
    assert any(not torch.equal(resumed_maps[m]["maps"][k], v) for m in sampled for k, v in clean_maps[m]["maps"].items())
    hist = history_of(result.checkpoint)
    assert [h["step"] for h in hist] == list(range(1, STEPS + more + 1))
    clean = history_of(clean_w2["result"].checkpoint)
    assert [h["loss"] for h in hist[:STEPS]] == [h["loss"] for h in clean]


# ---------------------------------------------------------------- bad input


def _nan_trajectory(root: Path) -> str:
    rows = store.manifest_rows(root)
    path = store.Layout.at(root).path(rows[3]["probe_path"])
    t = pq.read_table(path)
    hidden = t.column("hidden").combine_chunks()
    vals = hidden.values.to_numpy(zero_copy_only=False).copy()
    vals[7] = np.nan
    t = t.set_column(t.schema.get_field_index("hidden"), "hidden",
                     pa.ListArray.from_arrays(hidden.offsets, pa.array(vals, hidden.type.value_type)))
    pq.write_table(t, path)
    return rows[3]["model_id"]


def _corrupt(kind: str, root: Path) -> str:
    """Break a copy of the population; returns the text the error must contain."""
    rows = store.manifest_rows(root)
    layout = store.Layout.at(root)
    if kind == "missing_file":
        layout.path(rows[2]["test_path"]).unlink()
        return rows[2]["test_path"]
    if kind == "corrupt_file":
        layout.path(rows[1]["probe_path"]).write_bytes(b"PAR1 definitely not parquet")
        return "not a readable Parquet file"
    if kind == "row_without_trajectories":
        store.upsert_manifest(root, [{**rows[5], "probe_path": None}])
        return f"model {rows[5]['model_id']!r} has no probe_path"
    if kind == "nan":
        mid = _nan_trajectory(root)
        return f"NaN/Inf values \\(model '{mid}'\\)"
    if kind == "missing_root":
        shutil.rmtree(root)
        return "population root not found"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_file", "corrupt_file", "row_without_trajectories", "nan", "missing_root"])
def test_bad_population_fails_before_training(kind, pop_root, tmp_path):
    root = tmp_path / "pop"
    shutil.copytree(pop_root, root)
    expect = _corrupt(kind, root)
    cfg = meta_cfg(str(root), tmp_path / "meta")
    with pytest.raises((ValueError, FileNotFoundError), match=expect if kind == "nan" else None) as err:
        meta_ray.run_meta(cfg, str(root), progress=False)
    if kind != "nan":
        assert expect in str(err.value)
    assert not (tmp_path / "meta" / "ray_results").exists(), "training started despite bad input"


def test_preflight_reads_footers_and_decodes_only_a_file_changed_since_it_was_recorded(pop_root, tmp_path,
                                                                                        monkeypatch):
    root = tmp_path / "pop"
    shutil.copytree(pop_root, root)
    decoded = []
    real = store.read_trajectory
    monkeypatch.setattr(store, "read_trajectory", lambda *a, **k: decoded.append(a[1:]) or real(*a, **k))
    rows = meta_ray.validate_population(meta_cfg(str(root), tmp_path / "meta"), str(root))
    assert len(rows) == 8 and decoded == []  # 16 trajectory files checked, none decoded
    mid = _nan_trajectory(root)
    with pytest.raises(ValueError, match=f"NaN/Inf values \\(model '{mid}'\\)"):
        meta_ray.validate_population(meta_cfg(str(root), tmp_path / "meta"), str(root))
    assert decoded == [(mid, "probe")]


def test_a_cache_smaller_than_one_trajectory_fails_before_training(pop_root, tmp_path):
    with pytest.raises(ValueError, match=r"meta.cache_bytes=1000 is smaller than one model's probe trajectory"):
        meta_ray.run_meta(meta_cfg(pop_root, tmp_path / "meta", cache_bytes=1000), pop_root, progress=False)
    assert not (tmp_path / "meta").exists()


def test_cuda_on_a_cluster_without_gpus_fails_before_anything_is_written(local_ray, pop_root, tmp_path):
    if ray.cluster_resources().get("GPU"):
        pytest.skip("this Ray cluster has GPUs")
    cfg = meta_cfg(pop_root, tmp_path / "meta", device="cuda")
    with pytest.raises(ValueError, match=r"meta.device='cuda' needs one GPU per Ray Train worker "
                                         r"\(meta.num_workers=2\) but the Ray cluster has 0 GPU"):
        meta_ray.run_meta(cfg, pop_root, progress=False)
    assert not (tmp_path / "meta").exists()  # not even the output directory's lock


def test_too_many_workers_fails_before_training(pop_root, tmp_path):
    cfg = meta_cfg(pop_root, tmp_path / "meta", num_workers=9)
    with pytest.raises(ValueError, match=r"num_workers=9 exceeds the number of models \(8\)"):
        meta_ray.run_meta(cfg, pop_root, progress=False)
    assert not (tmp_path / "meta").exists()


def test_job_script_reports_bad_input(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_meta.py"), "--recipe", "smoke",
         "--set", f"population.root={missing}",
         "--set", f"meta.output_dir={tmp_path / 'meta'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "population root not found" in proc.stderr and str(missing) in proc.stderr


def test_worker_progress_reaches_the_driver_once(pop_root, tmp_path):
    # with --verbose the workers' own lines are streamed too: Ray Train V2 patches print() in
    # workers to both log and write stdout; progress must not double
    out = tmp_path / "meta"
    sets = {"population.root": pop_root, "meta.output_dir": out,
            "meta.num_workers": 1, "meta.steps": 10, "meta.eval_every": 5, "meta.checkpoint_every": 10,
            "meta.hidden_size": 16, "meta.embedding_dim": 2, "meta.batch_size": 8, "meta.models_per_step": 2}
    argv = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train_meta.py"), "--recipe", "smoke", "--verbose", *argv],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    driver_log = proc.stdout + proc.stderr
    for line in ("[meta] step 5/10 ", "[meta] step 10/10 "):
        assert driver_log.count(line) == 1, (line, driver_log[-3000:])
