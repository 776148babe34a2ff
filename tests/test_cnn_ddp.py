"""The meta-ResNet under Ray Train DDP (W=2): per-example normalisation, consistent metrics.

A DYNAMO batch mixes several base models' examples, each with its own theta. BatchNorm in the
meta-ResNet made a model's outputs depend on its batch mates (training) and on running
statistics only rank 0 fed (DDP broadcasts rank 0's buffers), so a worker's own test metrics
and a reloaded run's differed. GroupNorm (``meta.model._norm``) removes both; the controls
swap it back to BatchNorm. One local 2-CPU Ray, one tiny digits population, one W=2 fit.
"""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray")

from dynamo_dist import zoo  # noqa: E402
from dynamo_dist.config import GroupSpec, MetaConfig  # noqa: E402
from dynamo_dist.data import store  # noqa: E402
from dynamo_dist.meta import checkpoint as checkpoint_format  # noqa: E402
from dynamo_dist.meta import outputs  # noqa: E402
from dynamo_dist.meta import ray_train as meta_ray  # noqa: E402
from dynamo_dist.meta.metrics import evaluate  # noqa: E402
from dynamo_dist.meta.model import MetaResNet  # noqa: E402
from dynamo_dist.meta.trainer import load_population  # noqa: E402

pytestmark = pytest.mark.integration

STEPS = 20
# two groups differing in a training condition (learning rate), 2 seeds each: 2 models per worker
GROUPS = tuple(GroupSpec(name=name, task="digits", arch="resnet10", lr=lr, num_seeds=2, epochs=1, batch_size=64)
               for name, lr in (("slow", 1e-3), ("fast", 1e-2)))


@pytest.fixture(scope="module")
def pop_root(tmp_path_factory, tiny_population) -> str:
    return str(tiny_population(tmp_path_factory.mktemp("cnn_ddp") / "population", *GROUPS, num_examples=600,
                               num_probe=64, num_test=48))


