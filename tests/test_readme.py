"""Every command README.md shows is run by a test (issue 29).

The commands are read from README.md itself: each line of a ```bash block (``\\`` continuations
joined, trailing ``# comments`` dropped), each line of an untagged block that starts with a command
word, each inline code span that does, and each ```python block. ``COVERAGE`` maps every one of them
(by its longest matching prefix) to the test that exercises it; a README command with no entry fails
``test_every_readme_command_is_covered``, and an entry that no README command uses fails too.

The commands run here run as the README writes them, with the demo's paths and config swapped for a
tmp_path run at smoke scale: ``make demo``'s own recipe line (``make -n``) with configs/smoke.yaml,
then the outputs tour's DuckDB/pandas snippet, ``population --dry-run``, ``ui``, ``seeds`` (training
two seeds, then comparing them by ``--meta-dirs``), and the user guide's ``add-models`` → ``meta`` →
``embed`` on a tiny package of the user's own GRUs. Commands whose infrastructure another test
already starts (a Ray cluster for ``ray job submit``, a sweep, the suite behind ``make test``) map
to that test's node id, which must exist.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import servers
from recipes import small_analysis_args

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent  # the venv's console scripts: dynamo-dist as `make setup` installs it
SMOKE = REPO / "configs" / "smoke.yaml"
HERE = "tests/test_readme.py"

# The words a shell command in the README starts with (an untagged block's or an inline span's line is a
# command only if it starts with one; every line of a ```bash block is a command, whatever it starts with).
COMMAND_WORDS = ("make", "dynamo-dist", "python", "python3", "ray", "pip", "duckdb", "mlflow", "docker", "kubectl")

# README command prefix -> (the test node that runs it, how). The longest matching prefix wins; a key
# ending in "$" matches that command only.
COVERAGE: dict[str, tuple[str, str]] = {
    "make demo": (f"{HERE}::test_make_demo_is_the_smoke_pipeline_at_another_recipe",
                  "make -n demo's recipe line, run with configs/smoke.yaml and run_dir in tmp_path"),
    "make smoke": (f"{HERE}::test_make_demo_is_the_smoke_pipeline_at_another_recipe",
                   "make -n smoke's recipe line is the one the module's smoke run ran"),
    "make test": (f"{HERE}::test_make_test_is_what_ci_runs",
                  "not re-run from a test: it is the suite; checked to be .ci/run's command over tests/"),
    "make test-fast": (f"{HERE}::test_make_test_is_what_ci_runs",
                       "not re-run: make -n shows the suite with -m 'not integration'"),
    "make ui": (f"{HERE}::test_ui_serves_the_runs_mlflow_store", "make -n ui is `dynamo-dist ui runs/demo`, run"),
    "dynamo-dist run": (f"{HERE}::test_make_demo_is_the_smoke_pipeline_at_another_recipe",
                        "the smoke pipeline, a subprocess, once per module"),
    "dynamo-dist population --dry-run": (f"{HERE}::test_population_dry_run_counts_nothing_left",
                                         "on the smoke run's population"),
    "dynamo-dist ui": (f"{HERE}::test_ui_serves_the_runs_mlflow_store", "a real server on a free port, polled"),
    "dynamo-dist recipes": (f"{HERE}::test_recipes_prints_every_recipe", "subprocess"),
    "dynamo-dist add-models": (f"{HERE}::test_your_own_models_add_meta_embed", "a tiny mypkg.models:build, npz task"),
    "dynamo-dist meta": (f"{HERE}::test_your_own_models_add_meta_embed", "on the added models, --recipe smoke"),
    "dynamo-dist embed": (f"{HERE}::test_your_own_models_add_meta_embed", "a third user model into that meta run"),
    "dynamo-dist seeds": (f"{HERE}::test_seeds_trains_two_seeds_and_meta_dirs_gives_the_same_scores",
                          "--seeds 0,1 on the smoke population, then --meta-dirs on the two runs"),
    "dynamo-dist sweep": ("tests/test_multinode_sweeps.py::test_a_sweep_whose_worker_node_dies_finishes_every_trial",
                          "`dynamo-dist sweep --config` as a subprocess on a 2-node cluster; "
                          "configs/sweep-demo.yaml is validated here (test_readme_configs_validate)"),
    "python jobs/pipeline.py": ("tests/test_jobs.py::test_smoke_pipeline_job_succeeds_and_writes_outputs",
                                "jobs/pipeline.py --config configs/smoke.yaml as a Ray job"),
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pipeline.py": ("tests/test_jobs.py::test_smoke_pipeline_job_succeeds_and_writes_outputs",
                       "a `ray start --head` on free ports; the job (jobs/pipeline.py, smoke) submitted through "
                       "JobSubmissionClient, the API `ray job submit` calls"),
    "ray job submit ... -- python jobs/train_meta.py": (
        "tests/test_ray_train.py::test_worker_progress_reaches_the_driver_once",
        "jobs/train_meta.py --recipe smoke with --set overrides, run as a script (no job submission)"),
    "make$": (f"{HERE}::test_make_test_is_what_ci_runs", "a prerequisite (`make` and `python3 -m venv`): the Makefile's rules are checked"),
    "python3 -m venv$": (f"{HERE}::test_make_test_is_what_ci_runs",
                        "a prerequisite the Makefile runs to create .venv; its rule is checked"),
    "mlflow server$": ("tests/test_tune.py::test_mlflow_ui_shows_the_sweep_trials",
                       "the Tests paragraph's `mlflow server`, started by tests/servers.py's fixture"),
    "```python": (f"{HERE}::test_outputs_tour_snippets_read_the_smoke_run",
                  "every ```python block, runs/demo -> the smoke run, statement by statement"),
}


# ----------------------------------------------------------------------------- reading the README


def readme_commands(text: str) -> list[str]:
    """The commands ``text`` (a README) shows, in order, each once."""
    found: list[str] = []
    fenced = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```", re.S | re.M)
    for lang, body in fenced.findall(text):
        if lang == "python":
            found.append("```python")
            continue
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue  # yaml, json: configs, checked by test_readme_configs_validate
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip().removeprefix("$ ")
            if line and (lang or line.split()[0] in COMMAND_WORDS):
                found.append(" ".join(line.split()))
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", fenced.sub("", text)):
        span = " ".join(span.split())
        if span.split()[0] in COMMAND_WORDS:
            found.append(span)
    return list(dict.fromkeys(found))


def covering(command: str, table: dict[str, tuple[str, str]] = COVERAGE) -> str | None:
    """The longest prefix of ``table`` that ``command`` starts with (word-wise), or None."""
    words = command.split()
    hits = [p for p in table if (command == p[:-1] if p.endswith("$") else words[:len(p.split())] == p.split())]
    return max(hits, key=len, default=None)


def uncovered(text: str, table: dict[str, tuple[str, str]] = COVERAGE) -> list[str]:
    return [c for c in readme_commands(text) if covering(c, table) is None]


def readme_command(prefix: str) -> str:
    """The README's one command that starts with ``prefix`` (a test runs what the README says)."""
    hits = [c for c in readme_commands(README.read_text()) if c.startswith(prefix)]
    assert len(hits) == 1, (prefix, hits)
    return hits[0]


