"""Post-hoc embedding into a trained space: frozen meta-model, only theta_new and V_new fitted.

No Ray: one small population (two architectures, so the groups compute differently) and one
single-process meta run per module.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dynamo_dist.meta import posthoc
from dynamo_dist.config import GroupSpec, MetaConfig
from dynamo_dist.meta.local import run_meta_local
from dynamo_dist.meta.outputs import load_meta_run

GROUPS = (
    GroupSpec(name="gru", task="mnist1d", arch="gru", hidden_size=16, num_seeds=4, epochs=2, lr=1e-2, batch_size=16),
    GroupSpec(name="rnn", task="mnist1d", arch="rnn", hidden_size=16, num_seeds=4, epochs=2, lr=1e-2, batch_size=16),
)
REEMBED = ["gru-s000", "gru-s003", "rnn-s001", "rnn-s002"]


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory, tiny_population) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-core machines shared with other test runs: 1 thread is faster
    try:
        base = tmp_path_factory.mktemp("posthoc")
        root = str(base / "population")
        tiny_population(root, *GROUPS, num_probe=128, num_test=64)
        cfg = MetaConfig(output_dir=str(base / "meta"), hidden_size=24, embedding_dim=2,
                         steps=400, batch_size=16, models_per_step=4, lr=1e-2, eval_every=400,
                         checkpoint_every=400)
        run_meta_local(cfg, root, progress=False)
        yield base / "meta"
    finally:
        torch.set_num_threads(threads)


def _digest(path: Path) -> str:
    """sha256 of a file, or of every file of a directory (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + f.read_bytes())
    return h.hexdigest()


def test_reembedded_models_land_near_their_trained_theta(meta_dir):
    before_file = _digest(meta_dir / "checkpoint")
    before = {k: v.clone() for k, v in load_meta_run(meta_dir).meta.state_dict().items()}
    run = load_meta_run(meta_dir)
    trained = {r["model_id"]: np.array(r["theta"]) for r in pq.read_table(meta_dir / "embeddings.parquet").to_pylist()}
    group_mean = {g: np.mean([t for m, t in trained.items() if m.startswith(g + "-")], axis=0) for g in ("gru", "rnn")}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = posthoc.embed_new_models(meta_dir, run.population_root, REEMBED, steps=200, lr=2e-2)
    finally:
        torch.set_num_threads(threads)

    assert sorted(res) == sorted(REEMBED)
    for m, r in res.items():
        theta = np.array(r["theta"])
        assert theta.shape == (2,) and np.isfinite(theta).all()
        other = "rnn" if m.startswith("gru") else "gru"
        d_own = np.linalg.norm(theta - trained[m])
        d_other = np.linalg.norm(theta - group_mean[other])
        assert d_own < d_other, f"{m}: {d_own:.3f} from its trained theta, {d_other:.3f} from the {other} mean"
        assert {"agreement", "hidden_r2", "meta_accuracy", "base_accuracy", "seconds"} <= set(r)
        assert r["hidden_r2"] > 0.5 and 0.0 <= r["agreement"] <= 1.0
    # the meta-model was frozen: neither the file nor the loaded weights changed
    assert _digest(meta_dir / "checkpoint") == before_file
    after = load_meta_run(meta_dir).meta.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_meta_model_object_is_not_updated(meta_dir, monkeypatch):
    """The in-memory meta-model used for fitting keeps its weights (no optimiser touches it)."""
    run = load_meta_run(meta_dir)
    snapshot = {k: v.clone() for k, v in run.meta.state_dict().items()}
    monkeypatch.setattr(posthoc, "load_meta_run", lambda _: run)
    posthoc.embed_new_models(meta_dir, run.population_root, ["gru-s001"], steps=20, lr=5e-2)
    assert all(torch.equal(snapshot[k], v) for k, v in run.meta.state_dict().items())


def test_unknown_model_id_is_a_clear_error(meta_dir):
    run = load_meta_run(meta_dir)
    with pytest.raises(ValueError, match="no-such-model"):
        posthoc.embed_new_models(meta_dir, run.population_root, ["no-such-model"], steps=1)


def test_embed_cli_writes_new_models_with_their_nearest_trained_model(meta_dir, tmp_path, capsys, tiny_population):
    """New models (trained like the run's rnn group, other seeds) are embedded, each named with its nearest
    trained model and that model's group; results accumulate. Which group is nearest is the data's answer:
    at the default output temperature one of the two lands beside gru-s001, emulated there at agreement
    0.91 (at T = 1 it lands among the rnn models at 0.64), so it is not asserted to be rnn."""
    from dynamo_dist import cli
    from dynamo_dist.data import store

    root = str(tmp_path / "new")
    new = GroupSpec(name="new-rnn", task="mnist1d", arch="rnn", hidden_size=16, num_seeds=2, seed_offset=10,
                    epochs=2, lr=1e-2, batch_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny_population(root, new, num_probe=128, num_test=64)
        before = _digest(meta_dir / "checkpoint"), _digest(meta_dir / "embeddings.parquet")
        assert cli.main(["embed", "--meta-dir", str(meta_dir), "--root", root, "--models", "new-rnn-s010",
                         "--steps", "200"]) == 0
        assert cli.main(["embed", "--meta-dir", str(meta_dir), "--root", root, "--models", "new-rnn-s011",
                         "--steps", "200"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "new-rnn-s011" in out and "nearest trained model" in out
    rows = pq.read_table(meta_dir / "posthoc" / "embeddings.parquet").to_pylist()
    assert [r["model_id"] for r in rows] == ["new-rnn-s010", "new-rnn-s011"]  # the second call kept the first
    trained = {r["model_id"]: np.array(r["theta"]) for r in pq.read_table(meta_dir / "embeddings.parquet").to_pylist()}
    for r in rows:
        assert r["group"] == "new-rnn" and len(r["theta"]) == 2 and 0.0 <= r["agreement"] <= 1.0
        dists = {m: float(np.linalg.norm(np.array(r["theta"]) - t)) for m, t in trained.items()}
        assert r["nearest_model"] == min(dists, key=dists.get)
        assert r["nearest_distance"] == pytest.approx(min(dists.values()), rel=1e-5)
        assert r["nearest_group"] == r["nearest_model"].rsplit("-s", 1)[0]  # the nearest model's own group
    assert (meta_dir / "posthoc" / "embedding_pca.png").stat().st_size > 10_000
    assert (_digest(meta_dir / "checkpoint"), _digest(meta_dir / "embeddings.parquet")) == before
    assert store.manifest_rows(root)[0]["status"] == "complete"
