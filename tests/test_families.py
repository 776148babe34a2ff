"""A new architecture family is one module: a feed-forward family defined here, registered, is built,
recorded, embedded and evaluated by the package's own code, which names no family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dynamo_dist import family, zoo
from dynamo_dist.config import MetaConfig
from dynamo_dist.data import store
from dynamo_dist.data.tasks import Split
from dynamo_dist.meta.metrics import evaluate, summarize
from dynamo_dist.meta.model import GroupHeads, ModelEmbeddings
from dynamo_dist.meta.trainer import DynamoTrainer, PopulationData

# ---------------------------------------------------------------- the whole family: models, meta-model, states


class TinyMLP(nn.Module):
    """Base model: two tanh layers on the flattened image; each layer's output is a tap, (B, H)."""

    def __init__(self, spec: zoo.ArchSpec):
        super().__init__()
        self.spec = spec
        width = spec.hidden_size
        self.layers = nn.ModuleList([nn.Linear(math.prod(spec.input_shape), width), nn.Linear(width, width)])
        self.readout = nn.Linear(width, spec.num_classes)

    def trajectories(self, x):
        z, taps = x.flatten(1), []
        for layer in self.layers:
            z = torch.tanh(layer(z))
            taps.append(z)
        return taps, self.readout(z)[:, None, :]

    def forward(self, x):
        return self.trajectories(x)[1][:, -1]


class MetaMLP(nn.Module):
    """Meta-model: the same two layers, theta fed to each beside its input."""

    def __init__(self, input_spec, hidden_size: int, embedding_dim: int, output_sizes):
        super().__init__()
        self.embedding_dim, self.hidden_size = embedding_dim, hidden_size
        d = math.prod(input_spec.input_shape)
        self.layers = nn.ModuleList([nn.Linear(d + embedding_dim, hidden_size),
                                     nn.Linear(hidden_size + embedding_dim, hidden_size)])
        self.heads = GroupHeads({g: nn.Linear(hidden_size, c) for g, c in sorted(output_sizes.items())})

    @property
    def tap_dims(self):
        return [self.hidden_size, self.hidden_size]

    def forward(self, x, theta_BE):
        z, taps = x.flatten(1), []
        for layer in self.layers:
            z = torch.tanh(layer(torch.cat([z, theta_BE], dim=1)))
            taps.append(z)
        return taps, {g: head(z)[:, None, :] for g, head in self.heads.items()}

    def theta_weights(self):
        return [layer.weight[:, -self.embedding_dim:] for layer in self.layers]


class FeedForwardFamily(family.Family):
    name = "mlp"
    archs = ("mlp",)
    trajectory_rows = family.TAP_ROWS

    def check_spec(self, spec):
        if spec.input_kind != "image":
            raise ValueError(f"arch: mlp reads images, task gives {spec.input_kind!r}")

    def build(self, spec):
        return TinyMLP(spec)

    def hidden_shapes(self, hiddens):
        return [tuple(h.shape[1:]) for h in hiddens]

    def tap_width(self, shape):
        return shape[0]

    def state_rows(self, h, mask_BT):
        return h

    def hidden_loss(self, distances, mask_BT):
        return torch.stack([d.mean(dim=1) for d in distances], dim=1).mean(dim=1)

    def spread(self, deviations):
        return deviations.mean()

    def last_state(self, maps, hiddens):
        return maps[-1](hiddens[-1])

    def activation_taps(self, hiddens, lengths=None):
        return [h.double().numpy() for h in hiddens]

    def meta_model(self, input_spec, output_sizes, *, embedding_dim, hidden_size, **_):
        return MetaMLP(input_spec, hidden_size, embedding_dim, output_sizes)


# ---------------------------------------------------------------- tests

SHAPE = (1, 4, 4)


@pytest.fixture
def mlp():
    fam = family.register(FeedForwardFamily())
    yield fam
    family.unregister("mlp")


def _spec(hidden: int = 8) -> zoo.ArchSpec:
    return zoo.ArchSpec(arch="mlp", input_kind="image", input_shape=SHAPE, num_classes=3, hidden_size=hidden)


