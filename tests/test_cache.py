"""On-demand trajectory reads (data/cache.py, store.trajectory_info): exact values, a budget that holds."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from dynamo_dist.data import store
from dynamo_dist.data.cache import TrajectoryCache

N, T, H, C = 12, 5, 6, 3


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "pop"
    store.init_root(r, {"test": True})
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        store.write_trajectory(r, f"m-{i}", "probe", [torch.randn(N, T, H, generator=g)],
                               torch.randn(N, T, C, generator=g), "rnn", "float16" if i % 2 else "float32")
    shapes = [(4, 6, 6), (8, 3, 3)]
    store.write_trajectory(r, "r-0", "test", [torch.randn((N,) + s, generator=g) for s in shapes],
                           torch.randn(N, 1, C, generator=g), "cnn", "float16")
    return str(r)


def _bytes(traj: store.Trajectory) -> int:
    return sum(h.numel() * h.element_size() for h in traj.hiddens) + traj.outputs.numel() * traj.outputs.element_size()


def test_footer_info_matches_the_decoded_file(root):
    for mid, split in [(f"m-{i}", "probe") for i in range(6)] + [("r-0", "test")]:
        info = store.trajectory_info(root, mid, split)
        full = store.read_trajectory(root, mid, split, dtype=None)
        assert info.num_examples == full.num_examples == N
        assert info.dtype == str(full.outputs.dtype).removeprefix("torch.")
        assert info.decoded_bytes == _bytes(full)
        per_example = [tuple(h.shape[2:]) if info.family == "rnn" else tuple(h.shape[1:]) for h in full.hiddens]
        assert info.hidden_shapes == per_example and info.num_outputs == C


def test_on_demand_reads_equal_full_reads_and_keep_storage_precision(root):
    cache = TrajectoryCache(root, budget_bytes=None)
    for i in range(6):
        got, want = cache.get(f"m-{i}"), store.read_trajectory(root, f"m-{i}", dtype=None)
        assert got.outputs.dtype == (torch.float16 if i % 2 else torch.float32)
        assert torch.equal(got.hiddens[0], want.hiddens[0]) and torch.equal(got.outputs, want.outputs)
        # the float32 read of a float16 file is exactly the upcast of what the cache holds
        torch.testing.assert_close(got.hiddens[0].float(), store.read_trajectory(root, f"m-{i}").hiddens[0],
                                   rtol=0, atol=0)
    assert cache.reads == 6 and cache.get("m-0") is cache.get("m-0") and cache.hits == 2


def test_the_cache_never_exceeds_its_budget_and_evicts_least_recently_used(root):
    one = store.trajectory_info(root, "m-0").decoded_bytes  # float32: the largest of the m-* files
    cache = TrajectoryCache(root, budget_bytes=2 * one)
    order = ["m-0", "m-2", "m-4", "m-0", "m-1", "m-3", "m-5", "m-2", "m-4"]
    for mid in order:
        traj = cache.get(mid)
        assert torch.equal(traj.hiddens[0], store.read_trajectory(root, mid, dtype=None).hiddens[0])
        assert cache.nbytes <= 2 * one
    assert cache.peak_bytes <= 2 * one
    assert cache.reads > len(set(order))  # it did evict and re-read
    # least recently used goes first: m-4 and m-2 are the two most recent
    assert set(k[0] for k in cache._items) == {"m-2", "m-4"}


def test_a_budget_smaller_than_one_trajectory_names_the_field(root):
    cache = TrajectoryCache(root, budget_bytes=100)
    with pytest.raises(ValueError, match=r"meta.cache_bytes=100 is smaller than one trajectory .*'m-0'"):
        cache.get("m-0")


def test_prefetched_trajectories_are_served_without_a_second_read(root):
    cache = TrajectoryCache(root, budget_bytes=None)
    cache.prefetch(["m-1", "m-2"])
    cache.close()  # waits for the background reads
    assert cache.reads == 2
    assert torch.equal(cache.get("m-1").outputs, store.read_trajectory(root, "m-1", dtype=None).outputs)
    assert cache.reads == 2 and cache.hits == 1


def test_a_worker_reads_only_its_models_from_a_checkpoint_written_by_other_workers(tmp_path):
    from dynamo_dist.meta import checkpoint

    g = torch.Generator().manual_seed(0)
    states = {f"m{i}": {"theta": torch.randn(3, generator=g), "maps": {"0.weight": torch.randn(4, 2, generator=g)},
                        "opt": [{"step": torch.tensor(5.0), "exp_avg": torch.randn(3, generator=g)}, None]}
              for i in range(7)}
    ids = sorted(states)
    shards = [ids[r::3] for r in range(3)]  # written by 3 workers
    for r, own in enumerate(shards):
        shared = {"step": 5, "meta": {}, "opt_meta": {}, "shards": [checkpoint.shard_file(k) for k in range(3)],
                  "model_ids": ids} if r == 0 else None
        checkpoint.write_shard(tmp_path, r, {m: states[m] for m in own}, shared=shared)
    mine = ids[1::2]  # read back by 2 workers: rank 1's models
    _, got, _ = checkpoint.read_sharded(tmp_path, model_ids=mine)
    assert sorted(got) == mine
    for m in mine:  # values, not ids
        assert torch.equal(got[m]["theta"], states[m]["theta"])
        assert torch.equal(got[m]["maps"]["0.weight"], states[m]["maps"]["0.weight"])
        assert torch.equal(got[m]["opt"][0]["exp_avg"], states[m]["opt"][0]["exp_avg"]) and got[m]["opt"][1] is None
    _, everything, _ = checkpoint.read_sharded(tmp_path)
    assert sorted(everything) == ids


def test_a_run_checkpoint_keeps_the_shard_files_and_rewrites_never_mix_steps(tmp_path):
    """The run's copy of a sharded checkpoint: shard files linked, theta/V and shared weights read back
    exactly, theta alone without the rest; a rewrite at a later step leaves only that step's files;
    the inference copy has no optimiser state and loads the same."""
    from dynamo_dist.meta import checkpoint

    g = torch.Generator().manual_seed(1)

    def ray_checkpoint(d: Path, step: int) -> dict:
        states = {f"m{i}": {"theta": torch.randn(3, generator=g), "maps": {"0.weight": torch.randn(4, 2, generator=g)},
                            "opt": [{"step": torch.tensor(5.0), "exp_avg": torch.randn(3, generator=g)}, None]}
                  for i in range(5)}
        ids = sorted(states)
        d.mkdir()
        for r, own in enumerate([ids[0::2], ids[1::2]]):
            shared = {"step": step, "meta": {"w": torch.full((2,), float(step))}, "opt_meta": {"state": {}},
                      "shards": [checkpoint.shard_file(k) for k in range(2)], "model_ids": ids} if r == 0 else None
            checkpoint.write_shard(d, r, {m: states[m] for m in own}, shared=shared)
        return states

    kept = tmp_path / "run" / "checkpoint"
    first = ray_checkpoint(tmp_path / "c10", 10)
    checkpoint.write_run_checkpoint(kept, tmp_path / "c10")
    assert (kept / "shard-1-s00000010.pt").stat().st_ino == (tmp_path / "c10" / "shard-1.pt").stat().st_ino
    meta, per_model = checkpoint.read_model_state(kept)
    assert torch.equal(meta["w"], torch.full((2,), 10.0)) and sorted(per_model) == sorted(first)
    for m, s in first.items():
        assert torch.equal(per_model[m]["theta"], s["theta"]) and torch.equal(per_model[m]["maps"]["0.weight"],
                                                                             s["maps"]["0.weight"])
        assert "opt" not in per_model[m]
    assert {m: t.tolist() for m, t in checkpoint.read_thetas(kept).items()} == {
        m: s["theta"].tolist() for m, s in first.items()}
    later = ray_checkpoint(tmp_path / "c20", 20)  # the run resumed and finished again
    checkpoint.write_run_checkpoint(kept, tmp_path / "c20")
    assert sorted(f.name for f in kept.iterdir()) == ["shard-0-s00000020.pt", "shard-1-s00000020.pt", "shared.pt"]
    meta, per_model = checkpoint.read_model_state(kept)
    assert torch.equal(meta["w"], torch.full((2,), 20.0))
    assert all(torch.equal(per_model[m]["theta"], later[m]["theta"]) for m in later)
    assert not any(torch.equal(per_model[m]["theta"], first[m]["theta"]) for m in first)  # the control
    light = tmp_path / "pyfunc"
    checkpoint.write_inference_copy(kept, light)
    for name in checkpoint.safe_load(light / "shared.pt")["shards"]:
        assert all(set(s) == {"theta", "maps"} for s in checkpoint.safe_load(light / name).values())
    assert "opt_meta" not in checkpoint.safe_load(light / "shared.pt")
    _, again = checkpoint.read_model_state(light)
    assert all(torch.equal(again[m]["maps"]["0.weight"], later[m]["maps"]["0.weight"]) for m in later)


def test_a_split_read_once_streams_through_without_being_held(root):
    cache = TrajectoryCache(root, budget_bytes=10 ** 9)
    got = cache.get("r-0", "test", keep=False)
    assert cache.nbytes == 0 and cache.reads == 1
    assert torch.equal(got.hiddens[1], store.read_trajectory(root, "r-0", "test", dtype=None).hiddens[1])
    cache.get("m-0")
    assert cache.nbytes == store.trajectory_info(root, "m-0").decoded_bytes


def _spill_fds(directory: Path) -> list[str]:
    """This process's open files in ``directory`` (unlinked ones read '<path> (deleted)')."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [link for link in links if link.startswith(str(directory))]


