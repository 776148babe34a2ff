"""Running the meta-model at arbitrary embeddings theta (not only the base models' theta_n).

The decision of a model is its output at the final step: inputs are left-padded, so the
last step is always real (RNNs); ResNets have one output "step".

Shape legend: K embeddings, E embedding dim, B examples, C classes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.tasks import Split


@torch.no_grad()
def final_logits(meta: torch.nn.Module, theta_KE: torch.Tensor, group: str, x: torch.Tensor,
                 batch_size: int = 4096) -> torch.Tensor:
    """Logits (K,B,C) of head ``group`` at the final step for every theta_k on every input.

    Several thetas share one forward pass (inputs repeated) so that a grid of thetas
    runs in large batches.
    """
    meta.eval()
    theta = torch.as_tensor(np.asarray(theta_KE), dtype=torch.float32)
    if theta.ndim == 1:
        theta = theta[None]
    k, b = theta.shape[0], x.shape[0]
    if group not in meta.heads:
        raise ValueError(f"group: meta-model has heads {sorted(meta.heads)}, not {group!r}")
    per_call = max(1, batch_size // max(b, 1))
    out = []
    for s in range(0, k, per_call):
        th = theta[s:s + per_call]
        if b <= batch_size:
            xs = x.repeat((th.shape[0],) + (1,) * (x.ndim - 1))
            _, outs = meta(xs, th.repeat_interleave(b, dim=0))
            out.append(outs[group][:, -1].reshape(th.shape[0], b, -1))
        else:  # more inputs than a batch: one theta at a time, inputs in slices
            for t in th:
                parts = [meta(x[i:i + batch_size], t[None].expand(min(batch_size, b - i), -1))[1][group][:, -1]
                         for i in range(0, b, batch_size)]
                out.append(torch.cat(parts)[None])
    return torch.cat(out)


def accuracies(meta: torch.nn.Module, theta_KE, group: str, split: Split, batch_size: int = 4096) -> np.ndarray:
    """Accuracy (K,) of the meta-model at each theta on ``split`` (its labels)."""
    logits = final_logits(meta, theta_KE, group, split.x, batch_size)
    return (logits.argmax(-1) == split.y[None]).double().mean(dim=1).numpy()


def base_accuracy(outputs_BTC: torch.Tensor, labels_B: torch.Tensor) -> float:
    """A base model's accuracy from its recorded outputs (final step) on the same inputs."""
    n = outputs_BTC.shape[0]
    return float((outputs_BTC[:, -1].argmax(-1) == labels_B[:n]).double().mean())