def as_argv(command: str, subs: dict[str, str], *extra: str) -> list[str]:
    """``command`` as argv: ``[optional ...]`` groups dropped, README paths swapped by ``subs`` (in
    order), the console script taken from this venv, ``extra`` appended."""
    command = re.sub(r"\s*\[[^\]]*\]", "", command)
    for old, new in subs.items():
        command = command.replace(old, new)
    argv = shlex.split(command)
    if argv[0] == "dynamo-dist":
        argv[0] = str(BIN / "dynamo-dist")
    return [*argv, *extra]


def node_exists(node: str) -> bool:
    """Whether ``path::function`` names a test function in that file (read with ast, not imported)."""
    path, name = node.split("::")
    tree = ast.parse((REPO / path).read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


# ------------------------------------------------------------------------------------ unit tests


def test_every_readme_command_is_covered():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 15, commands  # the parser still finds the README's commands
    assert uncovered(README.read_text()) == []
    unused = [p for p in COVERAGE if not any(covering(c) == p for c in commands)]
    assert unused == [], f"COVERAGE entries no README command uses: {unused}"


def test_every_covering_test_exists():
    missing = [node for node, _ in COVERAGE.values() if not node_exists(node)]
    assert missing == []


def test_the_coverage_check_reports_an_unmapped_command():
    """Control: a README with a new command, an unknown word in a bash block and a new python block."""
    text = README.read_text() + ("\n```bash\ndynamo-dist frobnicate --all \\\n    --fast   # new\nmyscript.sh\n```\n"
                                 "Run `dynamo-dist repair runs/demo` first.\n")
    assert uncovered(text) == ["dynamo-dist frobnicate --all --fast", "myscript.sh", "dynamo-dist repair runs/demo"]
    assert uncovered("```python\nprint(1)\n```\n", {}) == ["```python"]
    assert covering("make demo", {"make": ("x", "")}) == "make"
    assert covering("makefile", {"make": ("x", "")}) is None  # word-wise, not character-wise
    assert not node_exists(f"{HERE}::test_that_does_not_exist")


def test_readme_configs_validate():
    """Every --config a README command names exists and validates; so do the README's YAML examples."""
    import yaml

    from dynamo_dist import config

    text = README.read_text()
    paths = {m for c in readme_commands(text) for m in re.findall(r"--config (configs/\S+)", c)}
    assert {"configs/demo.yaml", "configs/cluster.yaml", "configs/sweep-demo.yaml"} <= paths
    for p in sorted(paths):
        config.load(REPO / p)
    assert config.load(REPO / "configs/sweep-demo.yaml").sweep is not None
    blocks = [yaml.safe_load(b) for b in re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)]
    assert len(blocks) == 2
    for data in blocks:
        data = {**config.recipe_data(data.pop("recipe", "demo")), **data}
        config.parse(config.PipelineConfig, data, source="README.md")


