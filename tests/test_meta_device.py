"""``meta.device`` / ``meta.precision``: GPUs asked for and missing fail before any work, checkpoints
are device-agnostic (a GPU-written one resumes on CPU), bf16 autocast. In-memory populations of
untrained GRUs (no population stage): each test takes about a second. The cuda test runs only
where a GPU is visible.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.serialization

from dynamo_dist import zoo
from dynamo_dist.config import MetaConfig, SweepConfig
from dynamo_dist.data.store import Trajectory
from dynamo_dist.data.tasks import Split
from dynamo_dist.meta import checkpoint
from dynamo_dist.meta.local import run_meta_local
from dynamo_dist.meta.metrics import evaluate, summarize
from dynamo_dist.meta.ray_train import for_cluster
from dynamo_dist.meta.trainer import DynamoTrainer, PopulationData, resolve_device
from dynamo_dist.meta.tune import TRIAL_DRIVER_MEMORY, _trial_resources

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
T, D, N_PROBE, N_TEST = 10, 2, 64, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PopulationData:
    """Four random GRUs (hidden 6 and 8) of one 3-class task, their trajectories on random inputs."""
    gen = torch.Generator().manual_seed(0)
    probe = Split(torch.randn(N_PROBE, T, D, generator=gen), torch.zeros(N_PROBE, dtype=torch.long),
                  torch.full((N_PROBE,), T))
    test = Split(torch.randn(N_TEST, T, D, generator=gen), torch.randint(0, 3, (N_TEST,), generator=gen),
                 torch.full((N_TEST,), T))
    rows, trajs = [], {"probe": {}, "test": {}}
    for i, hidden in enumerate((6, 6, 8, 8)):
        mid = f"m{i}"
        torch.manual_seed(i)
        base = zoo.build(zoo.ArchSpec(arch="gru", input_kind="sequence", input_shape=(T, D), num_classes=3,
                                      hidden_size=hidden)).eval()
        with torch.no_grad():
            for split, inputs in (("probe", probe), ("test", test)):
                hs, out = base.trajectories(inputs.x)
                trajs[split][mid] = Trajectory(model_id=mid, hiddens=hs, outputs=out)
        rows.append({"model_id": mid, "task": "t", "arch": "gru", "input_kind": "sequence", "input_shape": [T, D],
                     "num_classes": 3, "hidden_size": hidden, "vocab_size": None})
    return PopulationData(root=str(tmp_path_factory.mktemp("pop")), rows=rows, probe_inputs={"t": probe},
                          probe=trajs["probe"], test_inputs={"t": test}, test=trajs["test"])


def _cfg(tmp_path, **kw) -> MetaConfig:
    base = dict(output_dir=str(tmp_path / "meta"), steps=6, hidden_size=12, embedding_dim=2, batch_size=8,
                models_per_step=2, val_models=None)
    return MetaConfig(**{**base, **kw})


def _shard_tensors(trainer: DynamoTrainer) -> dict[str, list[torch.Tensor]]:
    return {m: [p.detach().cpu() for p in trainer.embeddings.parameters_of(i)]
            for m, i in trainer.embeddings.index.items()}


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# ---------------------------------------------------------------- a GPU asked for and missing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_local_cuda_without_gpu_fails_before_anything_is_read_or_written(tmp_path):
    cfg = _cfg(tmp_path, device="cuda")
    with pytest.raises(ValueError, match=r"meta.device='cuda' but torch.cuda.is_available\(\) is False"):
        resolve_device(cfg)
    # the population root does not even exist: the device is checked first, and no output dir appears
    with pytest.raises(ValueError, match=r"meta.device='cuda'"):
        run_meta_local(cfg, str(tmp_path / "no-population"), progress=False)
    assert not (tmp_path / "meta").exists()
    assert resolve_device(cfg.replace(device="auto")) == torch.device("cpu")


def test_ray_device_follows_the_clusters_gpus(tmp_path):
    cfg = _cfg(tmp_path, num_workers=2)
    assert for_cluster(cfg, {"CPU": 2.0}) is cfg  # the default never asks for GPUs
    with pytest.raises(ValueError, match=r"meta.device='cuda' needs one GPU per Ray Train worker "
                                         r"\(meta.num_workers=2\) but the Ray cluster has 0 GPU"):
        for_cluster(cfg.replace(device="cuda"), {"CPU": 16.0})
    with pytest.raises(ValueError, match=r"the Ray cluster has 1 GPU"):
        for_cluster(cfg.replace(device="cuda"), {"CPU": 16.0, "GPU": 1.0})
    assert for_cluster(cfg.replace(device="cuda"), {"CPU": 2.0, "GPU": 2.0}).device == "cuda"
    assert for_cluster(cfg.replace(device="auto"), {"CPU": 16.0, "GPU": 1.0}).device == "cpu"  # 1 GPU, 2 workers
    assert for_cluster(cfg.replace(device="auto"), {"CPU": 16.0, "GPU": 4.0}).device == "cuda"


def test_sweep_trials_on_cuda_hold_their_gpus():
    one, two = SweepConfig(max_concurrent_trials=8), SweepConfig(max_concurrent_trials=8, workers_per_trial=2)
    assert _trial_resources(one, {"CPU": 8.0, "GPU": 2.0}) == ({"cpu": 1.0}, 8)  # cpu trials ignore GPUs
    assert _trial_resources(one, {"CPU": 8.0, "GPU": 2.0}, "cuda") == ({"cpu": 1.0, "gpu": 1.0}, 2)
    # a Ray Train trial's workers take the GPUs (use_gpu): 4 GPUs hold two trials of 2 workers
    assert _trial_resources(two, {"CPU": 16.0, "GPU": 4.0}, "cuda") == ({"cpu": 0.0, "memory": TRIAL_DRIVER_MEMORY}, 2)
    # the trial's driver takes no CPU: two 1-CPU nodes hold a 2-worker trial, 4 CPUs two of them
    assert _trial_resources(two, {"CPU": 2.0})[1] == 1 and _trial_resources(two, {"CPU": 4.0})[1] == 2


# ---------------------------------------------------------------- checkpoints are device-agnostic


def test_to_cpu_keeps_cpu_state_as_it_is(data, tmp_path):
    """On the CPU (the default) a saved state is what it was before devices existed: no copies, and a
    module state_dict keeps the ``_metadata`` its loader reads."""
    tr = DynamoTrainer(_cfg(tmp_path), data)
    tr.fit(steps=2)
    sd = tr.meta.state_dict()
    moved = checkpoint.to_cpu(sd)
    assert moved._metadata == sd._metadata
    assert all(moved[k] is v for k, v in sd.items())
    opt = tr.opt_meta.state_dict()
    assert checkpoint.to_cpu(opt)["param_groups"] == opt["param_groups"]
    assert all(a is b for a, b in zip(_tensors(checkpoint.to_cpu(opt)), _tensors(opt)))


def _saved_as_on_gpu(monkeypatch, save) -> None:
    """Run ``save`` with every tensor storage tagged ``cuda:0``: the file a GPU run writes when its
    tensors are not moved to the CPU first (loading it here without a map_location fails)."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save()


