"""Experiment (issue 27): the demo's meta batch, how many models a step and how many sequences each,
with learning rates and schedules beside it, at a fixed number of steps.

Single-process runs of ``DynamoTrainer`` on the demo population, one intra-op thread each, ``--jobs``
side by side; a run of 12 models a step stands for W=2 workers of 6 (each worker samples its own
shard's models). Every variant fixes its batch and rates in full (not the recipe of the day), with
theta's gain on the recurrence, hidden 128, lambda 10, T = 0.25, the final V solve; test agreement and
hidden R^2 on every model. JSON in ``benchmarks/results/``.

    python benchmarks/exp_batch_composition.py --steps 600 --variants m8b32 m12b21 m12b16 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ProcessPoolExecutor

from exp_theta_gain import fit_and_test, write_results

# the demo recipe before this experiment: 8 models a step in one process (4 a worker at W=2), 32 sequences each
BASE = {"models_per_step": 8, "batch_size": 32, "lr": 2e-2, "embedding_lr": 1e-2}
ALL = {"models_per_step": 12, "batch_size": 21}  # every model of a worker's shard each step, ~the same sequences
VARIANTS = {  # name: (meta overrides, learning-rate schedule)
    "m8b32": (BASE, "cosine-7/32"),
    "m8b32-cos0": (BASE, "cosine-to-0"),
    "m8b32-elr2": ({**BASE, "embedding_lr": 2e-2}, "cosine-7/32"),
    "m12b21": ({**BASE, **ALL}, "cosine-7/32"),
    "m12b16": ({**BASE, **ALL, "batch_size": 16}, "cosine-7/32"),
    "m12b21-lr3": ({**BASE, **ALL, "lr": 3e-2}, "cosine-7/32"),
    "m12b21-ow20": ({**BASE, **ALL, "output_weight": 20.0}, "cosine-7/32"),
    "m12b21-elr2": ({**BASE, **ALL, "embedding_lr": 2e-2}, "cosine-7/32"),
    "m12b21-lr3-elr2": ({**BASE, **ALL, "lr": 3e-2, "embedding_lr": 2e-2}, "cosine-7/32"),
}


def _run(args: tuple) -> dict:
    import torch

    from dynamo_dist import config
    from dynamo_dist.meta import trainer as trainer_mod

    name, steps, seed, population = args
    overrides, schedule = VARIANTS[name]
    if schedule == "cosine-to-0":
        trainer_mod.cosine_factor = lambda step, total: 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    torch.set_num_threads(1)
    cfg = config.recipe("demo").meta.replace(output_dir="/tmp/exp-batch-composition", steps=steps, seed=seed,
                                             eval_every=steps, theta_gain=True, hidden_size=128, output_weight=10.0,
                                             **overrides)
    tr = trainer_mod.DynamoTrainer(cfg, trainer_mod.load_population(population))
    return fit_and_test(tr, {"variant": name, "steps": steps, "seed": seed})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--population", default="runs/demo/population")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["m8b32", "m12b21"], choices=sorted(VARIANTS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="batch_composition_demo.json")
    a = ap.parse_args()
    jobs = [(v, a.steps, s, a.population) for s in a.seeds for v in a.variants]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as pool:
        runs = list(pool.map(_run, jobs))
    summary = {}
    for v in a.variants:
        rs = [r for r in runs if r["variant"] == v]
        summary[v] = {k: {"mean": sum(r[k] for r in rs) / len(rs), "min": min(r[k] for r in rs),
                          "max": max(r[k] for r in rs)} for k in ("agreement", "hidden_r2", "train_seconds")}
    doc = {"what": "demo meta batch composition and rates at a fixed number of steps, single-process runs",
           "command": f"python benchmarks/exp_batch_composition.py --steps {a.steps} --variants "
                      f"{' '.join(a.variants)} --seeds {' '.join(map(str, a.seeds))} --jobs {a.jobs}",
           "variants": {v: {"meta": VARIANTS[v][0], "schedule": VARIANTS[v][1]} for v in a.variants},
           "summary": summary, "runs": runs}
    write_results(doc, a.out, t0)


if __name__ == "__main__":
    main()
