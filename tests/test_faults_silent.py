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
from test_faults import _battery_case, _cli, _digests, _smoke_args, _truncate, meta_run, trained  # noqa: F401

from dynamo_dist.data import store

pytestmark = pytest.mark.integration  # starts Ray and CLI subprocesses (as test_faults.py)


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
    _battery_case(tmp_path, ["meta", *_smoke_args(tmp_path / "run", "meta.steps=5")], 2,
                  [f"population root {run_root}", *needles], new_files=True)
    assert not (tmp_path / "run" / "meta").exists()  # refused before the output directory


def test_sweep_refuses_models_recorded_with_other_settings(run_root, tmp_path):
    _rerecord(run_root, "a-s001", "probe", keep=16)
    _battery_case(tmp_path, ["sweep", *_smoke_args(tmp_path / "run")], 2,
                  [f"population root {run_root}: models disagree on the probe trajectory rows", "['a-s001']"],
                  new_files=True)


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


# ---------------------------------------------------------------- integrity errors say what to do

REMEDY = "run `dynamo-dist repair --root {root}`"
RERUN = "then rerun the stage"


def _nan_trajectory(root: Path, model_id: str, split: str = "probe") -> Path:
    """Write NaN into one model's trajectory file (schema and metadata kept): what a faulty disk or
    an outside tool leaves, never what the store writes."""
    import numpy as np
    import pyarrow as pa

    path = root / f"trajectories/split={split}/model_id={model_id}/part-0.parquet"
    table = pq.read_table(path)
    hidden = table.column("hidden").combine_chunks()
    values = hidden.values.to_numpy(zero_copy_only=False).copy()
    values[0] = np.nan
    column = pa.ListArray.from_arrays(hidden.offsets, pa.array(values))
    table = table.set_column(table.schema.get_field_index("hidden"), "hidden", column)
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), path)
    return path


def test_meta_on_a_nan_trajectory_names_the_file_and_the_repair(run_root, tmp_path):
    path = _nan_trajectory(run_root, "a-s001")
    _battery_case(tmp_path, ["meta", *_smoke_args(tmp_path / "run", "meta.steps=5")], 2,
                  [f"trajectory file {path} contains NaN/Inf values", REMEDY.format(root=run_root), RERUN],
                  new_files=True)
    assert not (tmp_path / "run" / "meta").exists()


@pytest.fixture
def copied_run(meta_run, tmp_path):  # noqa: F811 -- the imported fixture
    """A copy of the finished meta run's run dir (population beside it), the original untouched."""
    run_dir, _ = meta_run
    return Path(shutil.copytree(run_dir, tmp_path / "copy", symlinks=True))


