"""Emulation metrics: how well the meta-model at theta_n reproduces base model n.

* ``agreement``: fraction of examples where argmax of the meta output at the final step
  equals argmax of the base output (the classification decision);
* ``hidden_r2``: 1 - SSE/SST of V_n(h_meta) against the base hidden states, pooled over
  valid steps/positions and units (SST around the per-unit mean);
* ``meta_accuracy`` / ``base_accuracy``: accuracy of each against the true labels.

Regression models (real-valued outputs, ``output_kind`` "regression") have no decision to agree
on; in place of ``agreement`` and the accuracies they get

* ``output_r2``: 1 - SSE/SST of the meta outputs against the base model's outputs, pooled over
  valid steps and outputs (SST around each output's mean): the regression agreement measure;
* ``output_mse``: the mean squared difference of those outputs (what the output loss compares).

``summarize`` averages each metric over the models that have it.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import family as families
from ..zoo import output_kind_of
from .objective import sequence_rows


@torch.no_grad()
def emulation_metrics(meta, embeddings, row: int, group: str, family: str, x: torch.Tensor, lengths: torch.Tensor,
                      labels: torch.Tensor | None, base_hiddens: list[torch.Tensor], base_outputs: torch.Tensor,
                      batch_size: int = 512, output_kind: str = "classification") -> dict[str, float]:
    """Metrics of one model on one split (inputs aligned with its trajectories); ``output_kind``
    "regression": ``output_r2``/``output_mse`` in place of agreement and accuracies (``labels`` unused).

    Inputs and trajectories stay on the host; each batch goes to the device of the embeddings,
    and only scalars come back (float32 throughout, whatever ``meta.precision`` trained with).
    """
    meta.eval()
    n = base_outputs.shape[0]
    sse = np.zeros(len(base_hiddens))
    sums = [None] * len(base_hiddens)
    sumsq = np.zeros(len(base_hiddens))
    counts = np.zeros(len(base_hiddens))
    agree = correct_meta = correct_base = 0
    out_sse = out_sum = out_sumsq = out_count = 0.0
    regression = output_kind == "regression"
    theta = embeddings.theta[row].detach()
    device = theta.device
    fam = families.get(family)
    for s in range(0, n, batch_size):
        sl = slice(s, min(s + batch_size, n))
        xb, lb = x[sl].to(device), lengths[sl].to(device)
        hs, outs = meta(xb, theta[None].expand(xb.shape[0], -1))
        mapped = embeddings.apply_maps(row, hs)
        for t, (p, b) in enumerate(zip(mapped, base_hiddens)):
            b = b[sl].to(device)
            m = fam.step_mask(lb, b.shape[1])
            p, b = fam.state_rows(p, m), fam.state_rows(b, m)  # (valid steps or positions, H)
            sse[t] += float((p - b).pow(2).sum())
            sums[t] = b.sum(0) if sums[t] is None else sums[t] + b.sum(0)
            sumsq[t] += float(b.pow(2).sum())
            counts[t] += b.shape[0]
        if regression:
            m = fam.step_mask(lb, base_outputs.shape[1])
            p = sequence_rows(outs[group].float(), m)  # (valid steps, C)
            b = sequence_rows(base_outputs[sl].to(device), m)
            out_sse += float((p - b).pow(2).sum())
            out_sum = out_sum + b.sum(0)
            out_sumsq += float(b.pow(2).sum())
            out_count += b.shape[0]
            continue
        pred = outs[group][:, -1].argmax(-1).cpu()
        base = base_outputs[sl, -1].argmax(-1)
        agree += int((pred == base).sum())
        if labels is not None:
            correct_meta += int((pred == labels[sl]).sum())
            correct_base += int((base == labels[sl]).sum())
    sst = np.array([sq - float(sm.pow(2).sum()) / c for sq, sm, c in zip(sumsq, sums, counts)])
    r2 = 1.0 - sse.sum() / max(sst.sum(), 1e-12)
    if regression:
        out_sst = out_sumsq - float(out_sum.pow(2).sum()) / out_count
        return {"output_r2": 1.0 - out_sse / max(out_sst, 1e-12), "hidden_r2": float(r2),
                "output_mse": out_sse / (out_count * base_outputs.shape[-1])}
    out = {"agreement": agree / n, "hidden_r2": float(r2)}
    if labels is not None:
        out["meta_accuracy"] = correct_meta / n
        out["base_accuracy"] = correct_base / n
    return out


def evaluate(trainer, split: str = "test") -> dict[str, dict[str, float]]:
    """Per-model metrics on ``test`` (recorded test split, every model) or ``val`` (held-out probe
    tail of the trainer's fixed validation sample of models, ``trainer.val_rows``)."""
    if split not in ("test", "val"):
        raise ValueError(f"split: expected 'test' or 'val', got {split!r}")
    data = trainer.data
    results = {}
    rows = range(len(data.rows)) if split == "test" else trainer.val_rows
    for i in rows:
        row = data.rows[i]
        mid, task = row["model_id"], row["task"]
        if split == "test":
            inputs, traj = data.test_inputs[task], data.test[mid]
            idx = torch.arange(traj.num_examples)
            labels = inputs.y[idx]
        else:
            traj = data.probe[mid]
            idx = torch.from_numpy(trainer.val_split(task))
            idx = idx[idx < traj.num_examples]
            inputs, labels = data.probe_inputs[task], None  # the probe set is unlabelled
        if len(idx) == 0:
            continue
        results[mid] = emulation_metrics(
            trainer.meta, trainer.embeddings, i, task, data.family,
            inputs.x[idx], inputs.lengths[idx], labels, [h[idx].float() for h in traj.hiddens], traj.outputs[idx].float(),
            output_kind=output_kind_of(row))
    return results


def summarize(per_model: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over models, keys prefixed ``mean_``."""
    if not per_model:
        return {}
    keys = dict.fromkeys(k for m in per_model.values() for k in m)  # classifiers' and regressions' keys, in order
    return {f"mean_{k}": float(np.mean([m[k] for m in per_model.values() if k in m])) for k in keys}
