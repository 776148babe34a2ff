"""The convolutional family: small-image ResNets and users' CNNs read through hooks on their stages.

States: one tap per stage, (B, C, H, W) feature maps; the logits are one "step". The meta-model
is ``MetaResNet``; V_n is a 1x1 convolution per stage (channels to channels, at every position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import family, zoo
from ..config import RESNET_ARCHS
from ..data import store
from ..meta.model import MetaResNet


class ConvolutionalFamily(family.Family):
    name = "cnn"
    archs = RESNET_ARCHS
    hooked_arch = zoo.CUSTOM_CNN_ARCH
    recurrent = False
    trajectory_rows = family.TAP_ROWS

    def check_spec(self, spec) -> None:
        if spec.num_layers != 1 or spec.bidirectional:
            raise ValueError(f"num_layers/bidirectional: recurrent options, not for {spec.arch}")
        if spec.input_kind != "image":
            raise ValueError(f"arch: {spec.arch} needs image inputs, task gives {spec.input_kind!r}")

    def build(self, spec) -> nn.Module:
        return zoo.SmallImageResNet(spec)

    def check_population(self, rows, root):
        # users' CNNs (read through hooks) may have any number of taps at any resolution, but the meta-ResNet has
        # four stage maps and V_n is a 1x1 conv: each tap must have its stage's size (footers only, no values read)
        custom = [r for r in rows if r["arch"] == self.hooked_arch]
        want = MetaResNet.stage_sizes(*rows[0]["input_shape"][1:])
        misfit = {}
        for r in custom:
            got = [tuple(s[1:]) for s in store.trajectory_info(root, r["model_id"], "probe").hidden_shapes]
            if got != want:
                misfit.setdefault(str(got), []).append(r["model_id"])
        if misfit:
            detail = "; ".join(f"{ids[:5]}{'...' if len(ids) > 5 else ''} ({len(ids)} models): (H, W) per tap {got}"
                               for got, ids in misfit.items())
            raise ValueError(
                f"the CNN meta-model cannot emulate these models' hidden states: {detail}. The meta-model is a "
                f"small-image ResNet with 4 stage maps of (H, W) {want} for inputs {list(rows[0]['input_shape'])}, "
                "and it maps its stages to a model's taps channel by channel (1x1 conv), so a model needs 4 taps of "
                "exactly those sizes (an ImageNet stem's stride-2 conv1 and max-pool make every map 4 times "
                "smaller; timm's feature_info often gives 5 taps). They stay recorded in the population root. To embed "
                "a CNN: use the small-image layout (conv1 = Conv2d(C, 64, 3, 1, 1), maxpool = Identity: adopted as a "
                "zoo ResNet), or name 4 submodules whose outputs have those sizes (architecture.json: \"hidden\": "
                "[...]); embed the other models from a population root without these")

    def state_target(self, model, state):
        # a bare torchvision ResNet's state dict (no ``net.`` prefix) loads into the wrapped network
        return model if any(k.startswith("net.") for k in state) else model.net

    def hidden_shapes(self, hiddens):
        return [tuple(h.shape[1:]) for h in hiddens]

    def tap_width(self, shape) -> int:
        return shape[0]  # channels

    def state_rows(self, h, mask_BT):
        return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B*H*W, C)

    def map_shape(self, base_width, meta_width):
        return (base_width, meta_width, 1, 1)

    def apply_map(self, h, weight, bias):
        return F.conv2d(h, weight, bias)

    def map_module(self, meta_width, base_width):
        return nn.Conv2d(meta_width, base_width, 1, device="meta")

    def hidden_loss(self, distances, mask_BT):
        """Eq. 6 (B.1): per stage the distance averaged over channels and positions, then over stages."""
        return torch.stack([d.flatten(1).mean(dim=1) for d in distances], dim=1).mean(dim=1)

    def spread(self, deviations):
        return deviations.mean()  # averaged over channels and positions, as L_hidden averages

    def last_state(self, maps, hiddens):
        return maps[-1](hiddens[-1])  # the last stage

    def activation_taps(self, hiddens, lengths=None):
        """Each stage's feature map averaged over positions; rows are examples."""
        return [h.mean(dim=(2, 3)).double().numpy() for h in hiddens]

    def meta_model(self, input_spec, output_sizes, *, embedding_dim, hidden_size, embed_dim, resnet_arch,
                   theta_readout, theta_gain=False):
        return MetaResNet(input_spec, resnet_arch, embedding_dim, output_sizes)


CNN = family.register(ConvolutionalFamily())
