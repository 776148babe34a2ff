"""Ray job: train the DYNAMO meta-model with Ray Train (theta/V sharded across workers).

    ray job submit --working-dir . -- python jobs/train_meta.py --config configs/demo.yaml \
        --set meta.num_workers=4
    python jobs/train_meta.py --recipe smoke            # Ray starts in-process

Flags as ``dynamo-dist meta``: --config / --recipe / --set KEY=VALUE / --address.
Re-running with the same meta.output_dir resumes from that run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from dynamo_dist.cli import load_pipeline
from dynamo_dist.meta_ray import run_meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="pipeline YAML config (see configs/)")
    ap.add_argument("--recipe", help="built-in recipe: demo | smoke | paper (default demo)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a dotted field, e.g. meta.num_workers=2 or meta.steps=500")
    ap.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else in-process Ray)")
    args = ap.parse_args(argv)
    try:
        summary = run_meta(load_pipeline(args).meta, address=args.address)
    except (ValueError, FileNotFoundError) as err:
        print(f"train_meta: error: {err}", file=sys.stderr)
        return 2
    print(f"embedded {summary['num_models']} models with {summary['num_workers']} workers: "
          f"agreement {summary.get('mean_agreement', float('nan')):.3f}, "
          f"hidden R2 {summary.get('mean_hidden_r2', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
