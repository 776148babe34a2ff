"""The meta-model's hand-written GRU (``meta/gru.py``) against ``nn.GRU``: states and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynamo_dist import zoo
from dynamo_dist.meta.gru import _GRUSequence, gru_sequence, gru_step
from dynamo_dist.meta.model import MetaRNN


def _reference(cell: nn.GRU, u: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return cell(torch.cat([u, theta[:, None, :].expand(-1, u.shape[1], -1)], dim=-1))[0]


def _grads(fn, cell, u, theta, weight):
    out = fn(cell, u, theta)
    leaves = [t for t in (u, theta) if t.requires_grad] + list(cell.parameters())
    return out, torch.autograd.grad((out * weight).sum(), leaves)


@pytest.mark.parametrize("D", [1, 3])  # 1: one input feature (MNIST-1D), its own product
@pytest.mark.parametrize("u_grad", [False, True])  # True: token embeddings, whose gradient flows through u
def test_states_and_every_gradient_equal_nn_gru(u_grad, D):
    torch.manual_seed(0)
    B, T, E, H = 6, 9, 4, 7
    cell = nn.GRU(D + E, H, batch_first=True).double()
    with torch.no_grad():  # biases away from 0, so that a dropped bias term shows
        for p in cell.parameters():
            p.mul_(3)
    u = torch.randn(B, T, D, dtype=torch.float64, requires_grad=u_grad)
    theta = torch.randn(B, E, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(B, T, H, dtype=torch.float64)  # a loss that reads every state
    ref_out, ref_grads = _grads(_reference, cell, u, theta, weight)
    out, grads = _grads(gru_sequence, cell, u, theta, weight)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    assert len(grads) == len(ref_grads) == (6 if u_grad else 5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


def _loop(cell, u, theta, w_gain):
    h, out = u.new_zeros(u.shape[0], cell.hidden_size), []
    for t in range(u.shape[1]):
        h = gru_step(cell, u[:, t], theta, h, w_gain)
        out.append(h)
    return torch.stack(out, dim=1)


def test_theta_gain_states_and_gradients_equal_the_step_by_step_loop():
    """With theta scaling the recurrence, the fused pass equals ``gru_step`` applied T times (autograd)."""
    torch.manual_seed(4)
    B, T, D, E, H = 5, 8, 2, 3, 6
    cell = nn.GRU(D + E, H, batch_first=True).double()
    w_gain = (0.5 * torch.randn(3 * H, E, dtype=torch.float64)).requires_grad_()
    u = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(B, E, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(B, T, H, dtype=torch.float64)
    leaves = [u, theta, w_gain, *cell.parameters()]
    ref = _loop(cell, u, theta, w_gain)
    ref_grads = torch.autograd.grad((ref * weight).sum(), leaves)
    out = gru_sequence(cell, u, theta, w_gain)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    # the gain is not a no-op: at w_gain = 0 the states differ
    assert (out - gru_sequence(cell, u, theta, torch.zeros_like(w_gain))).abs().max() > 1e-2
    # and with w_gain = 0 the loop is nn.GRU itself
    torch.testing.assert_close(_loop(cell, u, theta, torch.zeros_like(w_gain)), _reference(cell, u, theta))


def test_gradcheck():
    torch.manual_seed(1)
    B, T, D, E, H = 3, 5, 2, 2, 4
    args = [torch.randn(B, T, D, dtype=torch.float64, requires_grad=True),
            torch.randn(B, E, dtype=torch.float64, requires_grad=True),
            torch.randn(3 * H, D + E, dtype=torch.float64, requires_grad=True),
            torch.randn(3 * H, H, dtype=torch.float64, requires_grad=True),
            torch.randn(3 * H, dtype=torch.float64, requires_grad=True),
            torch.randn(3 * H, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(_GRUSequence.apply, args)
    gain = torch.randn(3 * H, E, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GRUSequence.apply, [*args, gain])


def test_meta_rnn_takes_the_hand_written_path_and_matches_the_module():
    """MetaRNN's states, outputs and parameter gradients equal those of its own ``nn.GRU`` run the usual way."""
    torch.manual_seed(2)
    spec = zoo.ArchSpec(arch="gru", input_kind="sequence", input_shape=(11, 2), num_classes=3, hidden_size=5)
    meta = MetaRNN(spec, hidden_size=16, embedding_dim=3, output_sizes={"t": 3}, theta_readout=True)
    x, theta = torch.randn(4, 11, 2), torch.randn(4, 3, requires_grad=True)
    calls = []
    hook = _GRUSequence.forward
    try:
        _GRUSequence.forward = staticmethod(lambda *a: calls.append(1) or hook(*a))
        hs, ys = meta(x, theta)
    finally:
        _GRUSequence.forward = hook
    assert calls, "MetaRNN.forward did not use the hand-written GRU on the CPU"
    ref = _reference(meta.cell, x, theta)
    torch.testing.assert_close(hs[0], ref, rtol=1e-5, atol=1e-6)
    loss = ys["t"].square().sum() + hs[0].sum()
    grads = torch.autograd.grad(loss, [theta, *meta.parameters()])
    z = meta._film(ref, theta[:, None, :])
    ref_loss = meta.heads["t"](z).square().sum() + ref.sum()
    ref_grads = torch.autograd.grad(ref_loss, [theta, *meta.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_falls_back_to_the_module_under_autocast():
    torch.manual_seed(3)
    cell = nn.GRU(5, 6, batch_first=True)
    u, theta = torch.randn(2, 4, 3), torch.randn(2, 2)
    calls = []
    hook = _GRUSequence.forward
    try:
        _GRUSequence.forward = staticmethod(lambda *a: calls.append(1) or hook(*a))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gru_sequence(cell, u, theta)
    finally:
        _GRUSequence.forward = hook
    assert not calls  # nn.GRU itself ran (autocast decides its precision)
    torch.testing.assert_close(out.float(), _reference(cell, u, theta), rtol=0.05, atol=0.05)


def test_a_checkpoint_resumes_only_with_the_same_recurrence_gain(tmp_path):
    """A run written before theta_gain (no gain weights) is refused by a config with the gain, with the fix named;
    set meta.theta_gain=false and it resumes."""
    from dynamo_dist import config
    from dynamo_dist.meta import checkpoint

    cfg = config.recipe("demo").meta.replace(output_dir=str(tmp_path))
    assert cfg.theta_gain  # the demo recipe's
    shared = {"config": {k: getattr(cfg, k) for k in checkpoint.SHAPE_FIELDS}, "model_ids": ["a", "b"],
              "meta": {"cell.weight_hh_l0": torch.zeros(3, 1)}}
    with pytest.raises(ValueError, match="without theta's recurrence gain.*meta.theta_gain"):
        checkpoint.check_compatible(shared, cfg, ["a", "b"], "ckpt")
    checkpoint.check_compatible(shared, cfg.replace(theta_gain=False), ["a", "b"], "ckpt")
    shared["meta"]["recurrence_gain"] = torch.zeros(3, 2)
    checkpoint.check_compatible(shared, cfg, ["a", "b"], "ckpt")
    with pytest.raises(ValueError, match="with theta's recurrence gain"):
        checkpoint.check_compatible(shared, cfg.replace(theta_gain=False), ["a", "b"], "ckpt")
    # a meta-ResNet has no recurrence: nothing to compare
    checkpoint.check_compatible({**shared, "meta": {"stem.weight": torch.zeros(1)}}, cfg, ["a", "b"], "ckpt")


def test_runs_written_before_theta_gain_load_without_it(tmp_path):
    """``outputs.run_config`` reads a config file without the field as the model it trained: no gain."""
    import yaml

    from dynamo_dist import config
    from dynamo_dist.meta import outputs

    cfg = config.recipe("demo").meta
    written = cfg.model_dump(mode="json", exclude={"theta_gain"})
    (tmp_path / outputs.CONFIG_FILE).write_text(yaml.safe_dump(written))
    assert outputs.run_config(tmp_path).theta_gain is False
    (tmp_path / outputs.CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert outputs.run_config(tmp_path).theta_gain is True
