"""The meta-model's one-layer GRU over a whole sequence, with a hand-written backward pass (CPU).

``nn.GRU`` on the CPU runs the recurrence as a chain of small ATen ops and autograd records every
one of them. On the demo's shapes (128 sequences of 40 steps, 128 units, one thread) its matrix
products run near this CPU's peak, yet they are well under half of a forward and backward pass:
the rest is per-step glue (the gates' ``chunk`` and its backward ``cat``, the output ``stack``, a
dozen elementwise nodes and their allocations). Here the forward and backward passes are two loops over
time that write into preallocated (T, B, 3H) buffers, the backward keeps only what it needs (the
gates after their nonlinearities and W_hh h + b_hh), and the weight gradients are a few large
products at the end. Same equations and parameters as ``nn.GRU``
(``weight_ih_l0`` etc., gates in r, z, n order), h_0 = 0:

    r = sigma(W_ir x + b_ir + W_hr h + b_hr)
    z = sigma(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

The input is split in a per-step part u (B, T, D) and a per-sequence part theta (B, E) that the
meta-model feeds at every step, so theta's input product is computed once a sequence, not T
times. With ``w_gain`` (``meta.theta_gain``) theta also scales the hidden-to-hidden product:
W_hh h + b_hh becomes (W_hh h + b_hh) * (1 + w_gain theta) in all three gates.

``gru_sequence`` falls back to the module itself on CUDA without a gain (cuDNN's fused kernel is
the fast path there), and to it or a step-by-step loop under autocast. Checked against ``nn.GRU`` and the
step-by-step loop (states and every gradient) and by ``torch.autograd.gradcheck`` in
``tests/test_gru.py``; timed in ``benchmarks/bench_gru.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _tanh_(a: torch.Tensor) -> torch.Tensor:
    """tanh in place as 2 sigmoid(2a) - 1: ATen's CPU tanh is ~3x its sigmoid here."""
    return a.mul_(2).sigmoid_().mul_(2).sub_(1)


class _GRUSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u_BTD, theta_BE, w_ih, w_hh, b_ih, b_hh, w_gain=None):
        B, T, D = u_BTD.shape
        H = w_hh.shape[1]
        u_flat = u_BTD.transpose(0, 1).reshape(T * B, D)
        # input side (T, B, 3H): u's product at every step, theta's (with b_ih) once a sequence
        # (one input feature, as MNIST-1D: a broadcast product, ~6x faster here than a K = 1 matrix product)
        gi = u_flat * w_ih[:, 0] if D == 1 else u_flat @ w_ih[:, :D].t()
        gi = gi.view(T, B, 3 * H).add_(torch.addmm(b_ih, theta_BE, w_ih[:, D:].t()))
        w_hh_t = w_hh.t()
        gain = None if w_gain is None else 1 + theta_BE @ w_gain.t()  # (B, 3H), once a sequence
        states = u_BTD.new_zeros(T + 1, B, H)  # states[t] = h_t
        gates = u_BTD.new_empty(T, B, 3 * H)  # r, z, n after their nonlinearities
        gh = u_BTD.new_empty(T, B, 3 * H)  # W_hh h + b_hh, before the gain (its n block is what r multiplies)
        for t in range(T):
            h, g, a = states[t], gates[t], gh[t]
            torch.addmm(b_hh, h, w_hh_t, out=a)
            if gain is not None:
                a = a * gain
            torch.add(gi[t, :, :2 * H], a[:, :2 * H], out=g[:, :2 * H]).sigmoid_()
            n = g[:, 2 * H:]
            _tanh_(torch.addcmul(gi[t, :, 2 * H:], g[:, :H], a[:, 2 * H:], out=n))
            torch.addcmul(n, g[:, H:2 * H], h - n, out=states[t + 1])  # h' = n + z (h - n)
        ctx.save_for_backward(u_flat, theta_BE, w_ih, w_hh, states, gates, gh, w_gain, gain)
        ctx.shape = (B, T, D, H)
        return states[1:].transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, dout_BTH):
        u_flat, theta_BE, w_ih, w_hh, states, gates, gh, w_gain, gain = ctx.saved_tensors
        B, T, D, H = ctx.shape
        dout = dout_BTH.transpose(0, 1).contiguous()
        dpre = dout.new_empty(T, B, 3 * H)  # d(pre-activation) of r and z; d(r * gh_n) in the n block
        dn_in = dout.new_empty(T, B, H)  # d(pre-activation) of n: the input side's n block
        # d(W_hh h + b_hh): dpre itself without a gain, dpre * gain with one
        draw = dpre if gain is None else dout.new_empty(T, B, 3 * H)
        dgain = None if gain is None else dout.new_zeros(B, 3 * H)  # sum over t of dpre * (W_hh h + b_hh)
        dh = dout.new_zeros(B, H)
        for t in reversed(range(T)):
            dh.add_(dout[t])
            h, g, e, dn = states[t], gates[t], dpre[t], dn_in[t]
            r, z, n = g[:, :H], g[:, H:2 * H], g[:, 2 * H:]
            torch.mul(dh, 1 - z, out=dn).mul_(1 - n * n)
            torch.mul(dn, r, out=e[:, 2 * H:])
            ghn = gh[t, :, 2 * H:] if gain is None else gh[t, :, 2 * H:] * gain[:, 2 * H:]
            torch.mul(dn, ghn, out=e[:, :H]).mul_(r - r * r)  # r (1 - r)
            torch.mul(dh, h - n, out=e[:, H:2 * H]).mul_(z - z * z)  # z (1 - z)
            if gain is not None:
                dgain.addcmul_(e, gh[t])
                torch.mul(e, gain, out=draw[t])
            dh = torch.addmm(dh * z, draw[t], w_hh)
        grad = draw.view(T * B, 3 * H)
        rz, dn_flat = dpre.view(T * B, 3 * H)[:, :2 * H], dn_in.view(T * B, H)
        per_seq = dpre[:, :, :2 * H].sum(0)  # (B, 2H): theta and b_ih meet every step alike
        per_seq = torch.cat([per_seq, dn_in.sum(0)], dim=1)
        needs = ctx.needs_input_grad
        du = dtheta = dw_ih = dw_hh = db_ih = db_hh = dw_gain = None
        if needs[0]:
            w_iu = w_ih[:, :D]
            du = torch.addmm(rz @ w_iu[:2 * H], dn_flat, w_iu[2 * H:]).view(T, B, D).transpose(0, 1)
        if needs[1]:
            dtheta = per_seq @ w_ih[:, D:]
            if gain is not None:
                dtheta = dtheta + dgain @ w_gain
        if needs[2]:
            dw_ih = torch.cat([torch.cat([(u_flat.t() @ rz).t(), (u_flat.t() @ dn_flat).t()]),
                               per_seq.t() @ theta_BE], dim=1)
        if needs[3]:
            dw_hh = (states[:-1].reshape(T * B, H).t() @ grad).t()
        if needs[4]:
            db_ih = per_seq.sum(0)
        if needs[5]:
            db_hh = grad.sum(0)
        if len(needs) > 6 and needs[6]:
            dw_gain = dgain.t() @ theta_BE
        return du, dtheta, dw_ih, dw_hh, db_ih, db_hh, dw_gain


