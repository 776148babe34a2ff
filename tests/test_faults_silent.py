"""The last silent faults (issue 30): mixed recordings, damaged files without a remedy, half-written
checkpoints, URIs that cannot work, copied run dirs writing into the original, the embedded Ray's
listeners and orphans.

Same battery as ``test_faults.py`` (its helpers and fixtures): real CLI subprocesses, real files;
each case asserts the exit code, that the message names the field, path or URI, and the sha256 of
every file that existed before.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_faults import _battery_case, _cli, _digests, _smoke_args, meta_run, trained  # noqa: F401 -- fixtures

from dynamo_dist.data import store


@pytest.fixture
def run_root(trained, tmp_path):  # noqa: F811 -- the imported fixture
    """A private copy of the trained root inside a run dir."""
    return Path(shutil.copytree(trained, tmp_path / "run" / "population"))


def _rerecord(root: Path, model_id: str, split: str, keep: int | None = None, dtype: str = "float32") -> None:
    """Rewrite one model's trajectory as another recording would have (its first ``keep`` examples,
    ``dtype``), with its manifest row updated to match: a root assembled by hand, consistent per model."""
    traj = store.read_trajectory(root, model_id, split)
    n = traj.num_examples if keep is None else keep
    family = pq.read_schema(root / f"trajectories/split={split}/model_id={model_id}/part-0.parquet").metadata[
        b"dynamo.family"].decode()
    rel = store.write_trajectory(root, model_id, split, [h[:n] for h in traj.hiddens], traj.outputs[:n], family,
                                 dtype=dtype)
    store.upsert_manifest(root, [{"model_id": model_id, f"{split}_bytes": store.file_bytes(root, rel)}])


# ---------------------------------------------------------------- mixed recordings


@pytest.mark.parametrize("case", ["probe_rows", "test_rows", "dtype"])
def test_meta_refuses_models_recorded_with_other_settings(run_root, tmp_path, case):
    if case == "dtype":
        _rerecord(run_root, "b-s000", "probe", dtype="float16")
        _rerecord(run_root, "b-s000", "test", dtype="float16")
        needles = ["models disagree on the trajectory precision (population.dtype)",
                   "'float16' for 1 model(s) ['b-s000']", "'float32' for 2 model(s) ['a-s000', 'a-s001']"]
    else:
        split = case.split("_")[0]
        _rerecord(run_root, "a-s001", split, keep=16)
        needles = [f"models disagree on the {split} trajectory rows (dynamo.num_examples) of task 'mnist1d'",
                   "32 for 2 model(s) ['a-s000', 'b-s000']", "16 for 1 model(s) ['a-s001']"]
    res = _battery_case(tmp_path, ["meta", *_smoke_args(tmp_path / "run", "meta.steps=5")], 2,
                        [f"population root {run_root}", *needles], new_files=True)
    assert not (tmp_path / "run" / "meta").exists()  # refused before the output directory


def test_check_same_recording_reads_footers_only(run_root, monkeypatch):
    """No trajectory values are decoded to find a mixed recording."""
    _rerecord(run_root, "a-s001", "probe", keep=16)
    rows = store.manifest_rows(run_root)
    infos = [store.trajectory_info(run_root, r["model_id"], s) for r in rows for s in ("probe", "test")]

    def no_decoding(*a, **k):
        raise AssertionError("decoded a trajectory")

    monkeypatch.setattr(store, "read_trajectory", no_decoding)
    monkeypatch.setattr(store, "read_parquet", no_decoding)
    with pytest.raises(ValueError, match=r"\['a-s001'\]"):
        store.check_same_recording(run_root, infos, {r["model_id"]: r["task"] for r in rows})
    untouched = [i for i in infos if i.model_id != "a-s001"]
    store.check_same_recording(run_root, untouched, {r["model_id"]: r["task"] for r in rows})  # agreeing: no error


# ---------------------------------------------------------------- repair restores every column it can


def test_repair_restores_every_manifest_column(run_root, tmp_path):
    before = {r["model_id"]: r for r in store.manifest_rows(run_root)}
    assert all(r["train_seconds"] > 0 for r in before.values())
    (run_root / "manifest.parquet").unlink()
    digests = _digests(run_root)
    res = _cli("repair", "--root", str(run_root))
    assert res.returncode == 0, res.stderr
    assert "rebuilt the manifest from the files: 3 complete model(s)" in res.stdout
    after = {r["model_id"]: r for r in store.manifest_rows(run_root)}
    assert sorted(after) == sorted(before)
    for mid, r in before.items():
        lost = {k for k in r if k not in after[mid]}
        assert not lost, (mid, lost)  # every column comes back (weights_bytes from the file itself)
        assert after[mid] == r, mid
    assert {k: v for k, v in _digests(run_root).items() if k != "manifest.parquet"} == digests  # only it written
