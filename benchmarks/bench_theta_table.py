"""Memory and time of one worker's theta/V state against the number of models it holds.

For each ``--checkout NAME=PATH[@TABLE_MB]`` (a source tree of dynamo_dist; ``.`` = this one;
``@TABLE_MB``: its ``memory_bytes`` in MiB, V's tables beyond it memory-mapped files), a fresh
process builds the ``ModelEmbeddings`` of ``--models`` RNN models (``--meta-hidden`` ->
``--base-hidden`` maps, d = ``--embedding-dim``) or, with ``--family cnn``, CNN models with a 1x1
conv map per tap of ``--tap-widths`` (resnet18's 64 128 256 512 by default: ~1.4 MB of V a model),
then updates every model once, 4 models a step,
as that checkout's trainer does (a row-sparse step on stacked tables where ``adam_step`` exists;
before that, ``torch.optim.AdamW`` over a Parameter per model with its param group narrowed to
the step's models), then writes the shard of a checkpoint as that trainer does. Measured, from
/proc (VmRSS, VmHWM) after the imports:

* ``build_mb``, ``updated_mb``: resident memory added by building, and after every model has
  AdamW moments; ``updated_anon_mb``, ``peak_anon_mb``: the anonymous part of it (RssAnon, what the
  OS cannot page out to a file), after the updates and at its highest (sampled each step and around
  the checkpoint);
* ``checkpoint_peak_mb``: the peak above the updated state while the shard is made and saved
  (VmHWM, reset after the updates);
* ``update_ms``: mean wall time of one 4-model optimiser step (backward not included);
* ``shard_mb``, ``checkpoint_seconds``: the shard file and the time to make and save it.

    python benchmarks/bench_theta_table.py --models 5000 --checkout before=/tmp/before --checkout after=.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _mem() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def child(args) -> dict:
    import torch

    from dynamo_dist.meta.model import ModelEmbeddings

    torch.set_num_threads(1)
    n = args.models
    start = _mem()
    base, base_anon, peak_anon = start["VmRSS"], start["RssAnon"], start["RssAnon"]
    if args.family == "cnn":
        meta_dims, base_dims = args.tap_widths, [args.tap_widths] * n
        h = [torch.ones(2, w, 1, 1) for w in args.tap_widths]
    else:
        meta_dims, base_dims = [args.meta_hidden], [[args.base_hidden]] * n
        h = [torch.ones(2, args.meta_hidden)]
    budget = {} if args.table_mb is None else {"memory_bytes": int(args.table_mb * 2 ** 20)}
    emb = ModelEmbeddings([f"m{i:05d}" for i in range(n)], args.embedding_dim, meta_dims, base_dims, args.family,
                          **budget)
    built = _mem()["VmRSS"]
    tables = hasattr(emb, "adam_step")
    if not tables:
        opt = torch.optim.AdamW(emb.parameters(), lr=1e-3, weight_decay=0.0)
        group = opt.param_groups[0]
        all_params = group["params"]
    seconds = 0.0
    for start in range(0, n, 4):
        rows = list(range(start, min(start + 4, n)))
        loss = emb.theta_rows(rows).sum() + sum(o.sum() for r in rows for o in emb.apply_maps(r, h))
        loss.backward()
        t = time.perf_counter()
        if tables:
            emb.adam_step(rows, 1e-3)
        else:
            sampled = [p for r in rows for p in emb.parameters_of(r)]
            group["params"] = sampled
            opt.step()
            group["params"] = all_params
            for p in sampled:
                p.grad = None
        seconds += time.perf_counter() - t
        peak_anon = max(peak_anon, _mem()["RssAnon"])
    updated = _mem()
    # the peak from here on is the checkpoint's alone (the build's, e.g. initialising 256 rows of V
    # in the files between page-outs, is not counted): writing 5 to clear_refs resets VmHWM to VmRSS
    Path("/proc/self/clear_refs").write_text("5")
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        if tables:
            from dynamo_dist.meta import checkpoint, model

            files = getattr(emb, "table_files", dict)()  # as that checkout's worker writes it
            checkpoint.write_shard(d, 0, model.TableStates(emb.table_state(copy=False)), **({"files": files} if files else {}))
            peak_anon = max(peak_anon, _mem()["RssAnon"])
            getattr(emb, "page_out", lambda: None)()  # as the worker does after a checkpoint
        else:
            pstate = opt.state
            shard = {m: {"theta": emb.theta[i].detach().clone(),
                         "maps": {k: v.detach().clone() for k, v in emb.maps[i].state_dict().items()},
                         "opt": [{k: v.clone() for k, v in pstate[p].items()} if p in pstate else None
                                 for p in emb.parameters_of(i)]}
                     for m, i in emb.index.items()}
            torch.save(shard, Path(d) / "shard-0.pt")
            del shard
        ckpt_seconds = time.perf_counter() - t
        shard_mb = (Path(d) / "shard-0.pt").stat().st_size / 2 ** 20
    end = _mem()
    peak = end["VmHWM"]
    return {"tables": tables, "on_disk": bool(getattr(emb, "on_disk", False)),
            "build_mb": built - base, "updated_mb": updated["VmRSS"] - base,
            "updated_anon_mb": updated["RssAnon"] - base_anon, "peak_anon_mb": max(peak_anon, end["RssAnon"]) - base_anon,
            "after_checkpoint_mb": end["VmRSS"] - base,
            "checkpoint_peak_mb": peak - updated["VmRSS"], "update_ms": 1e3 * seconds / -(-n // 4),
            "shard_mb": shard_mb, "checkpoint_seconds": ckpt_seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=5000)
    ap.add_argument("--meta-hidden", type=int, default=32)
    ap.add_argument("--base-hidden", type=int, default=16)
    ap.add_argument("--embedding-dim", type=int, default=4)
    ap.add_argument("--family", choices=("rnn", "cnn"), default="rnn")
    ap.add_argument("--tap-widths", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--table-mb", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--checkout", action="append", default=[], metavar="NAME=PATH[@TABLE_MB]")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "theta_table.json"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    checkouts = [c.split("=", 1) for c in args.checkout] or [["this", "."]]
    runs = {}
    for name, spec in checkouts:
        path, _, table_mb = spec.partition("@")
        env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
        cmd = [sys.executable, __file__, "--child", "--models", str(args.models), "--meta-hidden",
               str(args.meta_hidden), "--base-hidden", str(args.base_hidden), "--embedding-dim", str(args.embedding_dim),
               "--family", args.family, "--tap-widths", *map(str, args.tap_widths),
               *(["--table-mb", table_mb] if table_mb else [])]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, json.dumps(runs[name]), flush=True)
    doc = {"what": "one worker's theta/V state: memory and optimiser time per checkout",
           "command": "python benchmarks/bench_theta_table.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "models": args.models, "family": args.family, "runs": runs}
    if len(runs) == 2:
        (_, a), (_, b) = runs.items()
        doc["ratios_second_over_first"] = {k: b[k] / a[k] for k in a if isinstance(a[k], float) and a[k]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
