"""The flip-flop example end to end: a user's population in, DYNAMO's meta-model out, and the task's known
answer checked on the meta-model at each member's θ.

1. train GRU and LSTM members with the user's own loop (``flipflop.py``);
2. bring them in with one ``add_models`` call (the factory is recorded, so the weights can be rebuilt);
3. train the meta-model (``run_meta_local``) and print its emulation metrics;
4. at each member's θ_n, find the fixed points of h -> F~(θ_n, x* = 0, h) and count the stable ones and the sign
   patterns of the meta readout G~(θ_n) at them: a network that stores 3 bits has 8 and 8;
5. save ``theta.png`` (every member's θ) and ``fixed_points.png`` (the fixed points at each θ_n in the PCA plane
   of the meta states visited at every θ).

Run:  .venv/bin/python examples/flipflop/run_example.py --out runs/flipflop
(matplotlib draws the plots; without it they are skipped.)

Shape legend: N examples, T steps, K = 3 bits, M meta hidden units, S a model's state size.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import flipflop  # noqa: E402 -- the user's package, beside this script

from dynamo_dist.analysis.fixed_points import (FixedPointFinder, base_dynamics, base_visited_states,  # noqa: E402
                                               meta_dynamics, meta_visited_states)

# model_id -> (cell, layers, seed)
MEMBERS = {"gru-1-s0": ("gru", 1, 0), "gru-1-s1": ("gru", 1, 1),
           "lstm-1-s0": ("lstm", 1, 0), "lstm-1-s1": ("lstm", 1, 1)}
HIDDEN = 16            # units of every member (measured choices, GRU and LSTM: docs/user-models.md)
NUM_SEARCH = 128       # fixed-point searches per dynamics: 16 pulse-and-hold states, then visited states
HOLD = 40              # steps of no input after each pattern's pulse: the task's sequence length
SETTLE = 400           # ... and ten times as long, where slow drift has ended
# the meta recipe (MetaConfig fields). A small meta GRU: one of 64 units emulated as well but held some bits by
# slow drift, with 8, 7, 4 and 4 stable points at the four members' θ (docs/user-models.md)
META = {"hidden_size": 16, "embedding_dim": 2, "steps": 600, "batch_size": 32, "models_per_step": 2, "lr": 2e-2,
        "eval_every": 600}


def finder(random_state: int = 0) -> FixedPointFinder:
    """The search used for base models and the meta-model alike: q <= 1e-8 (||F(h) - h|| <= 1.4e-4; float32
    rounding of a state of norm ~1 is ~1e-7), points closer than 0.05 merged (the 8 corners are ~1 apart)."""
    return FixedPointFinder(num_initial=NUM_SEARCH, q_tol=1e-8, dedup_tol=0.05, random_state=random_state)


def train_members(members: dict[str, tuple[str, int, int]], x_NTK: torch.Tensor, y_NTK: torch.Tensor,
                  steps: int) -> dict[str, nn.Module]:
    """The user's side: one model per member, trained by ``flipflop.train`` from its own seed."""
    models = {}
    for mid, (cell, layers, seed) in members.items():
        torch.manual_seed(seed)
        models[mid] = flipflop.build(cell, layers, HIDDEN)
        flipflop.train(models[mid], x_NTK, y_NTK, steps=steps, seed=seed)
    return models


def search_starts(visited, probe_x_NTK: torch.Tensor, num: int, seed: int = 0) -> torch.Tensor:
    """(num, S) starts: the states ``HOLD`` and ``SETTLE`` steps after each sign pattern is set
    (``flipflop.pulse_patterns``), then states visited on probe sequences. ``visited(x_NTK) -> (N*T, S)``
    in time order per example.

    After the task's hold a state may still be drifting along a slow direction (eigenvalues ~0.99), and a
    search from there can stop on a slow point with q above ``q_tol``; after ``SETTLE`` steps a state that
    holds its pattern sits next to the attractor that stores it (or has left that pattern, if there is none).
    """
    pulses = torch.from_numpy(flipflop.pulse_patterns(SETTLE))
    at = [pulses.shape[1] - 1 - SETTLE + HOLD, pulses.shape[1] - 1]
    held = visited(pulses).reshape(len(pulses), pulses.shape[1], -1)[:, at].reshape(2 * len(pulses), -1)
    seen = visited(probe_x_NTK)
    pick = np.random.default_rng(seed).choice(len(seen), size=min(num - len(held), len(seen)), replace=False)
    return torch.cat([held, seen[torch.from_numpy(pick)]])