def test_spilled_copies_are_read_back_exactly_within_their_budget_and_go_with_the_cache(root, monkeypatch, tmp_path):
    one = store.trajectory_info(root, "r-0", "test").decoded_bytes  # the largest file
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    cache = TrajectoryCache(root, budget_bytes=one, spill_bytes=2 * one, spill_dir=str(spill_dir))
    keys = [(f"m-{i}", "probe") for i in range(6)] + [("r-0", "test")]
    first = {k: cache.get(*k) for k in keys}
    decoded = []
    real = store.read_trajectory

    def counted(r, mid, split="probe", dtype="float32"):
        decoded.append(mid)
        return real(r, mid, split, dtype)

    monkeypatch.setattr(store, "read_trajectory", counted)
    for k in reversed(keys):  # evicted from memory by now: back from disk, or decoded when not kept
        got, want = cache.get(*k), first[k]
        assert [h.dtype for h in got.hiddens] == [h.dtype for h in want.hiddens]  # storage precision kept
        assert all(torch.equal(a, b) for a, b in zip(got.hiddens, want.hiddens))  # CNN taps too
        assert torch.equal(got.outputs, want.outputs) and got.model_id == k[0]
        got.outputs.add_(0)  # writable, like a decoded one
        assert cache.spill.nbytes <= 2 * one
    assert cache.spill.reads >= 2 and len(decoded) < len(keys)  # some came back from disk, not Parquet
    # one file, unlinked when made: nothing in the directory even now, and it closes with the cache
    assert not list(spill_dir.iterdir())
    assert [link.endswith("(deleted)") for link in _spill_fds(spill_dir)] == [True]
    streamed = TrajectoryCache(root, budget_bytes=None, spill_bytes=10 ** 9)
    streamed.get("r-0", "test", keep=False)
    assert not streamed.spill._entries  # a split evaluated once is not copied to disk
    streamed.close()
    cache.close()
    assert not _spill_fds(spill_dir)