def gru_step(cell: nn.GRU, x_BD: torch.Tensor, theta_BE: torch.Tensor, h_BH: torch.Tensor,
             w_gain: torch.Tensor | None = None) -> torch.Tensor:
    """One step of ``cell`` fed ``[x; theta]`` from ``h``, with the theta gain of the recurrence when given."""
    if w_gain is None:
        return cell(torch.cat([x_BD, theta_BE], dim=-1)[:, None, :], h_BH[None])[0][:, 0]
    H = cell.hidden_size
    gi = F.linear(torch.cat([x_BD, theta_BE], dim=-1), cell.weight_ih_l0, cell.bias_ih_l0)
    gh = F.linear(h_BH, cell.weight_hh_l0, cell.bias_hh_l0) * (1 + F.linear(theta_BE, w_gain))
    r = torch.sigmoid(gi[..., :H] + gh[..., :H])
    z = torch.sigmoid(gi[..., H:2 * H] + gh[..., H:2 * H])
    n = torch.tanh(gi[..., 2 * H:] + r * gh[..., 2 * H:])
    return n + z * (h_BH - n)


def gru_sequence(cell: nn.GRU, u_BTD: torch.Tensor, theta_BE: torch.Tensor,
                 w_gain: torch.Tensor | None = None) -> torch.Tensor:
    """The states (B, T, H) of one-layer, batch-first ``cell`` fed ``[u_t; theta]`` at every step from h_0 = 0.

    ``w_gain`` (3H, E): theta also scales the hidden-to-hidden product, (W_hh h + b_hh) * (1 + w_gain theta)."""
    device = u_BTD.device.type
    # on CUDA cuDNN's kernel is faster than any loop of ours; with a gain it has no kernel, and ours
    # (device-agnostic) beats autograd through the step-by-step loop
    fused = ((device == "cpu" or w_gain is not None) and not torch.is_autocast_enabled(device)
             and cell.num_layers == 1 and cell.bias and not cell.bidirectional and cell.batch_first
             and u_BTD.dtype == theta_BE.dtype == cell.weight_hh_l0.dtype)
    if fused:
        return _GRUSequence.apply(u_BTD, theta_BE, cell.weight_ih_l0, cell.weight_hh_l0, cell.bias_ih_l0,
                                  cell.bias_hh_l0, w_gain)
    if w_gain is None:
        th = theta_BE[:, None, :].expand(-1, u_BTD.shape[1], -1)
        return cell(torch.cat([u_BTD, th], dim=-1))[0]
    h, states = u_BTD.new_zeros(u_BTD.shape[0], cell.hidden_size), []
    for t in range(u_BTD.shape[1]):
        h = gru_step(cell, u_BTD[:, t], theta_BE, h, w_gain)
        states.append(h)
    return torch.stack(states, dim=1)