def _safetensors_dtype_flip(path: Path) -> None:
    """Damage a weights file so that its header still parses and its size is unchanged (so
    ``store.damage`` passes it) but safetensors refuses its tensors: F32 -> F16 in the header."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = bytes(data[8:8 + n]).replace(b'"F32"', b'"F16"', 1)
    data[8:8 + n] = header
    path.write_bytes(bytes(data))


def test_analyze_on_damaged_weights_is_refused_before_any_work(copied_run, tmp_path):
    root, weights = copied_run / "population", copied_run / "population/weights/a-s001.safetensors"
    _truncate(weights)
    res = _battery_case(tmp_path, ["analyze", "--meta-dir", str(copied_run / "meta"), "--no-log"], 2,
                        [f"model 'a-s001': weights file {weights} has", REMEDY.format(root=root), RERUN],
                        new_files=True)
    assert "damaged files" in res.stderr
    assert not [p for p in (copied_run / "meta/analysis").rglob("*") if p.name != ".dynamo.lock"]


def test_a_failed_analysis_leaves_the_earlier_one_and_no_partial_files(copied_run, tmp_path):
    """Weights damaged past the cheap checks fail the analysis mid-way (after sections wrote figures):
    the earlier analysis stays as it was, nothing new appears."""
    root, weights = copied_run / "population", copied_run / "population/weights/a-s000.safetensors"
    _safetensors_dtype_flip(weights)
    earlier = copied_run / "meta/analysis"
    (earlier / "figures").mkdir(parents=True)
    (earlier / "analysis.json").write_text('{"headline": {"earlier": true}}')
    (earlier / "report.html").write_text("<html>earlier</html>")
    (earlier / "figures" / "embedding_pca.png").write_bytes(b"earlier figure")
    res = _battery_case(tmp_path, ["analyze", "--meta-dir", str(copied_run / "meta"), "--no-log"], 2,
                        [f"weights file {weights} is not a readable safetensors file", REMEDY.format(root=root),
                         RERUN], new_files=True)
    assert "Traceback" not in res.stderr
    left = sorted(str(p.relative_to(earlier)) for p in earlier.rglob("*") if p.name != ".dynamo.lock")
    assert left == ["analysis.json", "figures", "figures/embedding_pca.png", "report.html"]


def test_embed_of_a_damaged_model_names_it_and_the_repair(copied_run, tmp_path):
    root = copied_run / "population"
    probe = root / "trajectories/split=probe/model_id=b-s000/part-0.parquet"
    _truncate(probe)
    _battery_case(tmp_path, ["embed", "--meta-dir", str(copied_run / "meta"), "--root", str(root),
                             "--models", "b-s000", "--steps", "5"], 2,
                  [f"model 'b-s000': probe file {probe} has", REMEDY.format(root=root), RERUN], new_files=True)
    assert not (copied_run / "meta/posthoc/embeddings.parquet").exists()


# ---------------------------------------------------------------- half-written checkpoints


def test_a_half_written_checkpoint_folder_is_removed_on_resume(meta_run, tmp_path):  # noqa: F811
    """A folder Ray Train's workers were still uploading into when the run was killed (not in Ray's
    checkpoint manager snapshot) is deleted by the re-run, which resumes from the listed checkpoint."""
    import hashlib
    import json

    copy, args = meta_run  # in place: a copy's MLflow store would be refused (the copied-run-dir tests below)
    runs = copy / "meta/ray_results/meta"
    snapshot = json.loads((runs / "checkpoint_manager_snapshot.json").read_text())
    latest = runs / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    half = runs / "checkpoint_2099-01-01_00-00-00.000000"  # newer than every real one
    half.mkdir()
    shutil.copy(latest / "shared.pt", half / "shared.pt")
    (half / "shard-0.pt").write_bytes((latest / "shard-0.pt").read_bytes()[:1000])  # cut mid-upload
    kept = {p.name: hashlib.sha256((latest / p.name).read_bytes()).hexdigest() for p in latest.iterdir()}

    res = _cli("meta", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"removed 1 checkpoint folder(s) an interrupted run left half-written: {half.name}" in res.stdout
    assert not half.exists()
    # every folder left is one Ray lists (its retention may have rotated the old ones out, never by us)
    now = json.loads((runs / "checkpoint_manager_snapshot.json").read_text())
    assert {p.name for p in runs.glob("checkpoint_*") if p.is_dir()} <= \
        {r["checkpoint_dir_name"] for r in now["checkpoint_results"]}
    if latest.is_dir():  # the one the re-run resumed from, unless rotated out: unchanged
        assert {p.name: hashlib.sha256((latest / p.name).read_bytes()).hexdigest() for p in latest.iterdir()} == kept
    assert json.loads((copy / "meta/summary.json").read_text())["steps"] == 10  # resumed at its last step


# ---------------------------------------------------------------- URIs that cannot work, stores without credentials

AZURE = "abfs://c@acct.dfs.core.windows.net/studies/pop"
SUPPORTED = "supported schemes s3://, gs://, gcs://, hdfs://, viewfs://"


def test_an_abfs_root_is_refused_at_validation_with_the_supported_schemes(tmp_path):
    _battery_case(tmp_path, ["population", *_smoke_args(tmp_path / "run", f"population.root={AZURE}")], 2,
                  ["population.root", AZURE, "cannot store files at a abfs:// URI", SUPPORTED])
    assert not (tmp_path / "run").exists()


def test_an_abfs_meta_dir_is_refused_naming_it(tmp_path):
    _battery_case(tmp_path, ["analyze", "--meta-dir", AZURE, "--no-log"], 2, [AZURE, SUPPORTED])


def test_an_s3_root_without_credentials_says_none_were_found(tmp_path):
    import os
    import subprocess
    import sys

    from servers import s3_server

    work, logs = tmp_path / "work", tmp_path / "s3"  # the server's log changes: outside the checked files
    home = work / "home"  # no ~/.aws
    home.mkdir(parents=True)
    (home / ".bashrc").write_text("# a file that must stay as it is\n")
    logs.mkdir()
    with s3_server(logs, buckets=("bucket",), auth=True) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(HOME=str(home), AWS_ENDPOINT_URL=server["AWS_ENDPOINT_URL"], AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true")
        before = _digests(work)
        res = subprocess.run([sys.executable, "-m", "dynamo_dist.cli", "population",
                              *_smoke_args(work / "run", "population.root=s3://bucket/pop")],
                             capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "s3://bucket/pop" in res.stderr and "no credentials found: set AWS_ACCESS_KEY_ID" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert _digests(work) == before  # nothing changed, nothing written
    assert not (work / "run").exists()


# ---------------------------------------------------------------- a copied run dir never writes into the original


@pytest.mark.parametrize("stage", ["analyze", "meta"])
def test_a_copied_run_dir_does_not_log_into_the_original(meta_run, tmp_path, stage):  # noqa: F811
    """``cp -a`` of a finished run dir: its MLflow store (mlflow.db, mlartifacts/) names the original's
    artifact folder, so logging through it would write there; the stage is refused before any work,
    naming both, and no file of the original changes."""
    import subprocess

    run_dir, args = meta_run
    original = _digests(run_dir)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
    if stage == "analyze":
        cmd = ["analyze", "--meta-dir", str(copy / "meta")]
    else:
        cmd = ["meta", *[a.replace(f"run_dir={run_dir}", f"run_dir={copy}") for a in args], "--set", "meta.steps=15"]
    res = _battery_case(tmp_path, cmd, 2, [f"the MLflow store {copy / 'mlflow.db'} was copied or moved",
                                          f"keep their artifacts in {run_dir.resolve() / 'mlartifacts'}",
                                          f"not in {copy.resolve() / 'mlartifacts'}"], new_files=True)
    assert "Traceback" not in res.stderr
    assert _digests(run_dir) == original  # every file of the original, and no new one
    if stage == "analyze":
        assert not [p for p in (copy / "meta/analysis").rglob("*") if p.name != ".dynamo.lock"]  # no work done
    # the same copy analysed without logging works and still leaves the original alone
    if stage == "analyze":
        res = _cli("analyze", "--meta-dir", str(copy / "meta"), "--no-log")
        assert res.returncode == 0, res.stderr[-3000:]
        assert (copy / "meta/analysis/report.html").is_file()
        assert _digests(run_dir) == original


# ---------------------------------------------------------------- the embedded Ray: loopback only, gone with its driver


def _loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _http_status(host: str, port: int) -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except Exception:  # noqa: BLE001 -- not HTTP (gRPC), refused, reset: no answer
        return None


def _listeners_on(host: str, port: int) -> set[int]:
    """Pids of the processes listening on ``port`` at ``host`` or on every address (empty: none found, or
    their owners hidden)."""
    import psutil

    return {c.pid for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid is not None
            and c.laddr.ip in (host, "0.0.0.0", "::", f"::ffff:{host}")}


def _token(pid: int) -> str | None:
    """The Ray token in a process's environment (None: none, or the process is gone)."""
    import psutil

    try:
        return psutil.Process(pid).environ().get("RAY_AUTH_TOKEN")
    except psutil.Error:
        return None


