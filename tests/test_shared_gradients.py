"""SharedGradients (meta/ray_train.py), the shared meta-model's data parallelism, in two real gloo
processes: gradients averaged as DistributedDataParallel averages them, a parameter no worker used
left without a gradient, one used on some workers averaged with zeros, rank 0's weights broadcast."""

import json

import torch
import torch.multiprocessing as mp
from servers import free_port


class _Heads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.core = torch.nn.Linear(3, 4)
        self.a, self.b, self.c = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)


def _loss(m: _Heads, rank: int) -> torch.Tensor:
    x = torch.arange(6.0).view(2, 3) * (rank + 1)
    h = torch.tanh(m.core(x))
    loss = m.a(h).pow(2).sum()
    if rank == 1:  # head b only on rank 1; head c on no rank
        loss = loss + m.b(h).sum()
    return loss


def _worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from dynamo_dist.meta.ray_train import SharedGradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different initial weights: the broadcast must make rank 0's the one
    m = _Heads()
    hook = SharedGradients(m, world=2)
    _loss(m, rank).backward()
    hook(None, (), {})
    rec = {"weights": [p.detach().tolist() for p in m.parameters()],
           "grads": [None if p.grad is None else p.grad.tolist() for p in m.parameters()]}
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(rec, f)
    dist.destroy_process_group()


def test_gradients_averaged_unused_left_alone_rank0_weights(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1]  # the same weights and gradients on both workers

    torch.manual_seed(0)
    ref = _Heads()  # rank 0's initial weights
    assert got[0]["weights"] == [p.detach().tolist() for p in ref.parameters()]
    per_rank = []
    for rank in range(2):
        ref.zero_grad(set_to_none=True)
        _loss(ref, rank).backward()
        per_rank.append({n: None if p.grad is None else p.grad.clone() for n, p in ref.named_parameters()})
    names = [n for n, _ in ref.named_parameters()]
    for name, grad in zip(names, got[0]["grads"]):
        g0, g1 = per_rank[0][name], per_rank[1][name]
        if name.startswith("c."):
            assert grad is None  # no worker used head c: AdamW must leave it alone
        else:
            zero = torch.zeros_like(g1)
            expected = ((g0 if g0 is not None else zero) + g1) / 2  # b: rank 1's gradient with rank 0's zeros
            torch.testing.assert_close(torch.tensor(grad), expected, rtol=1e-6, atol=1e-7)
