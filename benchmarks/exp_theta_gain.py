"""Experiment (issue 27): theta also scales the meta GRU's hidden-to-hidden product,
gh = (W_hh h + b_hh) * (1 + U theta), U (3M, E) starting at 0 (``meta.theta_gain``), against none.

In the paper's meta GRU theta enters only as W_ih theta, a per-model constant added to the gate
pre-activations; the gain gives each model a multiplicative say in the recurrence for 3 M E
parameters. Both arms run the hand-written GRU of ``meta/gru.py`` (the gain costs a few elementwise
ops a step there). Single-process runs of the demo recipe (4 models a step, hidden 128, lr 2e-2,
T = 0.25), one intra-op thread each, ``--jobs`` side by side, final V solve, test metrics; JSON in
``benchmarks/results/``.

    python benchmarks/exp_theta_gain.py --steps 600 --seeds 0 1 2 --jobs 2 --out theta_gain_demo.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _run(args: tuple) -> dict:
    import torch

    from dynamo_dist import config
    from dynamo_dist.meta.trainer import DynamoTrainer, load_population

    variant, steps, seed, population, overrides = args
    torch.set_num_threads(1)
    cfg = config.recipe("demo").meta.replace(output_dir="/tmp/exp-theta-gain", steps=steps, seed=seed,
                                             eval_every=steps, theta_gain=variant == "gain", **overrides)
    tr = DynamoTrainer(cfg, load_population(population))
    assert (tr.meta.recurrence_gain is not None) == (variant == "gain")
    return fit_and_test(tr, {"variant": variant, "steps": steps, "seed": seed})


def fit_and_test(tr, record: dict) -> dict:
    """Train ``tr`` to its steps, solve V once more, and add the training seconds and the test means
    (agreement, hidden R^2 over every model) to ``record``; printed as one JSON line and returned."""
    import numpy as np

    from dynamo_dist.meta.metrics import evaluate

    t = time.perf_counter()
    tr.fit()
    sec = time.perf_counter() - t
    tr.refit_maps()
    m = evaluate(tr, "test")
    out = {**record, "train_seconds": sec, "agreement": float(np.mean([v["agreement"] for v in m.values()])),
           "hidden_r2": float(np.mean([v["hidden_r2"] for v in m.values()]))}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--population", default="runs/demo/population")
    ap.add_argument("--steps", type=int, nargs="+", default=[600])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["base", "gain"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="meta overrides (floats/ints)")
    ap.add_argument("--out", default="theta_gain_demo.json")
    a = ap.parse_args()
    overrides = {k: (int(v) if v.isdigit() else float(v)) for k, v in (s.split("=", 1) for s in a.set)}
    jobs = [(v, st, s, a.population, overrides) for st in a.steps for s in a.seeds for v in a.variants]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as pool:
        runs = list(pool.map(_run, jobs))
    summary = {}
    for v in a.variants:
        for st in a.steps:
            rs = [r for r in runs if r["variant"] == v and r["steps"] == st]
            summary[f"{v}@{st}"] = {k: {"mean": sum(r[k] for r in rs) / len(rs), "min": min(r[k] for r in rs),
                                        "max": max(r[k] for r in rs)} for k in ("agreement", "hidden_r2",
                                                                                 "train_seconds")}
    doc = {"what": "theta gain of the meta GRU's recurrence vs none, demo recipe, single-process runs",
           "command": "python benchmarks/exp_theta_gain.py " + " ".join(
               [f"--steps {' '.join(map(str, a.steps))}", f"--seeds {' '.join(map(str, a.seeds))}",
                f"--jobs {a.jobs}", *([f"--set {' '.join(a.set)}"] if a.set else [])]),
           "summary": summary, "runs": runs}
    write_results(doc, a.out, t0)


def write_results(doc: dict, out: str, t0: float) -> None:
    """``doc`` with the machine and the wall seconds since ``t0``, as ``benchmarks/results/<out>``; its summary printed."""
    doc = {**doc, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "wall_seconds": time.perf_counter() - t0}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