@pytest.mark.serial  # Makefile: its metrics exporters' start and its orphans' end are timed in seconds
def test_an_in_process_run_listens_on_loopback_only_and_dies_with_its_driver(tmp_path):
    """A real in-process stage (population of the smoke recipe, Ray actors training): every listener
    of its Ray is on loopback (Prometheus metrics endpoints included: they answer HTTP there, and
    nothing answers on the host's other addresses); a SIGKILL of the driver leaves none of its Ray
    processes alive 10 s later."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import psutil

    root = tmp_path / "run" / "population"
    args = ["population", *_smoke_args(tmp_path / "run", "population.groups.0.epochs=60")]
    proc = subprocess.Popen([sys.executable, "-m", "dynamo_dist.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    tree: list = []
    try:
        deadline = time.monotonic() + 180
        while not (root / "inputs").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "the population stage ended before training"
            time.sleep(0.2)
        time.sleep(3)  # the agents' metrics exporters start a moment after the node
        tree = psutil.Process(proc.pid).children(recursive=True)
        listeners = set()
        for p in tree:
            try:
                listeners |= {(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                continue
        assert any(name == "raylet" for name, _, _ in listeners), listeners  # the scan sees Ray's listeners
        assert [x for x in listeners if not _loopback(x[1])] == []
        answering = {port for _, _, port in listeners if _http_status("127.0.0.1", port) == 200}
        assert answering, listeners  # control: the metrics endpoints exist and the probe reaches them
        hosts = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family == socket.AF_INET and not _loopback(a.address)}
        ours = {p.pid for p in tree}  # and any process with this Ray's token (one that left the tree)
        token = next(t for t in map(_token, ours) if t)
        for host in hosts:  # on every other address of the machine, no port of this Ray answers
            for _, _, port in listeners:
                with socket.socket() as s:
                    s.settimeout(1)
                    answered = s.connect_ex((host, port)) == 0
                if answered:  # by whom: another Ray on the machine (another test file's, in a parallel
                    # `make test`) may listen on the same port number on that address or on all of them
                    owners = _listeners_on(host, port)
                    assert owners and not owners & ours and not any(_token(o) == token for o in owners), \
                        (host, port, owners)

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        alive = tree
        while alive and time.monotonic() - killed < 10:
            time.sleep(0.5)
            alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], [(p.pid, p.name()) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in tree:  # our own processes, whatever the outcome
            try:
                p.kill()
            except psutil.Error:
                pass
