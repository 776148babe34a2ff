"""Users' CNNs with standard stems (issue 28): torchvision ResNets of any depth and timm CNNs, read by hooks.

No weights are downloaded: every network is randomly initialised here (seeded) and its state dict
written by the test. Each one's recorded trajectories must equal a manual forward pass with its own
hooks: the stage outputs (``layer1..layer4`` of a ResNet, timm's ``feature_info`` modules otherwise)
and the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from dynamo_dist import adapters
from dynamo_dist.config import PopulationConfig
from dynamo_dist.data import store
from dynamo_dist.data.tasks import load_task
from dynamo_dist.population import user_models

C, S, K = 3, 32, 10  # channels, image side, classes


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def task_name(tmp_path) -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, C, S, S)).astype(np.float32)
    np.savez(tmp_path / "images.npz", x=x, y=rng.integers(0, K, 96), x_test=x[:24] * 0.5, y_test=rng.integers(0, K, 24))
    return f"npz:{tmp_path / 'images.npz'}"


def _cfg(root: Path) -> PopulationConfig:
    return PopulationConfig(root=str(root), num_probe=12, num_test=8)


def _by_hooks(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The known answer: the named submodules' outputs, caught by hooks of the test's own, and the logits."""
    got = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: got.setdefault(n, o)) for n in names]
    with torch.no_grad():
        logits = model.eval()(x)
    for h in handles:
        h.remove()
    return [got[n] for n in names], logits


def _model_dir(d: Path, models: dict[str, nn.Module], description: dict) -> Path:
    d.mkdir(parents=True)
    for mid, m in models.items():
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / f"{mid}.safetensors"))
    (d / "architecture.json").write_text(json.dumps(description))
    return d


def _assert_recorded(root: str, task_name: str, model_id: str, model: nn.Module, names: list[str]) -> None:
    x = store.read_inputs(root, task_name, "probe").x
    want_taps, want_logits = _by_hooks(model, names, x)
    traj = store.read_trajectory(root, model_id)
    assert len(traj.hiddens) == len(names)
    for got, want in zip(traj.hiddens, want_taps, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj.outputs[:, 0], want_logits, rtol=1e-5, atol=1e-5)


def test_an_imagenet_stem_torchvision_resnet18_by_its_stages(tmp_path, task_name):
    torch.manual_seed(0)
    nets = {"tv18-a": torchvision.models.resnet18(num_classes=K), "tv18-b": torchvision.models.resnet18(num_classes=K)}
    assert tuple(nets["tv18-a"].conv1.kernel_size) == (7, 7)  # the ImageNet stem: 7x7 stride 2 and a max-pool
    d = _model_dir(tmp_path / "tv", nets, {"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": K}})
    root = str(tmp_path / "root")
    rows = user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root))
    assert [(r["arch"], r["module_class"], r["hidden_size"]) for r in rows] == \
        [("custom_cnn", "torchvision.models.resnet.ResNet", 512)] * 2
    stages = ["layer1", "layer2", "layer3", "layer4"]
    for mid, net in nets.items():
        _assert_recorded(root, task_name, mid, net, stages)
    # the stem and max-pool by hand: layer1 sees S/4 x S/4 maps
    assert store.read_trajectory(root, "tv18-a").hiddens[0].shape[-2:] == (S // 4, S // 4)
    again = adapters.load(store.Layout.at(root).path("weights/tv18-b.safetensors"))  # rebuilt by its factory
    x = load_task(task_name).test.x[:4]
    with torch.no_grad():
        torch.testing.assert_close(again(x), nets["tv18-b"].eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", ["resnet101", "wide_resnet50_2"])
def test_deeper_and_wider_torchvision_resnets_tap_their_stages(task_name, build):
    """Bottleneck ResNets of other depths and widths (not written to disk: ~170-270 MB of weights each)."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, build)(num_classes=K)
    model = adapters.hooked(net, load_task(task_name), what=build)
    x = load_task(task_name).probe.x[:2]
    with torch.no_grad():
        taps, outputs = model.trajectories(x)
    want_taps, want_logits = _by_hooks(net, ["layer1", "layer2", "layer3", "layer4"], x)
    assert [t.shape[1] for t in taps] == [256, 512, 1024, 2048] and model.spec.family == "cnn"
    for got, want in zip(taps, want_taps, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(outputs[:, 0], want_logits, rtol=0, atol=0)


def test_a_timm_cnn_by_its_feature_info(tmp_path, task_name):
    timm = pytest.importorskip("timm")
    kwargs = {"model_name": "mobilenetv3_small_050", "num_classes": K, "pretrained": False}
    torch.manual_seed(0)
    net = timm.create_model(**kwargs)
    names = [f["module"] for f in net.feature_info]
    assert names == ["bn1", "blocks.0", "blocks.1", "blocks.3", "blocks.5"]  # timm's own declaration
    d = _model_dir(tmp_path / "timm", {"mnv3": net}, {"factory": "timm:create_model", "kwargs": kwargs})
    root = str(tmp_path / "root")
    (row,) = user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root))
    assert (row["arch"], row["factory"], row["hidden_size"]) == ("custom_cnn", "timm:create_model", 288)
    _assert_recorded(root, task_name, "mnv3", net, names)


def test_image_models_that_do_not_fit_are_refused(tmp_path, task_name):
    root = str(tmp_path / "root")

    class Flat(nn.Module):  # no stages to find
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, 4, 3)
            self.fc = nn.Linear(4, K)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    def refused(match, call):
        with pytest.raises(ValueError, match=match):
            call()
        assert not Path(root).exists()

    refused(r"model 'flat': Flat is neither a ResNet-like CNN .* name the submodules whose outputs \(B, C, H, W\)",
            lambda: user_models.add_models(root, {"flat": Flat()}, task_name, cfg=_cfg(root)))
    refused(r"model 'flat': hidden: submodule 'fc' gave \(16, 10\), not feature maps",
            lambda: user_models.add_models(root, {"flat": Flat()}, task_name, cfg=_cfg(root), hidden=["conv", "fc"]))
    refused(r"model 'five': logits of shape \(16, 5\): the task has 10 classes",
            lambda: user_models.add_models(root, {"five": torchvision.models.resnet18(num_classes=5)}, task_name,
                                           cfg=_cfg(root)))
    # the user's own stages by name work the same way
    torch.manual_seed(0)
    flat = Flat()
    user_models.add_models(root, {"flat": flat}, task_name, cfg=_cfg(root), hidden=["conv"])
    _assert_recorded(root, task_name, "flat", flat, ["conv"])


# ------------------------------------------------------------------ into the meta stage


class FourStages(nn.Module):
    """A user's CNN whose four stages have the meta-ResNet's map sizes (S, S/2, S/4, S/8)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv2d(C, width, 3, 1, 1), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())
        self.s3 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU())
        self.s4 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(2 * width, K)

    def forward(self, x):
        return self.fc(self.s4(self.s3(self.s2(self.s1(x)))).mean((2, 3)))