def test_make_test_is_what_ci_runs():
    assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"
    test = _make_n("test")
    # two passes that together are the whole suite: the parallel files (TEST_WORKERS picks -n, 0: one
    # process), then the tests marked serial in one process
    assert re.search(r"python -m pytest .*-m \"?not serial\"? tests$", test, re.M), test
    assert re.search(r"python -m pytest (?!.*-n ).*-m \"?serial\"? tests$", test, re.M), test
    fast = _make_n("test-fast")
    assert re.search(r"python -m pytest .*-m \"?not integration\"? tests$", fast, re.M), fast
    assert "python3 -m venv .venv" in subprocess.run(["make", "-n", "-B", "setup"], cwd=REPO, capture_output=True,
                                                     text=True, check=True).stdout


def _make_n(target: str) -> str:
    return subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True).stdout


def _recipe_line(target: str) -> str:
    """The line of ``make -n target`` that runs the dynamo-dist CLI."""
    (line,) = [ln for ln in _make_n(target).splitlines() if "/dynamo-dist " in ln]
    return line.strip()


# ------------------------------------------------------------------------------ integration


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra}
    env.pop("RAY_ADDRESS", None)  # an in-process Ray of each command's own, never one already running
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(argv: list[str], cwd: Path, timeout: float = 600, **env: str) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(**env))
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> dict:
    """``make demo``'s recipe line with configs/smoke.yaml for configs/demo.yaml, run_dir in tmp_path."""
    line = _recipe_line("demo")
    assert line == ".venv/bin/dynamo-dist run --config configs/demo.yaml", line
    work = tmp_path_factory.mktemp("readme")
    run_dir = work / "runs" / "demo"
    argv = as_argv(line, {".venv/bin/dynamo-dist": "dynamo-dist", "configs/demo.yaml": str(SMOKE)},
                   "--set", f"run_dir={run_dir}", *small_analysis_args())  # tests/recipes.py: for time
    start = time.monotonic()
    out = _run(argv, cwd=work, timeout=900)
    return {"work": work, "run_dir": run_dir, "stdout": out, "seconds": time.monotonic() - start}


@pytest.mark.integration
def test_make_demo_is_the_smoke_pipeline_at_another_recipe(smoke_run):
    # demo and smoke differ only in the recipe (and the run_dir this run overrides)
    import yaml

    demo, smoke = (yaml.safe_load((REPO / "configs" / f).read_text()) for f in ("demo.yaml", "smoke.yaml"))
    assert demo == {"recipe": "demo", "run_dir": "runs/demo"} and smoke == {"recipe": "smoke", "run_dir": "runs/smoke"}
    assert _recipe_line("smoke") == ".venv/bin/dynamo-dist run --config configs/smoke.yaml"
    run_dir = smoke_run["run_dir"]
    manifest = pq.read_table(run_dir / "population" / "manifest.parquet").to_pylist()
    assert len(manifest) == 4 and {r["status"] for r in manifest} == {"complete"}
    emb = pq.read_table(run_dir / "meta" / "embeddings.parquet")
    assert sorted(emb.column("model_id").to_pylist()) == sorted(r["model_id"] for r in manifest)
    # the tour's files, where the README says they are
    for rel in ("mlflow.db", "meta/model_metrics.parquet", "meta/analysis/report.html", "meta/analysis/analysis.json"):
        assert (run_dir / rel).is_file(), rel
    assert str(run_dir / "meta" / "analysis" / "report.html") in smoke_run["stdout"]  # "prints where the results are"


