"""θ is a property of the computation, not of the parameterisation: a base model whose hidden units are
relabelled (the same permutation applied to every weight matrix) computes the same function, and DYNAMO
embeds it next to its original (its V_n absorbs the permutation). The control applies the permutation to
the recurrent rows only, which changes the function: that copy embeds away from the original.

One module-scoped run (about 30-40 s on an idle 2-core machine): 4 MNIST-1D GRUs (two trained to above
chance, two for one epoch at a low rate), the two copies added through ``add_models``, a meta run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamo_dist import zoo
from dynamo_dist.config import GroupSpec, MetaConfig, PopulationConfig
from dynamo_dist.data import store
from dynamo_dist.meta.local import run_meta_local
from dynamo_dist.meta.outputs import load_meta_run
from dynamo_dist.population.train import run_local
from dynamo_dist.population.user_models import add_models

HIDDEN = 8


def permute_gru(model: torch.nn.Module, perm: torch.Tensor, consistent: bool = True) -> torch.nn.Module:
    """A copy of a zoo GRU classifier whose hidden unit i is the original's unit perm[i].

    Rows of every gate block (r, z, n) of the input and recurrent weights and both biases are permuted,
    and the columns that read the hidden state (recurrent weights, readout). ``consistent=False``
    leaves those columns alone: the recurrent rows are scrambled and the function changes.
    """
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    h = model.spec.hidden_size
    rows = torch.cat([perm + g * h for g in range(3)])  # torch's GRU stacks the gates as [r; z; n]
    for k in ("rnn.weight_ih_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0", "rnn.weight_hh_l0"):
        sd[k] = sd[k][rows]
    if consistent:
        sd["rnn.weight_hh_l0"] = sd["rnn.weight_hh_l0"][:, perm]
        sd["readout.weight"] = sd["readout.weight"][:, perm]
    copy = zoo.build(model.spec)
    copy.load_state_dict(sd)
    return copy.eval()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("invariance")
    pop = PopulationConfig(root=str(root / "population"), num_examples=1000, num_probe=32, num_test=32, groups=(
        GroupSpec(name="a", task="mnist1d", arch="gru", hidden_size=HIDDEN, num_seeds=2, epochs=8, batch_size=32,
                  lr=2e-2),
        GroupSpec(name="b", task="mnist1d", arch="gru", hidden_size=HIDDEN, num_seeds=2, epochs=1, batch_size=64,
                  train_fraction=0.25)))
    try:
        run_local(pop, progress=False)
        layout = store.Layout.at(pop.root)
        original = store.manifest_rows(pop.root)[0]["model_id"]
        model = zoo.load(layout.path(layout.weights_rel(original)))
        perm = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(1))
        assert not torch.equal(perm, torch.arange(HIDDEN))
        add_models(pop.root, {"permuted": permute_gru(model, perm), "scrambled": permute_gru(model, perm, False)},
                   task="mnist1d", cfg=pop, group="copy")
        meta = MetaConfig(output_dir=str(root / "meta"), steps=300, hidden_size=16, embedding_dim=2, batch_size=16,
                          models_per_step=6, lr=3e-3, embedding_lr=1e-2, eval_every=300, seed=0)
        run_meta_local(meta, pop.root, progress=False)
    finally:
        torch.set_num_threads(before)
    return pop.root, original, perm, load_meta_run(meta.output_dir)


def test_the_permuted_copy_records_its_originals_outputs_and_permuted_hidden_states(embedded):
    root, original, perm, _ = embedded
    for split in ("probe", "test"):
        orig = store.read_trajectory(root, original, split)
        same = store.read_trajectory(root, "permuted", split)
        torch.testing.assert_close(same.outputs, orig.outputs, atol=1e-5, rtol=0)
        torch.testing.assert_close(same.hiddens[0], orig.hiddens[0][..., perm], atol=1e-5, rtol=0)
        # the control is another function: different outputs, and no relabelling of the states
        other = store.read_trajectory(root, "scrambled", split)
        assert (other.outputs - orig.outputs).abs().max() > 1e-2
        assert (other.hiddens[0] - orig.hiddens[0][..., perm]).abs().max() > 1e-2


def test_the_permuted_copy_embeds_within_a_small_fraction_of_the_median_distance(embedded):
    _, original, _, run = embedded
    ids, theta = run.model_ids, run.theta()
    at = {m: theta[ids.index(m)] for m in ids}
    base = [m for m in ids if m not in ("permuted", "scrambled")]
    assert len(base) == 4
    median = float(np.median([np.linalg.norm(at[a] - at[b]) for i, a in enumerate(base) for b in base[i + 1:]]))
    permuted = float(np.linalg.norm(at["permuted"] - at[original])) / median
    scrambled = float(np.linalg.norm(at["scrambled"] - at[original])) / median
    print(f"theta distance to the original / median between-model distance ({median:.3f}): "
          f"permuted copy {permuted:.3f}, scrambled control {scrambled:.3f}")
    assert permuted < 0.1
    assert scrambled > 0.2 and scrambled > 3 * permuted
