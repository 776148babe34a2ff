"""Post-hoc embedding: place new base models into a trained model-embedding space.

The meta-model of a finished meta run is frozen; only theta_new and the state map V_new of
each new model are fitted on its probe trajectories, with the run's objective (same lambda
and distances) and recipe: ``paper`` starts theta at 0 and steps theta and V by AdamW;
``varpro`` starts theta at the trained theta that emulates the new model best and solves V
in closed form at every step, stepping theta alone. Seconds per model instead of retraining the
meta-model. The new models may live in another population root, as long as their inputs
have the run's sizes and their task is one of the run's output groups (heads).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data import fsio, lock, store
from ..zoo import ArchSpec, family_of, output_kind_of
from . import outputs
from .metrics import emulation_metrics
from .model import ModelEmbeddings, tap_widths
from .outputs import load_meta_run
from .objective import Chunk, dynamo_loss, refit_maps
from .trainer import VAL_FRACTION, cosine_factor, load_population


def _check_compatible(run_rows: list[dict], new_rows: list[dict], heads, run_dir: Path, root: str) -> None:
    ref = ArchSpec.from_row(run_rows[0])
    for r in new_rows:
        spec = ArchSpec.from_row(r)
        if (spec.input_kind, tuple(spec.input_shape), spec.vocab_size) != (ref.input_kind, tuple(ref.input_shape),
                                                                          ref.vocab_size):
            raise ValueError(f"model {r['model_id']!r} in {root} has inputs {spec.input_kind} {list(spec.input_shape)} "
                             f"vocab={spec.vocab_size}; the meta run {run_dir} was trained on {ref.input_kind} "
                             f"{list(ref.input_shape)} vocab={ref.vocab_size}")
        if family_of(r["arch"]) != family_of(run_rows[0]["arch"]):
            raise ValueError(f"model {r['model_id']!r} ({r['arch']}) is not of the meta run's family")
        if r["task"] not in heads:
            raise ValueError(f"model {r['model_id']!r} has task {r['task']!r}; the meta run {run_dir} has output "
                             f"groups {sorted(heads)}")
        if heads[r["task"]].out_features != int(r["num_classes"]):
            raise ValueError(f"model {r['model_id']!r} has {r['num_classes']} outputs; the meta run's head "
                             f"{r['task']!r} has {heads[r['task']].out_features}")


def embed_new_models(meta_output_dir: str | Path, population_root: str, model_ids: list[str] | None = None,
                     steps: int = 300, lr: float = 1e-2, batch_size: int | None = None,
                     seed: int = 0, progress: bool = False) -> dict[str, dict]:
    """Fit theta and V of ``model_ids`` (default: every complete model of ``population_root``).

    ``steps`` AdamW steps per model at learning rate ``lr`` (cosine-annealed like training),
    minibatches of ``batch_size`` probe sequences (default: the run's), drawn from the
    training part of the probe split. The meta-model is never updated.

    Returns ``{model_id: {"theta": list[float] (length d), "agreement", "hidden_r2",
    "meta_accuracy", "base_accuracy", "seconds"}}``: emulation metrics on the model's
    recorded test split (see ``metrics.py``), ``seconds`` the fitting time of that model.
    """
    run = load_meta_run(meta_output_dir)
    cfg = run.cfg
    meta = run.meta
    meta.eval()  # frozen: BatchNorm statistics of ResNet meta-models stay as trained
    meta.requires_grad_(False)
    data = load_population(population_root, model_ids)
    _check_compatible(run.rows, data.rows, meta.heads, run.output_dir, population_root)
    family = run.family
    base_dims = [tap_widths(family, data.hidden_shapes(m)) for m in data.model_ids]
    torch.manual_seed(seed)
    # only new theta/V beside the run's trained meta-model
    emb = ModelEmbeddings(data.model_ids, cfg.embedding_dim, meta.tap_dims, base_dims, family)
    bs = batch_size or cfg.batch_size
    # the run's recipe: varpro solves V_n (L2) and starts theta from the trained thetas
    varpro = cfg.method == "varpro" and cfg.hidden_distance == "l2"
    loss_kw = {"maps_ridge": cfg.maps_ridge, "normalize_hidden": True} if varpro else {}
    loss_kw["output_temperature"] = cfg.temperature
    candidates = _candidate_thetas(run, seed) if varpro else None
    out: dict[str, dict] = {}
    from tqdm.auto import tqdm

    for i, row in enumerate(tqdm(data.rows, desc="embed", unit="model", disable=not progress)):
        t0 = time.perf_counter()
        mid, task = row["model_id"], row["task"]
        traj, inputs = data.probe[mid], data.probe_inputs[task]
        n_train = int(len(inputs) * (1 - VAL_FRACTION)) or len(inputs)
        pool = np.arange(min(n_train, traj.num_examples))
        rng = np.random.default_rng([seed, i])

        def chunk_of(idx: torch.Tensor) -> Chunk:
            return Chunk(model_id=mid, row=i, group=task, x=inputs.x[idx], lengths=inputs.lengths[idx],
                         hiddens=[h[idx].float() for h in traj.hiddens], outputs=traj.outputs[idx].float(),
                         output_kind=output_kind_of(row))

        if varpro:  # theta starts at the trained theta that emulates this model best; V is solved, not stepped
            start_at_best(meta, emb, i, chunk_of(torch.from_numpy(pool[:bs])), candidates, cfg)
            params = [emb.theta[i]]
        else:
            params = [emb.theta[i], *emb.maps[i].parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * cosine_factor(step, steps)
            idx = torch.from_numpy(rng.choice(pool, size=min(bs, len(pool)), replace=False))
            loss, _ = dynamo_loss(meta, emb, [chunk_of(idx)], cfg.output_weight, cfg.hidden_distance,
                                  cfg.output_distance, **loss_kw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if varpro:  # V from the whole training split at the theta found, as the trained models' V are
            sel = torch.from_numpy(pool)
            refit_maps(meta, emb, i, inputs.x[sel], inputs.lengths[sel], [h[sel] for h in traj.hiddens])
        seconds = time.perf_counter() - t0
        test, test_in = data.test[mid], data.test_inputs[task]
        sel = torch.arange(test.num_examples)
        m = emulation_metrics(meta, emb, i, task, family, test_in.x[sel], test_in.lengths[sel], test_in.y[sel],
                              [h.float() for h in test.hiddens], test.outputs.float(), output_kind=output_kind_of(row))
        out[mid] = {"theta": emb.theta[i].detach().tolist(), **m, "seconds": seconds}
        emb.release([i])  # its leaves were this model's optimiser's; they need not stay
    return out


MAX_START_CANDIDATES = 64  # trained thetas tried as a new model's start: one forward pass each


def _candidate_thetas(run, seed: int) -> torch.Tensor:
    """(K, E): up to ``MAX_START_CANDIDATES`` of the run's trained thetas (a seeded sample beyond that)."""
    theta = run.embeddings.theta_matrix().cpu().numpy()
    if len(theta) > MAX_START_CANDIDATES:
        theta = theta[np.sort(np.random.default_rng(seed).choice(len(theta), MAX_START_CANDIDATES, replace=False))]
    return torch.from_numpy(theta)


@torch.no_grad()
def start_at_best(meta, emb: ModelEmbeddings, row: int, chunk: Chunk, candidates: torch.Tensor, cfg) -> None:
    """Set theta of ``row`` to the candidate whose projected loss on ``chunk`` is lowest (V solved for
    each, the winner's V kept): a start near the models this one computes like, whatever seed."""
    best, best_loss, best_maps = None, float("inf"), None
    for theta in candidates:
        emb.theta_table[row].copy_(theta)
        emb.steps[row, 1:] = 0  # every candidate's V from a plain solve, not the previous candidate's
        loss, _ = dynamo_loss(meta, emb, [chunk], cfg.output_weight, cfg.hidden_distance, cfg.output_distance,
                              maps_ridge=cfg.maps_ridge, normalize_hidden=True, output_temperature=cfg.temperature)
        if float(loss) < best_loss:
            best, best_loss = theta, float(loss)
            best_maps = [p.detach().clone() for p in emb.parameters_of(row)[1:]]
    emb.theta_table[row].copy_(best)
    for p, v in zip(emb.parameters_of(row)[1:], best_maps):
        p.copy_(v)
    emb.steps[row, 1:] = 1


def nearest_trained(theta_new: np.ndarray, theta_trained: np.ndarray, trained_ids: list[str]) -> list[tuple[str, float]]:
    """For each new theta (rows of ``theta_new``), the closest trained model and the Euclidean distance."""
    d_NM = np.linalg.norm(theta_new[:, None, :] - theta_trained[None, :, :], axis=-1)
    j = d_NM.argmin(axis=1)
    return [(trained_ids[k], float(d_NM[i, k])) for i, k in enumerate(j)]


def run_posthoc(meta_output_dir: str | Path, population_root: str, model_ids: list[str] | None = None,
                steps: int = 300, out_dir: str | Path | None = None, seed: int = 0, progress: bool = False) -> Path:
    """Embed new models (``embed_new_models``) and write the result beside the meta run.

    ``<out_dir>`` (default ``<meta run>/posthoc``) gets ``embeddings.parquet`` -- one row per
    new model: theta, manifest labels, emulation metrics, and the nearest trained model in
    theta space (its id, group and distance) -- merged by model_id with earlier post-hoc
    rows, and ``embedding_pca.png``: the new models among the trained ones in the trained
    space's PCA plane. Returns the parquet path. The meta run itself is never modified.
    """
    outputs.check_meta_run(meta_output_dir)  # before any directory is created for its outputs
    out = fsio.as_path(out_dir) if out_dir is not None else outputs.posthoc_dir(meta_output_dir)
    with lock.hold(meta_output_dir, "embed", shared=True, what="meta run directory"), \
            lock.hold(out, "embed", what="post-hoc output directory"):
        return _embed_and_write(meta_output_dir, population_root, model_ids, steps, out, seed, progress)


def _embed_and_write(meta_output_dir, population_root: str, model_ids, steps: int, out: fsio.AnyPath, seed: int,
                     progress: bool) -> fsio.AnyPath:
    import pyarrow as pa

    results = embed_new_models(meta_output_dir, population_root, model_ids, steps=steps, seed=seed, progress=progress)
    meta_dir = fsio.as_path(meta_output_dir)  # embed_new_models has loaded and checked the run; only its embeddings are needed
    trained = outputs.read_embeddings(meta_dir).to_pylist()
    trained_ids = [r["model_id"] for r in trained]
    theta_trained = np.array([r["theta"] for r in trained], dtype=np.float64)
    new_ids = sorted(results)
    near = nearest_trained(np.array([results[m]["theta"] for m in new_ids]), theta_trained, trained_ids)
    group_of = {r["model_id"]: r.get("group") for r in trained}
    extra = {m: {**{k: v for k, v in results[m].items() if k != "theta"}, "nearest_model": n,
                 "nearest_group": group_of[n], "nearest_distance": dist} for m, (n, dist) in zip(new_ids, near)}
    table = outputs.embeddings_table([{"model_id": m, "theta": results[m]["theta"]} for m in new_ids],
                             store.manifest_rows(population_root))
    rows = [{**r, **extra[r["model_id"]]} for r in table.to_pylist()]
    path = out / "embeddings.parquet"
    if path.is_file():  # keep earlier post-hoc models; a re-embedded model's row is replaced
        replaced = set(new_ids)
        rows = [r for r in store.read_parquet(path, "post-hoc embeddings").to_pylist()
                if r["model_id"] not in replaced] + rows
    rows.sort(key=lambda r: r["model_id"])
    keys = list(dict.fromkeys(k for r in rows for k in r))
    merged = outputs.theta_as_float32_list(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]))
    with fsio.staged(out, last=("embeddings.parquet",)) as local:  # a bucket gets both files, the table last
        store.write_table_atomic(merged, local / "embeddings.parquet")
        try:
            from ..plots import posthoc_pca_plot

            posthoc_pca_plot(theta_trained, [group_of[m] for m in trained_ids],
                             np.array([r["theta"] for r in rows], dtype=np.float64), [r["model_id"] for r in rows],
                             local / "embedding_pca.png")
        except ImportError:  # matplotlib is optional for the core path
            pass
    return path


__all__ = ["embed_new_models", "run_posthoc", "nearest_trained"]