@pytest.mark.integration
def test_outputs_tour_snippets_read_the_smoke_run(smoke_run):
    """Each ```python block with runs/demo -> the smoke run, run in its cwd; each top-level expression's
    value is kept (as a notebook shows it) and checked against the run's files."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert len(blocks) == 1
    src = blocks[0].replace("runs/demo", str(smoke_run["run_dir"]))
    ns: dict = {}
    shown = []
    for stmt in ast.parse(src).body:
        if isinstance(stmt, ast.Expr):
            shown.append(eval(compile(ast.Expression(stmt.value), "README.md", "eval"), ns))
        else:
            exec(compile(ast.Module([stmt], []), "README.md", "exec"), ns)
    manifest = pq.read_table(smoke_run["run_dir"] / "population" / "manifest.parquet").to_pylist()
    ids = sorted(r["model_id"] for r in manifest)
    joined, counts = (s.fetchall() for s in shown)
    assert sorted(r[0] for r in joined) == ids
    assert {r[0]: r[1] for r in joined} == {r["model_id"]: r["group"] for r in manifest}
    assert all(len(r[2]) == 2 and 0 <= r[3] <= 1 for r in joined)  # smoke: d = 2; agreement is a fraction
    assert sorted(r[0] for r in counts) == ids and all(n > 0 for _, n in counts)
    emb = ns["emb"]
    assert sorted(emb["model_id"]) == ids and {"theta", "theta_0", "theta_1", "group"} <= set(emb.columns)


@pytest.mark.integration
def test_population_dry_run_counts_nothing_left(smoke_run):
    out = _run(as_argv(readme_command("dynamo-dist population --dry-run"), {}, "--config", str(SMOKE),
                       "--set", f"run_dir={smoke_run['run_dir']}"), cwd=smoke_run["work"], timeout=300)
    assert "a: 2 models, 2 complete, 0 failed, 0 to train" in out and "total: 0 of 4 to train" in out, out


@pytest.mark.integration
def test_recipes_prints_every_recipe(tmp_path):
    import yaml

    out = _run(as_argv(readme_command("dynamo-dist recipes"), {}), cwd=tmp_path, timeout=120)
    docs = {m.group(1): yaml.safe_load(m.group(2)) for m in re.finditer(r"^# --- (\w+)\n(.*?)(?=^# --- |\Z)", out,
                                                                        re.S | re.M)}
    assert set(docs) == {"demo", "smoke", "paper"}
    assert docs["smoke"]["meta"]["steps"] == 30 and len(docs["smoke"]["population"]["groups"]) == 2


@pytest.mark.integration
def test_ui_serves_the_runs_mlflow_store(smoke_run):
    ui = readme_command("dynamo-dist ui")
    assert _recipe_line("ui").replace(".venv/bin/", "") == ui  # make ui is the same command
    port = servers.free_port()
    argv = as_argv(ui, {"runs/demo": str(smoke_run["run_dir"])}, "--port", str(port))
    log = open(smoke_run["work"] / "ui.log", "w")
    proc = subprocess.Popen(argv, cwd=smoke_run["work"], stdout=log, stderr=subprocess.STDOUT, env=_env(),
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (smoke_run["work"] / "ui.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = json.load(resp)
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow UI did not answer in 180 s"
                time.sleep(0.5)
        assert "demo" in {e["name"] for e in body["experiments"]}  # the run directory's name
    finally:
        servers.stop_group(proc, timeout=10)
        log.close()


@pytest.mark.integration
def test_seeds_trains_two_seeds_and_meta_dirs_gives_the_same_scores(smoke_run):
    run_dir, work = smoke_run["run_dir"], smoke_run["work"]
    trained = readme_command("dynamo-dist seeds --config")
    _run(as_argv(trained, {"configs/demo.yaml": str(SMOKE), "0,1,2": "0,1"}, "--set", f"run_dir={run_dir}"),
         cwd=work, timeout=900)
    seeds_dir = run_dir / "meta-seeds"
    first = json.loads((seeds_dir / "seed-stability" / "seed_stability.json").read_text())
    again = work / "again"
    _run(as_argv(readme_command("dynamo-dist seeds --meta-dirs"),
                 {"runs/a/meta": str(seeds_dir / "seed-0"), "runs/b/meta": str(seeds_dir / "seed-1")},
                 "--config", str(SMOKE), "--set", f"run_dir={run_dir}", "--out", str(again), "--no-log"),
         cwd=work, timeout=300)
    second = json.loads((again / "seed_stability.json").read_text())
    assert [Path(d).name for d in first["meta_dirs"]] == ["seed-0", "seed-1"]
    assert second["meta_dirs"] == first["meta_dirs"]
    assert second["consensus_labels"] == first["consensus_labels"]
    # nothing retrained: the compared runs are the trained ones, so every score is the same
    scores = [k for k, v in first.items() if isinstance(v, float)]
    assert scores and {k: second[k] for k in scores} == pytest.approx({k: first[k] for k in scores})


# the user's package, as the README describes it: a factory in mypkg.models, a GRU with their own names
USER_PACKAGE = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden=32, inputs=3, classes=3):
        super().__init__()
        self.gru = nn.GRU(inputs, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc(self.gru(x)[0][:, -1])


def build(hidden=32):
    return Net(hidden)
'''


def _user_models(tmp: Path, names: list[str], x, y) -> Path:
    """``names`` trained by the user's own loop, saved as ``<name>.safetensors`` beside the README's
    architecture.json (taken from the README)."""
    import importlib.util

    import torch
    from safetensors.torch import save_file

    text = " ".join(README.read_text().split())
    arch = json.loads(re.search(r'`(\{"factory": .*?\})`', text).group(1))
    spec = importlib.util.spec_from_file_location("readme_mypkg_models", tmp / "mypkg" / "models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    out = tmp / names[0].rsplit("-", 1)[0]
    out.mkdir()
    for i, name in enumerate(names):
        torch.manual_seed(i)
        net = models.build(**arch["kwargs"])
        opt = torch.optim.Adam(net.parameters(), lr=0.03)
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f"{name}.safetensors"))
    (out / "architecture.json").write_text(json.dumps(arch))
    return out


@pytest.mark.integration
def test_your_own_models_add_meta_embed(tmp_path, one_thread):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(USER_PACKAGE)
    rng = np.random.default_rng(0)  # the user's task: which of 3 channels has the largest mean over 10 steps
    x = rng.normal(size=(240, 10, 3)).astype(np.float32)
    y = x.mean(axis=1).argmax(axis=1)
    np.savez(tmp_path / "data.npz", x=x[:180], y=y[:180], x_test=x[180:], y_test=y[180:])
    mine = _user_models(tmp_path, ["my-models-0", "my-models-1"], x[:180], y[:180])
    new = _user_models(tmp_path, ["new-0"], x[:180], y[:180])
    subs = {"my-models": str(mine), "/abs/data.npz": str(tmp_path / "data.npz"), "runs/mine": str(tmp_path / "mine"),
            "runs/demo/meta": str(tmp_path / "mine" / "meta"), "path/to/their/population": str(tmp_path / "new")}
    smoke = ("--recipe", "smoke", "--set", f"run_dir={tmp_path / 'mine'}")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    add = readme_command("dynamo-dist add-models")
    out = _run(as_argv(add, subs, *smoke), cwd=tmp_path, timeout=300, **env)
    assert "added 2 model(s)" in out, out
    rows = pq.read_table(tmp_path / "mine" / "population" / "manifest.parquet").to_pylist()
    assert sorted(r["model_id"] for r in rows) == ["my-models-0", "my-models-1"]
    assert {(r["factory"], r["group"], r["hidden_size"], r["status"]) for r in rows} == {
        ("mypkg.models:build", "my-models", 32, "complete")}

    _run(as_argv(readme_command("dynamo-dist meta --root"), subs, *smoke), cwd=tmp_path, timeout=600, **env)
    emb = pq.read_table(tmp_path / "mine" / "meta" / "embeddings.parquet").to_pylist()
    assert sorted(r["model_id"] for r in emb) == ["my-models-0", "my-models-1"]
    assert all(len(r["theta"]) == 2 and np.isfinite(r["theta"]).all() for r in emb)

    # a model trained elsewhere, added to its own root by the same README command, then embedded
    _run(as_argv(add, {"runs/mine/population": str(tmp_path / "new"), **subs, "my-models": str(new)}, *smoke),
         cwd=tmp_path, timeout=300, **env)
    _run(as_argv(readme_command("dynamo-dist embed"), subs, *smoke), cwd=tmp_path, timeout=300, **env)
    (row,) = pq.read_table(tmp_path / "mine" / "meta" / "posthoc" / "embeddings.parquet").to_pylist()
    assert row["model_id"] == "new-0" and np.isfinite(row["theta"]).all()
    assert row["nearest_model"] in {"my-models-0", "my-models-1"}
