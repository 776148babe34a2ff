"""Known answers and properties of the core: zoo, meta-models, objective, trainer, configs."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dynamo_dist import config, zoo
from dynamo_dist.meta.model import MetaResNet, MetaRNN, ModelEmbeddings, TableStates, build_meta_model
from dynamo_dist.meta.objective import Chunk, dynamo_loss, embedding_penalty, hidden_loss, output_loss, step_mask
from dynamo_dist.meta.trainer import check_population, cosine_factor

SEQ = zoo.ArchSpec(arch="gru", input_kind="sequence", input_shape=(7, 3), num_classes=4, hidden_size=5)


# ---------------------------------------------------------------- zoo


@pytest.mark.parametrize("arch", ["gru", "rnn", "lstm"])
def test_hidden_states_equal_manual_unrolled_forward(arch):
    torch.manual_seed(0)
    spec = zoo.ArchSpec(arch=arch, input_kind="sequence", input_shape=(6, 3), num_classes=4, hidden_size=5)
    model = zoo.build(spec).eval()
    x = torch.randn(2, 6, 3)
    (h_BTH,), y_BTC = model.trajectories(x)
    cell_cls = {"gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell}[arch]
    cell = cell_cls(3, 5)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in model.rnn.state_dict().items()})
    h = torch.zeros(2, 5)
    c = torch.zeros(2, 5)
    for t in range(6):
        if arch == "lstm":
            h, c = cell(x[:, t], (h, c))
        else:
            h = cell(x[:, t], h)
        torch.testing.assert_close(h_BTH[:, t], h)
        torch.testing.assert_close(y_BTC[:, t], model.readout(h))
    torch.testing.assert_close(model(x), y_BTC[:, -1])


def test_token_classifier_embeds_tokens():
    spec = zoo.ArchSpec(arch="gru", input_kind="tokens", input_shape=(5,), num_classes=2, hidden_size=4,
                        embed_dim=3, vocab_size=11)
    model = zoo.build(spec)
    (h,), y = model.trajectories(torch.randint(0, 11, (2, 5)))
    assert h.shape == (2, 5, 4) and y.shape == (2, 5, 2)


@pytest.mark.parametrize("arch,widths", [("resnet10", (64, 128, 256, 512)), ("resnet18", (64, 128, 256, 512)),
                                         ("resnet50", (256, 512, 1024, 2048))])
def test_resnet_stage_taps_have_expected_shapes(arch, widths):
    spec = zoo.ArchSpec(arch=arch, input_kind="image", input_shape=(1, 8, 8), num_classes=10)
    model = zoo.build(spec).eval()
    taps, logits = model.trajectories(torch.randn(2, 1, 8, 8))
    assert [tuple(t.shape) for t in taps] == [(2, widths[0], 8, 8), (2, widths[1], 4, 4), (2, widths[2], 2, 2),
                                              (2, widths[3], 1, 1)]
    assert logits.shape == (2, 1, 10)
    assert zoo.hidden_shapes(spec) == [tuple(t.shape[1:]) for t in taps]


@pytest.mark.parametrize("spec", [SEQ, zoo.ArchSpec(arch="resnet10", input_kind="image", input_shape=(3, 8, 8),
                                                    num_classes=3)])
def test_safetensors_round_trip_gives_identical_outputs(tmp_path, spec):
    torch.manual_seed(1)
    model = zoo.build(spec).eval()
    zoo.save(model, tmp_path / "m.safetensors")
    loaded = zoo.load(tmp_path / "m.safetensors")
    x = torch.randn((2,) + spec.input_shape)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.spec == spec
    assert not list(tmp_path.glob("*.tmp"))


def test_wrap_module_adopts_plain_torchvision_resnet():
    import torchvision

    net = torchvision.models.resnet18(num_classes=5)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    net.eval()
    spec = zoo.ArchSpec(arch="resnet18", input_kind="image", input_shape=(3, 16, 16), num_classes=5)
    wrapped = zoo.wrap_module(net, spec).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(wrapped(x), net(x))


def test_missing_and_corrupt_weights_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        zoo.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        zoo.load(bad)


def test_unknown_architecture_and_mismatched_input_kind():
    with pytest.raises(ValueError, match="arch"):
        zoo.ArchSpec(arch="transformer", input_kind="sequence", input_shape=(3, 1), num_classes=2)
    with pytest.raises(ValueError, match="image"):
        zoo.ArchSpec(arch="resnet18", input_kind="sequence", input_shape=(3, 1), num_classes=2)


# ---------------------------------------------------------------- objective


def test_hidden_loss_matches_hand_computation():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])   # (B=1, T=2, H=2)
    target = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])
    # L2: mean over t of squared norm: ((1+4) + (1+1)) / 2 = 3.5 ; L1: ((1+2) + (1+1)) / 2 = 2.5
    assert hidden_loss([pred], [target], "rnn", "l2").item() == pytest.approx(3.5)
    assert hidden_loss([pred], [target], "rnn", "l1").item() == pytest.approx(2.5)
    # masked: only step 2 valid -> 2.0 (L2)
    mask = step_mask(torch.tensor([1]), 2)
    assert mask.tolist() == [[False, True]]
    assert hidden_loss([pred], [target], "rnn", "l2", mask).item() == pytest.approx(2.0)
    # CNN: per-stage mean over C,H,W then mean over stages
    a, b = torch.ones(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    c, d = torch.full((1, 1, 2, 2), 2.0), torch.zeros(1, 1, 2, 2)
    assert hidden_loss([a, c], [b, d], "cnn", "l2").item() == pytest.approx((1.0 + 4.0) / 2)


def test_output_loss_kl_and_mse_match_hand_computation():
    base = torch.log(torch.tensor([[[0.5, 0.5]]]))
    meta = torch.log(torch.tensor([[[0.25, 0.75]]]))
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert output_loss(meta, base, "kl").item() == pytest.approx(kl, rel=1e-5)
    assert output_loss(base, base, "kl").item() == pytest.approx(0.0, abs=1e-7)
    mse = ((math.log(0.25) - math.log(0.5)) ** 2 + (math.log(0.75) - math.log(0.5)) ** 2) / 2
    assert output_loss(meta, base, "mse").item() == pytest.approx(mse, rel=1e-5)
    with pytest.raises(ValueError, match="output_distance"):
        output_loss(meta, base, "cosine")


def _tiny_meta(groups=None, d=3):
    torch.manual_seed(0)
    meta = MetaRNN(SEQ, hidden_size=6, embedding_dim=d, output_sizes=groups or {"a": 4})
    emb = ModelEmbeddings(["m0", "m1", "m2"], d, meta.tap_dims, [[5], [7], [5]], "rnn")
    return meta, emb


def _chunk(row, group="a", n=4, hdim=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Chunk(model_id=f"m{row}", row=row, group=group, x=torch.randn(n, 7, 3, generator=g),
                 lengths=torch.full((n,), 7), hiddens=[torch.randn(n, 7, hdim, generator=g)],
                 outputs=torch.randn(n, 7, classes, generator=g))


def test_dynamo_loss_equals_eq4_by_hand():
    meta, emb = _tiny_meta()
    with torch.no_grad():
        emb.theta[0].copy_(torch.tensor([0.1, -0.2, 0.3]))
    chunks = [_chunk(0), _chunk(1, hdim=7, seed=1)]
    loss, stats = dynamo_loss(meta, emb, chunks, output_weight=0.5)
    expected = 0.0
    for c in chunks:
        th = emb.theta[c.row].detach().expand(4, -1)
        hs, outs = meta(c.x, th)
        lh = ((emb.maps[c.row][0](hs[0]) - c.hiddens[0]) ** 2).sum(-1).mean()
        p = F.softmax(c.outputs, -1)
        lo = (p * (F.log_softmax(c.outputs, -1) - F.log_softmax(outs["a"], -1))).sum(-1).mean()
        expected += (lh + 0.5 * lo).item()
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)
    assert set(stats) == {"loss_hidden", "loss_output"}


def test_lambda_zero_ignores_outputs_and_weight_scales_them():
    meta, emb = _tiny_meta()
    chunks = [_chunk(0)]
    l0, s = dynamo_loss(meta, emb, chunks, 0.0)
    l1, _ = dynamo_loss(meta, emb, chunks, 1.0)
    l2, _ = dynamo_loss(meta, emb, chunks, 2.0)
    assert l0.item() == pytest.approx(s["loss_hidden"], rel=1e-6)
    assert (l2 - l1).item() == pytest.approx((l1 - l0).item(), rel=1e-5)
    with pytest.raises(ValueError, match="lambda"):
        dynamo_loss(meta, emb, chunks, -1.0)


def test_gradients_reach_theta_and_v_of_sampled_models_only():
    meta, emb = _tiny_meta()
    loss, _ = dynamo_loss(meta, emb, [_chunk(0), _chunk(2, seed=2)], 1.0)
    loss.backward()
    assert emb.theta[0].grad is not None and emb.theta[0].grad.abs().sum() > 0
    assert emb.theta[2].grad is not None
    assert emb.theta[1].grad is None
    assert all(p.grad is None for p in emb.maps[1].parameters())
    assert all(p.grad is not None for p in emb.maps[0].parameters())
    # and an AdamW step leaves the unsampled model exactly where it was (and moves the others)
    before = [p.detach().clone() for p in emb.parameters_of(1)]
    moved = [p.detach().clone() for p in emb.parameters_of(0)]
    emb.adam_step([0, 1, 2], lr=0.1, weight_decay=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, emb.parameters_of(1)))
    assert not any(torch.equal(a, b) for a, b in zip(moved, emb.parameters_of(0)))
    assert emb.steps[1].eq(0).all() and emb.steps[0].eq(1).all()
    assert all(p.grad is None for p in emb.parameters_of(0))


def _per_model_copies(emb: ModelEmbeddings) -> list[tuple[nn.Parameter, nn.Linear]]:
    """The layout ModelEmbeddings had before its tables: a Parameter and a module per model."""
    out = []
    for i in range(len(emb)):
        w, b = emb.parameters_of(i)[1:]
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        out.append((nn.Parameter(emb.theta[i].detach().clone()), lin))
    return out


def test_table_adamw_equals_torch_adamw_on_per_model_parameters():
    """Five steps over different models: the row-sparse step on the tables gives exactly what
    torch.optim.AdamW gives on a Parameter per model, values and moments."""
    meta, emb = _tiny_meta()
    ref = _per_model_copies(emb)
    opt = torch.optim.AdamW([p for th, lin in ref for p in (th, *lin.parameters())], lr=0.05, weight_decay=0.0)
    for step, rows in enumerate([[0, 2], [1], [0, 1, 2], [2], [0]]):
        chunks = [_chunk(r, hdim=7 if r == 1 else 5, seed=10 * step + r) for r in rows]
        loss, _ = dynamo_loss(meta, emb, chunks, 1.0)
        loss.backward()
        for c in chunks:  # the same loss through the per-model copies
            th, lin = ref[c.row]
            hs, outs = meta(c.x, th.expand(c.x.shape[0], -1))
            lh = ((lin(hs[0]) - c.hiddens[0]) ** 2).sum(-1).mean()
            lo = (F.softmax(c.outputs, -1) * (F.log_softmax(c.outputs, -1) - F.log_softmax(outs["a"], -1))).sum(-1)
            ((lh + lo.mean()) / len(chunks)).backward()
        meta.zero_grad()
        emb.adam_step(rows, lr=0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for i, (th, lin) in enumerate(ref):
        torch.testing.assert_close(emb.theta[i].detach(), th.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(emb.maps[i][0].weight.detach(), lin.weight.detach(), rtol=1e-6, atol=1e-7)
        state, want = emb.row_state(i), opt.state[lin.weight]
        assert float(state["opt"][1]["step"]) == float(want["step"]) == {0: 3, 1: 2, 2: 3}[i]
        torch.testing.assert_close(state["opt"][1]["exp_avg"], want["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(state["opt"][1]["exp_avg_sq"], want["exp_avg_sq"], rtol=1e-6, atol=1e-12)


def test_row_state_round_trip_and_views_write_the_tables():
    _, emb = _tiny_meta()
    for r in range(3):
        emb.theta_rows([r]).sum().backward()
        emb.apply_maps(r, [torch.ones(2, 6)])[0].sum().backward()
    emb.adam_step([0, 2], lr=0.1)
    other = ModelEmbeddings(["m0", "m1", "m2"], 3, [6], [[5], [7], [5]], "rnn")
    for r in range(3):
        other.load_row_state(r, emb.row_state(r))
    for r in range(3):
        a, b = emb.row_state(r), other.row_state(r)
        assert torch.equal(a["theta"], b["theta"]) and a["maps"].keys() == b["maps"].keys() == {"0.weight", "0.bias"}
        assert all(torch.equal(a["maps"][k], b["maps"][k]) for k in a["maps"])
        assert (a["opt"][0] is None) == (b["opt"][0] is None) == (r == 1)
    # writes through theta[i], maps[i] and init functions land in the tables
    with torch.no_grad():
        other.theta[1].copy_(torch.tensor([1.0, 2.0, 3.0]))
    torch.nn.init.zeros_(other.maps[1][0].weight)
    assert other.theta_matrix()[1].tolist() == [1.0, 2.0, 3.0] and other.row_state(1)["maps"]["0.weight"].eq(0).all()
    with pytest.raises(ValueError, match="m1"):
        other.load_row_state(1, emb.row_state(0))  # a 5-wide V where 7 is expected


def test_live_leaves_are_bounded_and_tables_stay_exact():
    _, emb = _tiny_meta()
    emb.live_rows = 2
    with torch.no_grad():  # readers (evaluation): the least recently used leaves are dropped
        emb.parameters_of(0)[0].fill_(0.5)
        emb.parameters_of(1), emb.parameters_of(2)
        assert len(emb._live) == 2 and 0 not in emb._live
        assert emb.theta[0].tolist() == [0.5] * 3  # evicted leaves were views: nothing lost
    # a training step over more models than live_rows keeps every leaf a gradient reaches until the update
    before = emb.theta_matrix()
    emb.theta_rows([0, 1, 2]).sum().backward()
    emb.adam_step([0, 1, 2], lr=0.1)
    assert (emb.theta_matrix() != before).all() and emb.steps[:, 0].eq(1).all()
    assert not emb._pinned
    with torch.no_grad():
        emb.parameters_of(0)
    assert list(emb._live) == [2, 0]  # the least recently used unpinned leaves went first (0, then 1)


def test_tables_on_disk_train_exactly_as_tables_in_memory(tmp_path):
    """With memory_bytes below the size of V's tables, V and its moments are memory-mapped files (unlinked at
    once: nothing is left in table_dir) whose rows are handed back to the OS after each step; the draws, the
    AdamW steps and a checkpoint round trip are exactly those of tables in memory."""
    ids, dims = ["m0", "m1", "m2", "m3"], [[5, 3], [7, 2], [5, 3], [4, 4]]
    built = {}
    for name, budget in (("memory", 10 ** 9), ("disk", 0)):
        torch.manual_seed(0)
        built[name] = ModelEmbeddings(ids, 3, [6, 4], dims, "cnn", memory_bytes=budget, table_dir=str(tmp_path))
    mem, disk = built["memory"], built["disk"]
    assert disk.on_disk and not mem.on_disk and not list(tmp_path.iterdir())
    torch.manual_seed(1)
    x = [torch.randn(2, 6, 3, 3), torch.randn(2, 4, 3, 3)]
    for rows in ([0, 2], [1, 3], [0, 1, 2, 3], [3]):
        for emb in (mem, disk):
            loss = emb.theta_rows(rows).pow(2).sum() + sum(h.pow(2).sum() for r in rows for h in emb.apply_maps(r, x))
            loss.backward()
            emb.adam_step(rows, lr=0.05, weight_decay=0.01)
    want = mem.table_state()["tables"]
    assert want["steps"].gt(0).all() and want["maps_v"].gt(0).any()
    got = disk.table_state()["tables"]
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
    assert disk.to("cpu").on_disk  # the same tables: still the files
    torch.save(disk.table_state(copy=False), tmp_path / "shard.pt")
    loaded = TableStates(torch.load(tmp_path / "shard.pt", mmap=True))
    again = ModelEmbeddings(ids, 3, [6, 4], dims, "cnn", memory_bytes=0, table_dir=str(tmp_path))
    for r, m in enumerate(ids):
        again.load_row_state(r, loaded[m])
    assert all(torch.equal(want[k], again.table_state()["tables"][k]) for k in want)


def _mapping_rss_kb(ptr: int) -> int:
    """Resident kB of this process's mapping that holds address ``ptr`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {ptr:#x}")


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_a_shard_of_tables_on_disk_is_copied_from_the_files_not_paged_in(tmp_path, monkeypatch, kernel_copy):
    """write_shard(files=...) writes the same checkpoint torch.save does (exact tensors, loaded with and
    without mmap, read per model), without paging the file-backed tables into the process: their
    mapping's resident set stays empty, where torch.save's write (the control) makes all of it resident.
    Also where the kernel cannot copy between the files (pread/pwrite in chunks)."""
    from dynamo_dist.meta import checkpoint

    if not kernel_copy:
        def refuse(*_a, **_k):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    ids = [f"m{i}" for i in range(64)]
    torch.manual_seed(0)
    disk = ModelEmbeddings(ids, 3, [64, 32], [[48, 16]] * len(ids), "cnn", memory_bytes=0, table_dir=str(tmp_path))
    x = [torch.randn(2, 64, 2, 2), torch.randn(2, 32, 2, 2)]
    for rows in ([0, 5, 9], [63, 1]):
        (disk.theta_rows(rows).sum() + sum(h.sum() for r in rows for h in disk.apply_maps(r, x))).backward()
        disk.adam_step(rows, lr=0.05)
    assert disk.on_disk and len(disk.table_files()) == 3
    state = TableStates(disk.table_state(copy=False))
    maps_ptr = disk.maps_table.data_ptr()
    disk.page_out()
    assert _mapping_rss_kb(maps_ptr) == 0
    (tmp_path / "streamed").mkdir()
    (tmp_path / "plain").mkdir()
    checkpoint.write_shard(tmp_path / "streamed", 0, state, files=disk.table_files())
    assert _mapping_rss_kb(maps_ptr) == 0  # nothing of the tables came through this process
    checkpoint.write_shard(tmp_path / "plain", 0, state)
    assert _mapping_rss_kb(maps_ptr) >= disk.maps_table.numel() * 4 // 1024 - 4  # the control: all of it
    name = checkpoint.shard_file(0)
    want = torch.load(tmp_path / "plain" / name, weights_only=True)
    for mmap in (False, True):
        got = torch.load(tmp_path / "streamed" / name, weights_only=True, mmap=mmap)
        assert got.keys() == want.keys() and got["tables"].keys() == want["tables"].keys()
        assert all(torch.equal(got["tables"][k], want["tables"][k]) for k in want["tables"])
    assert want["tables"]["maps_m"].ne(0).any()
    per_model = TableStates(torch.load(tmp_path / "streamed" / name, weights_only=True, mmap=True))
    for m in ("m0", "m9", "m63"):
        a, b = per_model[m], state[m]
        assert torch.equal(a["theta"], b["theta"]) and all(torch.equal(a["maps"][k], b["maps"][k]) for k in b["maps"])


