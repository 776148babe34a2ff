"""The meta-model checkpoint formats, plain torch (no Ray): testable and readable anywhere.

Sharded checkpoint directory (what Ray Train workers save at every ``checkpoint_every``
step; Ray Train merges the files every worker uploads under one directory name)::

    shared.pt                 rank 0: format, step, shared weights + optimiser, global loss history,
                              num_workers, the shard file names, model ids, mlflow run id, config
    shard-<rank>.pt           every rank: its models' theta, V and AdamW moments, in the table
                              form of ``ModelEmbeddings.table_state`` (a few stacked tensors and
                              the layout, read per model through ``model.TableStates``); shards
                              of earlier runs are {model_id: theta, V state, optimiser moments}
    test_metrics-<rank>.json  final checkpoint only: test-split metrics of the rank's models

Shards are keyed by model_id, so a restarted run or one resumed with another worker count
re-assigns them. A merged state (``{"step", "meta", "opt_meta", "shard": {model_id: ...}}``)
is what ``DynamoTrainer.state_dict`` gives (and a meta run's ``checkpoint.pt`` held before
runs kept their checkpoint sharded); all of it loads with ``torch.load(weights_only=True)``.

A finished meta run keeps its final checkpoint in the same format, in ``<output_dir>/checkpoint/``
(``write_run_checkpoint``): the shard files of the last Ray Train checkpoint, linked or copied
file by file (the driver never holds every model's state), renamed ``shard-<rank>-s<step>.pt``
so that a rewrite (a run resumed and finished again, a trial rewriting its outputs at every
report) puts new shard files first and then replaces ``shared.pt``, which names them: a reader
or a killed writer never pairs one step's shared weights with another step's theta/V.
``read_thetas`` reads theta alone (memory-mapped), ``read_model_state`` theta, V and the shared
weights without optimiser state, for loading the meta-model. Every tensor is a CPU tensor whatever the
device of the run (``to_cpu``), and is loaded onto the CPU: a run trained on GPUs resumes
on CPUs and the other way round.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ..data import fsio

FORMAT = 1
SHARED_FILE = "shared.pt"
# MetaConfig fields a checkpoint's tensors depend on: a resumed run must not change them.
SHAPE_FIELDS = ("embedding_dim", "hidden_size", "embed_dim", "resnet_arch")


def shard_file(rank: int) -> str:
    return f"shard-{rank}.pt"


def metrics_file(rank: int) -> str:
    return f"test_metrics-{rank}.json"


def to_cpu(obj):
    """A nested state with every tensor on the CPU; CPU tensors are kept, not copied, and a module
    state_dict keeps its ``_metadata`` (per-module versions ``load_state_dict`` reads)."""
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def shard_states(obj):
    """A loaded shard (either form) as ``{model_id: state}``: table-form shards through ``TableStates``."""
    from .model import TableStates, is_table_state

    return TableStates(obj) if is_table_state(obj) else obj


def _plain(obj):
    """What ``torch.save`` writes of a shard, or of a merged state holding one: its raw tables."""
    from .model import TableStates

    if isinstance(obj, TableStates):
        return obj.raw
    if isinstance(obj, dict) and isinstance(obj.get("shard"), TableStates):
        return {**obj, "shard": obj["shard"].raw}
    return obj


def save_atomic(obj, path: str | os.PathLike, files: Mapping[int, tuple[int, int]] | None = None) -> None:
    """``torch.save`` whole (``fsio.write_bytes_atomic``): readers never see half a file. ``files``
    (a local ``path`` only): tensors that are file-backed, copied file to file (``save_streamed``)
    into a temporary file that then replaces ``path``, never held in memory."""
    where = fsio.as_path(path)
    if files and not isinstance(where, fsio.RemotePath):
        tmp = where.with_name(f".{where.name}.tmp-{os.getpid()}")
        try:
            save_streamed(_plain(obj), tmp, files)
            os.replace(tmp, where)
        finally:
            tmp.unlink(missing_ok=True)
        return
    buf = io.BytesIO()
    torch.save(_plain(obj), buf)
    fsio.write_bytes_atomic(where, buf.getvalue())


def load(path: str | os.PathLike) -> dict:
    """A merged state (``checkpoint.pt``, local or on an object store); FileNotFoundError names the path."""
    if not fsio.as_path(path).is_file():
        raise FileNotFoundError(f"meta run checkpoint not found: {path}")
    state = safe_load(path)
    if isinstance(state, dict) and "shard" in state:
        state["shard"] = shard_states(state["shard"])
    return state


def safe_load(path: str | os.PathLike):
    """``torch.load(weights_only=True)`` with errors that name the file: a checkpoint holding
    other objects than tensors is refused (unpickling it could run code), a damaged one too."""
    import pickle  # noqa: PLC0415

    where = fsio.as_path(path)
    try:
        source = io.BytesIO(where.read_bytes()) if isinstance(where, fsio.RemotePath) else where
        return torch.load(source, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ValueError(f"checkpoint {path} holds objects other than tensors and plain containers; it was not "
                         "written by dynamo_dist and is not loaded (unpickling it could run code)") from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"checkpoint {path} is damaged or not a torch checkpoint "
                         f"({str(err).splitlines()[0][:200]}); re-run its meta stage") from None


def write_shard(directory: str | os.PathLike, rank: int, shard_state: dict,
                test_metrics: dict[str, dict] | None = None, shared: dict | None = None,
                files: Mapping[int, tuple[int, int]] | None = None) -> None:
    """One worker's files of a sharded checkpoint; rank 0 passes ``shared`` (see module docstring).
    ``files``: the tables that are memory-mapped files (``ModelEmbeddings.table_files``), copied into
    the shard from their files (``save_streamed``), not read through the mapping."""
    d = Path(directory)
    if shared is not None:
        torch.save({"format": FORMAT, **shared}, d / SHARED_FILE)
    if files:
        save_streamed(_plain(shard_state), d / shard_file(rank), files)
    else:
        torch.save(_plain(shard_state), d / shard_file(rank))
    if test_metrics is not None:
        (d / metrics_file(rank)).write_text(json.dumps(test_metrics))


def save_streamed(obj, path: str | os.PathLike, files: Mapping[int, tuple[int, int]],
                  chunk_bytes: int = 64 * 2 ** 20) -> None:
    """``torch.save(obj, path)`` to a local file, the same file for ``torch.load`` (with or without
    mmap), written so that a tensor whose storage is a memory-mapped file never passes through this
    process: ``files`` maps such a storage's data_ptr to (descriptor, offset) of its bytes in their
    file, and they are copied from there by the kernel (``os.copy_file_range``; ``pread``/``pwrite``
    of ``chunk_bytes`` where that is not supported). ``torch.save`` reading a 4 GB table through its
    mapping made all of it resident at once (``benchmarks/bench_theta_table.py``).

    How: ``torch.save`` under ``torch.serialization.skip_data`` writes everything but the storages'
    bytes (their records keep their size and place); the file's own records, loaded memory-mapped,
    tell where each storage's bytes go; then every storage is written there. The zip records keep
    a CRC of 0, which ``torch.load`` does not check."""
    path = Path(path)
    with torch.serialization.skip_data():
        torch.save(obj, path)
    skeleton = torch.load(path, weights_only=True, mmap=True, map_location="cpu")  # views of the file
    pairs = {}  # by storage, as torch.save counts them (zero-size ones may share a data_ptr)
    for src, skel in _tensor_pairs(obj, skeleton):
        st = src.untyped_storage()
        pairs.setdefault(st._cdata, (st, skel.untyped_storage()))
    where = record_offsets(path, [skel for _, skel in pairs.values()])
    del skeleton
    with open(path, "r+b") as f:
        out = f.fileno()
        for (st, _), offset in zip(pairs.values(), where):
            source = files.get(st.data_ptr()) if st.nbytes() else None
            if source is not None:
                _copy_file(source[0], source[1], out, offset, st.nbytes(), chunk_bytes)
            else:
                data = memoryview(torch.empty(0, dtype=torch.uint8).set_(st).numpy())
                for lo in range(0, len(data), chunk_bytes):
                    fsio.pwrite_all(out, data[lo:lo + chunk_bytes], offset + lo)


def record_offsets(path: str | os.PathLike, storages: list) -> list[int]:
    """Where in the torch.save file ``path`` the bytes of each of ``storages`` lie: ``storages`` are
    every storage of ``torch.load(path, weights_only=True, mmap=True)`` (one mapping of the file:
    their addresses are its records' offsets plus one base). RuntimeError when they do not match
    the file's records."""
    reader = torch._C.PyTorchFileReader(str(path))
    records = {reader.get_record_offset(n): reader.get_record_size(n) for n in reader.get_all_records()
               if re.fullmatch(r"data/\d+", n)}
    if len(storages) != len(records):
        raise RuntimeError(f"{path}: {len(storages)} storages but {len(records)} tensor records")
    base = min(st.data_ptr() for st in storages) - min(records)  # where the mapping of the file begins
    out = []
    for st in storages:
        offset = st.data_ptr() - base
        if records.get(offset) != st.nbytes():
            raise RuntimeError(f"{path}: a storage of {st.nbytes()} bytes has no record at offset {offset}")
        out.append(offset)
    return out


def _tensor_pairs(a, b):
    """The tensors of two states of the same structure, side by side."""
    if torch.is_tensor(a):
        yield a, b
    elif isinstance(a, Mapping):
        for k in a:
            yield from _tensor_pairs(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b):
            yield from _tensor_pairs(x, y)


def _copy_file(src: int, src_offset: int, dst: int, dst_offset: int, count: int, chunk_bytes: int) -> None:
    """``count`` bytes of file ``src`` from ``src_offset`` to file ``dst`` at ``dst_offset``."""
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src, dst, count - done, src_offset + done, dst_offset + done)
            if n == 0:
                raise OSError(f"copy_file_range: source ended after {done} of {count} bytes")
            done += n
        return
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            raise
    while done < count:  # the kernel cannot copy between these files: bounded reads and writes
        data = os.pread(src, min(chunk_bytes, count - done), src_offset + done)
        if not data:
            raise OSError(f"pread: source ended after {done} of {count} bytes")
        fsio.pwrite_all(dst, memoryview(data), dst_offset + done)
        done += len(data)


