"""θ-space stability over meta seeds (analysis/seeds.py; seed training: pipeline.seeds_stage; ``dynamo-dist seeds``).

Known answers of the alignment and the consensus on synthetic θ (each with a control where the
property must not hold), then one integration run: a 6-model population of two training
conditions, three tiny meta runs (seed 0 trained beforehand, seeds 1 and 2 by the CLI with the
meta stage run in this process instead of on Ray Train), the analysis, and the CLI's refusals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import ortho_group

from dynamo_dist import cli, pipeline
from dynamo_dist.analysis import seeds
from dynamo_dist.analysis.comparison import adjusted_rand
from dynamo_dist.config import GroupSpec, MetaConfig, PopulationConfig


def _grouped_theta(rng, num_groups=3, per_group=8, dims=4, spread=3.0):
    labels = np.repeat(np.arange(num_groups), per_group)
    return rng.normal(size=(num_groups, dims))[labels] * spread + rng.normal(size=(len(labels), dims)), labels


# ---------------------------------------------------------------- alignment


def test_procrustes_undoes_rotation_scale_and_shift():
    rng = np.random.default_rng(0)
    theta, _ = _grouped_theta(rng)
    moved = 2.5 * theta @ ortho_group.rvs(4, random_state=1) + 7.0
    aligned, disparity = seeds.procrustes(theta, moved)
    assert disparity < 1e-12
    np.testing.assert_allclose(aligned, seeds.normalise(theta), atol=1e-10)
    # symmetric, and a reflection is a rotation here too
    assert seeds.procrustes(moved, theta)[1] < 1e-12
    assert seeds.procrustes(theta, theta * [-1, 1, 1, 1])[1] < 1e-12
    # control: an unrelated θ cannot be rotated onto it
    _, unrelated = seeds.procrustes(theta, rng.normal(size=theta.shape))
    assert unrelated > 0.5


def test_procrustes_refuses_other_models_and_pads_widths():
    rng = np.random.default_rng(1)
    theta = rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="9 models, the reference has 10"):
        seeds.procrustes(theta, theta[:9])
    with pytest.raises(ValueError, match="same embedding"):
        seeds.normalise(np.ones((5, 3)))
    wider = np.column_stack([theta, np.zeros(10)]) @ ortho_group.rvs(4, random_state=0)
    assert seeds.procrustes(theta, wider)[1] < 1e-12  # a d=3 θ and its rotation into d=4


def test_rotated_copies_are_perfectly_stable_and_random_theta_is_not():
    rng = np.random.default_rng(2)
    theta, labels = _grouped_theta(rng)
    copies = [theta, 0.1 * theta @ ortho_group.rvs(4, random_state=3) - 1.0,
              4.0 * theta @ ortho_group.rvs(4, random_state=4)]
    fit = seeds.SeedStability(random_state=0).fit(copies, labels)
    assert fit.num_clusters_ == 3
    np.testing.assert_allclose(fit.disparity_, 0.0, atol=1e-12)
    np.testing.assert_allclose(fit.pairwise_adjusted_rand_, 1.0)
    assert fit.stability_ == pytest.approx(1.0) and fit.distance_stability_ == pytest.approx(1.0)
    np.testing.assert_allclose(fit.aligned_, np.broadcast_to(fit.aligned_[0], fit.aligned_.shape), atol=1e-10)
    np.testing.assert_allclose(fit.coords_, np.broadcast_to(fit.coords_[0], fit.coords_.shape), atol=1e-10)
    assert np.ptp(fit.adjusted_rand_) < 1e-12 and fit.adjusted_rand_[0] > 0.8  # the groups are well apart
    assert fit.consensus_adjusted_rand_ == pytest.approx(fit.adjusted_rand_[0])
    # control: θ without structure shared between seeds
    noise = seeds.SeedStability(random_state=0).fit([rng.normal(size=theta.shape) for _ in range(3)], labels)
    assert noise.stability_ < 0.3 and abs(noise.distance_stability_) < 0.3
    assert noise.disparity_[0, 1] > 0.5 and np.all(np.abs(noise.adjusted_rand_) < 0.3)


def test_seed_stability_refuses_bad_input():
    theta = np.random.default_rng(3).normal(size=(6, 2))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seeds.SeedStability().fit([theta], [0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match=r"seeds \[1\]"):
        seeds.SeedStability().fit([theta, theta[:5]], [0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="number of groups"):
        seeds.SeedStability().fit([theta, theta], [0] * 6)


# ---------------------------------------------------------------- consensus


def test_consensus_outvotes_each_seeds_mistake():
    truth = np.repeat([0, 1, 2], 5)
    labelings = []
    for wrong, relabel in ((0, [2, 0, 1]), (7, [1, 2, 0]), (12, [0, 1, 2])):
        lab = truth.copy()
        lab[wrong] = (lab[wrong] + 1) % 3          # one model in another cluster
        labelings.append(np.array(relabel)[lab])   # cluster ids are arbitrary per seed
    labelings = np.stack(labelings)
    assert all(adjusted_rand(truth, lab) < 1.0 for lab in labelings)
    consensus, co = seeds.consensus_clustering(labelings, 3)
    assert adjusted_rand(truth, consensus) == pytest.approx(1.0)
    assert co[0, 1] == pytest.approx(2 / 3) and co[1, 2] == 1.0 and co[0, 14] == 0.0
    np.testing.assert_allclose(np.diag(co), 1.0)
    # control: clusterings that agree on nothing give no consensus with the groups
    rng = np.random.default_rng(0)
    noise, _ = seeds.consensus_clustering(rng.integers(0, 3, size=(3, 15)), 3)
    assert adjusted_rand(truth, noise) < 0.5


def test_seed_lists_are_checked():
    assert pipeline.parse_seeds("0, 1,2") == (0, 1, 2)
    for bad, match in (("0", "at least 2"), ("0,0", "at least 2"), ("0,x", "comma-separated"), ("1,-2", "non-negative")):
        with pytest.raises(ValueError, match=match):
            pipeline.parse_seeds(bad)
    with pytest.raises(ValueError, match="--meta-dirs"):
        pipeline.check_seeds(None)
    assert MetaConfig(seeds=[3, 1]).seeds == (3, 1) and MetaConfig().seeds is None
    for bad in ([1], [1, 1], [0, -1]):
        with pytest.raises(ValueError, match="meta.seeds"):
            MetaConfig(seeds=bad)


def test_runs_must_embed_the_same_models():
    run = lambda root, ids, where: SimpleNamespace(population_root=root, model_ids=ids, output_dir=where)  # noqa: E731
    seeds.check_same_models([run("/p", ["a", "b"], "r0"), run("/p", ["a", "b"], "r1")])
    with pytest.raises(ValueError, match="different populations.*r1"):
        seeds.check_same_models([run("/p", ["a", "b"], "r0"), run("/q", ["a", "b"], "r1")])
    with pytest.raises(ValueError, match=r"different model sets: r1 lacks \['b'\]"):
        seeds.check_same_models([run("/p", ["a", "b"], "r0"), run("/p", ["a", "c"], "r1")])


# ---------------------------------------------------------------- end to end through the CLI


META = {"steps": 200, "hidden_size": 16, "embedding_dim": 3, "batch_size": 16, "models_per_step": 2,
        "eval_every": 100, "checkpoint_every": 200}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A pipeline config on a 2-group population (learning rates 1e-3 vs 3e-2), seed 0 trained."""
    from dynamo_dist.meta.local import run_meta_local
    from dynamo_dist.population.train import run_local

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("seeds")
    groups = tuple(GroupSpec(name=name, task="mnist1d", arch="gru", hidden_size=8, num_seeds=3, epochs=2, lr=lr,
                             batch_size=64) for name, lr in (("slow", 1e-3), ("fast", 3e-2)))
    pop = PopulationConfig(root=str(tmp / "population"), groups=groups, num_examples=1000, num_probe=32, num_test=32)
    run_local(pop, progress=False)
    config = tmp / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"recipe": "smoke", "run_dir": str(tmp / "run"),
                                      "population": pop.model_dump(mode="json"), "meta": META}))
    cfg = cli.load_pipeline(cli.build_parser().parse_args(["seeds", "--config", str(config)]))
    run_meta_local(pipeline.seed_config(cfg, 0).meta, pop.root, progress=False)
    yield config, cfg
    torch.set_num_threads(before)


