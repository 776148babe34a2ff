"""Semi-supervised learning in model-embedding space (paper section 4.3, Fig. 7).

The trained meta-model is frozen and only theta is optimised, from theta = 0, to
minimise the cross-entropy of the meta-model's final-step output on a small labelled
set (disjoint from the test split). The iterates are kept for plotting.

Shape legend: B labelled examples, E embedding dim, S optimisation steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.tasks import Split
from .evaluate import accuracies


class SemiSupervisedTheta:
    """Optimise theta of a frozen meta-model on labelled examples.

    Parameters
    ----------
    num_steps : int -- optimiser iterates (the paper plots 100).
    lr : float -- Adam learning rate on theta.
    batch_size : int | None -- examples per step (None: the whole labelled set every step).
    init : array (E,) | None -- starting theta (default 0, as the paper).
    random_state : int | None -- minibatch order.

    Attributes (after ``fit``): theta_ (E,), path_ (S+1,E) iterates including the start,
    losses_ (S,), train_accuracy_ (accuracy on the labelled set at theta_).
    """

    def __init__(self, num_steps: int = 100, lr: float = 0.05, batch_size: int | None = None,
                 init: np.ndarray | None = None, random_state: int | None = None):
        self.num_steps = num_steps
        self.lr = lr
        self.batch_size = batch_size
        self.init = init
        self.random_state = random_state

    def fit(self, meta: torch.nn.Module, group: str, labelled: Split) -> "SemiSupervisedTheta":
        if len(labelled) == 0:
            raise ValueError("labelled: the labelled set is empty")
        if group not in meta.heads:
            raise ValueError(f"group: meta-model has heads {sorted(meta.heads)}, not {group!r}")
        dim = meta.embedding_dim
        start = np.zeros(dim) if self.init is None else np.asarray(self.init, dtype=np.float64)
        theta = torch.tensor(start, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=self.lr)
        rng = np.random.default_rng(self.random_state)
        was_training = meta.training
        flags = [p.requires_grad for p in meta.parameters()]
        meta.eval()  # frozen: no dropout/BN updates, no gradients into the meta-model
        for p in meta.parameters():
            p.requires_grad_(False)
        path, losses = [theta.detach().clone().numpy()], []
        try:
            n = len(labelled)
            for _ in range(self.num_steps):
                if self.batch_size is None or self.batch_size >= n:
                    idx = torch.arange(n)
                else:
                    idx = torch.from_numpy(rng.choice(n, size=self.batch_size, replace=False))
                x, y = labelled.x[idx], labelled.y[idx]
                _, outs = meta(x, theta[None].expand(x.shape[0], -1))
                loss = F.cross_entropy(outs[group][:, -1], y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                path.append(theta.detach().clone().numpy())
        finally:
            for p, f in zip(meta.parameters(), flags):
                p.requires_grad_(f)
            meta.train(was_training)
        self.theta_ = path[-1].astype(np.float64)
        self.path_ = np.array(path, dtype=np.float64)
        self.losses_ = np.array(losses)
        self.train_accuracy_ = float(accuracies(meta, self.theta_, group, labelled)[0])
        return self

    def score(self, meta: torch.nn.Module, group: str, split: Split) -> float:
        """Accuracy of the meta-model at ``theta_`` on ``split``."""
        return float(accuracies(meta, self.theta_, group, split)[0])