def test_an_inference_copy_takes_the_tables_out_of_the_shard_file_file_to_file(tmp_path, monkeypatch):
    """write_inference_copy (what the MLflow Model keeps) copies theta and V out of a table-form shard by
    the kernel, not through the process (every byte it writes of them goes through _copy_file), and
    drops the optimiser state; the models' theta and V read back exactly."""
    from dynamo_dist.meta import checkpoint

    ids = [f"m{i}" for i in range(16)]
    emb = ModelEmbeddings(ids, 3, [8], [[5]] * len(ids), "rnn")
    (emb.theta_rows([0, 3]).sum() + sum(h.sum() for r in (0, 3) for h in emb.apply_maps(r, [torch.ones(2, 8)]))).backward()
    emb.adam_step([0, 3], lr=0.1)
    src, dest = tmp_path / "ckpt", tmp_path / "copy"
    src.mkdir()
    checkpoint.write_shard(src, 0, TableStates(emb.table_state()), shared={
        "step": 1, "meta": {}, "opt_meta": {}, "history": [], "model_ids": ids, "shards": [checkpoint.shard_file(0)]})
    copied = []
    real = checkpoint._copy_file
    monkeypatch.setattr(checkpoint, "_copy_file", lambda *a: (copied.append(a[4]), real(*a)))
    checkpoint.write_inference_copy(src, dest)
    kept = torch.load(dest / checkpoint.shard_file(0), weights_only=True)
    assert set(kept["tables"]) == {"theta", "maps"}  # no AdamW moments or step counts
    assert sorted(copied) == sorted(t.numel() * 4 for t in kept["tables"].values())
    (_, want), (_, got) = checkpoint.read_model_state(src), checkpoint.read_model_state(dest)
    assert sorted(got) == sorted(ids) and want["m3"]["maps"]["0.weight"].ne(emb.maps[5][0].weight.detach()).any()
    for m in ids:
        assert torch.equal(got[m]["theta"], want[m]["theta"])
        assert all(torch.equal(got[m]["maps"][k], v) for k, v in want[m]["maps"].items())