def test_a_registered_family_is_what_its_archs_build(mlp):
    assert zoo.family_of("mlp") == "mlp" and family.get("mlp") is mlp
    assert isinstance(zoo.build(_spec()), TinyMLP)
    assert zoo.hidden_shapes(_spec(6)) == [(6,), (6,)]
    assert not _spec().recurrent
    with pytest.raises(ValueError, match="mlp reads images"):
        zoo.ArchSpec(arch="mlp", input_kind="sequence", input_shape=(5, 2), num_classes=3)


def test_the_builtin_families_are_found_and_guard_their_archs():
    assert {"rnn", "cnn"} <= set(family.names())
    assert zoo.family_of("lstm") == "rnn" and zoo.family_of(zoo.CUSTOM_CNN_ARCH) == "cnn"
    assert "mlp" not in family.names() and family.of_arch("mlp") is None  # the fixture took it back
    with pytest.raises(ValueError, match="unknown architecture 'mlp'"):
        _spec()

    class Squatter(FeedForwardFamily):
        name = "squatter"
        archs = ("gru",)

    with pytest.raises(ValueError, match=r"archs \['gru'\] belong to family 'rnn'"):
        family.register(Squatter())
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        family.get("nope")


def test_a_new_family_is_recorded_embedded_and_evaluated_by_the_package(mlp, tmp_path):
    gen = torch.Generator().manual_seed(0)
    probe = Split(torch.randn(96, *SHAPE, generator=gen), torch.zeros(96, dtype=torch.long),
                  torch.ones(96, dtype=torch.long))
    test = Split(torch.randn(32, *SHAPE, generator=gen), torch.randint(0, 3, (32,), generator=gen),
                 torch.ones(32, dtype=torch.long))
    rows, trajs = [], {"probe": {}, "test": {}}
    for i, hidden in enumerate((6, 6, 8)):
        torch.manual_seed(i)
        base = zoo.build(_spec(hidden)).eval()
        for split, inputs in (("probe", probe), ("test", test)):
            with torch.no_grad():
                hs, out = base.trajectories(inputs.x)
            store.write_trajectory(tmp_path, f"m{i}", split, hs, out, zoo.family_of("mlp"))
            back = store.read_trajectory(tmp_path, f"m{i}", split)  # the store's tap rows hold any family's taps
            assert [torch.equal(a, b) for a, b in zip(back.hiddens, hs)] == [True, True]
            assert torch.equal(back.outputs, out)
            trajs[split][f"m{i}"] = back
        info = store.trajectory_info(tmp_path, f"m{i}", "probe")
        assert (info.family, info.num_steps, info.hidden_shapes) == ("mlp", 2, [(hidden,), (hidden,)])
        rows.append({"model_id": f"m{i}", "task": "t", "arch": "mlp", "input_kind": "image",
                     "input_shape": list(SHAPE), "num_classes": 3, "hidden_size": hidden, "vocab_size": None})
    data = PopulationData(root=str(tmp_path), rows=rows, probe_inputs={"t": probe}, probe=trajs["probe"],
                          test_inputs={"t": test}, test=trajs["test"])
    cfg = MetaConfig(output_dir=str(tmp_path / "meta"), method="paper", steps=150, hidden_size=16,
                     embedding_dim=2, batch_size=32, models_per_step=2, lr=1e-2, val_models=None, seed=0)
    trainer = DynamoTrainer(cfg, data)
    assert isinstance(trainer.meta, MetaMLP) and isinstance(trainer.embeddings, ModelEmbeddings)
    assert [tuple(w.shape) for w, _ in trainer.embeddings.maps_of(2)] == [(8, 16), (8, 16)]  # V_n: the family's maps
    before = summarize(evaluate(trainer))["mean_hidden_r2"]
    history = trainer.fit()
    after = summarize(evaluate(trainer))
    first, last = np.mean([h["loss"] for h in history[:10]]), np.mean([h["loss"] for h in history[-10:]])
    assert last < 0.5 * first
    assert before < 0 and after["mean_hidden_r2"] > 0.8  # from worse than the mean to most of the variance
