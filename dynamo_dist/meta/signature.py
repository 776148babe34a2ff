"""A deterministic, informative start for theta: the base models' functional signatures.

Algorithm 1 starts every theta_n at 0, so the meta-model must first learn to tell models
apart from nothing, and where theta ends up depends on the meta seed. Here each model's
signature is its outputs on a fixed set of probe inputs (the first ``num_examples`` of its
task's probe split, last step, log-softmax centred over classes for classifiers, raw for
regression), which are invariant to permutations and rotations of its hidden units; theta_n
starts at the signature's coordinates on the population's top-d principal components. Models
that decide alike start close, whatever the seed.

Plain torch; the population moments are sums, so sharded workers add theirs
(``all_reduce``) and every worker finds the same components.
Shape legend: N models, K examples, C classes, D signature length, E embedding dim d.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def output_signature(outputs_KTC: torch.Tensor, output_distance: str) -> torch.Tensor:
    """(K*C,) float64: the last step's outputs, as the output loss compares them (log-probabilities
    up to a constant for ``kl``, raw for ``mse``)."""
    last = outputs_KTC[:, -1].double()
    if output_distance == "kl":
        last = torch.log_softmax(last, dim=-1)
        last = last - last.mean(dim=-1, keepdim=True)
    return last.reshape(-1)


class SignatureSpace:
    """Where each task's block lies in a population-wide signature vector (models of different tasks
    have disjoint blocks: a model's signature is zero outside its own task's)."""

    def __init__(self, output_sizes: Mapping[str, int], examples: Mapping[str, int]):
        self.offsets: dict[str, int] = {}
        at = 0
        for task in sorted(output_sizes):
            self.offsets[task] = at
            at += int(examples[task]) * int(output_sizes[task])
        self.size = at

    def place(self, task: str, sig: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.size, dtype=torch.float64)
        out[self.offsets[task]:self.offsets[task] + sig.numel()] = sig
        return out


def principal_theta(signatures_ND: torch.Tensor, embedding_dim: int, scale: float,
                    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(N, E) float32: each signature's coordinates on the top-E principal components of the whole
    population's signatures, scaled so that the population's root-mean-square ||theta|| is ``scale``.

    ``all_reduce`` sums a tensor over the workers holding the other models (None: this is the
    whole population). Components are signed so that their largest entry is positive, so every
    worker, and every run, finds the same ones. Fewer than E informative directions leave the
    remaining coordinates at 0.
    """
    n, d = signatures_ND.shape
    moments = torch.cat([signatures_ND.sum(0), (signatures_ND.T @ signatures_ND).reshape(-1),
                         torch.tensor([float(n)], dtype=torch.float64)])
    if all_reduce is not None:
        moments = all_reduce(moments)
    total = float(moments[-1])
    mean = moments[:d] / max(total, 1.0)
    cov = moments[d:d + d * d].reshape(d, d) / max(total, 1.0) - torch.outer(mean, mean)
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)  # ascending
    k = min(embedding_dim, d)
    evals, evecs = evals.flip(0)[:k].clamp_min(0.0), evecs.flip(1)[:, :k]
    sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    evecs = evecs * torch.where(sign == 0, torch.ones_like(sign), sign)
    theta = torch.zeros(n, embedding_dim, dtype=torch.float64)
    captured = float(evals.sum())
    if captured > 1e-12 * max(float(torch.diagonal(cov).sum()), 1e-300):
        theta[:, :k] = (signatures_ND - mean) @ evecs * (scale / captured ** 0.5)
    return theta.float()
