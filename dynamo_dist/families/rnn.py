"""The recurrent family: GRU / tanh-RNN / LSTM classifiers and users' recurrent modules.

States: one tap, the hidden state at every step, (B, T, H) (a multi-layer or bidirectional RNN's
layers and directions side by side, ``zoo.layer_states``); inputs are left-padded, so the valid
steps of an example are its last ``length``. The meta-model is ``MetaRNN``; V_n is affine per step
(``Family``'s default maps).
"""

from __future__ import annotations

from torch import nn

from .. import family, zoo
from ..config import SEQUENCE_ARCHS
from ..meta.model import MetaRNN
from ..meta.objective import masked_time_mean, sequence_rows, step_mask


class RecurrentFamily(family.Family):
    name = "rnn"
    archs = SEQUENCE_ARCHS
    hooked_arch = zoo.CUSTOM_ARCH
    recurrent = True
    trajectory_rows = family.STEP_ROWS

    def check_spec(self, spec) -> None:
        if spec.input_kind == "image":
            raise ValueError(f"arch: {spec.arch} needs sequence or token inputs, task gives images")

    def build(self, spec) -> nn.Module:
        return zoo.SequenceClassifier(spec)

    def hidden_shapes(self, hiddens):
        return [tuple(h.shape[2:]) for h in hiddens]

    def tap_width(self, shape) -> int:
        return shape[-1]

    def step_mask(self, lengths_B, num_steps):
        return step_mask(lengths_B, num_steps)

    def state_rows(self, h, mask_BT):
        return sequence_rows(h, mask_BT)

    def hidden_loss(self, distances, mask_BT):
        """Eq. 2: ``1/T sum_t`` of the distance summed over hidden units."""
        (d,) = distances
        return masked_time_mean(d.sum(dim=-1), mask_BT)

    def spread(self, deviations):
        return deviations.sum(1).mean()  # summed over units per step, as L_hidden sums

    def last_state(self, maps, hiddens):
        return maps[0](hiddens[0])[:, -1]  # the one tap, at its last step

    def activation_taps(self, hiddens, lengths=None):
        """Rows are the valid (example, step) pairs of the single tap (left padding masked)."""
        (h_NTH,) = hiddens
        if lengths is None:
            return [h_NTH.reshape(-1, h_NTH.shape[-1]).double().numpy()]
        return [h_NTH[step_mask(lengths[: h_NTH.shape[0]], h_NTH.shape[1])].double().numpy()]

    def meta_model(self, input_spec, output_sizes, *, embedding_dim, hidden_size, embed_dim, resnet_arch,
                   theta_readout, theta_gain=False):
        return MetaRNN(input_spec, hidden_size, embedding_dim, output_sizes, embed_dim=embed_dim,
                       theta_readout=theta_readout, theta_gain=theta_gain)


RNN = family.register(RecurrentFamily())
