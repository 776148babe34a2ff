"""The meta trainer's AdamW (meta/adamw.py) against torch.optim.AdamW: the same bits, the same
state_dict both ways, and no import of torch._dynamo by a meta trainer's steps."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from dynamo_dist.meta.adamw import AdamW


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _steps(model, opt, n: int, seed: int, lrs=None) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[i]
        x = torch.randn(16, 5, generator=g)
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        if i % 3 == 2:  # a parameter without a gradient this step is left alone, as torch leaves it
            model[2].bias.grad = None
        opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_same_bits_as_torch_adamw(weight_decay):
    a, b = _model(0), _model(0)
    ours = AdamW(a.parameters(), lr=3e-2, weight_decay=weight_decay)
    ref = torch.optim.AdamW(b.parameters(), lr=3e-2, weight_decay=weight_decay)
    lrs = [3e-2 * (1 - i / 40) for i in range(25)]
    _steps(a, ours, 25, seed=1, lrs=lrs)
    _steps(b, ref, 25, seed=1, lrs=lrs)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    sa, sb = ours.state_dict(), ref.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)


def test_state_dict_loads_both_ways():
    """A checkpoint written with torch.optim.AdamW resumes under ours, and the reverse, to the same bits."""
    a, b = _model(2), _model(2)
    ref = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=1e-4)
    _steps(a, ref, 7, seed=3)
    b.load_state_dict(a.state_dict())
    ours = AdamW(b.parameters(), lr=5.0, weight_decay=0.5)  # the loaded group's values replace these
    ours.load_state_dict(ref.state_dict())
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[0]["weight_decay"] == 1e-4
    _steps(a, ref, 6, seed=4)
    _steps(b, ours, 6, seed=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)

    c = _model(9)
    c.load_state_dict(b.state_dict())
    back = torch.optim.AdamW(c.parameters(), lr=5.0)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))  # state_dict shares its tensors, as torch's does
    _steps(b, ours, 4, seed=5)
    _steps(c, back, 4, seed=5)
    for pb, pc in zip(b.parameters(), c.parameters()):
        assert torch.equal(pb, pc)


def test_state_dict_of_another_model_is_refused():
    ours = AdamW(_model(0).parameters(), lr=1e-3)
    other = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="this model has one group of 4"):
        ours.load_state_dict(other.state_dict())


def test_meta_steps_do_not_import_torch_dynamo(digit_parity_root, tmp_path):
    """The ~2 s this module saves each worker: a meta trainer's build and steps (under varpro with
    theta's gain, and under the paper recipe, whose V_n are stepped too) and a state_dict round trip
    leave torch._dynamo unimported."""
    code = textwrap.dedent("""
        import sys
        from dynamo_dist.config import MetaConfig
        from dynamo_dist.meta.trainer import DynamoTrainer, load_population
        data = load_population(sys.argv[1])
        for method in ("varpro", "paper"):
            cfg = MetaConfig(output_dir=sys.argv[2], method=method, theta_gain=method == "varpro", steps=3,
                             hidden_size=16, embedding_dim=2, batch_size=8, models_per_step=2)
            tr = DynamoTrainer(cfg, data)
            tr.fit(3)
            tr.load_state_dict(tr.state_dict())
        print("torch._dynamo" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code, digit_parity_root, str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
