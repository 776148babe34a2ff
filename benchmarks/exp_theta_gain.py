"""Experiment (issue 27's next lever, not a default): theta also scales the meta GRU's hidden-to-hidden
product, gh = (W_hh h + b_hh) * (1 + U theta), U (3M, E) starting at 0, in a hand-written GRU loop.

In the paper's meta GRU theta enters only as W_ih theta, a per-model constant added to the gate
pre-activations; this gives each model a multiplicative say in the recurrence for 3 M E parameters.
One single-process run of the demo recipe (4 models a step, hidden 128, lr 2e-2, T = 0.25), final V
solve, test metrics; prints one JSON line. ``base`` is the same run with the fused ``nn.GRU``.

    python benchmarks/exp_theta_gain.py base 600 0 & python benchmarks/exp_theta_gain.py gain 600 0
"""
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynamo_dist import config
from dynamo_dist.meta import model as M
from dynamo_dist.meta.trainer import DynamoTrainer, load_population
from dynamo_dist.meta.metrics import evaluate

torch.set_num_threads(1)

variant, steps, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if variant == "gain":
    init0 = M.MetaRNN.__init__
    def init(self, *a, **k):
        init0(self, *a, **k)
        self.hh_gain = nn.Parameter(torch.zeros(3 * self.hidden_size, self.embedding_dim))
    def forward(self, x, theta_BE):
        u = self.encode(x)
        B, T = u.shape[:2]
        th = theta_BE[:, None, :].expand(-1, T, -1)
        c = self.cell
        gi = F.linear(torch.cat([u, th], -1), c.weight_ih_l0, c.bias_ih_l0)  # (B,T,3H)
        gain = 1 + F.linear(theta_BE, self.hh_gain)  # (B,3H)
        h = u.new_zeros(B, self.hidden_size)
        hs = []
        for t in range(T):
            gh = F.linear(h, c.weight_hh_l0, c.bias_hh_l0) * gain
            ir, iz, i_n = gi[:, t].chunk(3, -1)
            hr, hz, hn = gh.chunk(3, -1)
            r = torch.sigmoid(ir + hr); z = torch.sigmoid(iz + hz)
            n = torch.tanh(i_n + r * hn)
            h = (1 - z) * n + z * h
            hs.append(h)
        h_BTM = torch.stack(hs, 1)
        z_ = self._film(h_BTM, theta_BE[:, None, :])
        return [h_BTM], {g: head(z_) for g, head in self.heads.items()}
    M.MetaRNN.__init__ = init
    M.MetaRNN.forward = forward
    tw0 = M.MetaRNN.theta_weights
    M.MetaRNN.theta_weights = lambda self: [*tw0(self), self.hh_gain]
elif variant != "base":
    raise SystemExit(f"variant {variant!r}: base | gain")
cfg = config.recipe("demo").meta.replace(output_dir="/tmp/p27/o", steps=steps, seed=seed, eval_every=steps)
data = load_population("runs/demo/population")
tr = DynamoTrainer(cfg, data)
t = time.perf_counter()
tr.fit(steps)
sec = time.perf_counter() - t
tr.refit_maps()
m = evaluate(tr, "test")
out = {"variant": variant, "steps": steps, "seed": seed, "seconds": sec,
       "agreement": float(np.mean([v["agreement"] for v in m.values()])),
       "hidden_r2": float(np.mean([v["hidden_r2"] for v in m.values()]))}
print(json.dumps(out), flush=True)