def test_a_checkpoint_written_on_a_gpu_resumes_on_cpu(data, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, steps=8)
    full = DynamoTrainer(cfg, data)
    losses = [r["loss"] for r in full.fit()]

    half = DynamoTrainer(cfg, data)
    half.fit(steps=4)
    _saved_as_on_gpu(monkeypatch, lambda: half.save(tmp_path / "ck.pt"))
    with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location does here
        torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed = DynamoTrainer(cfg, data)
    resumed.restore(tmp_path / "ck.pt")
    assert all(t.device.type == "cpu" for t in _tensors(checkpoint.load(tmp_path / "ck.pt")))
    for m, ps in _shard_tensors(half).items():
        for a, b in zip(ps, _shard_tensors(resumed)[m]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r["loss"] for r in resumed.fit()] == pytest.approx(losses[4:], rel=1e-5)

    # a Ray worker's path: the sharded format, read back for this worker's models only (mmap)
    d = tmp_path / "sharded"
    d.mkdir()
    shared = {**half.shared_state(), "shards": [checkpoint.shard_file(0)], "model_ids": data.model_ids}
    _saved_as_on_gpu(monkeypatch, lambda: checkpoint.write_shard(d, 0, half.shard_state(), shared=shared))
    got_shared, per_model, _ = checkpoint.read_sharded(d, model_ids=["m1", "m2"])
    assert sorted(per_model) == ["m1", "m2"]
    torch.testing.assert_close(per_model["m2"]["theta"], _shard_tensors(half)["m2"][0], rtol=0, atol=0)
    assert all(t.device.type == "cpu" for t in _tensors((got_shared, per_model)))


