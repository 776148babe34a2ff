"""What a user sees: the smoke pipeline through the CLI prints the project's own lines and
progress bars, no Ray/MLflow internals, no line twice, one screen in all."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
BAR = re.compile(r"^(population|meta|analyze|record|embed):\s+\d+%\|")
NOISE = ("(pid=", "State API", "core_worker", "PlacementGroupCleaner", "PreemptionWatcher", " INFO ", "WARNING",
         "Traceback", "mlflow.store", "TrainingReport")


def test_smoke_pipeline_console_is_the_projects_own(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DYNAMO_VERBOSE")}
    res = subprocess.run([sys.executable, "-m", "dynamo_dist.cli", "run", "--recipe", "smoke", "--set",
                          f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=900)
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