@pytest.fixture(scope="module")
def w2_run(local_ray, pop_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("w2") / "meta"
    cfg = MetaConfig(output_dir=str(out), embedding_dim=2, steps=STEPS, batch_size=8, models_per_step=2,
                     eval_every=10, checkpoint_every=STEPS, num_workers=2, lr=3e-3, embedding_lr=3e-2, seed=0)
    result = meta_ray.build_trainer(cfg, pop_root, progress=False).fit()
    summary = meta_ray.finalize(cfg, pop_root, result)
    return {"out": out, "cfg": cfg, "summary": summary, "run": outputs.load_meta_run(out)}


def _with_batchnorm(meta: nn.Module) -> nn.Module:
    """A copy of the meta-ResNet with every GroupNorm replaced by BatchNorm2d (the old layout)."""
    bn = copy.deepcopy(meta)
    for parent in list(bn.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, nn.BatchNorm2d(child.num_channels))
    return bn


def _forward_with_mates(meta, x_a, theta_a, x_b, theta_b):
    """Model a's taps and logits when its examples share one forward with model b's."""
    n = x_a.shape[0]
    theta = torch.cat([theta_a.expand(n, -1), theta_b.expand(x_b.shape[0], -1)])
    with torch.no_grad():
        taps, outs = meta(torch.cat([x_a, x_b]), theta)
    return [t[:n] for t in taps] + [o[:n] for o in outs.values()]


def test_a_models_outputs_do_not_depend_on_its_batch_mates(w2_run, pop_root):
    run = w2_run["run"]
    meta, theta = run.meta, run.embeddings.theta_matrix()
    x = store.read_inputs(pop_root, "digits", "test").x
    a, b, c = x[:8], x[8:16], x[16:24]
    t0, t_near, t_far = theta[0], theta[1], theta[-1]  # another model of a's group, one of the other group
    assert not torch.allclose(t_near, t_far)
    for meta_mode in ("train", "eval"):  # DynamoTrainer trains in train mode, metrics use eval mode
        getattr(meta, meta_mode)()
        alone = _forward_with_mates(meta, a, t0, a[:0], t0[None])
        with_near = _forward_with_mates(meta, a, t0, b, t_near)
        with_far = _forward_with_mates(meta, a, t0, c, t_far)
        for u, v, w in zip(alone, with_near, with_far):
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(w, u, rtol=1e-5, atol=1e-5)
    meta.train()
    train_out = _forward_with_mates(meta, a, t0, b, t_near)
    meta.eval()
    for u, v in zip(train_out, _forward_with_mates(meta, a, t0, b, t_near)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)  # no train/eval gap either
    # theta reaches the outputs: the same inputs under another model's theta differ
    assert not torch.allclose(_forward_with_mates(meta, a, t_far, a[:0], t0[None])[3], alone[3], atol=1e-4)
    # the control: the same trained weights with BatchNorm, in train mode, see their batch mates
    bn = _with_batchnorm(meta).train()
    near, far = _forward_with_mates(bn, a, t0, b, t_near), _forward_with_mates(bn, a, t0, c, t_far)
    assert max(float((u - v).abs().max()) for u, v in zip(near, far)) > 1e-3
    assert list(bn.buffers()) and not list(meta.buffers())  # nothing for DDP to broadcast from rank 0


def test_w2_test_metrics_equal_the_reloaded_run_in_one_process(w2_run):
    """Each worker scores its own models at the end of training; a reload scores all in one process."""
    summary, per_model, history, _ = outputs.read_results(w2_run["out"])
    run = w2_run["run"]
    assert summary["num_workers"] == 2 and summary["steps"] == STEPS and len(history) == STEPS
    assert np.mean([h["loss"] for h in history[-5:]]) < np.mean([h["loss"] for h in history[:5]])
    shards = meta_ray.assign_shards(run.model_ids, 2)
    assert sorted(per_model) == run.model_ids and all(len(s) == 2 for s in shards)
    population = load_population(run.population_root, run.model_ids)
    reloaded = evaluate(SimpleNamespace(data=population, meta=run.meta, embeddings=run.embeddings), "test")
    for m in run.model_ids:  # both ranks' models, rank 1's included
        for k in ("agreement", "hidden_r2", "meta_accuracy", "base_accuracy"):
            assert reloaded[m][k] == pytest.approx(per_model[m][k], abs=1e-5), (m, k)
    assert summary["mean_agreement"] == pytest.approx(np.mean([reloaded[m]["agreement"] for m in run.model_ids]))


def test_a_batchnorm_meta_checkpoint_is_refused_naming_why(w2_run, tmp_path):
    """A meta run written when the meta-ResNet had BatchNorm: loading says so, no key-mismatch traceback."""
    old = tmp_path / "old-meta"
    shutil.copytree(w2_run["out"], old)
    shared_file = outputs.run_checkpoint(old) / checkpoint_format.SHARED_FILE
    shared = checkpoint_format.safe_load(shared_file)
    shared["meta"] = _with_batchnorm(w2_run["run"].meta).state_dict()
    torch.save(shared, shared_file)
    with pytest.raises(ValueError, match=r"BatchNorm statistics \('[\w.]+\.(running_mean|running_var|num_batches_tracked)'.*GroupNorm"):
        outputs.load_meta_run(old)
    outputs.load_meta_run(w2_run["out"])  # the original run still loads


def test_resuming_a_batchnorm_meta_checkpoint_is_refused_in_the_driver(w2_run, tmp_path):
    """A re-run into the output dir of a BatchNorm-era run: the driver's pre-flight refuses it,
    before Ray Train starts workers that would each fail on it max_failures times."""
    old = tmp_path / "old-meta"
    shutil.copytree(w2_run["out"], old)
    cfg = w2_run["cfg"].replace(output_dir=str(old))
    meta_ray.check_resumable(cfg, w2_run["run"].model_ids)  # the control: the run as written resumes
    (latest,) = sorted((old / "ray_results" / "meta").glob("checkpoint_0*"))[-1:]
    shared = checkpoint_format.safe_load(latest / checkpoint_format.SHARED_FILE)
    shared["meta"] = _with_batchnorm(w2_run["run"].meta).state_dict()
    torch.save(shared, latest / checkpoint_format.SHARED_FILE)
    with pytest.raises(ValueError, match=r"cannot resume from .*BatchNorm statistics.*a re-run resumes it"):
        meta_ray.check_resumable(cfg, w2_run["run"].model_ids)


def test_meta_resnet_norm_is_per_example_without_ray():
    """The property on a fresh meta-ResNet (no training, no Ray), with its BatchNorm control."""
    spec = zoo.ArchSpec(arch="resnet10", input_kind="image", input_shape=(1, 8, 8), num_classes=10)
    torch.manual_seed(0)
    meta = MetaResNet(spec, "resnet10", embedding_dim=3, output_sizes={"digits": 10}).train()
    x, t_a, t_b, t_c = torch.randn(12, 1, 8, 8), torch.randn(3), torch.randn(3), 5 * torch.randn(3)
    one = _forward_with_mates(meta, x[:4], t_a, x[4:8], t_b)
    other = _forward_with_mates(meta, x[:4], t_a, x[8:], t_c)
    for u, v in zip(one, other):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    bn = _with_batchnorm(meta).train()
    diff = [float((u - v).abs().max()) for u, v in zip(_forward_with_mates(bn, x[:4], t_a, x[4:8], t_b),
                                                        _forward_with_mates(bn, x[:4], t_a, x[8:], t_c))]
    assert max(diff) > 1e-3


def test_the_cnn_meta_run_is_an_mlflow_pyfunc_model(w2_run, pop_root, tmp_path):
    """The MLflow Model of a CNN run (what the meta stage logs) loads and gives the meta-model's logits and
    the base model's last tap through V_n, for a model's own theta."""
    import mlflow.pyfunc
    import pandas as pd

    from dynamo_dist.meta import pyfunc

    run = w2_run["run"]
    path = pyfunc.save(w2_run["out"], store.manifest_rows(pop_root), tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(path))
    x = store.read_inputs(pop_root, "digits", "test").x[:3]
    mid, row = run.model_ids[1], 1
    got = model.predict(pd.DataFrame({"model_id": [mid] * 3, "x": [v.reshape(-1).tolist() for v in x]}))
    with torch.no_grad():
        hs, outs = run.meta(x, run.embeddings.theta[row].detach()[None].expand(3, -1))
        last = run.embeddings.apply_maps(row, hs)[-1]
    for j in range(3):
        np.testing.assert_allclose(got["logits"][j], outs["digits"][j, -1].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["hidden"][j], last[j].reshape(-1).numpy(), rtol=1e-5, atol=1e-5)
    # the last tap (the widest, 1x1 after pooling), not the first
    assert len(got["hidden"][0]) == last[0].numel() and last[0].shape[0] > hs[0][0].shape[0]