def test_the_spill_ring_drops_the_oldest_copies_it_overwrites_and_returns_the_rest_exactly(root):
    from dynamo_dist.data.cache import SpillRing

    trajs = {m: store.read_trajectory(root, m, "probe", dtype=None) for m in [f"m-{i}" for i in range(6)]}
    trajs["r-0"] = store.read_trajectory(root, "r-0", "test", dtype=None)
    size = {m: sum(h.numel() * h.element_size() for h in t.hiddens) + t.outputs.numel() * t.outputs.element_size()
            for m, t in trajs.items()}
    budget = 3 * size["m-0"] + size["m-0"] // 2
    assert size["r-0"] <= budget
    ring = SpillRing(budget)
    order = ["m-0", "m-1", "m-2", "m-3", "r-0", "m-4", "m-5", "m-0", "m-1", "r-0", "m-2"]
    held: list[str] = []
    for m in order:
        ring.put((m, "probe"), trajs[m])
        now = [k[0] for k in ring._entries]
        written = held + ([m] if m not in held else [])
        assert now == written[len(written) - len(now):] and now[-1] == m  # the newest copies, oldest dropped
        held = now
        assert ring.nbytes == sum(size[k] for k in held) <= budget
        spans = sorted((e.offset, e.offset + e.size) for e in ring._entries.values())
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= budget  # no overlap
        for k in held:
            got = ring.get((k, "probe"))
            assert torch.equal(got.outputs, trajs[k].outputs) and all(
                torch.equal(a, b) for a, b in zip(got.hiddens, trajs[k].hiddens))
    assert ring.get(("m-3", "probe")) is None  # overwritten long ago
    ring.close()


def test_a_spill_that_cannot_be_written_loses_nothing(root, monkeypatch):
    cache = TrajectoryCache(root, budget_bytes=None, spill_bytes=10 ** 9)

    def full(*_a):  # as if the disk were full: every write fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    got = cache.get("m-1")
    assert torch.equal(got.outputs, store.read_trajectory(root, "m-1", dtype=None).outputs)
    assert cache.spill.nbytes == 0 and not cache.spill._entries and cache.spill.get(("m-1", "probe")) is None