def test_tables_that_do_not_fit_on_disk_fail_at_build_naming_the_directory(tmp_path):
    """The files' blocks are reserved when the tables are made: no room is an error naming the directory
    and meta.table_bytes then, not a SIGBUS in the middle of training (here a 1 MiB file-size limit)."""
    code = f"""
import resource, signal
from dynamo_dist.meta.model import ModelEmbeddings
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
ModelEmbeddings(["a", "b"], 3, [512], [[512], [512]], "rnn", memory_bytes=0, table_dir={str(tmp_path)!r})
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "cannot reserve" in last and "meta.table_bytes" in last and str(tmp_path) in last, last
    assert not list(tmp_path.iterdir())


def test_heads_route_by_output_group():
    meta, emb = _tiny_meta(groups={"digit": 4, "parity": 2})
    ch_d = _chunk(0, group="digit", classes=4)
    ch_p = _chunk(1, group="parity", hdim=7, classes=2, seed=1)
    loss, _ = dynamo_loss(meta, emb, [ch_p], 1.0)
    loss.backward()
    assert meta.heads["parity"].weight.grad.abs().sum() > 0
    assert meta.heads["digit"].weight.grad is None or meta.heads["digit"].weight.grad.abs().sum() == 0
    meta.zero_grad(set_to_none=True)
    loss, _ = dynamo_loss(meta, emb, [ch_d, ch_p], 1.0)
    loss.backward()
    assert meta.heads["digit"].weight.grad.abs().sum() > 0


def test_meta_rnn_h0_independent_of_theta_and_theta_changes_dynamics():
    meta, _ = _tiny_meta()
    x = torch.randn(2, 7, 3)
    h_a = meta(x, torch.zeros(2, 3))[0][0]
    h_b = meta(x, torch.ones(2, 3))[0][0]
    assert not torch.allclose(h_a, h_b)
    # h_0 = 0 whatever theta: for every theta (not only theta = 0, where a theta-dependent h_0 such
    # as W theta would vanish too), one .step from h = 0 gives the forward pass's first state
    u0 = meta.encode(x)[:, 0]
    thetas = [torch.zeros(2, 3), torch.ones(2, 3), torch.randn(2, 3, generator=torch.Generator().manual_seed(1)) * 3]
    for theta in thetas:
        first = meta(x, theta)[0][0][:, 0]
        torch.testing.assert_close(meta.step(u0, theta, torch.zeros(2, 6)), first)
    # the control: a start that depends on theta gives another first state, so the check above can fail
    theta = thetas[2]
    h0_of_theta = torch.tanh(theta @ torch.ones(3, 6))
    assert not torch.allclose(meta.step(u0, theta, h0_of_theta), meta(x, theta)[0][0][:, 0], atol=1e-3)


def test_meta_resnet_shares_w_across_blocks_of_equal_width():
    spec = zoo.ArchSpec(arch="resnet18", input_kind="image", input_shape=(1, 8, 8), num_classes=10)
    meta = MetaResNet(spec, "resnet18", embedding_dim=4, output_sizes={"digits": 10}).eval()
    blocks = meta.stages[0]
    assert blocks[0].theta_proj is blocks[1].theta_proj is meta.theta_proj["64"]
    n_params = sum(p.numel() for p in meta.parameters())
    assert n_params == sum(p.numel() for p in {id(p): p for p in meta.parameters()}.values())
    x = torch.randn(2, 1, 8, 8)
    taps, outs = meta(x, torch.zeros(2, 4))
    assert [t.shape[1] for t in taps] == [64, 128, 256, 512]
    assert outs["digits"].shape == (2, 1, 10)
    taps2, _ = meta(x, torch.ones(2, 4))  # same input, another theta: theta reaches the first stage
    assert not torch.allclose(taps[0], taps2[0])
    with torch.no_grad():  # the control: with theta's projection zeroed, theta no longer matters
        for proj in meta.theta_proj.values():
            for p in proj.parameters():
                p.zero_()
    assert torch.allclose(meta(x, torch.zeros(2, 4))[0][0], meta(x, torch.ones(2, 4))[0][0])


def test_cosine_schedule_is_table1_7_over_32():
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(100, 100) == pytest.approx(math.cos(7 * math.pi / 16))


# ---------------------------------------------------------------- configs and validation


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="output_weight"):
        config.parse(config.MetaConfig, {"output_weight": -1})
    with pytest.raises(ValueError, match="embedding_dim"):
        config.parse(config.MetaConfig, {"embedding_dim": 0})
    with pytest.raises(ValueError, match="arch"):
        config.parse(config.GroupSpec, {"arch": "mlp"})
    with pytest.raises(ValueError, match="stepz"):
        config.parse(config.MetaConfig, {"stepz": 3})
    with pytest.raises(ValueError, match="duplicate group"):
        config.parse(config.PopulationConfig, {"groups": [{"name": "a"}, {"name": "a"}]})
    assert config.parse(config.PopulationConfig, {"root": "s3://bucket/pop"}).root == "s3://bucket/pop"
    with pytest.raises(ValueError, match=r"root.*ftp://host/pop.*supported schemes"):  # pyarrow.fs opens no ftp://
        config.parse(config.PopulationConfig, {"root": "ftp://host/pop"})
    with pytest.raises(ValueError, match=r"output_dir.*s3:///x.*no bucket"):
        config.parse(config.MetaConfig, {"output_dir": "s3:///x"})


def test_yaml_config_with_recipe_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("recipe: smoke\nmeta:\n  steps: 7\n")
    cfg = config.load(p, overrides={"meta.embedding_dim": 5})
    assert cfg.meta.steps == 7 and cfg.meta.embedding_dim == 5
    assert cfg.population == config.recipe("smoke").population
    p.write_text("meta:\n  output_weight: -2\n")
    with pytest.raises(ValueError, match=r"meta\.output_weight"):
        config.load(p)
    with pytest.raises(FileNotFoundError):
        config.load(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="unknown recipe"):
        config.recipe("huge")


def test_overrides_index_lists(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("recipe: smoke\n")
    cfg = config.load(p, overrides={"population.groups.1.num_seeds": 5})
    assert [g.num_seeds for g in cfg.population.groups] == [2, 5]
    # invalid values and unknown fields reach validation, which names the dotted field
    with pytest.raises(ValueError, match=r"population\.groups\.0\.num_seeds \(from --set population.groups.0.num_seeds=0\): Input should be greater"):
        config.load(p, overrides={"population.groups.0.num_seeds": 0})
    with pytest.raises(ValueError, match=r"population\.groups\.0\.bogus \(from --set population.groups.0.bogus=1\): Extra inputs"):
        config.load(p, overrides={"population.groups.0.bogus": 1})
    with pytest.raises(ValueError, match=r"population\.groups\.2.*2-element list"):
        config.load(p, overrides={"population.groups.2.lr": 0.1})
    with pytest.raises(ValueError, match=r"population\.groups\.x.*2-element list"):
        config.load(p, overrides={"population.groups.x.lr": 0.1})
    with pytest.raises(ValueError, match=r"meta\.steps.*not a mapping"):
        config.load(p, overrides={"meta.steps.x": 1})
    p.write_text("recipe: smoke\nsweep:\n")  # an empty YAML section is a mapping to fill in
    assert config.load(p, overrides={"sweep.num_samples": 3}).sweep.num_samples == 3
    p.write_text("run_dir: runs/x\n")  # groups come from the default: no list in the data to index
    with pytest.raises(ValueError, match=r"population\.groups.*default"):
        config.load(p, overrides={"population.groups.0.lr": 0.1})


def test_cli_set_indexes_lists(capsys):
    from dynamo_dist import cli

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    rc = cli.main(["population", "--config", str(smoke), "--set", "population.groups.0.num_seeds=0"])
    assert rc == 2
    assert "population.groups.0.num_seeds" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["population", "--recipe", "smoke", "--set", "population.groups.0.lr=0.5"])
    assert cli.load_pipeline(args).population.groups[0].lr == 0.5


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_parses_and_its_population_expands(name):
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / name)
    from dynamo_dist.population import train

    jobs = train.expand(cfg.population)
    assert jobs and len(train.work_units(cfg.population, jobs)) <= len(jobs)


def test_rayjob_entrypoint_is_a_pipeline_command_line_the_cli_accepts():
    import shlex

    import yaml

    from dynamo_dist import cli

    repo = Path(__file__).resolve().parents[1]
    job = yaml.safe_load((repo / "cluster" / "kuberay" / "rayjob-pipeline.yaml").read_text())
    argv = [a.replace("/app/", f"{repo}/") for a in shlex.split(job["spec"]["entrypoint"])]
    assert "main([\"run\", *sys.argv[1:]])" in (repo / "jobs" / "pipeline.py").read_text()
    args = cli.build_parser().parse_args(["run", *argv[2:]])
    cfg = cli.load_pipeline(args)
    assert cfg.population.groups and cfg.meta.steps > 0


def test_unknown_dataset_is_an_error():
    from dynamo_dist.data.tasks import load_task

    with pytest.raises(ValueError, match="imagenet"):
        load_task("imagenet")


def test_base_models_with_different_input_sizes_are_rejected():
    rows = [
        {"model_id": "a", "arch": "gru", "input_kind": "sequence", "input_shape": [40, 1], "vocab_size": None},
        {"model_id": "b", "arch": "gru", "input_kind": "sequence", "input_shape": [40, 2], "vocab_size": None},
    ]
    with pytest.raises(ValueError, match="different input sizes"):
        check_population(rows, "pop")
    rows[1]["input_shape"] = [40, 1]
    rows[1]["arch"] = "resnet18"
    with pytest.raises(ValueError, match="mix RNNs and ResNets"):
        check_population(rows, "pop")


def test_cli_ui_prints_the_classic_ml_experiments_page(monkeypatch, capsys):
    # MLflow 3's UI opens its GenAI view unless the URL asks for workflowType=machine_learning
    from dynamo_dist import cli, tracking

    served = []
    monkeypatch.setattr(tracking, "serve_ui", lambda *a: served.append(a) or 0)
    assert cli.main(["ui", "runs/x", "--port", "5123"]) == 0
    assert served == [("runs/x", "127.0.0.1", 5123)]
    assert "http://127.0.0.1:5123/#/experiments?workflowType=machine_learning" in capsys.readouterr().out


def test_register_model_flag_and_its_errors():
    from dynamo_dist import cli, tracking

    for cmd in ("meta", "run"):
        assert cli.build_parser().parse_args([cmd, "--register-model", "dyn"]).register_model == "dyn"
    for bad in ("", " ", "a/b", "a:b"):
        with pytest.raises(ValueError, match="a registered model name must be non-blank"):
            tracking.check_model_name(bad)
    with pytest.raises(ValueError, match="--register-model dyn: the meta run was not logged to MLflow"):
        tracking.register_meta_model(None, {"num_models": 4}, "dyn")


def test_updates_per_model_sets_the_steps_and_conflicts_with_steps(tmp_path):
    cfg = config.MetaConfig(updates_per_model=10, models_per_step=4, num_workers=2)
    # 1,000 models, 8 sampled per step across 2 workers: 10 updates each -> 1,250 steps
    assert cfg.for_population(1000).steps == 1250 and cfg.for_population(1000).updates_per_model is None
    # 3 models on 2 workers: each worker samples its 1-2 models, 4 per step in all
    assert cfg.for_population(3).steps == 8
    assert config.MetaConfig(steps=7).for_population(1000).steps == 7
    # what a run's MLflow params say: the average updates a model, however the schedule was given
    assert cfg.updates_a_model(1000) == 10 and cfg.for_population(1000).updates_a_model(1000) == 10
    assert config.MetaConfig(steps=100, models_per_step=4).updates_a_model(8) == 50
    with pytest.raises(ValueError, match=r"meta.updates_per_model \(3\) and meta.steps \(4\) are both set"):
        config.parse(config.PipelineConfig, {"meta": {"updates_per_model": 3, "steps": 4}})
    # a recipe's steps give way to the user's updates_per_model (file or --set)
    p = tmp_path / "c.yaml"
    p.write_text("recipe: demo\nmeta:\n  updates_per_model: 50\n")
    assert config.load(p).meta.updates_per_model == 50
    # the demo samples 6 models a worker: at W=2 each of 12 models is updated every step
    assert config.load(tmp_path / "c.yaml", overrides={}).meta.for_population(12).steps == 50
    data = config.apply_overrides(config.recipe_data("smoke"), {"meta.updates_per_model": 5})
    assert config.parse(config.PipelineConfig, data).meta.updates_per_model == 5


def test_the_demo_recipe_counts_updates_a_model_and_a_users_steps_replace_them(tmp_path):
    demo = config.recipe("demo").meta
    assert demo.updates_per_model == 700
    assert demo.for_population(12).steps == 700 and demo.for_population(18).steps == 1050
    assert demo.for_population(50).steps == math.ceil(700 * 50 / 12)
    # a user's steps replace the recipe's per-model schedule: --set, a file, a file then --set
    data = config.apply_overrides(config.recipe_data("demo"), {"meta.steps": 40})
    meta = config.parse(config.PipelineConfig, data).meta
    assert meta.updates_per_model is None and meta.for_population(50).steps == 40
    p = tmp_path / "c.yaml"
    p.write_text("recipe: demo\nmeta:\n  steps: 30\n")
    assert config.load(p).meta.for_population(50).steps == 30
    p.write_text("recipe: demo\nmeta:\n  updates_per_model: 100\n")
    assert config.load(p, overrides={"meta.steps": 20}).meta.for_population(50).steps == 20
    assert config.load(p).meta.for_population(12).steps == 100
    with pytest.raises(ValueError, match="both set"):
        config.load(p, overrides={"meta.steps": 20, "meta.updates_per_model": 5})
    # the printed recipe loads back as a config file (its schedule is one field, not both)
    from dynamo_dist import cli

    out = tmp_path / "recipes.txt"
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        assert cli.main(["recipes"]) == 0
    demo_doc = yaml.safe_load(out.read_text().split("# --- demo\n")[1].split("# ---")[0])
    assert "steps" not in demo_doc["meta"] and demo_doc["meta"]["updates_per_model"] == 700
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(demo_doc))
    assert config.load(tmp_path / "d.yaml").meta.for_population(12).steps == 700


def test_a_resume_with_another_worker_count_keeps_the_schedule_it_started():
    cfg = config.MetaConfig(updates_per_model=100, models_per_step=4, num_workers=1)
    started = cfg.replace(num_workers=2).for_population(64)  # 100 x 64 / 8 = 800 steps at W=2
    assert started.steps == 800 and cfg.for_population(64).steps == 1600
    assert cfg.for_population(64, resumed=started.model_dump(mode="json")).steps == 800
    # another schedule asked for (not just another W): the new one
    more = cfg.replace(updates_per_model=200)
    assert more.for_population(64, resumed=started.model_dump(mode="json")).steps == 3200
    # a checkpoint of an explicit step count that is not this schedule's: the new one
    assert cfg.for_population(64, resumed={"steps": 123, "num_workers": 2, "models_per_step": 4}).steps == 1600


def test_cli_root_and_out_set_the_stage_paths():
    from dynamo_dist import cli

    args = cli.build_parser().parse_args(["meta", "--recipe", "smoke", "--root", "/data/pop", "--out", "/data/meta"])
    cfg = cli.load_pipeline(args)
    assert cfg.population.root == "/data/pop" and cfg.meta.output_dir == "/data/meta"
    for cmd in ("population", "sweep", "run"):
        cfg = cli.load_pipeline(cli.build_parser().parse_args([cmd, "--recipe", "smoke", "--root", "/p"]))
        assert cfg.population.root == "/p" and cfg.meta.output_dir == "runs/smoke/meta"
    an = cli.build_parser().parse_args(["analyze", "--out", "/r"])
    assert an.out_dir == "/r"


def test_remote_paths_name_like_pathlib_without_touching_the_store():
    from dynamo_dist.data import fsio

    p = fsio.as_path("s3://bucket/runs//demo/./meta/")
    assert isinstance(p, fsio.RemotePath) and str(p) == "s3://bucket/runs/demo/meta"
    assert (p.name, str(p.parent), str(p / "a.parquet"), str(p.with_name("pop"))) == (
        "meta", "s3://bucket/runs/demo", "s3://bucket/runs/demo/meta/a.parquet", "s3://bucket/runs/demo/pop")
    assert str(p / ".." / "population") == "s3://bucket/runs/demo/population"
    assert fsio.relative("s3://bucket/runs/demo/population", "s3://bucket/runs/demo/meta") == "../population"
    assert fsio.relative("s3://other/population", "s3://bucket/meta") is None  # no path joins two buckets
    assert fsio.absolute("gs://b/x") == "gs://b/x" and fsio.absolute("rel").startswith("/")
    assert isinstance(fsio.as_path("file:///tmp/x"), Path) and not fsio.is_uri("/tmp/x")
    # the host of a non-bucket scheme stays in the URI, not in the filesystem path
    h = fsio.RemotePath("hdfs://namenode:8020/data/pop")
    assert str(h._from_fs_path("/data/pop/manifest.parquet")) == "hdfs://namenode:8020/data/pop/manifest.parquet"


@pytest.mark.parametrize("spec", [SEQ, zoo.ArchSpec(arch="resnet10", input_kind="image", input_shape=(1, 8, 8),
                                                    num_classes=10)])
def test_theta_weights_are_the_weights_theta_multiplies(spec):
    # the embedding penalty's W: zeroing exactly these makes the meta-model ignore theta
    meta = build_meta_model(zoo.family_of(spec.arch), spec, {"g": spec.num_classes}, embedding_dim=3,
                            hidden_size=6).eval()
    x = torch.randn((2,) + spec.input_shape)
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert all(w.shape[-1] == 3 for w in meta.theta_weights())
    assert not torch.allclose(meta(x, a)[0][-1], meta(x, b)[0][-1])
    with torch.no_grad():
        for w in meta.theta_weights():
            w.zero_()
    torch.testing.assert_close(meta(x, a)[0][-1], meta(x, b)[0][-1])


def test_embedding_penalty_known_answer():
    meta = build_meta_model("rnn", SEQ, {"g": 4}, embedding_dim=2, hidden_size=3)
    with torch.no_grad():
        meta.cell.weight_ih_l0.fill_(2.0)  # theta's columns: (3*3, 2) entries of 2 -> ||W||^2 = 72
    theta = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # ||theta||^2: 25 and 1, mean 13
    got = embedding_penalty(meta, theta, alpha=0.5, num_models=8)
    torch.testing.assert_close(got, torch.tensor(0.5 * 0.5 * (13 + 72 / 8)))
    got.backward()
    assert meta.cell.weight_ih_l0.grad[:, :-2].abs().sum() == 0  # only theta's columns are penalised
    assert meta.cell.weight_ih_l0.grad[:, -2:].abs().sum() > 0
    with pytest.raises(ValueError, match="embedding_penalty"):
        embedding_penalty(meta, theta, alpha=-1.0, num_models=8)