@pytest.fixture
def local_meta_stage(monkeypatch):
    """The meta stage in this process (``run_meta_local``) instead of Ray Train; records the seeds it trains."""
    from dynamo_dist.meta.local import run_meta_local

    trained = []

    def meta_stage(cfg, address=None, progress=True, **_):
        trained.append(cfg.meta.seed)
        return run_meta_local(cfg.meta, cfg.population.root, progress=False)

    monkeypatch.setattr(pipeline, "meta_stage", meta_stage)
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # the CLI sets these for an embedded Ray it never starts here
        monkeypatch.delenv(var, raising=False)
    return trained


def test_seeds_cli_trains_missing_seeds_and_scores_them(seeded, local_meta_stage, tmp_path, capsys):
    config, cfg = seeded
    assert cli.main(["seeds", "--config", str(config), "--seeds", "0,1,2"]) == 0
    assert local_meta_stage == [1, 2]  # seed 0 had finished: not retrained
    out = Path(cfg.run_dir) / pipeline.SEEDS_DIR / seeds.OUT_DIR
    result = json.loads((out / seeds.JSON_FILE).read_text())
    assert (out / seeds.FIGURE_FILE).stat().st_size > 0
    table = (out / seeds.TABLE_FILE).read_text()
    assert result["seeds"] == [0, 1, 2] and result["reference_seed"] == 0
    assert result["num_models"] == 6 and result["num_groups"] == result["num_clusters"] == 2
    assert [r["seed"] for r in result["per_seed"]] == [0, 1, 2]
    assert [Path(r["meta_dir"]).name for r in result["per_seed"]] == ["seed-0", "seed-1", "seed-2"]
    for r in result["per_seed"]:
        assert -1.0 <= r["adjusted_rand"] <= 1.0 and -1.0 <= r["silhouette"] <= 1.0
        assert 0.0 <= r["mean_agreement"] <= 1.0
        assert f"| {r['seed']} | {r['adjusted_rand']:.3f} | {r['silhouette']:.3f} |" in table
    assert result["per_seed"][0]["disparity_to_reference"] == 0.0
    pairwise = {k: np.array(v) for k, v in result["pairwise"].items()}
    for m in pairwise.values():
        assert m.shape == (3, 3) and np.allclose(m, m.T)
    np.testing.assert_allclose(np.diag(pairwise["adjusted_rand"]), 1.0)
    np.testing.assert_allclose(np.diag(pairwise["disparity"]), 0.0)
    assert np.all((pairwise["disparity"] >= 0) & (pairwise["disparity"] <= 1))
    off = ~np.eye(3, dtype=bool)
    assert result["seed_stability"] == pytest.approx(pairwise["adjusted_rand"][off].mean())
    assert result["distance_stability"] == pytest.approx(pairwise["distance_correlation"][off].mean())
    assert -1.0 <= result["seed_stability"] <= 1.0 and -1.0 <= result["distance_stability"] <= 1.0
    assert -1.0 <= result["consensus_adjusted_rand"] <= 1.0
    assert sorted(result["consensus_labels"]) == sorted(seeds.outputs.load_meta_run(result["meta_dirs"][0]).model_ids)
    assert result["config_differences"] == {d: {} for d in result["meta_dirs"][1:]}
    # the seeds really differ: different θ, not one run three times (the property the analysis measures)
    assert pairwise["disparity"][0, 1] > 1e-6
    printed = capsys.readouterr().out
    assert "seed stability" in printed
    # the comparison is an MLflow run of the run's store: headline metrics, per-seed steps, files
    from mlflow import MlflowClient

    store_ = pipeline.tracking_store(cfg)
    client = MlflowClient(store_.uri)
    (logged,) = client.search_runs([client.get_experiment_by_name(store_.experiment).experiment_id],
                                   "tags.mlflow.runName = 'seed-stability'")
    assert f"logged: MLflow run {logged.info.run_id}" in printed
    assert logged.data.metrics["seed_stability"] == pytest.approx(result["seed_stability"])
    assert logged.data.metrics["consensus_adjusted_rand"] == pytest.approx(result["consensus_adjusted_rand"])
    per_seed = client.get_metric_history(logged.info.run_id, "seed.adjusted_rand")
    assert [m.step for m in sorted(per_seed, key=lambda m: m.step)] == [0, 1, 2]
    assert [m.value for m in sorted(per_seed, key=lambda m: m.step)] == pytest.approx(
        [r["adjusted_rand"] for r in result["per_seed"]])
    files = {f.path for f in client.list_artifacts(logged.info.run_id, "seed-stability")}
    assert files == {f"seed-stability/{n}" for n in (seeds.JSON_FILE, seeds.TABLE_FILE, seeds.FIGURE_FILE)}

    # the same runs through --meta-dirs: nothing trained, the same numbers
    dirs = [r["meta_dir"] for r in result["per_seed"]]
    assert cli.main(["seeds", "--config", str(config), "--meta-dirs", *dirs, "--out", str(tmp_path / "again"),
                     "--no-log"]) == 0
    again = json.loads((tmp_path / "again" / seeds.JSON_FILE).read_text())
    assert local_meta_stage == [1, 2]
    assert again["pairwise"] == result["pairwise"] and again["per_seed"] == result["per_seed"]
    # another reference: its own row has disparity 0, the pairwise ARI (no alignment) is the same pair's
    assert cli.main(["seeds", "--config", str(config), "--meta-dirs", dirs[2], dirs[0], "--out", str(tmp_path / "b"),
                     "--no-log"]) == 0
    swapped = json.loads((tmp_path / "b" / seeds.JSON_FILE).read_text())
    assert swapped["reference_seed"] == 2 and swapped["per_seed"][0]["disparity_to_reference"] == 0.0
    assert swapped["seed_stability"] == pytest.approx(pairwise["adjusted_rand"][0, 2])