# ---------------------------------------------------------------- bf16


def test_bf16_on_cpu_trains_under_autocast_with_float32_state(data, tmp_path):
    """bf16 is allowed on the CPU too (torch.autocast("cpu")): the losses move off the float32 ones
    by bf16 rounding only, and weights, theta/V and AdamW moments stay float32."""
    f32 = [r["loss"] for r in DynamoTrainer(_cfg(tmp_path), data).fit()]
    tr = DynamoTrainer(_cfg(tmp_path, precision="bf16"), data)
    bf16 = [r["loss"] for r in tr.fit()]
    assert all(np.isfinite(bf16))
    assert bf16 != f32  # autocast did run the matmuls in bf16
    np.testing.assert_allclose(bf16, f32, rtol=0.05)
    state = tr.state_dict()
    assert {t.dtype for t in _tensors(state) if t.is_floating_point()} == {torch.float32}
    assert np.isfinite(summarize(evaluate(tr, "val"))["mean_hidden_r2"])


# ---------------------------------------------------------------- on a GPU


@needs_cuda
def test_cuda_training_resumes_on_cpu_with_equal_theta_and_v(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the GRU in float32 on both devices
    cfg = _cfg(tmp_path, device="cuda", steps=8)
    gpu = DynamoTrainer(cfg, data)
    assert gpu.device.type == "cuda" and next(gpu.meta.parameters()).is_cuda and gpu.embeddings.theta[0].is_cuda
    gpu_losses = [r["loss"] for r in gpu.fit(steps=4)]
    state = gpu.state_dict()
    assert all(t.device.type == "cpu" for t in _tensors(state))  # a checkpoint holds CPU tensors
    gpu.save(tmp_path / "ck.pt")

    cpu = DynamoTrainer(cfg.replace(device="cpu"), data)
    cpu.restore(tmp_path / "ck.pt")
    assert cpu.step == 4
    for m, ps in _shard_tensors(gpu).items():
        for a, b in zip(ps, _shard_tensors(cpu)[m]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k, v in gpu.meta.state_dict().items():
        torch.testing.assert_close(cpu.meta.state_dict()[k], v.cpu(), rtol=0, atol=0)
    # the same maths on both devices: first losses and metrics agree up to float32 kernels
    cpu_losses = [r["loss"] for r in DynamoTrainer(cfg.replace(device="cpu"), data).fit(steps=4)]
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-3)
    on_gpu, on_cpu = summarize(evaluate(gpu, "test")), summarize(evaluate(cpu, "test"))
    assert on_gpu["mean_hidden_r2"] == pytest.approx(on_cpu["mean_hidden_r2"], abs=1e-3)
    assert len(cpu.fit()) == 4 and gpu.embedding_rows()[0]["model_id"] == "m0"

    # and back: the CPU checkpoint resumes on the GPU
    cpu.save(tmp_path / "ck-cpu.pt")
    again = DynamoTrainer(cfg, data)
    again.restore(tmp_path / "ck-cpu.pt")
    torch.testing.assert_close(again.embeddings.theta[3].cpu(), cpu.embeddings.theta[3], rtol=0, atol=0)
    assert len(again.fit(steps=10)) == 2  # optimiser moments on the GPU (a device mix would raise here)


@needs_cuda
def test_bf16_on_cuda_trains(data, tmp_path):
    tr = DynamoTrainer(_cfg(tmp_path, device="cuda", precision="bf16"), data)
    losses = [r["loss"] for r in tr.fit()]
    assert all(np.isfinite(losses)) and tr.embeddings.theta[0].dtype == torch.float32
