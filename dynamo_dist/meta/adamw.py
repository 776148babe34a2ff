"""AdamW for the meta trainer, without ``torch.optim``.

``torch.optim.AdamW.step`` imports ``torch._dynamo`` on its first call (it marks a graph break for
``torch.compile``), and so does the first call of ``torch.optim.adamw.adamw``: ~2 s of every Ray
Train worker's start on 2 cores, paid before its first step, for a compiler the meta trainer never
uses. ``adamw_update`` is ``torch.optim.adam._single_tensor_adam`` with decoupled weight decay (the
path torch takes for CPU tensors), operation for operation, so it gives the same bits;
``AdamW`` is ``torch.optim.AdamW`` for one parameter group, with its ``state_dict`` format (a
checkpoint written by either loads into the other).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults
# torch.optim.AdamW's param-group keys (torch 2.14) beside lr, betas, eps, weight_decay and params
_GROUP_DEFAULTS = {"amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
                   "differentiable": False, "fused": None, "decoupled_weight_decay": True}


@torch.no_grad()
def adamw_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                 exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float,
                 betas: tuple[float, float] = BETAS, eps: float = EPS, weight_decay: float = 0.0) -> None:
    """One AdamW step of each parameter in place; ``steps`` are 0-dim float tensors, incremented."""
    beta1, beta2 = betas
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        step_size = lr / (1 - beta1 ** step)
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW:
    """``torch.optim.AdamW`` over one parameter group: ``param_groups[0]["lr"]`` is read at each step,
    ``zero_grad``, ``step`` (parameters without a gradient are skipped), ``state_dict`` /
    ``load_state_dict`` in torch's format, ``register_step_pre_hook``."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = BETAS,
                 eps: float = EPS, weight_decay: float = 1e-2):
        self.params = list(params)
        self.param_groups = [{"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                              **_GROUP_DEFAULTS, "params": self.params}]
        self.state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
        self._pre_hooks: list[Callable] = []

    def register_step_pre_hook(self, hook: Callable) -> None:
        """``hook(optimizer, args, kwargs)`` before every step, as torch calls it."""
        self._pre_hooks.append(hook)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def step(self) -> None:
        for hook in self._pre_hooks:
            hook(self, (), {})
        group = self.param_groups[0]
        live = [p for p in self.params if p.grad is not None]
        for p in live:
            if p not in self.state:
                self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.zeros_like(p)}
        st = [self.state[p] for p in live]
        adamw_update(live, [p.grad for p in live], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                     [s["step"] for s in st], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                     weight_decay=group["weight_decay"])

    def state_dict(self) -> dict:
        index = {p: i for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {index[p]: dict(s) for p, s in self.state.items()},
                "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"optimizer state: {len(groups)} parameter group(s) of "
                             f"{[len(g['params']) for g in groups]} parameters, this model has one group of "
                             f"{len(self.params)}")
        saved = groups[0]
        self.param_groups[0].update({k: v for k, v in saved.items() if k != "params"})
        self.param_groups[0]["betas"] = tuple(self.param_groups[0]["betas"])
        self.state = {}
        for i, s in state_dict["state"].items():
            p = self.params[saved["params"].index(int(i))]
            self.state[p] = {"step": s["step"].detach().clone().float().cpu(),
                             "exp_avg": s["exp_avg"].detach().to(dtype=p.dtype, device=p.device, copy=True),
                             "exp_avg_sq": s["exp_avg_sq"].detach().to(dtype=p.dtype, device=p.device, copy=True)}
