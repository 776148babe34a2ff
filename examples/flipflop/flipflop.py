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


def make_data(num: int, steps: int = 40, p_pulse: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, T, 3) float32 pulses in {-1, 0, 1}, y (N, T, 3) float32 the last pulse per channel)."""
    rng = np.random.default_rng(seed)
    pulses = rng.random((num, steps, BITS)) < p_pulse
    x = np.where(pulses, rng.choice([-1.0, 1.0], size=(num, steps, BITS)), 0.0).astype(np.float32)
    y = np.zeros_like(x)
    state = np.zeros((num, BITS), np.float32)
    for t in range(steps):
        state = np.where(x[:, t] != 0, x[:, t], state)
        y[:, t] = state
    return x, y


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
    return float(loss)