def _full(x_NTK: torch.Tensor) -> torch.Tensor:
    return torch.full((len(x_NTK),), x_NTK.shape[1], dtype=torch.int64)


def meta_fixed_points(meta: nn.Module, theta_E, group: str, probe_x_NTK: torch.Tensor,
                      seed: int = 0) -> FixedPointFinder:
    """Fixed points of the meta-model at θ (x* = 0: no pulse), read out by G~ of ``group`` at θ."""
    theta = torch.as_tensor(theta_E, dtype=torch.float32)
    starts = search_starts(lambda x: meta_visited_states(meta, theta, x, _full(x)), probe_x_NTK, NUM_SEARCH, seed)
    return finder(seed).fit(meta_dynamics(meta, theta, group=group), starts)


def base_fixed_points(model: nn.Module, probe_x_NTK: torch.Tensor, seed: int = 0) -> FixedPointFinder:
    """Fixed points of a base model (a zoo model or a user's module hooked on its recurrent layer)."""
    starts = search_starts(lambda x: base_visited_states(model, x, _full(x)), probe_x_NTK, NUM_SEARCH, seed)
    return finder(seed).fit(base_dynamics(model), starts)


def attractors(f: FixedPointFinder) -> tuple[int, int]:
    """(stable fixed points: every Jacobian eigenvalue inside the unit circle, distinct sign patterns of the
    readout at them). The task's known answer is (8, 8)."""
    stable = [i for i in range(len(f.eigenvalues_)) if np.abs(f.eigenvalues_[i]).max() < 1.0]
    return len(stable), len({tuple(np.sign(f.readouts_[i]).astype(int)) for i in stable})


