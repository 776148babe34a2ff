"""The fault battery of issue 17, run against one or more checkouts of dynamo_dist, as a user would.

Each case runs the ``dynamo-dist`` CLI of a checkout (``PYTHONPATH=<checkout>``) in a fresh
directory and records: the exit code, the first line of stderr, whether a Python traceback
was printed, whether every file that existed before is byte-identical after (sha256; the
lock file excepted), what was trained, and the seconds it took. Writes JSON, prints a table.

    python benchmarks/fault_battery.py --checkout before=/tmp/old --checkout after=. \\
        --out benchmarks/results/faults.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

POP = {"num_examples": 1000, "num_probe": 32, "num_test": 32,
       "groups": [{"name": "a", "task": "mnist1d", "arch": "gru", "hidden_size": 8, "num_seeds": 3, "epochs": 2,
                   "batch_size": 64}]}
META = {"steps": 10, "checkpoint_every": 5, "eval_every": 5, "hidden_size": 8, "embedding_dim": 2, "batch_size": 8,
        "models_per_step": 1, "num_workers": 1, "val_models": 2}


def _digests(base: Path) -> dict[str, str]:
    """sha256 of every file but the lock (its holder record) and the MLflow store (a stage that
    runs appends its run there; that is a write, not an overwrite of completed work)."""
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file() and p.name not in (".dynamo.lock", "mlflow.db")}


def _weights_mtimes(root: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in (root / "weights").glob("*.safetensors")}


class Battery:
    def __init__(self, checkout: Path, work: Path):
        self.checkout, self.work = checkout, work
        self.env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)

    def cli(self, *args, timeout=600) -> tuple[subprocess.CompletedProcess, float]:
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "dynamo_dist.cli", *args], capture_output=True, text=True,
                             env=self.env, timeout=timeout, cwd=self.work)
        return res, time.perf_counter() - t

    def config(self, d: Path, population=None, meta=None, **top) -> Path:
        data = {"run_dir": str(d / "run"), "population": {**POP, "root": str(d / "run" / "population"),
                                                          **(population or {})},
                "meta": {**META, "output_dir": str(d / "run" / "meta"), **(meta or {})}, **top}
        path = d / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def trained(self) -> Path:
        """A trained population and meta run (made once per checkout, copied per case)."""
        base = self.work / "trained"
        if not base.exists():
            base.mkdir()
            cfg = self.config(base)
            for stage in ("population", "meta"):
                res, _ = self.cli(stage, "--config", str(cfg))
                if res.returncode != 0:
                    raise RuntimeError(f"{stage} failed on {self.checkout}:\n{res.stderr[-3000:]}")
        return base

    def fresh(self, name: str, trained: bool = True) -> Path:
        d = self.work / name
        if trained:
            shutil.copytree(self.trained(), d)
            self.config(d)  # the config of the copy points at the copy
        else:
            d.mkdir()
        return d

    def training(self, d: Path, cfg: Path, marker: str = "population.json") -> tuple[subprocess.Popen, Path]:
        """A population stage started in the background, returned once ``marker`` exists in its root:
        ``population.json`` (the root is open, Ray starting), ``inputs`` (a first model recorded)."""
        proc = subprocess.Popen([sys.executable, "-m", "dynamo_dist.cli", "population", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env,
                                cwd=self.work)
        root = d / "run" / "population"
        deadline = time.monotonic() + 120
        while not (root / marker).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return proc, root

    def record(self, d: Path, res, seconds, before, **extra) -> dict:
        after = _digests(d)
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        i = next((j for j, ln in enumerate(lines) if "error" in ln.lower() or "interrupted" in ln.lower()),
                 len(lines) - 1)
        first = lines[i].strip() if lines else ""
        if first.endswith(":") and i + 1 < len(lines):  # "invalid config X:" then the field
            first += " " + lines[i + 1].strip()
        changed = sorted(k for k, v in before.items() if after.get(k) != v)
        return {"exit": res.returncode, "message": first[:300], "traceback": "Traceback" in res.stderr,
                "files_unchanged": not changed, "changed": changed[:5],
                "seconds": round(seconds, 1), **extra}

    # ------------------------------------------------------------ cases

    def case_second_population_on_a_root_in_use(self):
        d = self.fresh("concurrent", trained=False)
        cfg = self.config(d, population={"groups": [{**POP["groups"][0], "epochs": 60}]})
        first, root = self.training(d, cfg)
        res, s = self.cli("population", "--config", str(cfg))
        first.communicate(timeout=600)
        rows = subprocess.run([sys.executable, "-c", "import sys; from dynamo_dist.data import store; "
                               "print(len(store.manifest_rows(sys.argv[1])))", str(root)], capture_output=True,
                              text=True, env=self.env, cwd=self.work).stdout.strip()
        # the first run keeps writing while the second runs: "unchanged" does not apply here
        return {**self.record(d, res, s, {}), "files_unchanged": None, "first_exit": first.returncode,
                "complete_models": rows}

    def _damaged(self, name: str, rel: str):
        d = self.fresh(name)
        root = d / "run" / "population"
        p = root / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        mt = _weights_mtimes(root)
        res, s = self.cli("population", "--config", str(d / "c.yaml"))
        retrained = sorted(k for k, v in _weights_mtimes(root).items() if mt.get(k) != v)
        return self.record(d, res, s, {}, retrained=retrained)

    def case_truncated_trajectory_on_resume(self):
        return self._damaged("trunc_traj", "trajectories/split=probe/model_id=a-s001/part-0.parquet")

    def case_truncated_weights_on_resume(self):
        return self._damaged("trunc_weights", "weights/a-s001.safetensors")

    def case_deleted_manifest(self):
        d = self.fresh("no_manifest")
        root = d / "run" / "population"
        (root / "manifest.parquet").unlink()
        mt = _weights_mtimes(root)
        before = _digests(d)
        res, s = self.cli("population", "--config", str(d / "c.yaml"))
        retrained = sorted(k for k, v in _weights_mtimes(root).items() if mt.get(k) != v)
        return self.record(d, res, s, before, retrained=retrained)

    def case_num_probe_changed(self):
        d = self.fresh("num_probe")
        cfg = self.config(d, population={"num_probe": 16, "groups": [{**POP["groups"][0], "num_seeds": 4}]})
        before = _digests(d)
        res, s = self.cli("population", "--config", str(cfg))
        return self.record(d, res, s, before, new_models=sorted(set(_weights_mtimes(d / "run" / "population"))
                                                                  - {"a-s000", "a-s001", "a-s002"}))

    def case_unknown_task(self):
        d = self.fresh("task", trained=False)
        cfg = self.config(d, population={"groups": [{**POP["groups"][0], "task": "nope"}]})
        res, s = self.cli("population", "--config", str(cfg))
        return self.record(d, res, s, {}, wrote_population_json=(d / "run/population/population.json").exists())

    def case_boolean_num_seeds(self):
        d = self.fresh("bool", trained=False)
        cfg = self.config(d, population={"groups": [{**POP["groups"][0], "num_seeds": True}]})
        res, s = self.cli("population", "--config", str(cfg), "--dry-run")
        return self.record(d, res, s, {}, models_planned=res.stdout.strip().splitlines()[-1:] or None)

    def case_set_steps_true(self):
        d = self.fresh("set_bool")
        before = _digests(d)
        res, s = self.cli("meta", "--config", str(d / "c.yaml"), "--set", "meta.steps=true", "--set",
                          f"meta.output_dir={d / 'run' / 'meta2'}")
        return self.record(d, res, s, before, wrote_meta2=(d / "run" / "meta2").exists())

    def case_file_as_run_dir(self):
        d = self.fresh("file_run_dir", trained=False)
        cfg = self.config(d)
        (d / "run").write_text("a file")
        before = _digests(d)
        res, s = self.cli("population", "--config", str(cfg))
        return self.record(d, res, s, before)

    def case_pickle_payload_in_checkpoint(self):
        d = self.fresh("pickle")
        meta = d / "run" / "meta"
        code = ("import torch, pathlib, sys; torch.save({'step': 1, 'x': pathlib.Path('x')}, sys.argv[1])")
        # the current layout's checkpoint/shared.pt, or checkpoint.pt of a checkout from before it
        target = meta / "checkpoint" / "shared.pt" if (meta / "checkpoint").is_dir() else meta / "checkpoint.pt"
        subprocess.run([sys.executable, "-c", code, str(target)], check=True, env=self.env,
                       cwd=self.work)
        before = _digests(d)
        res, s = self.cli("analyze", "--config", str(d / "c.yaml"), "--no-log")
        return self.record(d, res, s, before)

    def case_resume_with_other_embedding_dim(self):
        d = self.fresh("resume")
        before = _digests(d)
        res, s = self.cli("meta", "--config", str(d / "c.yaml"), "--set", "meta.embedding_dim=3")
        return self.record(d, res, s, before)

    def case_ctrl_c_during_population(self):
        d = self.fresh("ctrl_c", trained=False)
        cfg = self.config(d, population={"groups": [{**POP["groups"][0], "epochs": 30}]})
        t = time.perf_counter()
        proc, root = self.training(d, cfg, marker="inputs")  # training under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        res = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
        return self.record(d, res, time.perf_counter() - t, {},
                           temp_files_left=len(list(root.rglob("*.tmp"))))

    def case_moved_run_dir(self):
        moved = self.work / "moved"
        shutil.copytree(self.trained(), moved)  # the whole run dir: population + meta, the original stays
        code = ("import sys; from dynamo_dist.meta.outputs import load_meta_run; "
                "print(load_meta_run(sys.argv[1]).population_root)")
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code, str(moved / "run" / "meta")], capture_output=True,
                             text=True, env=self.env, cwd=self.work)
        read = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        return self.record(moved, res, time.perf_counter() - t, {},
                           reads="the copy" if read.startswith(str(moved)) else f"the original ({read})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--out", default="benchmarks/results/faults.json")
    ap.add_argument("--cases", nargs="*", help="only these cases (names without case_)")
    args = ap.parse_args()
    results = {}
    cases = [n for n in dir(Battery) if n.startswith("case_") and (not args.cases or n[5:] in args.cases)]
    for spec in args.checkout:
        name, path = spec.split("=", 1)
        with tempfile.TemporaryDirectory(prefix=f"faults-{name}-") as work:
            b = Battery(Path(path).resolve(), Path(work))
            results[name] = {}
            for case in cases:
                try:
                    results[name][case[5:]] = getattr(b, case)()
                except Exception as err:  # noqa: BLE001 -- a case that cannot run is reported, not fatal
                    results[name][case[5:]] = {"error": f"{type(err).__name__}: {err}"[:300]}
                print(name, case[5:], json.dumps(results[name][case[5:]]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