def read_sharded(path: str | os.PathLike, model_ids: list[str] | None = None,
                 ) -> tuple[dict, dict[str, dict], dict[str, dict] | None]:
    """Read a merged checkpoint directory -> (shared state, {model_id: shard state}, test metrics).

    ``model_ids``: only these models' states (a worker's own): shard files are memory-mapped
    and only the wanted tensors copied, so a worker's memory follows its own models even
    when the checkpoint was written by another number of workers. Test metrics are None
    unless every worker of that checkpoint wrote them (final checkpoint).
    """
    path = Path(path)
    if not (path / SHARED_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {SHARED_FILE}; not a dynamo_dist meta checkpoint")
    shared = safe_load(path / SHARED_FILE)
    if shared.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: format {shared.get('format')!r}, this code reads {FORMAT}")
    from .model import TableStates, is_table_state

    wanted = None if model_ids is None else set(model_ids)
    parts: list = []
    seen: set[str] = set()
    for name in shared["shards"]:
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: shard file {name} is missing")
        if wanted is None:
            part = shard_states(torch.load(path / name, weights_only=True, map_location="cpu"))
        else:
            mapped = torch.load(path / name, weights_only=True, mmap=True, map_location="cpu")
            if is_table_state(mapped):  # states are copied out of the mapped file as they are read
                part = TableStates(mapped, only=wanted, copy=True)
            else:
                part = {m: _cloned(s) for m, s in mapped.items() if m in wanted}
            del mapped
        dup = seen & set(part)
        if dup:
            raise ValueError(f"checkpoint {path}: models {sorted(dup)[:5]} appear in more than one shard")
        seen |= set(part)
        parts.append(part)
    per_model = parts[0] if len(parts) == 1 else _Chained(parts)
    expected = set(shared["model_ids"]) if wanted is None else wanted & set(shared["model_ids"])
    missing = sorted(expected - set(per_model))
    if missing:
        raise ValueError(f"checkpoint {path} lacks theta/V of models {missing[:5]}")
    return shared, per_model, read_test_metrics(path, shared)


def read_test_metrics(path: str | os.PathLike, shared: dict) -> dict[str, dict] | None:
    """{model_id: test metrics} of a final checkpoint; None unless every worker wrote its file."""
    metrics: dict[str, dict] = {}
    for r in range(len(shared["shards"])):
        f = Path(path) / metrics_file(r)
        if not f.is_file():
            return None
        metrics.update(json.loads(f.read_text()))
    return metrics


class _Chained(Mapping):
    """One ``{model_id: state}`` over the shards' own mappings (no state made before it is read)."""

    def __init__(self, parts: list[Mapping]):
        self._parts = parts
        self._where = {m: i for i, p in enumerate(parts) for m in p}

    def __getitem__(self, model_id: str) -> dict:
        return self._parts[self._where[model_id]][model_id]

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _cloned(obj):
    """A copy of a nested state whose tensors no longer reference the memory-mapped file."""
    from .model import _map_tensors

    return _map_tensors(obj, torch.clone)


def merged_state(shared: dict, per_model: dict[str, dict]) -> dict:
    """The merged state of a sharded checkpoint (the layout of ``DynamoTrainer.state_dict``)."""
    return {"step": shared["step"], "meta": shared["meta"], "opt_meta": shared["opt_meta"], "shard": per_model}


def check_compatible(shared: dict, cfg, model_ids: list[str], where: str) -> None:
    """A checkpoint resumes only under the same tensor shapes, the same population and a meta-model
    layout this version builds (no BatchNorm meta-ResNet)."""
    from .model import refuse_batchnorm_state

    old = shared["config"]
    bad = [f"{k}: checkpoint {old.get(k)!r} vs config {getattr(cfg, k)!r}" for k in SHAPE_FIELDS
           if old.get(k) != getattr(cfg, k)]
    if bad:
        raise ValueError(f"cannot resume from {where}: " + "; ".join(bad))
    meta_keys = shared.get("meta", {})
    if any(k.startswith("cell.") for k in meta_keys) and ("recurrence_gain" in meta_keys) != cfg.theta_gain:
        raise ValueError(f"cannot resume from {where}: its meta GRU was trained "
                         + ("with" if "recurrence_gain" in meta_keys else "without")
                         + f" theta's recurrence gain, this config has meta.theta_gain={cfg.theta_gain} "
                         "(set meta.theta_gain to match to resume it)")
    if sorted(shared["model_ids"]) != sorted(model_ids):
        extra = sorted(set(model_ids) - set(shared["model_ids"]))
        gone = sorted(set(shared["model_ids"]) - set(model_ids))
        raise ValueError(f"cannot resume from {where}: population changed (new models {extra[:5]}, "
                         f"missing models {gone[:5]})")
    try:
        refuse_batchnorm_state(shared.get("meta", {}))
    except ValueError as err:
        raise ValueError(f"cannot resume from {where}: {err}") from None


def maps_base_dims(maps_state: dict) -> list[int]:
    """A model's width per tap from its saved V maps (``"<tap>.weight"`` rows are base units)."""
    taps: dict[int, int] = {}
    for k, v in maps_state.items():
        i, name = k.split(".", 1)
        if name == "weight":
            taps[int(i)] = v.shape[0]
    return [taps[i] for i in sorted(taps)]


# ---------------------------------------------------------------- a finished run's checkpoint


def run_shard_file(rank: int, step: int) -> str:
    return f"shard-{rank}-s{step:08d}.pt"


def write_run_checkpoint(dest: str | os.PathLike, source: str | os.PathLike | None = None, *,
                         state: dict | None = None, shared: dict | None = None,
                         files: Mapping[int, tuple[int, int]] | None = None) -> None:
    """A meta run's final checkpoint in ``dest`` (a local directory), from a sharded checkpoint
    directory ``source`` (its shard files hard-linked, or copied across filesystems: no tensor is
    loaded) or from a merged ``state`` of one process (one shard; ``shared``: the extra shared
    fields, see ``ray_train``; ``files``: its file-backed tables, see ``save_streamed``). Shards first,
    then ``shared.pt`` (atomic), then shard files no longer named are removed."""
    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    if source is not None:
        src = Path(source)
        head = safe_load(src / SHARED_FILE)
        names = []
        for rank, name in enumerate(head["shards"]):
            names.append(run_shard_file(rank, int(head["step"])))
            _link_or_copy(src / name, d / names[-1])
    else:
        head = {"format": FORMAT, "step": state["step"], "meta": state["meta"], "opt_meta": state["opt_meta"],
                "num_workers": 1, "model_ids": sorted(state["shard"]), **(shared or {})}
        names = [run_shard_file(0, int(state["step"]))]
        save_atomic(state["shard"], d / names[0], files)
    save_atomic({**head, "shards": names}, d / SHARED_FILE)
    for f in d.glob("shard-*.pt"):
        if f.name not in names:
            f.unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # the checkpoint's files are never rewritten in place: sharing them is safe
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _shard_files(path: fsio.AnyPath) -> tuple[dict, list]:
    shared = safe_load(path / SHARED_FILE)
    if shared.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: format {shared.get('format')!r}, this code reads {FORMAT}")
    files = [path / name for name in shared["shards"]]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: shard file {f.name} is missing")
    return shared, files


def _mapped(f: fsio.AnyPath) -> dict:
    """A shard file's ``{model_id: state}``; memory-mapped when local (only what is read is paged in)."""
    if isinstance(f, fsio.RemotePath):
        return shard_states(safe_load(f))
    try:
        return shard_states(torch.load(f, weights_only=True, mmap=True, map_location="cpu"))
    except Exception:  # noqa: BLE001 - safe_load names the file and the reason
        return shard_states(safe_load(f))


def _sources_in(path: Path, fd: int, loaded) -> dict[int, tuple[int, int]] | None:
    """``{data_ptr: (fd, offset)}`` of every tensor of ``loaded`` (all of ``path`` read memory-mapped, as
    ``_mapped`` does) in the file; None when they are not views of its mapping (it was read whole)."""
    storages = {}
    for t, _ in _tensor_pairs(loaded, loaded):
        st = t.untyped_storage()
        storages.setdefault(st._cdata, st)
    try:
        offsets = record_offsets(path, list(storages.values()))
    except RuntimeError:
        return None
    return {st.data_ptr(): (fd, off) for st, off in zip(storages.values(), offsets) if st.nbytes()}


def read_thetas(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every model's theta of a sharded checkpoint directory, one shard file at a time, reading
    nothing else of them (memory: N x d, whatever the size of the V maps and optimiser state)."""
    _, files = _shard_files(fsio.as_path(path))
    thetas: dict[str, torch.Tensor] = {}
    for f in files:
        thetas.update({m: s["theta"].clone() for m, s in _mapped(f).items()})
    return thetas


def read_model_state(path: str | os.PathLike) -> tuple[dict, dict[str, dict]]:
    """(shared meta-model weights, {model_id: {"theta", "maps"}}) of a meta run's checkpoint: a
    sharded directory, or the merged ``checkpoint.pt`` of runs written before; no optimiser state."""
    where = fsio.as_path(path)
    if where.is_file():
        state = load(where)
        return state["meta"], {m: {"theta": s["theta"], "maps": s["maps"]} for m, s in state["shard"].items()}
    if not (where / SHARED_FILE).is_file():
        raise FileNotFoundError(f"meta run checkpoint not found: {where} (no {SHARED_FILE})")
    shared, files = _shard_files(where)
    per_model: dict[str, dict] = {}
    for f in files:
        per_model.update({m: {"theta": s["theta"].clone(), "maps": {k: v.clone() for k, v in s["maps"].items()}}
                          for m, s in _mapped(f).items()})
    missing = sorted(set(shared["model_ids"]) - set(per_model))
    if missing:
        raise ValueError(f"checkpoint {where} lacks theta/V of models {missing[:5]}")
    return shared["meta"], per_model


def write_inference_copy(source: str | os.PathLike, dest: str | os.PathLike) -> None:
    """``source``'s checkpoint without optimiser state in ``dest`` (the MLflow Model's copy), one
    shard file at a time."""
    src, d = fsio.as_path(source), Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    if src.is_file():  # a merged checkpoint.pt of an earlier run
        meta, per_model = read_model_state(src)
        state = {"step": load(src)["step"], "meta": meta, "opt_meta": {}, "shard": per_model}
        write_run_checkpoint(d, state=state)
        return
    shared, files = _shard_files(src)
    from .model import TableStates

    for f in files:
        states = _mapped(f)
        if not isinstance(states, TableStates):  # per-model shards of earlier runs
            save_atomic({m: {"theta": s["theta"], "maps": s["maps"]} for m, s in states.items()}, d / f.name)
            continue
        keep = states.without_moments()
        with contextlib.ExitStack() as stack:
            sources = None
            if not isinstance(f, fsio.RemotePath):  # the tables are copied out of the shard file, file to file
                fd = os.open(f, os.O_RDONLY)
                stack.callback(os.close, fd)
                sources = _sources_in(f, fd, states.raw)
            save_atomic(keep, d / f.name, sources)
    save_atomic({k: v for k, v in shared.items() if k not in ("opt_meta", "history")}, d / SHARED_FILE)
