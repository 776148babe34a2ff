"""Ray job: Ray Tune sweep of the meta-model over lambda, d and the hidden distance.

    ray job submit --working-dir . -- python jobs/sweep_meta.py --config configs/demo.yaml \
        --tracking-uri http://mlflow.internal:5000
    python jobs/sweep_meta.py --recipe demo --set sweep.scheduler=asha   # Ray starts in-process

Flags as ``dynamo-dist sweep``: --config / --recipe / --set KEY=VALUE / --address, plus
--tracking-uri (overrides meta.tracking_uri; default: SQLite under the run directory).
The grid comes from the config's ``sweep`` section (defaults: SweepConfig).
"""

from __future__ import annotations

import argparse
import sys

from dynamo_dist.cli import add_common_args, load_pipeline
from dynamo_dist.config import SweepConfig
from dynamo_dist.meta.tune import run_sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (http://host:port for a tracking server)")
    args = ap.parse_args(argv)
    try:
        cfg = load_pipeline(args)
        meta = cfg.meta.replace(tracking_uri=args.tracking_uri) if args.tracking_uri else cfg.meta
        table = run_sweep(meta, cfg.sweep or SweepConfig(), cfg.run_dir, address=args.address)
    except (ValueError, FileNotFoundError) as err:
        print(f"sweep_meta: error: {err}", file=sys.stderr)
        return 2
    best = table[0]
    print(f"{len(table)} trials; best: {best['trial']} ({best['mlflow_run_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