def plot_theta(run, path: Path) -> Path | None:
    """θ of every member (first two coordinates), coloured by cell."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    theta = run.theta()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for i, (mid, row) in enumerate(zip(run.model_ids, run.rows)):
        cell = row.get("cell", mid.split("-")[0])
        ax.scatter(theta[i, 0], theta[i, 1] if theta.shape[1] > 1 else 0.0, s=60,
                   c={"gru": "tab:blue", "lstm": "tab:orange"}.get(cell, "tab:grey"), label=cell)
        ax.annotate(mid, (theta[i, 0], theta[i, 1] if theta.shape[1] > 1 else 0.0), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=8)
    ax.set(xlabel="θ₁", ylabel="θ₂", title="flip-flop population: θ_n")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fixed_points(fits: dict[str, tuple[FixedPointFinder, np.ndarray]], path: Path) -> Path | None:
    """One panel per member: meta states visited at its θ (grey) and the fixed points there (filled: stable,
    open: unstable; colour: the readout's sign pattern), all in one PCA plane of the visited meta states."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pooled = np.concatenate([v for _, v in fits.values()])
    mean = pooled.mean(0)
    plane = np.linalg.svd(pooled - mean, full_matrices=False)[2][:2]
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(fits), figsize=(3.2 * len(fits), 3.2), sharex=True, sharey=True, squeeze=False)
    for ax, (mid, (f, visited)) in zip(axes[0], fits.items()):
        v = (visited - mean) @ plane.T
        ax.scatter(v[:, 0], v[:, 1], s=2, c="0.8")
        p = (f.fixed_points_ - mean) @ plane.T
        for i in range(len(p)):
            stable = i < len(f.eigenvalues_) and np.abs(f.eigenvalues_[i]).max() < 1.0
            code = int(sum((s > 0) << (2 - b) for b, s in enumerate(f.readouts_[i])))
            ax.scatter(p[i, 0], p[i, 1], s=40, edgecolors=cmap(code), facecolors=cmap(code) if stable else "none")
        n_stable, n_patterns = attractors(f)
        ax.set_title(f"{mid}: {n_stable} stable, {n_patterns} patterns", fontsize=9)
        ax.set_xlabel("PC1")
    axes[0][0].set_ylabel("PC2")
    fig.suptitle("meta-model fixed points at each member's θ (x* = 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    from dynamo_dist.config import MetaConfig, PopulationConfig
    from dynamo_dist.data import store
    from dynamo_dist.data.tasks import load_task
    from dynamo_dist.meta.local import run_meta_local
    from dynamo_dist.meta.outputs import load_meta_run
    from dynamo_dist.population import user_models

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/flipflop", help="directory for the data, population, meta run and plots")
    ap.add_argument("--member-steps", type=int, default=600, help="training steps of each member")
    ap.add_argument("--meta-steps", type=int, default=META["steps"], help="meta-model training steps")
    ap.add_argument("--meta-hidden", type=int, default=META["hidden_size"], help="meta-model GRU hidden size")
    ap.add_argument("--embedding-dim", type=int, default=META["embedding_dim"], help="dimension of θ")
    ap.add_argument("--method", default="varpro", choices=["varpro", "paper"], help="meta.method")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    x, y = flipflop.make_data(1000, seed=0)
    np.savez(out / "flipflop.npz", x=x, y=y)
    task_name = f"npz:{(out / 'flipflop.npz').resolve()}"
    task = load_task(task_name)
    models = train_members(MEMBERS, task.base_train.x, task.base_train.y, args.member_steps)
    probe_x = task.probe.x[:100]
    base = {mid: attractors(base_fixed_points(m, probe_x)) for mid, m in models.items()}
    t_members = time.perf_counter() - t0

    root = str(out / "population")
    labels = {mid: {"cell": cell, "layers": layers, "seed": seed} for mid, (cell, layers, seed) in MEMBERS.items()}
    for mid, (cell, layers, _) in MEMBERS.items():  # one call per factory kwargs
        user_models.add_models(root, {mid: models[mid]}, task_name, cfg=PopulationConfig(root=root, num_probe=300,
                               num_test=100), labels={mid: labels[mid]}, group="flipflop", factory="flipflop:build",
                               factory_kwargs={"cell": cell, "layers": layers, "hidden": HIDDEN})
    rows = {r["model_id"]: r for r in store.manifest_rows(root)}

    recipe = {**META, "steps": args.meta_steps, "eval_every": args.meta_steps, "hidden_size": args.meta_hidden,
              "embedding_dim": args.embedding_dim, "method": args.method}
    summary = run_meta_local(MetaConfig(output_dir=str(out / "meta"), **recipe), root, progress=False)
    run = load_meta_run(out / "meta")
    t_meta = time.perf_counter() - t0 - t_members

    theta = dict(zip(run.model_ids, run.theta()))
    fits, meta = {}, {}
    for mid in run.model_ids:
        th = torch.as_tensor(theta[mid])
        f = meta_fixed_points(run.meta, th, task_name, probe_x)
        fits[mid] = (f, meta_visited_states(run.meta, th, probe_x, _full(probe_x)).numpy())
        meta[mid] = attractors(f)
    import pyarrow.parquet as pq
    per_model = {r["model_id"]: r for r in pq.read_table(out / "meta" / "model_metrics.parquet").to_pylist()}
    result = {
        "members": {mid: {"test_r2": rows[mid]["test_r2"], "base_stable": base[mid][0], "base_patterns": base[mid][1],
                          "meta_output_r2": per_model[mid]["output_r2"], "meta_hidden_r2": per_model[mid]["hidden_r2"],
                          "theta": [round(float(v), 3) for v in theta[mid]],
                          "meta_stable": meta[mid][0], "meta_patterns": meta[mid][1]} for mid in run.model_ids},
        "mean_output_r2": summary["mean_output_r2"], "mean_hidden_r2": summary["mean_hidden_r2"],
        "seconds": {"members": round(t_members, 1), "meta": round(t_meta, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "args": vars(args),
    }
    plots = [plot_theta(run, out / "theta.png"), plot_fixed_points(fits, out / "fixed_points.png")]
    result["plots"] = [str(p) for p in plots if p is not None]
    (out / "flipflop_result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
