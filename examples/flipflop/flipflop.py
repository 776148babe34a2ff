"""The 3-bit flip-flop task (Sussillo & Barak 2013) and a user's own GRU/LSTM population, in plain PyTorch.

Three input channels carry rare +1/-1 pulses; output channel k holds the sign of the last pulse on input k
(0 before the first). A network that solves it must store 3 bits: 8 stable fixed points under zero input.
This file is what a user writes in their own code: data, model class, factory, training loop. dynamo_dist
sees only the saved arrays, the safetensors state dicts and ``architecture.json`` naming ``build``.

Shape legend: N examples, T steps, K = 3 bits, H hidden units.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

BITS = 3


def make_data(num: int, steps: int = 40, p_pulse: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, T, 3) float32 pulses in {-1, 0, 1}, y (N, T, 3) float32 the last pulse per channel).

    ``p_pulse``: chance of a pulse per channel and step. Frequent pulses make a network answer each pulse
    the same way whenever it comes, so between pulses its state must return to one point per memory: an
    attractor. With rare ones (0.05) a 24-unit GRU held the bits by slow drift instead (eigenvalues
    0.98-0.999, the drifting memories merging after ~1,000 steps): docs/user-models.md.
    """
    rng = np.random.default_rng(seed)
    pulses = rng.random((num, steps, BITS)) < p_pulse
    x = np.where(pulses, rng.choice([-1.0, 1.0], size=(num, steps, BITS)), 0.0).astype(np.float32)
    y = np.zeros_like(x)
    state = np.zeros((num, BITS), np.float32)
    for t in range(steps):
        state = np.where(x[:, t] != 0, x[:, t], state)
        y[:, t] = state
    return x, y


def sign_patterns() -> np.ndarray:
    """The 8 memories the task stores, (8, 3) in {-1, 1}: one per sign pattern of the 3 bits."""
    return np.array([[1.0 if (k >> (BITS - 1 - b)) & 1 else -1.0 for b in range(BITS)] for k in range(2 ** BITS)],
                    np.float32)


def pulse_patterns(hold: int = 40, gap: int = 5) -> np.ndarray:
    """(8, 2 * gap + 1 + hold, 3): each sign pattern set channel by channel (a pulse on channel k at step
    k * gap, as the task's data set them), then ``hold`` steps of no input. A network that solves the task
    ends each sequence next to the attractor that stores that pattern."""
    x = np.zeros((2 ** BITS, (BITS - 1) * gap + 1 + hold, BITS), np.float32)
    for k in range(BITS):
        x[:, k * gap, k] = sign_patterns()[:, k]
    return x


class FlipFlopRNN(nn.Module):
    """A GRU or LSTM of ``layers`` layers with a linear readout at every step."""

    def __init__(self, cell: str = "gru", layers: int = 1, hidden: int = 24):
        super().__init__()
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](BITS, hidden, num_layers=layers, batch_first=True)
        self.readout = nn.Linear(hidden, BITS)

    def forward(self, x):
        return self.readout(self.rnn(x)[0])


def build(cell: str = "gru", layers: int = 1, hidden: int = 24) -> nn.Module:
    """The factory architecture.json names: ``{"factory": "flipflop:build", "kwargs": {...}}``."""
    return FlipFlopRNN(cell, layers, hidden)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 600, batch: int = 128,
          lr: float = 1e-2, seed: int = 0) -> float:
    """A plain Adam loop on MSE; returns the last batch's loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return float(loss.detach())