def _meta_cfg(out: Path):
    from dynamo_dist.config import MetaConfig

    return MetaConfig(output_dir=str(out), steps=2, embedding_dim=2, batch_size=4, models_per_step=2, eval_every=2)


def test_the_meta_stage_refuses_cnns_whose_taps_are_not_its_stage_maps(tmp_path, task_name):
    """ImageNet-stem ResNets (maps S/4..S/32) and a 1-tap CNN: refused before training, naming the models and the
    sizes the meta-ResNet needs, nothing written; a user's CNN with four taps of those sizes is embedded."""
    from dynamo_dist.meta.local import run_meta_local
    from dynamo_dist.meta.trainer import load_population

    torch.manual_seed(0)
    root = str(tmp_path / "root")
    nets = {"tv18-a": torchvision.models.resnet18(num_classes=K), "tv18-b": torchvision.models.resnet18(num_classes=K)}
    user_models.add_models(root, nets, task_name, cfg=_cfg(root))
    out = tmp_path / "meta"
    with pytest.raises(ValueError, match=r"the CNN meta-model cannot emulate .*\['tv18-a', 'tv18-b'\] \(2 models\): "
                                         r"\(H, W\) per tap \[\(8, 8\), \(4, 4\), \(2, 2\), \(1, 1\)\].* 4 stage "
                                         r"maps of \(H, W\) \[\(32, 32\), \(16, 16\), \(8, 8\), \(4, 4\)\]"):
        run_meta_local(_meta_cfg(out), root, progress=False)
    assert not out.exists()

    one_tap = str(tmp_path / "one-tap")
    user_models.add_models(one_tap, {"flat": FourStages()}, task_name, cfg=_cfg(one_tap), hidden=["s1"])
    with pytest.raises(ValueError, match=r"\['flat'\] \(1 models\): \(H, W\) per tap \[\(32, 32\)\]"):
        load_population(one_tap)

    fits = str(tmp_path / "fits")
    stages = {f"cnn{i}": FourStages(width=8 * (i + 1)) for i in range(2)}  # different widths: V_n per model
    rows = user_models.add_models(fits, stages, task_name, cfg=_cfg(fits), hidden=["s1", "s2", "s3", "s4"])
    assert {r["arch"] for r in rows} == {"custom_cnn"}
    summary = run_meta_local(_meta_cfg(out), fits, progress=False)
    import pyarrow.parquet as pq

    metrics = pq.read_table(out / "model_metrics.parquet").to_pylist()
    assert sorted(r["model_id"] for r in metrics) == ["cnn0", "cnn1"] and summary["num_models"] == 2
    assert all(np.isfinite(r["hidden_r2"]) for r in metrics)