def test_seeds_cli_refuses_bad_input_before_training(seeded, local_meta_stage, tmp_path, capsys):
    config, cfg = seeded
    seed0 = pipeline.seed_run_dir(cfg, 0)
    copy = str(shutil.copytree(seed0, tmp_path / "copy"))  # a finished run that is not seed0's directory
    cases = [
        (["--seeds", "0"], "--seeds=[0]: need at least 2"),
        ([], "no seeds"),
        (["--meta-dirs", seed0], "need at least 2 meta runs"),
        (["--meta-dirs", seed0, str(tmp_path)], f"{tmp_path}/meta_run.json not found"),
        (["--meta-dirs", seed0, seed0], "given more than once"),
        # seed 0 finished with embedding_dim 3: not reused for another config, and seed 7 is not trained either
        (["--seeds", "7,0", "--set", "meta.embedding_dim=4"], "meta.embedding_dim: 3 there, 4 now"),
        (["--set", "meta.seeds=[7,0]", "--set", "meta.embedding_dim=4"], "meta.embedding_dim: 3 there, 4 now"),
        (["--set", "meta.seeds=[1]"], "need at least 2 distinct"),
        (["--seeds", "7,0", "--set", "population.root=" + str(tmp_path / "none")], "population root not found"),
        (["--meta-dirs", seed0, copy, "--set", "analyze.color_by=nope"],
         "color_by: manifest has no column 'nope'"),
    ]
    for extra, message in cases:
        assert cli.main(["seeds", "--config", str(config), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert local_meta_stage == []
    assert not Path(pipeline.seed_run_dir(cfg, 7)).exists()
