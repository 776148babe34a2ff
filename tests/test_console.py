"""What a user sees: the smoke pipeline through the CLI prints the project's own lines and
progress bars, no Ray/MLflow internals, no line twice, one screen in all."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import pytest
from recipes import small_analysis_args

pytestmark = pytest.mark.integration
BAR = re.compile(r"^(population|meta|analyze|record|embed):\s+\d+%\|")
NOISE = ("(pid=", "State API", "core_worker", "PlacementGroupCleaner", "PreemptionWatcher", " INFO ", "WARNING",
         "Traceback", "mlflow.store", "TrainingReport")


def test_smoke_pipeline_console_is_the_projects_own(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DYNAMO_VERBOSE")}
    res = subprocess.run([sys.executable, "-m", "dynamo_dist.cli", "run", "--recipe", "smoke", "--set",
                          f"run_dir={tmp_path / 'run'}", *small_analysis_args()], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [ln.rstrip() for ln in re.split(r"[\r\n]+", res.stdout + res.stderr) if ln.strip()]
    text = [ln for ln in lines if not BAR.match(ln)]
    noisy = [ln for ln in lines if any(n in ln for n in NOISE)]
    assert not noisy, noisy[:10]
    assert len(text) <= 30, text
    assert len(set(text)) == len(text), [ln for ln in text if text.count(ln) > 1]
    assert any(ln.startswith("meta:") and "agreement=" in ln for ln in lines)  # live val metrics on the bar
    assert any(ln.startswith("analyze:") for ln in lines)
    assert "== dynamo_dist pipeline finished in" in res.stdout


@pytest.mark.serial  # Makefile: the interrupt must land while models are left to train: in the parallel pass (3 files, load ~9) the driver finished all four and exited 0
def test_ctrl_c_is_one_line_and_a_rerun_resumes(tmp_path):
    """Ctrl-C during the population stage prints one line and exits 130; the same command run
    again trains only what was left, leaving the models completed before the interrupt untouched."""
    import hashlib
    import signal
    import time

    from dynamo_dist.data import store

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DYNAMO_VERBOSE")}
    root = tmp_path / "run" / "population"
    # group a (2 epochs) completes first, group b (100 epochs, ~8 s a model here) is still training
    cmd = [sys.executable, "-m", "dynamo_dist.cli", "population", "--recipe", "smoke",
           "--set", f"run_dir={tmp_path / 'run'}", "--set", "population.groups.1.epochs=100"]

    def complete() -> list[str]:
        try:
            return [r["model_id"] for r in store.manifest_rows(root)]
        except (FileNotFoundError, ValueError, OSError):  # not written yet
            return []

    # SIGINT as a terminal gives it: a suite started in the background (`make test &` in a non-interactive
    # shell) runs with SIGINT ignored, which children inherit, and the interrupt would never land
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the first completed model read from the progress bar as it is printed: polling the manifest for
    # it once noticed it only after all four models were done (parallel test files, load 20+, 2 cores)
    out, err_bytes, first_done = bytearray(), bytearray(), threading.Event()

    def read(stream, into: bytearray, watch: bool) -> None:
        for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
            into.extend(chunk)
            if watch and b"| 1/4 [" in into:
                first_done.set()

    readers = [threading.Thread(target=read, args=(proc.stdout, out, False), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, err_bytes, True), daemon=True)]
    for r in readers:
        r.start()
    deadline = time.monotonic() + 300
    while not first_done.wait(0.2) and time.monotonic() < deadline and proc.poll() is None:
        pass
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    for r in readers:
        r.join(timeout=30)
    err = err_bytes.decode(errors="replace")
    assert proc.returncode == 130, err[-3000:]
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert lines == ["dynamo-dist population: interrupted; completed work is kept (every file is written whole), "
                     "re-run the same command to resume"], err[-3000:]
    assert "Traceback" not in err and not list(root.rglob("*.tmp"))  # nothing half-written left behind
    done = complete()
    assert 1 <= len(done) < 4, done  # something to keep and something to resume
    kept = {m: hashlib.sha256((root / "weights" / f"{m}.safetensors").read_bytes()).hexdigest() for m in done}
    mtimes = {m: (root / "weights" / f"{m}.safetensors").stat().st_mtime_ns for m in done}

    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert f"total: {4 - len(done)} of 4 to train" in dry.stdout, dry.stdout + dry.stderr[-2000:]
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 complete models in" in again.stdout and "Traceback" not in again.stderr
    assert sorted(complete()) == ["a-s000", "a-s001", "b-s000", "b-s001"]
    for m in done:  # the models completed before Ctrl-C were resumed past, not retrained
        assert (root / "weights" / f"{m}.safetensors").stat().st_mtime_ns == mtimes[m], m
        assert hashlib.sha256((root / "weights" / f"{m}.safetensors").read_bytes()).hexdigest() == kept[m], m
